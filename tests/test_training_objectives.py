"""The training objectives and the validation estimate, tested against oracles.

Oracle: a network that puts equal mass on the K real tokens has cross-entropy log K at every masked position,
so the NELBO per token is log K * integral of -alpha'_t dt = log K * (alpha_{t_min} - alpha_1) for every schedule,
and exactly log K for every single row of the discrete form.
"""

import math

import pytest
import torch
from transformers.modeling_outputs import MaskedLMOutput

from hf_mdm import MDMConfig
from hf_mdm.sampling_mdm import get_noise_schedule
from hf_mdm.training import objectives
from hf_mdm.training.objectives import (T_MIN, antithetic_times, continuous_count_weights, draw_noise, get_objective,
                                        validation_loss, validation_nelbo)

from conftest import tiny_config, tiny_model
from oracle import LENGTH, MASK, SEQUENCES, OracleDenoiser, oracle_config
from training_scripts.common import one_thread_and_fresh_accelerate_state  # noqa: F401 (autouse fixture)


class UniformModel(torch.nn.Module):
    """Equal logits over the real tokens, -inf for [MASK]; records the timesteps it was given."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.timesteps = []

    def forward(self, input_ids, timesteps=None):
        self.timesteps.append(timesteps)
        logits = torch.zeros(*input_ids.shape, self.config.vocab_size) + self.weight
        logits[..., self.config.mask_token_id] = float("-inf")
        return MaskedLMOutput(logits=logits)


def random_blocks(config, batch, seq_len, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, config.mask_token_id, (batch, seq_len), generator=generator)


def test_antithetic_times_put_one_time_in_each_stratum():
    for u in (0.0, 0.37, 0.999):
        times = antithetic_times(u, 16)
        assert torch.equal(torch.sort(times).values.mul(16).floor(), torch.arange(16, dtype=torch.float64))
    noise = draw_noise(torch.Generator().manual_seed(3), 8, 5)
    assert noise.times.shape == (8,) and noise.uniforms.shape == (8, 5)
    assert torch.equal(noise[2:4].times, noise.times[2:4])


@pytest.mark.parametrize("schedule", ["linear", "loglinear", "cosine"])
def test_continuous_nelbo_of_uniform_model_is_log_k(schedule):
    config = tiny_config(noise_schedule=schedule)
    model, objective = UniformModel(config), get_objective("mdm", config)
    input_ids = random_blocks(config, 1024, 32)
    losses = objective.sequence_losses(model, input_ids, draw_noise(torch.Generator().manual_seed(0), 1024, 32))
    alpha = get_noise_schedule(schedule, config.noise_eps).alpha
    expected = math.log(config.vocab_size - 1) * float(alpha(torch.tensor(T_MIN)) - alpha(torch.tensor(1.0)))
    assert losses.shape == (1024,)
    assert losses.mean().item() == pytest.approx(expected, rel=0.02)
    assert model.timesteps == [None]  # time-agnostic network: no time input


def test_discrete_nelbo_masks_exactly_n_stratified_positions():
    config = tiny_config()
    model, objective = UniformModel(config), get_objective("mdm-discrete", config)
    input_ids = random_blocks(config, 64, 32)
    noise = draw_noise(torch.Generator().manual_seed(1), 64, 32)
    masked, weight, _ = objective.corrupt(input_ids, noise)
    num_masked = masked.sum(-1)
    # n = floor(L s) + 1 with stratified s: 64 rows over L = 32 values, each value exactly twice.
    assert torch.equal(torch.bincount(num_masked, minlength=33)[1:], torch.full((32,), 2))
    assert torch.allclose(weight, (1.0 / num_masked.double())[:, None].expand_as(weight))  # per masked token
    losses = objective.sequence_losses(model, input_ids, noise)
    assert torch.allclose(losses, torch.full((64,), math.log(config.vocab_size - 1)), rtol=1e-5)


@pytest.mark.parametrize("name", ["mdm", "mdm-discrete"])
def test_time_reaches_the_network_only_with_time_conditioning(name):
    config = tiny_config(time_conditioning=True, noise_schedule="linear")
    model, objective = UniformModel(config), get_objective(name, config)
    input_ids = random_blocks(config, 8, 16)
    noise = draw_noise(torch.Generator().manual_seed(2), 8, 16)
    objective.sequence_losses(model, input_ids, noise)
    _, _, t = objective.corrupt(input_ids, noise)
    schedule = get_noise_schedule("linear")
    assert torch.allclose(model.timesteps[0], schedule.total_noise(t).float())


def test_masking_follows_alpha_t():
    config = tiny_config(noise_schedule="cosine")
    objective = get_objective("mdm", config)
    noise = draw_noise(torch.Generator().manual_seed(4), 256, 512)
    masked, _, t = objective.corrupt(torch.zeros(256, 512, dtype=torch.long), noise)
    expected = 1 - objective.schedule.alpha(t)
    assert (masked.float().mean(-1) - expected).abs().max() < 0.08


def test_continuous_and_discrete_forms_estimate_the_same_nelbo():
    """Prop. 3.1: the two forms are the same bound (the continuous one on [T_MIN, 1] less ~0.2%, see the oracle
    test below); on a random network they agree within Monte-Carlo error."""
    torch.manual_seed(0)
    model = tiny_model(vocab_size=51)
    blocks = random_blocks(model.config, 64, 16)
    # 48 noise draws per block: the two estimates then differ by about 1% (seeds 0-2), their Monte-Carlo error.
    continuous = validation_nelbo(model, blocks, batch_size=64, num_passes=48).nats_per_token
    discrete = validation_nelbo(model, blocks, discrete=True, batch_size=64, num_passes=48).nats_per_token
    assert discrete == pytest.approx(continuous, rel=0.02)


def test_validation_nelbo_is_fixed_by_its_seed_not_by_batching():
    model = tiny_model()
    blocks = random_blocks(model.config, 24, 16)
    result = validation_nelbo(model, blocks, batch_size=24, seed=0)
    rebatched = validation_nelbo(model, blocks, batch_size=5, seed=0)
    assert rebatched.nats_per_token == pytest.approx(result.nats_per_token, rel=1e-6)
    assert validation_nelbo(model, blocks, seed=1).nats_per_token != pytest.approx(result.nats_per_token, rel=1e-6)
    assert result.perplexity == pytest.approx(math.exp(result.nats_per_token))
    assert result.num_tokens == 24 * 16 and not model.training
    # The continuous form on [T_MIN, 1] sits below the bound (see the oracle test below); the discrete one is it.
    assert not result.is_bound and result.estimate == "truncated_nelbo"
    discrete = validation_nelbo(model, blocks, discrete=True, batch_size=24, seed=0)
    assert discrete.is_bound and discrete.estimate == "nelbo"


def test_ar_validation_loss_is_next_token_cross_entropy():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=32, n_layer=1, n_head=2, n_positions=32)).eval()
    blocks = torch.randint(0, 50, (6, 16))
    expected = model(blocks, labels=blocks).loss.item()  # transformers' own shifted mean
    result = validation_loss(model, blocks, objective="ar", batch_size=6)
    assert result.nats_per_token == pytest.approx(expected, rel=1e-5)
    assert not result.is_bound and result.estimate == "nll" and result.num_tokens == 6 * 15


def test_unknown_objective_is_a_value_error():
    with pytest.raises(ValueError, match="objective must be one of"):
        get_objective("diffusion", MDMConfig(vocab_size=10, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                             cond_dim=8))


def oracle_count_losses(model) -> torch.Tensor:
    """(81, L + 1): g_x(n), the mean cross-entropy of a masked token of sequence x when n positions are masked (the
    mean over the C(L, n) choices), for the oracle's exact conditionals; column 0 unused."""
    import itertools

    g = torch.zeros(len(SEQUENCES), LENGTH + 1, dtype=torch.float64)
    for pattern in itertools.product([False, True], repeat=LENGTH):
        masked = torch.tensor(pattern)
        n = int(masked.sum())
        if n:
            logp = OracleDenoiser.conditional_logits(torch.where(masked, MASK, SEQUENCES), model.joint.expand(len(SEQUENCES), -1))
            ce = -logp.gather(-1, SEQUENCES[..., None])[..., 0]
            g[:, n] += (ce * masked).sum(-1) / n / math.comb(LENGTH, n)
    return g


