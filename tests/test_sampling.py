"""The sampling module on its own: hand-made logits and probabilities, no network."""

import math
import numpy as np
import pytest
import torch
from scipy import stats

from hf_mdm.sampling_mdm import (
    CategoricalSampler,
    DiffusionState,
    FirstHittingSampler,
    get_noise_schedule,
)

from precision import (
    TRUNCATION,
    UNIFORM_SPACING,
    ancestral_step_categorical,
    grid_suppression,
    prop52_suppression,
    race_win_probability,
    truncated_gumbel_probabilities,
    zero_probability,
)


@pytest.mark.parametrize("name", ["linear", "loglinear", "cosine"])
def test_schedule_inverse_and_derivative(name):
    schedule = get_noise_schedule(name, 1e-3)
    t = torch.linspace(0.01, 0.99, 50, dtype=torch.float64)
    torch.testing.assert_close(schedule.inverse(schedule.alpha(t)), t)
    h = 1e-6
    numeric = (schedule.alpha(t + h) - schedule.alpha(t - h)) / (2 * h)
    torch.testing.assert_close(schedule.alpha_derivative(t), numeric, rtol=1e-5, atol=1e-8)
    assert float(schedule.alpha(torch.tensor(0.0, dtype=torch.float64))) == 1.0


def test_loglinear_total_noise_is_mdlms_sigma():
    schedule = get_noise_schedule("loglinear", 1e-3)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    torch.testing.assert_close(schedule.total_noise(t), -torch.log1p(-(1 - 1e-3) * t))
    torch.testing.assert_close(schedule.loss_weight(t[1:]), 1 / t[1:])


def test_categorical_matches_probabilities():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64)
    sampler = CategoricalSampler(generator=torch.Generator().manual_seed(0))
    draws = sampler(probs.log().expand(40000, 4))
    counts = torch.bincount(draws, minlength=4).numpy()
    assert stats.chisquare(counts, 40000 * probs.numpy()).pvalue > 1e-3


def test_temperature_top_k_top_p_and_greedy():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, float("-inf")]])
    probs = CategoricalSampler(temperature=0.5).probabilities(logits)[0]
    torch.testing.assert_close(probs, torch.softmax(logits[0].double() / 0.5, -1))
    probs = CategoricalSampler(top_k=2).probabilities(logits)[0]
    assert (probs[2:] == 0).all() and probs[:2].sum() == pytest.approx(1.0)
    probs = CategoricalSampler(top_p=0.8).probabilities(logits)[0]
    assert (probs[2:] == 0).all()  # 0.665 + 0.245 covers 0.8
    greedy = CategoricalSampler(temperature=0, generator=torch.Generator().manual_seed(0))
    assert (greedy(logits.expand(100, 5)) == 0).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_mask_token_is_never_drawn_and_the_callers_logits_are_untouched(dtype):
    """Whatever logit the network gives [MASK] (here the largest), the sampler gives it probability zero."""
    logits = torch.tensor([[0.0, 1.0, 0.5, 30.0]], dtype=dtype).expand(5000, 4).contiguous()
    before = logits.clone()
    sampler = CategoricalSampler(dtype=dtype, generator=torch.Generator().manual_seed(0), mask_token_id=3)
    assert (sampler.probabilities(logits)[:, 3] == 0).all()
    draws = sampler(logits)
    assert (draws != 3).all() and torch.equal(logits, before)
    counts = torch.bincount(draws, minlength=3)[:3].numpy()
    expected = torch.softmax(before[0, :3].double(), -1).numpy() * 5000
    assert stats.chisquare(counts, expected).pvalue > 1e-3
    greedy = CategoricalSampler(dtype=dtype, temperature=0, mask_token_id=3)
    assert (greedy(logits) == 1).all()


