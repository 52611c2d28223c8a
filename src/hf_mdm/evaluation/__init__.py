"""Evaluation of MDM samples: generative perplexity beside token entropy, MAUVE, and the NELBO bound.

The metrics ship as local `evaluate` modules under `metrics/<name>/<name>.py`, each a thin wrapper around the
plain functions below, and load offline:

    from hf_mdm.evaluation import load_metric
    load_metric("token_entropy").compute(predictions=[[1, 1, 2, 2]])                # {'token_entropy': 0.693...}
    load_metric("generative_perplexity").compute(predictions=texts, judge="path/to/judge")

`hf-mdm evaluate` (`evaluation/cli.py`) sweeps sampler settings and writes results.json, results.md and a plot.
"""

from pathlib import Path

from .entropy import EntropyResult, token_entropy, unigram_entropy
from .judge import DEFAULT_JUDGE, GenerativePerplexityResult, Judge, generative_perplexity, judge_features, load_judge
from .mauve_score import MauveResult, mauve_score
from .nelbo import load_text_blocks, mdm_nelbo, pack_texts


METRICS_DIR = Path(__file__).parent / "metrics"
METRICS = ("generative_perplexity", "token_entropy", "mauve", "mdm_nelbo")


def metric_path(name: str) -> Path:
    """The local script of the `evaluate` module called `name`."""
    if name not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {name!r}.")
    return METRICS_DIR / name / f"{name}.py"


def load_metric(name: str, **kwargs):
    """`evaluate.load` on the local module called `name` (one of `METRICS`): no network, no Hub.

    kwargs go to `evaluate.load` (e.g. `experiment_id`, `num_process`, `process_id`).
    """
    import evaluate

    return evaluate.load(str(metric_path(name)), **kwargs)


__all__ = [
    "METRICS",
    "DEFAULT_JUDGE",
    "EntropyResult",
    "GenerativePerplexityResult",
    "Judge",
    "MauveResult",
    "generative_perplexity",
    "judge_features",
    "load_judge",
    "load_metric",
    "load_text_blocks",
    "mauve_score",
    "mdm_nelbo",
    "metric_path",
    "pack_texts",
    "token_entropy",
    "unigram_entropy",
]
