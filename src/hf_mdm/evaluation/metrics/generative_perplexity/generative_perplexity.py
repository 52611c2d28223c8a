"""generative_perplexity: an `evaluate` metric that scores decoded samples with a judge causal LM.

A thin wrapper around `hf_mdm.evaluation.judge.generative_perplexity` (one implementation); see that module for
the exact definition (retokenized with the judge's tokenizer, chunks of the judge's context, next-token NLL).
"""

import datasets
import evaluate

from hf_mdm.evaluation.judge import DEFAULT_JUDGE
from hf_mdm.evaluation.judge import generative_perplexity
from hf_mdm.evaluation.judge import load_judge
from hf_mdm.evaluation.metric_info import metric_info


_DESCRIPTION = """
Generative perplexity: decoded samples are retokenized with a judge causal LM's tokenizer and scored in chunks of
its context with next-token cross-entropy (the first token of each chunk has no prediction). The corpus value is
exp(total NLL / total predicted tokens). Low values can mean good text or merely repetitive text: always report
token entropy beside it.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `str`): decoded samples.
    judge (`str` or `hf_mdm.evaluation.judge.Judge`, defaults to "openai-community/gpt2-large"): a causal LM folder or Hub id, or
        a judge already loaded with `load_judge`.
    batch_size (`int`, defaults to 8): chunks per forward pass.
    device (`str`, *optional*): "cpu", "cuda", ...; default: cuda when available.
    max_length (`int`, *optional*): chunk length; default the judge's context.
Returns:
    generative_perplexity (`float`), mean_nll (`float`, nats), per_sample (`list` of `float` or None),
    num_tokens (`int`, predicted tokens), num_scored (`int`), excluded (`list` of `int`: texts with fewer than
    two judge tokens, left out and counted, never NaN; ValueError if all are).
Examples:
    >>> metric = hf_mdm.evaluation.load_metric("generative_perplexity")
    >>> metric.compute(predictions=["Hello world, again."], judge="path/to/gpt2")["generative_perplexity"]
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class GenerativePerplexity(evaluate.Metric):
    def _info(self):
        return metric_info(_DESCRIPTION, _KWARGS_DESCRIPTION, datasets.Value("string"))

    def _compute(self, predictions, judge=DEFAULT_JUDGE, batch_size=8, device=None, max_length=None):
        result = generative_perplexity(predictions, load_judge(judge, device), batch_size, max_length)
        return vars(result)