def _race_counts(pi: np.ndarray, dtype: torch.dtype, rows: int, seed: int, chunk: int = 10000) -> np.ndarray:
    sampler = CategoricalSampler(dtype=dtype, generator=torch.Generator().manual_seed(seed))
    weights = torch.tensor(pi, dtype=dtype)
    counts = np.zeros(len(pi), dtype=np.int64)
    for _ in range(rows // chunk):
        counts += np.bincount(sampler.draw(weights.expand(chunk, -1)).numpy(), minlength=len(pi))
    return counts


def test_float32_truncation_closed_form_at_paper_scale():
    """V = 4096 Zipf(1.1) tokens scaled by 1/N with N = 5000, [MASK] near 1 (docs/concepts/precision.md)."""
    pi = ancestral_step_categorical(vocab=4096, steps=5000)

    def conditional_entropy(q):
        tokens = q[:-1] / q[:-1].sum()
        tokens = tokens[tokens > 0]
        return float(-(tokens * np.log(tokens)).sum())

    true_entropy = conditional_entropy(pi)
    float32 = truncated_gumbel_probabilities(pi, TRUNCATION["float32"])
    float64 = truncated_gumbel_probabilities(pi, TRUNCATION["float64"])
    assert abs(float64.sum() - 1) < 1e-9 and abs(float32.sum() - 1) < 1e-9
    # float32: token entropy falls by more than a nat and a quarter of the token mass is lost.
    assert conditional_entropy(float32) < true_entropy - 1.0
    assert float32[:-1].sum() < 0.8 * pi[:-1].sum()
    # float64: indistinguishable from the true distribution.
    assert abs(conditional_entropy(float64) - true_entropy) < 1e-6
    assert np.abs(float64 - pi).max() < 1e-9


@pytest.mark.slow
def test_float32_sampler_undersamples_the_tail_and_float64_does_not():
    """Monte Carlo of our own CategoricalSampler on one ancestral step (V = 4096 Zipf(1.1), N = 1000, where the
    float32 shift is already visible at an affordable sample size). Bins: [MASK], token ranks 1-10, 11-100,
    101-500, 501-4096. float64 counts agree with the true probabilities (chi-square p > 0.001); float32 counts
    agree with Prop. 5.2's closed form (p > 0.001) and the tail beyond rank 500 is significantly smaller than
    the truth (one-sided Poisson p < 0.001)."""
    pi = ancestral_step_categorical(vocab=4096, steps=1000)
    edges = [0, 10, 100, 500, 4096]
    rows = 200_000

    def binned(q):
        return np.array([q[-1]] + [q[a:b].sum() for a, b in zip(edges[:-1], edges[1:])])

    truth = binned(pi)
    closed_form = binned(truncated_gumbel_probabilities(pi, TRUNCATION["float32"]))
    observed64 = binned(_race_counts(pi, torch.float64, rows, seed=1))
    observed32 = binned(_race_counts(pi, torch.float32, rows, seed=2))

    assert stats.chisquare(observed64, truth * rows).pvalue > 1e-3
    assert stats.chisquare(observed32, closed_form * rows).pvalue > 1e-3
    tail32, expected_tail = observed32[-1], truth[-1] * rows
    assert stats.poisson.cdf(tail32, expected_tail) < 1e-3, (tail32, expected_tail)


def test_cpu_uniforms_are_the_grid_the_grid_law_assumes():
    """torch's CPU float32 `rand` is k 2^-24 with k = 0 ... 2^24 - 1 uniform (ATen masks 24 bits of a 32-bit draw), so
    the smallest noise values CategoricalSampler can draw are the cells -log(1 - j 2^-24), computed by its own
    float32 log. float16 rounds a float32 uniform to the nearest half and returns 0 where it rounded to 1.0: near 1
    the cells 1 - j 2^-11, and U = 0 with probability 2^-12 + 2^-24 (`zero_probability`)."""
    generator = torch.Generator().manual_seed(0)
    cells = torch.rand(4_000_000, generator=generator).double() * 2**24
    assert torch.equal(cells, cells.round()) and 0 <= cells.min() and cells.max() <= 2**24 - 1
    k = cells.long()
    for bins in (k & 255, k >> 16):  # low and high bits of k uniform over 256 values
        assert stats.chisquare(torch.bincount(bins, minlength=256).numpy()).pvalue > 1e-3
    j = torch.arange(1, 65, dtype=torch.float64)
    top = (1 - j * 2.0**-24).float()
    assert torch.equal(top.double(), 1 - j * 2.0**-24)  # exactly representable: the grid's top cells
    noise = top.log().neg()  # as CategoricalSampler.draw computes E from U
    torch.testing.assert_close(noise.double(), -torch.log1p(-j * 2.0**-24), rtol=2e-7, atol=0)

    half = torch.rand(4_000_000, dtype=torch.float16, generator=generator).double()
    near_one = half[half >= 0.5] * 2**11
    assert torch.equal(near_one, near_one.round()) and half.max() == 1 - 2.0**-11
    zeros = int((half == 0).sum())
    expected = 4_000_000 * zero_probability("float16")
    assert min(stats.poisson.cdf(zeros, expected), stats.poisson.sf(zeros - 1, expected)) > 5e-4, (zeros, expected)


def test_grid_law_exact_race_against_enumeration_and_the_audit_numbers():
    """`race_win_probability` against brute force on a coarse grid (s = 2^-6: all 64^3 outcomes of 2 tokens and the
    rest), then the audit's float32 race: 3M races of 1000 tokens of weight 2 x 2^-24 against "stay masked". The grid
    law predicts 275.8 token wins (275.6 from r / (e^r - 1) alone, the 0.2 more from stay-masked drawing U = 0),
    Prop. 5.2 216.9, a continuous U 357.6."""
    s = 2.0**-6
    weight, rest = 2 * s, 1 - 4 * s
    with np.errstate(divide="ignore"):
        noise = -np.log(np.arange(64) * s)  # U = 0: E = inf, ratio 0
    ratio = lambda p: np.where(np.isinf(noise), 0.0, p / noise)
    outcomes = np.stack(np.broadcast_arrays(ratio(weight)[:, None, None], ratio(weight)[None, :, None],
                                            ratio(rest)[None, None, :]), -1)
    brute_force = (outcomes.argmax(-1) != 2).mean()
    # All three U = 0 (probability s^3): argmax takes the first index, a token; the law leaves that tie out.
    assert abs(race_win_probability(weight, 2, rest, s) - brute_force) == pytest.approx(s**3, rel=1e-6)

    s = UNIFORM_SPACING["float32"]
    weight, tokens = 2 * s, 1000
    rest = 1 - tokens * weight
    grid = 3e6 * race_win_probability(weight, tokens, rest)
    closed = 3e6 * tokens * weight * grid_suppression(weight, rest)
    prop52 = 3e6 * truncated_gumbel_probabilities(np.array([weight] * tokens + [rest]), TRUNCATION["float32"])[:tokens].sum()
    assert grid == pytest.approx(275.83, abs=0.01) and closed == pytest.approx(275.65, abs=0.01)
    assert prop52 == pytest.approx(216.93, abs=0.01)
    assert prop52 == pytest.approx(3e6 * tokens * weight * prop52_suppression(weight, rest), rel=1e-6)
    assert grid_suppression(weight) == pytest.approx(0.5 / np.expm1(0.5), rel=1e-6)


def test_float16_race_follows_the_grid_law_not_prop52():
    """CategoricalSampler's race on torch's real CPU uniforms, in float16, whose grid (2^-11) makes a token win
    2^13 times more often per draw than float32's, so 2M races tell the laws apart (float32 needs ~1e10 draws:
    benchmarks/float32_law.py). 16 tokens of weight 2 x 2^-11 (r = 0.48) against stay-masked: the count of token
    wins agrees with the grid law (two-sided Poisson p > 0.001) and rejects Prop. 5.2 and the true probability
    (p < 1e-10; they predict 19110 and 31250 against the grid's 24594)."""
    s, tokens, races = UNIFORM_SPACING["float16"], 16, 2_000_000
    weight = 2 * s
    rest = 1 - tokens * weight
    sampler = CategoricalSampler(dtype=torch.float16, generator=torch.Generator().manual_seed(1))
    weights = torch.tensor([weight] * tokens + [rest], dtype=torch.float16).expand(100_000, -1)
    wins = sum(int((sampler.draw(weights) != tokens).sum()) for _ in range(races // 100_000))

    def two_sided(expected):
        return 2 * min(stats.poisson.cdf(wins, expected), stats.poisson.sf(wins - 1, expected))

    grid = races * race_win_probability(weight, tokens, rest, s, zero_probability("float16"))
    prop52 = races * truncated_gumbel_probabilities(np.array([weight] * tokens + [rest]), TRUNCATION["float16"])[:tokens].sum()
    assert two_sided(grid) > 1e-3, (wins, grid)
    assert two_sided(prop52) < 1e-10 and two_sided(races * tokens * weight) < 1e-10, (wins, prop52)


def test_first_hitting_times_follow_order_statistics():
    """Linear schedule, n masked positions: the unmasking times are the order statistics of n i.i.d. U(0, 1),
    drawn from the top down. So the first time has CDF t^n, and every time pooled is U(0, 1) (KS p > 0.001).
    The time the network is asked about is the new time."""
    n, batch = 8, 4000
    schedule = get_noise_schedule("linear")
    sampler = FirstHittingSampler(schedule=schedule, categorical=CategoricalSampler(generator=torch.Generator().manual_seed(0)))
    tokens = torch.full((batch, n), 5)
    state = DiffusionState.start(tokens, torch.ones(batch, n, dtype=torch.bool))
    seen = []

    def denoise(rows, row_tokens, positions, times, window=None):
        seen.append(times.clone())
        return torch.zeros(len(rows), positions.shape[1], 6).index_fill_(-1, torch.tensor([5]), float("-inf"))

    times = []
    while not state.done:
        state = sampler.step(state, denoise)
        times.append(state.time.clone())
    times = torch.stack(times, dim=1)  # (batch, n), decreasing along dim 1
    assert (times[:, 1:] < times[:, :-1]).all()
    torch.testing.assert_close(torch.stack(seen, 1), times)
    assert stats.kstest(times[:, 0].numpy(), lambda t: t**n).pvalue > 1e-3
    assert stats.kstest(times.flatten().numpy(), "uniform").pvalue > 1e-3
    # The k-th time from the top is Beta(n - k + 1, k).
    assert stats.kstest(times[:, 3].numpy(), stats.beta(n - 3, 4).cdf).pvalue > 1e-3


@pytest.mark.parametrize("schedule_name", ["loglinear", "cosine"])
def test_first_hitting_times_other_schedules(schedule_name):
    """For any schedule, 1 - alpha(tau) follows the same order-statistic law (times are uniform in 1 - alpha)."""
    n, batch = 5, 3000
    schedule = get_noise_schedule(schedule_name)
    sampler = FirstHittingSampler(schedule=schedule, categorical=CategoricalSampler(generator=torch.Generator().manual_seed(1)))
    state = DiffusionState.start(torch.full((batch, n), 2), torch.ones(batch, n, dtype=torch.bool))
    denoise = lambda rows, tok, pos, t, window=None: torch.zeros(len(rows), pos.shape[1], 3)
    state = sampler.step(state, denoise)
    scale = 1 - float(schedule.alpha(torch.tensor(1.0, dtype=torch.float64)))
    first = (1 - schedule.alpha(state.time)) / scale
    assert stats.kstest(first.numpy(), lambda x: x**n).pvalue > 1e-3


def test_parallel_steps_budget_unmasks_everything_in_budget():
    sampler = FirstHittingSampler(schedule=get_noise_schedule("linear"),
                                  categorical=CategoricalSampler(generator=torch.Generator().manual_seed(0)), steps=3)
    masked = torch.zeros(2, 10, dtype=torch.bool)
    masked[0, :10] = True
    masked[1, :4] = True
    state = DiffusionState.start(torch.full((2, 10), 3), masked)
    denoise = lambda rows, tok, pos, t, window=None: torch.zeros(len(rows), pos.shape[1], 4)
    counts = []
    while not state.done:
        before = state.masked.sum(1)
        state = sampler.step(state, denoise)
        counts.append((before - state.masked.sum(1)).tolist())
    assert counts == [[4, 2], [3, 1], [3, 1]]


def test_cosine_means_mdlms_cosine_not_md4s():
    """"cosine" is alpha_t = cos(pi t / 2) (MDLM's); md4's 1 - sin(pi t / 2) keeps 0.29 of the tokens at t = 0.5."""
    t = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0], dtype=torch.float64)
    alpha = get_noise_schedule("cosine").alpha(t)
    torch.testing.assert_close(alpha, torch.cos(torch.pi * t / 2), rtol=0, atol=1e-15)
    assert abs(float(alpha[2]) - 0.7071) < 1e-4 and abs(1 - math.sin(math.pi / 4) - 0.2929) < 1e-4
