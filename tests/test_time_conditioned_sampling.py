"""Exact first-hitting sampling for time-conditioned networks (docs/concepts/first-hitting.md).

For a network that reads the noise level, the distribution of the final sequences is not the model's joint at
any single time: it is defined by the reverse process itself, in which a masked position unmasks at time tau
with the network's prediction at tau. Many-step ancestral sampling in float64 approximates that process (its
error shrinks like 1/steps); the first-hitting sampler (FHS) draws it exactly, provided the network sees each
row's new time tau at every step. So FHS and 500-step float64 ancestral must agree (two-sample chi-square), and
an FHS that feeds the wrong time (a constant, or the time before the jump) must visibly disagree.

The oracle: sequences of 4 tokens over 3 values; its joint at noise level sigma is the mixture
alpha * A + (1 - alpha) * B with alpha = exp(-sigma) the clean fraction, A favouring equal neighbours and B
unequal ones, so early steps (t near 1) follow B and late steps A.
"""

import numpy as np
import pytest
import torch
from scipy import stats
from transformers.modeling_outputs import MaskedLMOutput

from hf_mdm.sampling_mdm import CategoricalSampler, DiffusionState, build_strategy, get_noise_schedule

from oracle import ALL_INPUTS, LENGTH, MASK, SEQUENCES, TOKENS, OracleDenoiser, correlated_joint, oracle_config, sequence_index


SAMPLES = 20_000
# The ancestral sampler's discretisation error at 500 steps, computed exactly for this oracle by propagating the
# distribution over its 256 partly masked states: total variation 9e-4 from the continuous-time process (4.5e-4
# at 1000 steps), far below what 20k samples resolve (about 0.03). 500 steps keep the test near 60 s on 2 cores.
ANCESTRAL_STEPS = 500
SIGMA_AT_T1 = float(-np.log(1e-3))  # total noise at t = 1 for MDLM's log-linear schedule (eps = 1e-3)


def anticorrelated_joint(seed: int = 5) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    base = torch.rand(len(SEQUENCES), generator=generator, dtype=torch.float64) + 0.5
    equal_neighbours = (SEQUENCES[:, 1:] == SEQUENCES[:, :-1]).sum(1).double()
    twos = (SEQUENCES == 2).sum(1).double()
    joint = base * torch.exp(-1.5 * equal_neighbours + 0.8 * twos)
    return joint / joint.sum()


JOINT_CLEAN, JOINT_NOISY = correlated_joint(0), anticorrelated_joint()


def mixture_joint(timesteps: torch.Tensor) -> torch.Tensor:
    """(B,) noise levels sigma -> (B, 81) joints: alpha * A + (1 - alpha) * B with alpha = exp(-sigma)."""
    alpha = torch.exp(-timesteps.double())[:, None]
    return alpha * JOINT_CLEAN + (1 - alpha) * JOINT_NOISY


class MixtureOracle(OracleDenoiser):
    """The time-conditioned oracle. A call whose rows share a few times (ancestral steps share one) is answered from
    a table of the 256 partly masked inputs: the conditionals of a mixture joint are ratios of mixtures of the
    two joints' marginals, so the table costs next to nothing and 500 ancestral steps over 20k sequences stay
    fast. Rows with many distinct times (first-hitting) go through OracleDenoiser unchanged."""

    def __init__(self):
        super().__init__(oracle_config(time_conditioning=True), time_joint=mixture_joint)
        self.eval()
        self.last_timesteps = None
        visible = ALL_INPUTS != MASK
        consistent = ((ALL_INPUTS[:, None, :] == SEQUENCES[None]) | ~visible[:, None, :]).all(-1).double()  # (256, 81)
        onehot = torch.nn.functional.one_hot(SEQUENCES, TOKENS).double().reshape(len(SEQUENCES), -1)  # (81, L * 3)
        self.marginals = [(consistent * joint) @ onehot for joint in (JOINT_CLEAN, JOINT_NOISY)]  # unnormalised

    def table(self, sigma: torch.Tensor) -> torch.Tensor:
        """(256, L, 4) logits of every partly masked input at noise level sigma (a 0-d tensor)."""
        alpha = torch.exp(-sigma.double())
        marginals = (alpha * self.marginals[0] + (1 - alpha) * self.marginals[1]).view(-1, LENGTH, TOKENS)
        marginals = marginals / marginals.sum(-1, keepdim=True)
        mask_column = torch.full((len(ALL_INPUTS), LENGTH, 1), float("-inf"), dtype=torch.float64)
        return torch.cat([marginals.log(), mask_column], -1)

    def forward(self, input_ids, attention_mask=None, timesteps=None, output_positions=None, **kwargs):
        self.last_timesteps = timesteps.clone()
        times, inverse = torch.unique(timesteps, return_inverse=True)
        if len(times) > 4:
            return super().forward(input_ids, attention_mask, timesteps, output_positions, **kwargs)
        tables = torch.stack([self.table(time) for time in times])  # (times, 256, L, 4)
        index = (input_ids * (TOKENS + 1) ** torch.arange(LENGTH - 1, -1, -1)).sum(-1)
        logits = tables[inverse, index]
        if output_positions is not None:
            logits = logits.gather(1, output_positions[..., None].expand(-1, -1, TOKENS + 1))
        return MaskedLMOutput(logits=logits.float())


