"""Training masked diffusion models (and an autoregressive baseline) with Accelerate.

data.py (documents -> packed blocks), tokenizer.py (a BPE with [MASK]), objectives.py (the NELBO and the
validation estimate), models.py (presets), ema.py, checkpointing.py, loop.py (the loop), cli.py (`hf-mdm train`).
"""

from .data import BlockSampler, check_text_files, load_documents, tokenize_and_pack
from .objectives import (AutoregressiveObjective, DiscreteMaskedDiffusionObjective, MaskedDiffusionObjective,
                         ValidationResult, antithetic_times, get_objective, validation_loss, validation_nelbo)
from .tokenizer import train_bpe_tokenizer


def __getattr__(name: str):
    # The loop (and Accelerate with it) loads only when asked for: the evaluation modules use data and objectives.
    if name in ("TrainConfig", "train"):
        from . import loop

        return getattr(loop, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AutoregressiveObjective", "BlockSampler", "DiscreteMaskedDiffusionObjective", "MaskedDiffusionObjective",
    "TrainConfig", "ValidationResult", "antithetic_times", "check_text_files", "get_objective", "load_documents",
    "tokenize_and_pack", "train", "train_bpe_tokenizer", "validation_loss", "validation_nelbo",
]
