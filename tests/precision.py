"""Closed form of categorical sampling with truncated Gumbel noise (arXiv:2409.02908, Prop. 5.2; notes section 4)."""

import math

import numpy as np


# Gumbel noise -log(-log U) is truncated where U stops below 1: U <= 1 - 2^-24 (float32), 1 - 2^-53 (float64).
TRUNCATION = {
    "float32": -math.log(-math.log1p(-(2.0**-24))),  # 16.64
    "float64": -math.log(-math.log1p(-(2.0**-53))),  # 36.74
}


def truncated_gumbel_probabilities(pi: np.ndarray, truncation: float) -> np.ndarray:
    """P(argmax_i log pi_i + G_i = n) when every G_i is Gumbel noise truncated at `truncation`.

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


def ancestral_step_categorical(vocab: int = 4096, steps: int = 5000, exponent: float = 1.1) -> np.ndarray:
    """One ancestral step's categorical: Zipf token probabilities scaled by 1/N, then [MASK] with 1 - 1/N."""
    zipf = np.arange(1, vocab + 1, dtype=np.float64) ** -exponent
    zipf /= zipf.sum()
    return np.concatenate([zipf / steps, [1.0 - 1.0 / steps]])
