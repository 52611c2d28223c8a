"""The two laws of categorical sampling with finite-precision uniforms (hf_mdm.precision), and test categoricals."""

import numpy as np

from hf_mdm.precision import (  # noqa: F401  (re-exported for the tests)
    TRUNCATION,
    UNIFORM_SPACING,
    grid_suppression,
    prop52_suppression,
    race_win_probability,
    truncated_gumbel_probabilities,
    zero_probability,
)


def ancestral_step_categorical(vocab: int = 4096, steps: int = 5000, exponent: float = 1.1) -> np.ndarray:
    """One ancestral step's categorical: Zipf token probabilities scaled by 1/N, then [MASK] with 1 - 1/N."""
    zipf = np.arange(1, vocab + 1, dtype=np.float64) ** -exponent
    zipf /= zipf.sum()
    return np.concatenate([zipf / steps, [1.0 - 1.0 / steps]])
