"""Checkpoints that ship inside the package, so that a first run needs no network.

    from transformers import AutoModel, AutoTokenizer
    import hf_mdm

    path = hf_mdm.pretrained_path("shakespeare-mdm")
    model, tokenizer = AutoModel.from_pretrained(path), AutoTokenizer.from_pretrained(path)

Each folder is an ordinary `save_pretrained` folder (config, float16 weights, tokenizer, model card), so it loads
the same way from a path or from the Hub once published (`hf-mdm publish` adds the remote code, which
`save_pretrained` writes into any folder saved from a loaded model). The weights are stored in float16 to keep the package
small; the configs say float32, which is the dtype `from_pretrained` gives them. How they were trained:
examples/shakespeare/ and each folder's README.md.
"""

import json
import re
import struct
from pathlib import Path

from ..constants import DEFAULT_MDM, HUB_ID_PATTERN, MDM_MODEL_TYPES, PRETRAINED, UNCONVERTED


HUB_ID = re.compile(HUB_ID_PATTERN)


def pretrained_path(name: str = DEFAULT_MDM) -> Path:
    """The folder of a shipped checkpoint, for `from_pretrained`. Names: the keys of `PRETRAINED`."""
    if name not in PRETRAINED:
        raise ValueError(f"pretrained_path: name must be one of {sorted(PRETRAINED)}, got {name!r}.")
    folder = Path(__file__).resolve().parent / name
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"The shipped checkpoint {name!r} is missing from {folder}: reinstall hf_mdm.")
    return folder



def shipped_or_given(name_or_path):
    """A shipped checkpoint's name becomes its folder; anything else (a folder, a Hub id, a model) is returned as it
    is: what Python entry points that take a checkpoint do first, so that shipped names work there as in the CLI."""
    if isinstance(name_or_path, str) and name_or_path in PRETRAINED:
        return str(pretrained_path(name_or_path))
    return name_or_path


def resolve_checkpoint(name_or_path: str, require_mdm: bool = False) -> str:
    """A shipped checkpoint's name becomes its folder; a local folder is returned as it is, a Hub id unchanged.

    A path that exists nowhere and is not a Hub id (owner/name) is refused here, before anything is loaded. With
    `require_mdm`, a local folder must be an hf_mdm model: a training run's folder points to its `model/`, an
    autoregressive or an unconverted LLaDA/Dream folder says what to do instead, and each weights file's header is
    read, so that a truncated or corrupt file is named before loading starts."""
    if name_or_path in PRETRAINED:
        folder = shipped_or_given(name_or_path)
        if require_mdm:
            check_mdm_folder(Path(folder), name_or_path)
        return folder
    folder = Path(name_or_path).expanduser()
    if not folder.exists():
        if HUB_ID.match(name_or_path) and not name_or_path.startswith("."):
            return name_or_path
        hint = "" if "/" in name_or_path else " (a Hub id has an owner: openai-community/gpt2-large, not gpt2-large)"
        raise ValueError(f"{name_or_path!r} is not a folder, a shipped name ({', '.join(sorted(PRETRAINED))}) or a "
                         f"Hub id (owner/name){hint}.")
    if not folder.is_dir():
        raise ValueError(f"{name_or_path!r} is a file; a checkpoint is a folder (with config.json and its weights).")
    if require_mdm:
        check_mdm_folder(folder, name_or_path)
    return name_or_path


def check_mdm_folder(folder: Path, name: str) -> None:
    """Raises ValueError unless `folder` holds an hf_mdm model whose weights files have readable headers."""
    if not (folder / "config.json").is_file():
        if (folder / "model" / "config.json").is_file():
            raise ValueError(f"{name!r} is a training run's folder; its model is {str(folder / 'model')!r}.")
        raise ValueError(f"{name!r} has no config.json: it is not a checkpoint folder.")
    try:
        model_type = str(json.loads((folder / "config.json").read_text()).get("model_type"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{str(folder / 'config.json')!r} is not valid JSON ({error}).") from None
    if model_type.lower() in UNCONVERTED:
        raise ValueError(f"{name!r} is a {model_type} checkpoint in its own format: convert it first, "
                         f"`hf-mdm convert {UNCONVERTED[model_type.lower()]} {name} DST`, then use DST.")
    if model_type not in MDM_MODEL_TYPES:
        raise ValueError(f"{name!r} is a {model_type!r} model, not an hf_mdm masked diffusion model "
                         f"(model_type {' or '.join(MDM_MODEL_TYPES)}). An autoregressive model samples with "
                         "transformers (AutoModelForCausalLM(...).generate), and judges samples as evaluate's "
                         "--judge or --ar-model.")
    for weights in sorted(folder.glob("*.safetensors")):
        check_safetensors_header(weights)


def check_safetensors_header(path: Path) -> None:
    """A safetensors file starts with an 8-byte little-endian length and that many bytes of JSON header."""
    size = path.stat().st_size
    with open(path, "rb") as file:
        head = file.read(8)
        length = struct.unpack("<Q", head)[0] if len(head) == 8 else None
        if length is None or length > size - 8:
            raise ValueError(f"{str(path)!r} is not a readable safetensors file (truncated or corrupt: its header "
                             f"says {length} header bytes, the file has {size} bytes).")
        try:
            json.loads(file.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ValueError(f"{str(path)!r} is not a readable safetensors file (its header is not JSON).") from None
