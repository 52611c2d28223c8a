"""mdm_nelbo: an `evaluate` metric, a masked diffusion model's NELBO on held-out text and its perplexity bound.

A thin wrapper around `hf_mdm.evaluation.nelbo.mdm_nelbo`, which packs the texts as training does and calls the
training objective's `validation_nelbo` on its fixed, seeded time grid (no second implementation).
"""

import datasets
import evaluate

from hf_mdm.evaluation.metric_info import are_texts
from hf_mdm.evaluation.metric_info import metric_info
from hf_mdm.evaluation.nelbo import mdm_nelbo


_DESCRIPTION = """
The continuous-time negative ELBO of a masked diffusion model, in nats per token, on held-out texts packed into
blocks of the model's length; exp(NELBO) is an upper bound on its perplexity. The time grid and masks are fixed by
`seed`, so two checkpoints are compared on the same noise.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `str`): held-out texts (packed into blocks, EOS after each); or
        (`list` of `list` of `int`): blocks of token ids, all of one length.
    model (`str` or `MDMForMaskedDiffusion`): a checkpoint folder (its tokenizer is loaded too) or a model.
    tokenizer (*optional*): the MDM's tokenizer, when `model` is a model and predictions are texts.
    block_size (`int`, *optional*): default the model's max_position_embeddings.
    batch_size (`int`, defaults to 8), num_passes (`int`, defaults to 1), seed (`int`, defaults to 0),
    discrete (`bool`, defaults to False: the form over the number of masked tokens when True), device.
Returns:
    nelbo (`float`, nats per token), perplexity_bound (`float`), num_blocks, num_tokens (`int`).
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class MDMNelbo(evaluate.Metric):
    def _info(self):
        texts, blocks = datasets.Value("string"), datasets.Sequence(datasets.Value("int64"))
        return metric_info(_DESCRIPTION, _KWARGS_DESCRIPTION, texts, blocks)

    def _compute(self, predictions, model=None, tokenizer=None, block_size=None, batch_size=8, num_passes=1, seed=0,
                 discrete=False, device=None):
        if model is None:
            raise ValueError("mdm_nelbo needs model=... (a checkpoint folder, a shipped name or an MDMForMaskedDiffusion).")
        as_texts = are_texts(predictions)
        result = mdm_nelbo(
            model,
            texts=predictions if as_texts else None,
            input_ids=None if as_texts else predictions,
            tokenizer=tokenizer,
            block_size=block_size,
            batch_size=batch_size,
            num_passes=num_passes,
            seed=seed,
            discrete=discrete,
            device=device,
        )
        return {"nelbo": result.nats_per_token, "perplexity_bound": result.perplexity,
                "num_blocks": result.num_sequences, "num_tokens": result.num_tokens}
