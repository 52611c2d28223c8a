"""mauve: an `evaluate` metric, MAUVE of generated texts against reference texts in a judge's feature space.

A thin wrapper around `hf_mdm.evaluation.mauve_score.mauve_score` (mauve-text's `compute_mauve` on the judge's
final hidden state at the last token). References are a keyword argument, so the two sides may differ in size.
"""

import datasets
import evaluate

from hf_mdm.evaluation.judge import DEFAULT_JUDGE
from hf_mdm.evaluation.judge import load_judge
from hf_mdm.evaluation.mauve_score import mauve_score
from hf_mdm.evaluation.metric_info import are_texts
from hf_mdm.evaluation.metric_info import metric_info


_DESCRIPTION = """
MAUVE (Pillutla et al., 2021) compares the distribution of generated texts with that of reference texts: both are
embedded with a judge LM (final hidden state at the last token), quantized jointly by k-means, and the divergence
frontier of the two histograms is integrated. Near 1: the same distribution; lower: different.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `str`, or `list` of `list` of `float`): generated texts, or their features.
    reference_texts (`list` of `str`): reference texts; or
    reference_features (`list` of `list` of `float`): their features. One of the two is required.
    judge (`str` or `Judge`, defaults to "openai-community/gpt2-large"): featurizes whichever side is given as texts.
    batch_size (`int`, defaults to 8), device (`str`, *optional*), max_length (`int`, defaults to 1024 tokens).
    num_buckets ("auto" or `int`), seed (`int`, defaults to 25), kmeans_num_redo, kmeans_max_iter,
    kmeans_explained_var, mauve_scaling_factor: as in mauve-text's `compute_mauve`.
Returns:
    mauve (`float`), frontier_integral (`float`), num_buckets, num_predictions, num_references (`int`).
Examples:
    >>> metric = hf_mdm.evaluation.load_metric("mauve")
    >>> metric.compute(predictions=samples, reference_texts=references, judge="path/to/gpt2")["mauve"]
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Mauve(evaluate.Metric):
    def _info(self):
        texts, features = datasets.Value("string"), datasets.Sequence(datasets.Value("float32"))
        return metric_info(_DESCRIPTION, _KWARGS_DESCRIPTION, texts, features)

    def _compute(self, predictions, reference_texts=None, reference_features=None, judge=DEFAULT_JUDGE, batch_size=8,
                 device=None, max_length=1024, **mauve_options):
        if reference_texts is None and reference_features is None:
            raise ValueError("MAUVE needs reference texts (reference_texts=...) or reference_features=..., and got none.")
        as_texts = are_texts(predictions)
        needs_judge = as_texts or reference_features is None
        loaded = load_judge(judge, device) if needs_judge else None
        result = mauve_score(
            texts=predictions if as_texts else None,
            features=None if as_texts else predictions,
            reference_texts=reference_texts,
            reference_features=reference_features,
            judge=loaded,
            batch_size=batch_size,
            max_length=max_length,
            **mauve_options,
        )
        return vars(result)
