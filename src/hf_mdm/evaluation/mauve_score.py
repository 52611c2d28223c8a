"""MAUVE (Pillutla et al., 2021): how close the distribution of generated texts is to that of reference texts.

`mauve.compute_mauve` (the mauve-text package) quantizes both sets of features jointly (PCA, then k-means into
`num_buckets` clusters) and integrates the divergence frontier of the two histograms: near 1 for two samples of
one distribution, lower the more they differ. Features are the judge's final hidden state at the last token
(`judge.judge_features`), or given directly as arrays.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .judge import Judge, judge_features


@dataclass
class MauveResult:
    """`mauve` in (0, 1]; `frontier_integral` (lower is closer); sizes of the two feature sets."""

    mauve: float
    frontier_integral: float
    num_buckets: int
    num_predictions: int
    num_references: int


def _features(name: str, texts, features, judge, batch_size: int, max_length: int) -> np.ndarray:
    if features is not None:
        features = np.asarray(features, dtype=np.float32)
        if features.ndim != 2 or features.shape[0] == 0:
            raise ValueError(f"{name} features must be a non-empty array of shape (n, dim), got {features.shape}.")
        return features
    if texts is None or len(texts) == 0:
        raise ValueError(
            f"MAUVE needs {name} texts or {name} features, and got none. "
            + ("Give reference texts (hf-mdm evaluate --reference-files FILE ...)." if name == "reference" else "")
        )
    if judge is None:
        raise ValueError(f"MAUVE needs a judge to featurize the {name} texts (or precomputed {name} features).")
    return judge_features(texts, judge, batch_size, max_length)[0]


def mauve_score(
    texts: Sequence[str] | None = None,
    reference_texts: Sequence[str] | None = None,
    judge: Judge | None = None,
    features=None,
    reference_features=None,
    batch_size: int = 8,
    max_length: int = 1024,
    num_buckets: int | str = "auto",
    seed: int = 25,
    kmeans_num_redo: int = 5,
    kmeans_max_iter: int = 500,
    kmeans_explained_var: float = 0.9,
    mauve_scaling_factor: float = 5.0,
) -> MauveResult:
    """MAUVE of generated texts (P) against reference texts (Q); mauve-text's defaults unless given.

    Args:
        texts / features: the generated side, as texts (featurized by `judge`) or a `(n, dim)` array.
        reference_texts / reference_features: the reference side, likewise; one of them is required.
        judge: from `load_judge`; needed for whichever side is given as texts.
        num_buckets: k-means clusters; "auto" is max(2, round(min(n_p, n_q) / 10)), as in mauve-text.
        seed: seeds the k-means (the result is deterministic for fixed inputs and seed).
    """
    import mauve  # mauve-text; imported here so that the rest of hf_mdm.evaluation works without it

    p = _features("generated", texts, features, judge, batch_size, max_length)
    q = _features("reference", reference_texts, reference_features, judge, batch_size, max_length)
    if p.shape[1] != q.shape[1]:
        raise ValueError(f"generated and reference features differ in size: {p.shape[1]} vs {q.shape[1]}.")
    out = mauve.compute_mauve(
        p_features=p, q_features=q, num_buckets=num_buckets, seed=seed, kmeans_num_redo=kmeans_num_redo,
        kmeans_max_iter=kmeans_max_iter, kmeans_explained_var=kmeans_explained_var,
        mauve_scaling_factor=mauve_scaling_factor, verbose=False,
    )
    return MauveResult(float(out.mauve), float(out.frontier_integral), int(out.num_buckets), len(p), len(q))