def test_nelbo_of_an_exact_denoiser_and_the_continuous_forms_offset(monkeypatch):
    """An exact denoiser (tests/oracle.py, a known joint over 81 sequences of length 4): the bound is the true NLL,
    -log q(x) / L, for every sequence, in closed form, and the continuous form sits below it by exactly
    (1 / L) sum_n (1 - w_n) g(n) (`continuous_count_weights`): 0.20% here with T_MIN = eps = 1e-3. To see the offset
    through the estimator's noise, T_MIN = 0.25 and eps = 0.3 make it 47%: over 40 seeded passes of 16200 blocks
    the continuous estimate matches the closed form (within 4 standard errors) and not the bound, while the discrete
    estimate matches the bound."""
    import statistics

    model = OracleDenoiser(oracle_config()).eval()
    g = oracle_count_losses(model)
    bound = g[:, 1:].sum(-1) / LENGTH
    torch.testing.assert_close(bound, -model.joint.log() / LENGTH, rtol=1e-12, atol=1e-12)  # the any-order chain rule
    schedule = get_noise_schedule("loglinear", 1e-3)
    weights = continuous_count_weights(LENGTH, schedule)
    assert ((weights > 0) & (weights < 1)).all()
    offset = ((1 - weights) * g[:, 1:]).sum(-1) / LENGTH
    assert float(offset.mean() / bound.mean()) == pytest.approx(0.00199, abs=2e-5)
    # Its two leading terms: t < T_MIN (one token masked) and the eps left clean at t = 1 (all L masked).
    a_0 = (1 - 1e-3) * T_MIN
    leading = a_0 * g[:, 1] + (1 - (1 - 1e-3) ** LENGTH) / LENGTH * g[:, LENGTH]
    torch.testing.assert_close(offset, leading, rtol=2e-3, atol=0)

    monkeypatch.setattr(objectives, "T_MIN", 0.25)
    model = OracleDenoiser(oracle_config(noise_eps=0.3)).eval()
    weights = continuous_count_weights(LENGTH, get_noise_schedule("loglinear", 0.3), 0.25)
    expected = float(((weights * g[:, 1:]).sum(-1) / LENGTH).mean())  # g does not depend on the schedule
    blocks = SEQUENCES.repeat(200, 1)  # every sequence alike: the closed forms are means over the 81
    for discrete, target, other in ((False, expected, float(bound.mean())), (True, float(bound.mean()), expected)):
        runs = [validation_nelbo(model, blocks, discrete=discrete, batch_size=len(blocks), seed=seed).nats_per_token
                for seed in range(40)]
        mean, error = statistics.mean(runs), statistics.stdev(runs) / math.sqrt(len(runs))
        assert abs(mean - target) < 4 * error and abs(mean - other) > 100 * error, (discrete, mean, target, error)
