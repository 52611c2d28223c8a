"""Tokenizers for training: a byte-level BPE trained on the corpus itself, and the [MASK] check.

An MDM needs three special tokens besides the text's own: [MASK] (the absorbing state), EOS (the separator
that packing puts between documents) and PAD. `train_bpe_tokenizer` makes a tokenizer with all three from a
corpus that has none (the `tokenizers` library's byte-level BPE, GPT-2's scheme), so a run needs nothing from
the Hub.
"""

import os
import warnings
from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from .data import check_text_files, iter_texts


EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "[PAD]"
MASK_TOKEN = "[MASK]"


def train_bpe_tokenizer(
    files: Sequence[str | os.PathLike],
    vocab_size: int = 4096,
    min_frequency: int = 2,
    output_dir: str | os.PathLike | None = None,
    text_field: str = "text",
) -> PreTrainedTokenizerFast:
    """Trains a byte-level BPE tokenizer on text files, with EOS, PAD and [MASK] as special tokens.

    Args:
        files: UTF-8 text (.txt) or jsonl (.jsonl, the text in `text_field`) files to learn merges from; checked
            first (`check_text_files`).
        vocab_size: size of the vocabulary, special tokens and the 256 byte symbols included.
        min_frequency: a pair must occur this often to be merged.
        output_dir: where to `save_pretrained` the tokenizer (optional).

    Returns:
        A `PreTrainedTokenizerFast` with `eos_token`, `pad_token` and `mask_token` set.
    """
    from tokenizers import ByteLevelBPETokenizer

    special_tokens = [EOS_TOKEN, PAD_TOKEN, MASK_TOKEN]
    if vocab_size < 256 + len(special_tokens):
        raise ValueError(
            f"vocab_size must be at least {256 + len(special_tokens)} (256 bytes + 3 special tokens), got {vocab_size}."
        )
    check_text_files(files, text_field)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(iter_texts(files, text_field), vocab_size=vocab_size, min_frequency=min_frequency,
                            special_tokens=special_tokens)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN, mask_token=MASK_TOKEN
    )
    if len(tokenizer) < vocab_size:
        warnings.warn(f"--train-tokenizer {vocab_size}: the training text yields only {len(tokenizer)} tokens (no more "
                      f"merges occur at least min_frequency={min_frequency} times); the vocabulary is "
                      f"{len(tokenizer)}. More text, or a smaller size, gives the size asked for.", stacklevel=2)
    if output_dir is not None:
        tokenizer.save_pretrained(output_dir)
    return tokenizer


def check_special_tokens(tokenizer: PreTrainedTokenizerBase, needs_mask: bool, add_mask_token: bool = False) -> None:
    """Makes sure the tokenizer has what training needs, before any data is tokenized.

    Packing needs an EOS token; an MDM needs a [MASK] token. A tokenizer without one (GPT-2's, say) either gets
    "[MASK]" added to its vocabulary (`add_mask_token=True`; the model is then built with the larger
    vocabulary) or the run stops here with an explanation.
    """
    if tokenizer.eos_token_id is None:
        raise ValueError(
            f"The tokenizer {tokenizer.name_or_path!r} has no EOS token, which packing puts between documents. "
            "Set one (tokenizer.eos_token = ...) and save it, or train one with --train-tokenizer."
        )
    if needs_mask and tokenizer.mask_token_id is None:
        if not add_mask_token:
            raise ValueError(
                f"The tokenizer {tokenizer.name_or_path!r} has no mask token, and a masked diffusion model needs one "
                "(the absorbing [MASK] state). Pass --add-mask-token to add '[MASK]' to its vocabulary (the model is "
                "built with the larger vocabulary), or use a tokenizer that has one (--train-tokenizer makes one)."
            )
        tokenizer.add_special_tokens({"mask_token": MASK_TOKEN})
