"""The sampling module on its own: hand-made logits and probabilities, no network."""

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

from precision import TRUNCATION, ancestral_step_categorical, truncated_gumbel_probabilities


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
    """V = 4096 Zipf(1.1) tokens scaled by 1/N with N = 5000, [MASK] near 1 (notes section 4)."""
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


def test_first_hitting_times_follow_order_statistics():
    """Linear schedule, n masked positions: the unmasking times are the order statistics of n i.i.d. U(0, 1),
    drawn from the top down. So the first time has CDF t^n, and every time pooled is U(0, 1) (KS p > 0.001).
    The time the network is asked about is the new time."""
    n, batch = 8, 4000
    schedule = get_noise_schedule("linear")
    sampler = FirstHittingSampler(schedule, CategoricalSampler(generator=torch.Generator().manual_seed(0)))
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
    sampler = FirstHittingSampler(schedule, CategoricalSampler(generator=torch.Generator().manual_seed(1)))
    state = DiffusionState.start(torch.full((batch, n), 2), torch.ones(batch, n, dtype=torch.bool))
    denoise = lambda rows, tok, pos, t, window=None: torch.zeros(len(rows), pos.shape[1], 3)
    state = sampler.step(state, denoise)
    scale = 1 - float(schedule.alpha(torch.tensor(1.0, dtype=torch.float64)))
    first = (1 - schedule.alpha(state.time)) / scale
    assert stats.kstest(first.numpy(), lambda x: x**n).pvalue > 1e-3


def test_parallel_steps_budget_unmasks_everything_in_budget():
    sampler = FirstHittingSampler(get_noise_schedule("linear"), CategoricalSampler(generator=torch.Generator().manual_seed(0)), steps=3)
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
