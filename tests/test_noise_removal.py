"""Noise removal after the ancestral sampler: MDLM's, and the last-step argmax hf_mdm used to call by that name.

MDLM (`Diffusion._sample`, `sampling.noise_removal: True`, its default) samples every step of the grid
torch.linspace(1, eps, steps + 1) with eps = 1e-5, then makes ONE more network call at t = eps whose argmax fills
only the positions still masked. "last_step_argmax" runs the grid down to 0 and replaces its last step (which
would unmask everything left) by an argmax at every position still masked.

For the oracle of `oracle.py` (4 positions, 3 tokens, exact conditionals) the law of the final sequence of each
procedure is computed exactly: the distribution over the 256 partly masked states is pushed through each step's
transition matrix (every masked position independently unmasks with probability (alpha_s - alpha_t) / (1 - alpha_t),
to a token drawn from the oracle's conditional given the current state), and through the argmax map at the end.
Samples from generate() must match their own law (chi-square p > 1e-3) and visibly miss the other one (p < 1e-6),
with fixed seeds.
"""

import numpy as np
import pytest
import torch
from scipy import stats

from hf_mdm.sampling_mdm import (
    MDLM_NOISE_REMOVAL_TIME,
    AncestralSampler,
    CategoricalSampler,
    DiffusionState,
    get_noise_schedule,
)

from oracle import ALL_INPUTS, LENGTH, MASK, SEQUENCES, TOKENS, OracleDenoiser, oracle_config, sequence_index


SAMPLES = 20_000
STEPS = 8  # few steps, so that many positions are still masked before the last one and the procedures differ
PVALUE_MATCH, PVALUE_MISMATCH = 1e-3, 1e-6


@pytest.fixture(scope="module")
def oracle():
    return OracleDenoiser(oracle_config()).eval()


def state_index(states: torch.Tensor) -> torch.Tensor:
    """(N, 4) partly masked states -> their row in ALL_INPUTS (base 4, first position most significant)."""
    return (states * (TOKENS + 1) ** torch.arange(LENGTH - 1, -1, -1)).sum(-1)


def conditionals(oracle) -> torch.Tensor:
    """(256, 4, 3) float64: p(x0_l = v | state), the oracle's predictions for every partly masked state."""
    with torch.no_grad():
        logits = oracle.conditional_logits(ALL_INPUTS, oracle.joint.expand(len(ALL_INPUTS), -1))
    return torch.softmax(logits[..., :TOKENS], dim=-1)


def step_matrix(p: torch.Tensor, unmask: float) -> torch.Tensor:
    """(256, 256) transition of one ancestral step in which each masked position unmasks with probability `unmask`."""
    masked = ALL_INPUTS == MASK  # (256, 4)
    per_position = torch.zeros(len(ALL_INPUTS), LENGTH, TOKENS + 1, dtype=torch.float64)
    per_position[..., :TOKENS] = unmask * p
    per_position[..., MASK] = 1 - unmask
    visible = torch.nn.functional.one_hot(ALL_INPUTS.clamp(max=TOKENS), TOKENS + 1).double()
    per_position = torch.where(masked[..., None], per_position, visible)
    a, b, c, d = per_position.unbind(1)
    return torch.einsum("xa,xb,xc,xd->xabcd", a, b, c, d).reshape(len(ALL_INPUTS), -1)


def argmax_map(p: torch.Tensor) -> torch.Tensor:
    """(256, 256) the deterministic map that fills every masked position with its argmax token (one network call)."""
    filled = torch.where(ALL_INPUTS == MASK, p.argmax(-1), ALL_INPUTS)
    return torch.nn.functional.one_hot(state_index(filled), len(ALL_INPUTS)).double()


def exact_law(oracle, steps: int, noise_removal=None, final_time: float = MDLM_NOISE_REMOVAL_TIME) -> torch.Tensor:
    """(81,) the exact law of the final sequence for the ancestral sampler on `steps` uniform steps."""
    schedule = get_noise_schedule(oracle.config.noise_schedule, oracle.config.noise_eps)
    p = conditionals(oracle)
    end = final_time if noise_removal == "mdlm" else 0.0
    grid = [1 - (1 - end) * k / steps for k in range(steps + 1)]
    grid[-1] = end
    law = torch.zeros(len(ALL_INPUTS), dtype=torch.float64)
    law[state_index(torch.full((1, LENGTH), MASK))] = 1.0
    for k in range(steps):
        alpha_t, alpha_s = (float(schedule.alpha(torch.tensor(x, dtype=torch.float64))) for x in grid[k : k + 2])
        if noise_removal == "last_step_argmax" and k == steps - 1:
            law = law @ argmax_map(p)
        else:
            law = law @ step_matrix(p, (alpha_s - alpha_t) / (1 - alpha_t))
    if noise_removal == "mdlm":
        law = law @ argmax_map(p)
    clean = state_index(SEQUENCES)
    assert abs(float(law[clean].sum()) - 1) < 1e-12  # nothing is left masked
    return law[clean]


