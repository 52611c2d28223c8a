"""token_entropy: an `evaluate` metric, per-sample unigram entropy of token ids in nats, averaged.

A thin wrapper around `hf_mdm.evaluation.entropy.token_entropy` (one implementation).
"""

import datasets
import evaluate

from hf_mdm.evaluation.entropy import token_entropy
from hf_mdm.evaluation.metric_info import metric_info


_DESCRIPTION = """
Token entropy: for each sample of L token ids, -sum_k p_k log p_k with p_k = (count of token k) / L (natural log),
averaged over samples. Real OpenWebText at L = 1024 (GPT-2 tokens) gives about 5.6-5.7; samples whose entropy is
far lower are repetitive, however good their generative perplexity.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `list` of `int`): the samples' own token ids.
Returns:
    token_entropy (`float`, nats): the mean over samples; per_sample (`list` of `float`).
Examples:
    >>> hf_mdm.evaluation.load_metric("token_entropy").compute(predictions=[[1, 1, 2, 2]])["token_entropy"]
    0.6931471805599453
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class TokenEntropy(evaluate.Metric):
    def _info(self):
        return metric_info(_DESCRIPTION, _KWARGS_DESCRIPTION, datasets.Sequence(datasets.Value("int64")))

    def _compute(self, predictions):
        return vars(token_entropy(predictions))
