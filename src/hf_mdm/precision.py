"""What the dtype of a categorical draw does to the samples: two laws for small probabilities.

`CategoricalSampler.draw` (sampling_mdm.py) races the categories: argmax_i p_i / E_i with E_i = -log U_i. With
a continuous U it samples p exactly. A real U takes finitely many values, and small categories lose.

1. Prop. 5.2 of arXiv:2409.02908 (`truncated_gumbel_probabilities`): U continuous on [0, 1 - s], so the Gumbel
   noise -log E is truncated at M = -log(-log(1 - s)). For a category of weight w against the rest of weight S,
   in the limit w << S its probability is multiplied by exp(-r), r = S e^-M / w ~ S s / w
   (`prop52_suppression`).

2. The grid law, which is how torch draws (`grid_suppression`, `race_win_probability`). On the CPU,
   `torch.rand(..., dtype=float32)` takes one 32-bit Mersenne Twister output x and returns
   U = (x & (2^24 - 1)) * 2^-24 (ATen's `transformation::uniform_real`, called through
   `uniform_real_distribution<float>` by the CPU `uniform_kernel`, one value after the other): U takes the 2^24
   values k s, s = 2^-24, each with probability s. The smallest noise values are therefore the cells
   E = e_j = -log(1 - j s) ~ j s, j = 1, 2, ..., each drawn with probability s, and nothing in between. The
   category wins from cell j when the rest's scaled noise Z = min_k E_k / p_k ~ Exp(S) exceeds e_j / w, so
       P(win) = sum_j s exp(-S e_j / w) ~ s / (e^r - 1),   r = S s / w,
   against w / S for a continuous U: a suppression of r / (e^r - 1) instead of exp(-r). At r = 1/2 (w = 2 s):
   0.771 against 0.607. U = 0 (probability s) gives E = inf: that category cannot win, whatever its weight.
   float16 and bfloat16 have the same top cells 1 - j s with s = 2^-11 and 2^-8 (torch 2.13 rounds a float32
   uniform to them, and turns the values that round to 1.0 into 0: `zero_probability`).

`torch.Tensor.exponential_` and torch's Gumbel-softmax draw their noise from the same uniform grid (the CPU
kernel transforms the same `uniform_real_distribution` draws), but CategoricalSampler uses neither: its float32
noise is `torch.rand` then `log_`, and its float64 noise on the CPU comes from numpy's PCG64 `random()`, on the
53-bit grid k 2^-53 (sampling_mdm.uniform), where r is 2^29 times smaller and neither law is measurable.

On CUDA (not measured: no GPU was lent), torch's float32 uniform is curand's 32-bit draw x 2^-32 + 2^-33
rounded to float32, with 1.0 mapped to 0: near 1 it lands on the same cells 1 - j 2^-24, each with probability
2^-24 (256 of the 2^32 draws), so the code predicts the same grid law there.

Measured (tests/test_sampling.py, benchmarks/float32_law.py): races of CategoricalSampler follow the grid law,
not Prop. 5.2's. This module does not travel with checkpoints; the sampler does not need it.
"""

import math

import numpy as np


# The spacing s of torch's CPU uniforms: 2^-digits of the dtype (float64: numpy's 53-bit random(), see above).
UNIFORM_SPACING = {"float64": 2.0**-53, "float32": 2.0**-24, "float16": 2.0**-11, "bfloat16": 2.0**-8}
# Gumbel noise -log(-log U) is truncated where U stops below 1: U <= 1 - s.
TRUNCATION = {name: -math.log(-math.log1p(-spacing)) for name, spacing in UNIFORM_SPACING.items()}


def grid_suppression(weight, rest: float = 1.0, spacing: float = UNIFORM_SPACING["float32"]):
    """r / (e^r - 1), r = spacing * rest / weight: the factor by which the grid of U multiplies the probability of
    a category of `weight` racing a rest of total weight `rest`, to leading order in weight / rest (the grid law,
    module docstring). Arrays broadcast."""
    r = spacing * np.asarray(rest, dtype=np.float64) / np.asarray(weight, dtype=np.float64)
    return np.where(r > 1e-8, r / np.expm1(np.maximum(r, 1e-300)), 1.0 - r / 2)


def prop52_suppression(weight, rest: float = 1.0, truncation: float = TRUNCATION["float32"]):
    """exp(-r), r = rest * e^-M / weight: Prop. 5.2's factor for the same race, to the same order (U continuous on
    [0, 1 - s], Gumbel noise truncated at M). Arrays broadcast."""
    return np.exp(-math.exp(-truncation) * np.asarray(rest, dtype=np.float64) / np.asarray(weight, dtype=np.float64))


