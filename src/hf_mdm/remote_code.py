"""The remote code a checkpoint folder carries, written from the package's own files.

hf_mdm holds each travelling file once (`hf_mdm/*_mdm*.py`). `save_pretrained` writes a model's files into the
folder it saves (transformers follows the modeling file's relative imports); the converters, which write weights
shard by shard without a model, and `hf-mdm publish` call `write_remote_code` / `remote_code_files` instead.
"""

import shutil
from pathlib import Path

from .constants import MDM_MODEL_TYPES, travelling_files


PACKAGE = Path(__file__).resolve().parent


def remote_code_files(model_type: str) -> dict[str, Path]:
    """File name -> the package's copy, for a checkpoint of `model_type` ("mdm", "mdm_llama")."""
    if model_type not in MDM_MODEL_TYPES:
        raise ValueError(f"model_type must be one of {MDM_MODEL_TYPES} to carry hf_mdm's remote code, got {model_type!r}.")
    return {name: PACKAGE / name for name in travelling_files(model_type)}


def write_remote_code(folder: str | Path, model_type: str) -> list[str]:
    """Copies the remote code of `model_type` into `folder` (a folder being staged: callers move it into place)."""
    names = []
    for name, path in remote_code_files(model_type).items():
        shutil.copyfile(path, Path(folder) / name)
        names.append(name)
    return names