def law_pvalue(samples: torch.Tensor, law: torch.Tensor) -> float:
    """Chi-square p-value of samples (N, 4) against a law over the 81 sequences; cells expected below 5 are pooled.
    A sample the law says is impossible gives p = 0."""
    counts = torch.bincount(sequence_index(samples), minlength=len(SEQUENCES)).double().numpy()
    expected = law.numpy() * len(samples)
    if counts[expected == 0].sum() > 0:
        return 0.0
    big = expected >= 5
    observed = np.append(counts[big], counts[~big].sum())
    predicted = np.append(expected[big], expected[~big].sum())
    keep = predicted > 0
    return float(stats.chisquare(observed[keep], predicted[keep] * observed[keep].sum() / predicted[keep].sum()).pvalue)


PVALUES = {}


@pytest.fixture(scope="module", autouse=True)
def report_pvalues():
    yield
    if PVALUES:
        print("\nnoise removal, chi-square p-values against each exact law (20k samples, 8 steps):")
        for case, value in PVALUES.items():
            print(f"  {case:70s} {value:.3g}")


@pytest.mark.parametrize("sampler", ["ancestral", "ancestral_cache"])
@pytest.mark.parametrize("mode, other", [("mdlm", "last_step_argmax"), ("last_step_argmax", "mdlm"), (None, "last_step_argmax")],
                         ids=["mdlm", "last_step_argmax", "none"])
def test_each_noise_removal_samples_its_exact_law(oracle, sampler, mode, other):
    out = oracle.generate(max_new_tokens=LENGTH, num_return_sequences=SAMPLES, sampler=sampler, steps=STEPS,
                          noise_removal=mode or False, generator=torch.Generator().manual_seed(0),
                          return_dict_in_generate=True)
    assert (out.sequences != MASK).all()
    own, wrong = law_pvalue(out.sequences, exact_law(oracle, STEPS, mode)), law_pvalue(out.sequences, exact_law(oracle, STEPS, other))
    PVALUES[f"{sampler}, noise_removal={mode}: own law"] = own
    PVALUES[f"{sampler}, noise_removal={mode}: law of {other}"] = wrong
    assert own > PVALUE_MATCH
    assert wrong < PVALUE_MISMATCH
    if mode == "mdlm":
        assert out.nfe <= STEPS + 1 and generate_steps_unchanged(oracle)


def generate_steps_unchanged(oracle) -> bool:
    """noise_removal=True is MDLM's: the same samples as noise_removal="mdlm" for the same seed."""
    kwargs = dict(max_new_tokens=LENGTH, num_return_sequences=500, sampler="ancestral", steps=STEPS)
    a = oracle.generate(noise_removal=True, generator=torch.Generator().manual_seed(3), **kwargs)
    b = oracle.generate(noise_removal="mdlm", generator=torch.Generator().manual_seed(3), **kwargs)
    return torch.equal(a, b)


def run_sampler(oracle, sampler: AncestralSampler, samples: int, record=None) -> torch.Tensor:
    """Steps a sampler built by hand on the oracle (as generate() would), optionally recording each call."""
    tokens = torch.full((samples, LENGTH), MASK)
    state = DiffusionState.start(tokens, torch.ones(samples, LENGTH, dtype=torch.bool))

    def denoise(rows, row_tokens, positions, times, windows=None):
        if record is not None:
            record.append((rows.clone(), times.clone(), row_tokens.clone()))
        logits = oracle(row_tokens).logits
        return logits if positions is None else logits.gather(1, positions[..., None].expand(-1, -1, logits.shape[-1]))

    for _ in range(sampler.step_limit(state)):
        if state.done:
            break
        state = sampler.step(state, denoise)
    assert state.done
    return state.tokens


