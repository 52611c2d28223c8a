"""The MDM's NELBO on held-out text, and its perplexity bound exp(NELBO).

Not a second implementation: texts are packed into blocks exactly as training packs them
(`training.data.tokenize_and_pack`: EOS after each document, no padding, the tail that fills no block dropped)
and scored by `training.objectives.validation_nelbo` on its fixed, seeded time grid.
"""

from collections.abc import Sequence

import datasets
import torch
from transformers import AutoModel, AutoTokenizer, PreTrainedTokenizerBase

from ..training.data import load_documents, tokenize_and_pack
from ..training.objectives import ValidationResult, validation_nelbo
from ..pretrained import shipped_or_given
from .judge import resolve_device


def pack_texts(texts: Sequence[str], tokenizer: PreTrainedTokenizerBase, block_size: int) -> torch.Tensor:
    """Texts -> `(num_blocks, block_size)` token ids, packed as in training. Raises if not one block fills."""
    if len(texts) == 0:
        raise ValueError("no texts to pack into blocks.")
    if tokenizer.eos_token_id is None:
        raise ValueError(f"the tokenizer {tokenizer.name_or_path!r} has no EOS token, which packing puts between texts.")
    documents = datasets.Dataset.from_dict({"text": list(texts)})
    blocks = tokenize_and_pack(documents, tokenizer, block_size)
    if len(blocks) == 0:
        raise ValueError(f"the texts hold fewer than {block_size} tokens: not one block of {block_size} to evaluate.")
    return blocks[:]["input_ids"]  # (num_blocks, block_size)


def load_text_blocks(files: Sequence[str], tokenizer: PreTrainedTokenizerBase, block_size: int,
                     count: int | None = None, text_field: str = "text", sample_by: str = "paragraph") -> torch.Tensor:
    """Held-out text or jsonl files -> their first `count` blocks (all when None or 0) of `block_size` token ids,
    read and packed as training reads and packs them: what `hf-mdm evaluate` compares samples against."""
    documents = load_documents(files, text_field=text_field, sample_by=sample_by)
    blocks = pack_texts(documents[text_field], tokenizer, block_size)
    return blocks[:count] if count else blocks


def mdm_nelbo(model, texts: Sequence[str] | None = None, input_ids: torch.Tensor | None = None,
              tokenizer: PreTrainedTokenizerBase | None = None, block_size: int | None = None, batch_size: int = 8,
              num_passes: int = 1, seed: int = 0, discrete: bool = False, device=None) -> ValidationResult:
    """Validation NELBO (nats per token) and perplexity bound of an MDM on texts or on ready blocks.

    Args:
        model: an `MDMForMaskedDiffusion`, or a checkpoint folder or shipped name ("shakespeare-mdm"; its tokenizer
            is loaded from it too).
        texts: held-out texts, packed into blocks of `block_size` (default: the model's max_position_embeddings).
        input_ids (`torch.LongTensor` of shape `(num_blocks, seq_len)`): or blocks already packed.
        tokenizer: the MDM's tokenizer, needed with `texts` when `model` is not a path.
        num_passes, seed, discrete: as in `validation_nelbo` (more passes, less variance; fixed time grid).
    """
    if (texts is None) == (input_ids is None):
        raise ValueError("give either texts or input_ids.")
    model = shipped_or_given(model)
    if isinstance(model, (str, bytes)) or hasattr(model, "__fspath__"):
        tokenizer = tokenizer or AutoTokenizer.from_pretrained(model)
        model = AutoModel.from_pretrained(model)
    model.to(resolve_device(device))
    if texts is not None:
        if tokenizer is None:
            raise ValueError("texts need the MDM's tokenizer (tokenizer=...).")
        input_ids = pack_texts(texts, tokenizer, block_size or model.config.max_position_embeddings)
    input_ids = torch.as_tensor(input_ids, dtype=torch.long)
    if input_ids.dim() != 2 or input_ids.shape[0] == 0:
        raise ValueError(f"input_ids must be a non-empty (num_blocks, seq_len) array, got shape {tuple(input_ids.shape)}.")
    return validation_nelbo(model, input_ids, discrete=discrete, batch_size=batch_size, num_passes=num_passes,
                            seed=seed)