def half_uniforms_round_float32(dtype: str = "float16") -> bool:
    """Whether this torch makes a float16 / bfloat16 `rand` by rounding its float32 uniform (torch 2.13's CPU
    `uniform_kernel`, which then returns 0 where the rounding reached 1.0) rather than by masking 11 / 8 bits of
    the 32-bit draw (older versions). Both read the same 32-bit draws, so the same seed tells them apart."""
    import torch

    reduced = torch.rand(256, dtype=getattr(torch, dtype), generator=torch.Generator().manual_seed(0))
    rounded = torch.rand(256, generator=torch.Generator().manual_seed(0)).to(reduced.dtype)
    return torch.equal(reduced, rounded.masked_fill(rounded == 1, 0))


def zero_probability(dtype: str) -> float:
    """P(U = 0) for torch's CPU `rand` in `dtype` (float64: the sampler's numpy draw). float32: the masked 24-bit
    integer is 0, 2^-24. float16 / bfloat16 from a rounded float32 uniform: the top half cell, which rounds to 1.0
    and becomes 0, s / 2, plus the float32 zero; from masked bits: s."""
    spacing = UNIFORM_SPACING[dtype]
    if dtype in ("float32", "float64") or not half_uniforms_round_float32(dtype):
        return spacing
    return spacing / 2 + UNIFORM_SPACING["float32"]


def race_win_probability(weight: float, count: int, rest: float, spacing: float = UNIFORM_SPACING["float32"],
                         zero_mass: float | None = None) -> float:
    """P(one of `count` categories of `weight` wins the race against one category of weight `rest`) when the top
    of the uniform's range is the grid 1 - j s (j = 1, 2, ...; s = `spacing`), each value with probability s, and
    U = 0 (E = inf: that category cannot win) has probability `zero_mass` (default s): exact for torch's CPU
    float32 `rand`, whose U is k s, k = 0 ... 2^24 - 1, each with probability s.

    The best of the `count` categories has the smallest cell index J among them (U = 1 - J s, E = e_J =
    -log(1 - J s)); P(J = j) = (1 - (j - 1) s)^count - (1 - j s)^count. It wins when the rest's E exceeds
    rest * e_j / weight, i.e. when the rest's U < c_j = exp(-rest e_j / weight): probability
    zero_mass + s * (ceil(c_j / s) - 1). Summed over j until c_j <= s, where only the rest's U = 0 is left; the
    remaining j in closed form. Exact up to the float rounding of E and of the ratios (relative 2^-24 in float32).
    """
    if not (weight > 0 and rest > 0 and count >= 1):
        raise ValueError(f"weight and rest must be > 0 and count >= 1, got {weight}, {rest}, {count}.")
    zero_mass = spacing if zero_mass is None else zero_mass
    cells = int(round(1 / spacing))
    # Beyond j_end, exp(-rest e_j / weight) <= s: only the rest's U = 0 is left, probability s.
    j_end = min(cells, int(math.ceil(-math.log(spacing) * weight / (rest * spacing))) + 2)
    total = 0.0
    for start in range(1, j_end + 1, 1 << 22):
        j = np.arange(start, min(start + (1 << 22), j_end + 1), dtype=np.float64)
        below = np.exp(count * np.log1p(-(j - 1) * spacing)) - np.exp(count * np.log1p(-j * spacing))
        noise = -np.log1p(-j * spacing)
        rest_loses = zero_mass + spacing * (np.ceil(np.exp(-rest * noise / weight) / spacing) - 1)
        total += float((below * np.minimum(rest_loses, 1.0)).sum())
    # j > j_end (up to cells - 1: U = 0 never wins): the rest loses only with U = 0.
    top = math.exp(count * math.log1p(-j_end * spacing)) - math.exp(count * math.log1p(-(cells - 1) * spacing)) \
        if j_end < cells - 1 else 0.0
    return total + zero_mass * top


def truncated_gumbel_probabilities(pi: np.ndarray, truncation: float) -> np.ndarray:
    """Prop. 5.2: P(argmax_i log pi_i + G_i = n) when every G_i is Gumbel noise truncated at `truncation`.

    Sort pi_1 <= ... <= pi_K, pi_0 = 0, S_i = sum_{k >= i} pi_k. Then
    P(n) = pi_n * sum_{i <= n} beta_i,
    beta_i = [exp((K + 1 - i - S_i / pi_i) e^-M) - exp((K + 1 - i - S_i / pi_{i-1}) e^-M)] / S_i.
    """
    order = np.argsort(pi, kind="stable")
    p = pi[order].astype(np.float64)
    K = len(p)
    i = np.arange(1, K + 1)
    S = np.cumsum(p[::-1])[::-1]
    e = math.exp(-truncation)
    previous = np.concatenate([[0.0], p[:-1]])
    with np.errstate(divide="ignore"):
        upper = np.exp((K + 1 - i - S / p) * e)
        lower = np.where(previous > 0, np.exp((K + 1 - i - S / np.where(previous > 0, previous, 1.0)) * e), 0.0)
    beta = (upper - lower) / S
    probs_sorted = p * np.cumsum(beta)
    probs = np.empty(K)
    probs[order] = probs_sorted
    return probs
