"""Checkpoints that ship inside the package, so that a first run needs no network.

    from transformers import AutoModel, AutoTokenizer
    import hf_mdm

    path = hf_mdm.pretrained_path("shakespeare-mdm")
    model, tokenizer = AutoModel.from_pretrained(path), AutoTokenizer.from_pretrained(path)

Each folder is an ordinary `save_pretrained` folder (config, float16 weights, tokenizer, model card; the MDM one
also its remote code), so it loads the same way from a path, from the Hub once published, or with
`trust_remote_code=True` where hf_mdm is not installed. The weights are stored in float16 to keep the package
small; the configs say float32, which is the dtype `from_pretrained` gives them. How they were trained:
examples/shakespeare/ and each folder's README.md.
"""

from pathlib import Path


PRETRAINED = {
    "shakespeare-mdm": "time-agnostic masked diffusion LM, 8.1 M parameters, context 256, Shakespeare BPE (4099)",
    "shakespeare-ar": "GPT-2-style causal LM, 8.2 M parameters, same data and tokenizer: judge and AR baseline",
}
DEFAULT_MDM = "shakespeare-mdm"
DEFAULT_JUDGE = "shakespeare-ar"


def pretrained_path(name: str = DEFAULT_MDM) -> Path:
    """The folder of a shipped checkpoint, for `from_pretrained`. Names: the keys of `PRETRAINED`."""
    if name not in PRETRAINED:
        raise ValueError(f"pretrained_path: name must be one of {sorted(PRETRAINED)}, got {name!r}.")
    folder = Path(__file__).resolve().parent / name
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"The shipped checkpoint {name!r} is missing from {folder}: reinstall hf_mdm.")
    return folder


def resolve_checkpoint(name_or_path: str) -> str:
    """A shipped checkpoint's name becomes its folder; anything else (a path, a Hub id) is returned unchanged."""
    return str(pretrained_path(name_or_path)) if name_or_path in PRETRAINED else name_or_path