class ConstantTimeOracle(MixtureOracle):
    """A sampler that never updates the time it feeds the network: always sigma(1)."""

    def forward(self, input_ids, attention_mask=None, timesteps=None, output_positions=None, **kwargs):
        constant = torch.full_like(timesteps, SIGMA_AT_T1)
        return super().forward(input_ids, attention_mask, constant, output_positions, **kwargs)


def counts(samples: torch.Tensor) -> np.ndarray:
    return torch.bincount(sequence_index(samples), minlength=len(SEQUENCES)).numpy()


def two_sample_pvalue(a: torch.Tensor, b: torch.Tensor) -> float:
    """Chi-square test that two sets of samples come from the same distribution over the 81 sequences."""
    table = np.stack([counts(a), counts(b)])
    return stats.chi2_contingency(table[:, table.sum(0) > 0]).pvalue


@pytest.fixture(scope="module")
def ancestral_samples():
    out = MixtureOracle().generate(max_new_tokens=LENGTH, num_return_sequences=SAMPLES, sampler="ancestral",
                                   steps=ANCESTRAL_STEPS, sampling_dtype="float64",
                                   generator=torch.Generator().manual_seed(1))
    assert (out != MASK).all()
    return out


def test_first_hitting_matches_many_step_ancestral(ancestral_samples):
    oracle = MixtureOracle()
    out = oracle.generate(max_new_tokens=LENGTH, num_return_sequences=SAMPLES, generator=torch.Generator().manual_seed(0),
                          return_dict_in_generate=True)
    assert out.nfe == LENGTH and (out.sequences != MASK).all()
    assert two_sample_pvalue(out.sequences, ancestral_samples) > 1e-3
    # The target is the reverse process, not the joint at any single time: no mixture weight fits the samples
    # (the exact reverse-process distribution is at total variation >= 0.068 from every one of them).
    for alpha in torch.linspace(0, 1, 101, dtype=torch.float64):
        joint = alpha * JOINT_CLEAN + (1 - alpha) * JOINT_NOISY
        assert stats.chisquare(counts(out.sequences), (joint * SAMPLES).numpy()).pvalue < 1e-6


def test_first_hitting_that_ignores_time_fails(ancestral_samples):
    ignoring = ConstantTimeOracle().generate(max_new_tokens=LENGTH, num_return_sequences=SAMPLES,
                                             generator=torch.Generator().manual_seed(2))
    assert two_sample_pvalue(ignoring, ancestral_samples) < 1e-3


def test_first_hitting_with_the_time_before_the_jump_fails(ancestral_samples):
    """Feeding each step the row's previous time (rather than the new first-hitting time tau) is wrong too."""
    oracle, schedule = MixtureOracle(), get_noise_schedule("loglinear", 1e-3)
    generator = torch.Generator().manual_seed(3)
    sampler = build_strategy("first_hitting", schedule=schedule, categorical=CategoricalSampler(torch.float64, generator=generator),
                             mask_token_id=MASK)
    tokens = torch.full((SAMPLES, LENGTH), MASK)
    state = DiffusionState.start(tokens, tokens == MASK)
    while not state.done:
        previous_time = state.time.clone()

        def stale_denoise(rows, row_tokens, positions, times, window=None):
            sigma = schedule.total_noise(previous_time[rows]).float()
            return oracle(row_tokens, timesteps=sigma, output_positions=positions).logits

        state = sampler.step(state, stale_denoise)
    assert two_sample_pvalue(state.tokens, ancestral_samples) < 1e-3


def test_network_sees_each_rows_new_time():
    """Every call gets, per row, sigma(tau) for the tau that row has just jumped to; the times decrease."""
    oracle, schedule = MixtureOracle(), get_noise_schedule("loglinear", 1e-3)
    generator = torch.Generator().manual_seed(4)
    sampler = build_strategy("first_hitting", schedule=schedule, categorical=CategoricalSampler(torch.float64, generator=generator),
                             mask_token_id=MASK)
    tokens = torch.full((64, LENGTH), MASK)
    tokens[:32, 0] = 1  # rows with different numbers of masked positions finish at different steps
    state = DiffusionState.start(tokens, tokens == MASK)
    while not state.done:
        seen = {}

        def denoise(rows, row_tokens, positions, times, window=None):
            seen.update(rows=rows, times=times.clone())
            sigma = schedule.total_noise(times).float()
            return oracle(row_tokens, timesteps=sigma, output_positions=positions).logits

        before = state.time.clone()
        state = sampler.step(state, denoise)
        rows = seen["rows"]
        torch.testing.assert_close(seen["times"], state.time[rows], rtol=0, atol=0)
        assert (state.time[rows] < before[rows]).all()
        torch.testing.assert_close(oracle.last_timesteps, schedule.total_noise(state.time[rows]).float(), rtol=0, atol=0)


def test_mixture_oracle_table_is_the_oracle():
    oracle = MixtureOracle()
    for sigma in (0.0, 0.37, 2.5, SIGMA_AT_T1):
        expected = OracleDenoiser.conditional_logits(ALL_INPUTS, mixture_joint(torch.tensor([sigma])).expand(len(ALL_INPUTS), -1))
        torch.testing.assert_close(oracle.table(torch.tensor(sigma)), expected, rtol=1e-12, atol=1e-12)