def test_mdlm_noise_removal_fills_only_what_is_still_masked_at_its_final_time(oracle):
    """With the grid stopped at t = 0.25, a quarter of the positions are still masked: the extra call's argmax must
    fill exactly those, from the network at t = 0.25, and the law is the exact one (not plain ancestral's)."""
    schedule = get_noise_schedule("loglinear", 1e-3)
    record = []
    sampler = AncestralSampler(schedule=schedule, categorical=CategoricalSampler(generator=torch.Generator().manual_seed(1), mask_token_id=MASK),
                               steps=STEPS, noise_removal="mdlm", mask_token_id=MASK, final_time=0.25)
    samples = run_sampler(oracle, sampler, SAMPLES, record)
    assert len(record) == STEPS + 1  # the grid, then one argmax call
    rows, times, before = record[-1]
    assert torch.allclose(times, torch.full_like(times, 0.25))
    still_masked = before == MASK
    assert bool(still_masked.any(dim=1).all())  # only rows with positions left take part
    assert 0.22 < still_masked.sum().item() / (SAMPLES * LENGTH) < 0.28  # (1 - alpha(0.25)) / (1 - alpha(1))
    assert torch.equal(samples[rows][~still_masked], before[~still_masked])  # unmasked positions carried over
    p = conditionals(oracle)[state_index(before)]  # (rows, 4, 3)
    assert torch.equal(samples[rows][still_masked], p.argmax(-1)[still_masked])
    own = law_pvalue(samples, exact_law(oracle, STEPS, "mdlm", final_time=0.25))
    plain = law_pvalue(samples, exact_law(oracle, STEPS, None))
    PVALUES["final_time=0.25, mdlm: own law"], PVALUES["final_time=0.25, mdlm: plain ancestral law"] = own, plain
    assert own > PVALUE_MATCH and plain < PVALUE_MISMATCH


def test_the_grid_ends_at_mdlms_eps_and_the_extra_call_sees_it():
    """MDLM's grid, linspace(1, 1e-5, steps + 1), with the times a network is asked about; the argmax call only
    happens for rows with positions left, and a time-conditioned network is asked at t = 1e-5 (sigma(1e-5))."""
    schedule = get_noise_schedule("loglinear", 1e-3)
    seen = []

    def denoise(rows, row_tokens, positions, times, windows=None):
        seen.append(times.clone())
        logits = torch.zeros(len(rows), row_tokens.shape[1], 4, dtype=torch.float64)
        logits[..., 0] = 5.0  # token 0 is the argmax
        return logits

    sampler = AncestralSampler(schedule=schedule, categorical=CategoricalSampler(generator=torch.Generator().manual_seed(0), mask_token_id=3),
                               steps=4, noise_removal="mdlm", mask_token_id=3)
    state = DiffusionState.start(torch.full((2, 3), 3), torch.ones(2, 3, dtype=torch.bool))
    grid = torch.linspace(1, MDLM_NOISE_REMOVAL_TIME, 5, dtype=torch.float64)
    for k in range(4):
        state = sampler.step(state, denoise)
        torch.testing.assert_close(seen[k], grid[k].expand(len(seen[k])), rtol=0, atol=1e-12)
    # As if row 0 had run its whole grid with a position left masked (at eps that happens about 3e-5 of the time).
    state.masked[0, 1], state.tokens[0, 1], state.block_step[0] = True, 3, 4
    state = sampler.step(state, denoise)
    assert len(seen) == 5 and len(seen[-1]) == 1  # one extra call, for row 0 alone
    torch.testing.assert_close(seen[-1], torch.tensor([MDLM_NOISE_REMOVAL_TIME], dtype=torch.float64), rtol=0, atol=1e-12)
    assert state.done and int(state.tokens[0, 1]) == 0
    assert sampler.step_limit(DiffusionState.start(torch.full((1, 3), 3), torch.ones(1, 3, dtype=torch.bool))) == 5


def test_noise_removal_values_are_validated():
    from hf_mdm import MDMGenerationConfig

    for value in (False, True, "mdlm", "last_step_argmax"):
        assert MDMGenerationConfig(sampler="ancestral", noise_removal=value).noise_removal == value
    for value in ("argmax", 1, None):
        with pytest.raises(ValueError, match=r"noise_removal must be one of \(False, True, 'mdlm', 'last_step_argmax'\)"):
            MDMGenerationConfig(sampler="ancestral", noise_removal=value)
