"""Model cards and publishing: a saved checkpoint folder becomes a Hub model repo.

`write_model_card` renders the templates of `model_cards/` (shipped inside the package as `hf_mdm.model_cards`) into
the folder's README.md, under the metadata the Hub indexes: library, pipeline, tags, datasets, license and evaluation
results in model-index form; training, conversion and publishing all write their cards with it. `publish` checks that
the folder is a complete checkpoint (weights, config, generation config, tokenizer, card) before anything touches the
network, then uploads it in one commit, with hf_mdm's remote code for an MDM (from the package's own files, and
config.json's auto_map naming them, whatever an earlier release wrote into the folder).

    hf-mdm publish runs/my-mdm/model me/my-mdm

This module never travels with checkpoints, so it may import hf_mdm (importing it registers the model types).
"""

import json
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path, PurePosixPath
from string import Template

import yaml
from huggingface_hub import CommitOperationAdd, EvalResult, HfApi, ModelCard, ModelCardData, metadata_load
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from .constants import MDM_MODEL_TYPES
from .remote_code import remote_code_files


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")  # either one lets AutoTokenizer load the folder
CARD_METADATA = ("library_name", "pipeline_tag", "license")  # what publish requires in README.md's front matter
KIND_TAGS = {"mdm": ["hf_mdm", "masked-diffusion", "diffusion-lm"], "causal_lm": ["hf_mdm"]}
KIND_NAMES = {"mdm": "MDM", "causal_lm": "causal LM"}

# training=... of write_model_card: field -> (type, what it says on the card). Every field is optional.
TRAINING_FIELDS = {
    "command": (str, "the command that trained the checkpoint"),
    "steps": (int, "optimizer steps"),
    "tokens_seen": (int, "training tokens processed"),
    "hardware": (str, "what it ran on, and for how long"),
    "validation_data": (str, "the held-out text of the validation number"),
    "validation_nats_per_token": (float, "held-out NELBO (MDM, a bound) or next-token loss (causal LM), nats/token"),
}
# eval_results=... rows: huggingface_hub.EvalResult's own field names (task_type is always text-generation).
EVAL_REQUIRED = ("dataset_name", "dataset_type", "metric_type", "metric_value")
EVAL_OPTIONAL = ("dataset_config", "dataset_split", "dataset_revision", "metric_name", "metric_config",
                 "source_name", "source_url")


# ------------------------------------------------------------------------------------------------ the checkpoint


def read_config(folder: str | os.PathLike) -> dict:
    """folder/config.json as a dict; a missing or unreadable config is a ValueError saying where to look instead."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder.")
    path = folder / "config.json"
    if not path.is_file():
        hint = ""
        if (folder / "model" / "config.json").is_file():
            hint = f" (training writes the final checkpoint to {folder / 'model'})"
        raise ValueError(f"{folder} has no config.json{hint}.")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None


def checkpoint_kind(config: Mapping) -> str:
    """"mdm" or "causal_lm", from a config.json dict: the card's usage code and publish's checks depend on it."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = config.get("model_type")
    if model_type in MDM_MODEL_TYPES:
        return "mdm"
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return "causal_lm"
    raise ValueError(f"config.json has model_type {model_type!r}; hf_mdm publishes MDMs ('mdm', 'mdm_llama') and transformers "
                     "causal LMs (e.g. 'gpt2', 'llama').")


def checkpoint_files(folder: str | os.PathLike) -> list[str]:
    """The files `publish` uploads (POSIX paths relative to `folder`), after checking that they make a complete
    checkpoint; a ValueError names everything that is missing, so one run tells the whole story."""
    return sorted(checkpoint_upload(folder))


def checkpoint_upload(folder: str | os.PathLike) -> dict[str, Path | bytes]:
    """Path in the repo -> what is uploaded there: the folder's files, and for an MDM hf_mdm's remote code (the
    package's own files) with config.json's auto_map naming today's classes. Raises ValueError naming every missing
    part."""
    folder = Path(folder)
    config = read_config(folder)
    kind = checkpoint_kind(config)
    relative = (PurePosixPath(path.relative_to(folder).as_posix()) for path in _files_inside(folder))
    upload: dict[str, Path | bytes] = {str(path): folder / path for path in relative if not _is_junk(path)}
    if kind == "mdm":
        upload.update({name: path for name, path in remote_code_files(config["model_type"]).items()})
        upload["config.json"] = (json.dumps(_with_current_auto_map(folder), indent=2, sort_keys=True) + "\n").encode()
    missing = _missing_parts(folder, config, kind, set(upload))
    if missing:
        raise ValueError(f"{folder} is not a complete {KIND_NAMES[kind]} checkpoint; missing: {'; '.join(missing)}.")
    return upload


def _files_inside(folder: Path) -> list[Path]:
    """Every file under `folder`. A symbolic link pointing outside the folder is refused, so publishing never
    uploads what the folder merely points at (a key file, another checkpoint); a link to a file inside is uploaded
    as that file, and a link to a folder inside is not walked (its files are uploaded from where they are)."""
    root, files = folder.resolve(), []
    for directory, subdirectories, names in os.walk(folder, followlinks=False):
        for name in subdirectories + names:
            path = Path(directory) / name
            if path.is_symlink() and not path.resolve().is_relative_to(root):
                raise ValueError(f"{path} is a symbolic link to {path.resolve()}, outside {folder}: refusing to upload "
                                 "what the folder points at. Copy the file into the folder (cp -L) if it belongs "
                                 "to the checkpoint.")
        files += [Path(directory) / name for name in names if (Path(directory) / name).is_file()]
    return files


def _with_current_auto_map(folder: Path) -> dict:
    """config.json with the auto_map of today's remote code (what loading the config and saving it writes)."""
    from transformers import AutoConfig

    config = read_config(folder)
    config["auto_map"] = AutoConfig.from_pretrained(folder).auto_map
    return config


def _is_junk(relative: PurePosixPath) -> bool:
    """Caches, temp files (hidden, like write_model_card's) and training state: never part of a published checkpoint."""
    return (relative.parts[0] == "checkpoints" or relative.suffix == ".pyc"
            or any(part.startswith(".") or part == "__pycache__" for part in relative.parts))


def _missing_parts(folder: Path, config: Mapping, kind: str, files: set[str]) -> list[str]:
    missing = []
    code = _auto_map_files(config.get("auto_map") or {})
    missing += [f"{name} (named by config.json auto_map)" for name in code if name not in files and kind != "mdm"]
    if kind == "mdm" and "generation_config.json" not in files:
        missing.append("generation_config.json")
    if not any(name.endswith(".safetensors") for name in files):
        missing.append("weights (*.safetensors)")
    index = "model.safetensors.index.json"
    if index in files:
        shards = set(json.loads((folder / index).read_text(encoding="utf-8"))["weight_map"].values())
        missing += [f"{shard} (named by {index})" for shard in sorted(shards - files)]
    if not any(name in files for name in TOKENIZER_FILES):
        missing.append("tokenizer (tokenizer.json or tokenizer_config.json: save the tokenizer into the folder)")
    if "README.md" not in files:
        missing.append("README.md (write it with hf_mdm.hub.write_model_card)")
    else:
        try:
            metadata = metadata_load(folder / "README.md") or {}
        except (yaml.YAMLError, ValueError):
            metadata = {}
        absent = [key for key in CARD_METADATA if not metadata.get(key)]
        if absent:
            missing.append(f"{', '.join(absent)} in README.md metadata (write the card with hf_mdm.hub.write_model_card)")
    return missing


def _auto_map_files(auto_map: Mapping) -> list[str]:
    """The .py files that config.json's auto_map points to: "module.Class" -> "module.py". A "repo--module.Class"
    reference lives in another repo, and a tokenizer entry may be a [slow, fast] pair with None."""
    references = [ref for value in auto_map.values() for ref in (value if isinstance(value, list) else [value])
                  if isinstance(ref, str) and "--" not in ref]
    return sorted({ref.rsplit(".", 1)[0].replace(".", "/") + ".py" for ref in references})


# ------------------------------------------------------------------------------------------------ the model card


def write_model_card(
    folder: str | os.PathLike,
    *,
    title: str,
    summary: str,
    datasets: Sequence[str] = (),
    license: str = "apache-2.0",
    training: Mapping | None = None,
    eval_results: Sequence[Mapping] = (),
    tags: Sequence[str] = (),
    base_model: str | None = None,
    language: str | Sequence[str] | None = None,
    repo_id: str | None = None,
    conversion: str | None = None,
    usage: str | None = None,
) -> Path:
    """Writes folder/README.md: Hub metadata, then model_cards/template.md filled in for this checkpoint.

    Args:
        folder: a `save_pretrained` folder of an MDM (model_type "mdm") or of a transformers causal LM.
        title: the card's heading; also the model-index name of the evaluation results.
        summary: a paragraph on what the model is and what it is for.
        datasets: Hub ids of the training data.
        license: a Hub license id.
        training: any of `TRAINING_FIELDS`, e.g. {"command": "hf-mdm train --config run.yaml", "steps": 20000,
            "tokens_seen": 2_621_440_000, "hardware": "8x H100, 14 h", "validation_data": "OpenWebText, 1% held out",
            "validation_nats_per_token": 3.21}. The card shows exp of the last as the perplexity (a bound for an MDM).
        eval_results: rows of the evaluation table and of model-index, each with `EVAL_REQUIRED` keys
            (dataset_name, dataset_type, metric_type, metric_value) and any of `EVAL_OPTIONAL` (dataset_split, ...).
        tags: Hub tags added after "hf_mdm" (and "masked-diffusion", "diffusion-lm" for an MDM).
        base_model: the Hub id this checkpoint was fine-tuned or converted from.
        language: language code(s) of the training text.
        repo_id: the Hub id the usage code loads; default: a path placeholder.
        conversion: for a converted checkpoint (`hf-mdm convert`), where the weights came from and what the
            conversion decided (Markdown): a "Conversion" section instead of "Training".
        usage: Markdown replacing the card's usage code (a converter's chat example, say).

    Returns:
        The path of README.md. It is replaced atomically: a reader sees the old card or the new one, never half.

    Raises:
        ValueError naming the field, for bad input; nothing is written then.
    """
    from transformers import AutoConfig  # hf_mdm is imported with this module, so "mdm" configs load too

    folder = Path(folder)
    kind = checkpoint_kind(read_config(folder))
    _check_value("title", title, str)
    _check_value("summary", summary, str)
    _check_value("license", license, str)
    datasets, tags = _string_list("datasets", datasets), _string_list("tags", tags)
    language = _string_list("language", language) or None
    if base_model is not None:
        _check_value("base_model", base_model, str)
    results = _eval_results(eval_results)
    training = _checked_training(training)
    for name, text in (("conversion", conversion), ("usage", usage)):
        if text is not None:
            _check_value(name, text, str)
    if conversion is not None and training:
        raise ValueError("a card has training or conversion, not both: a converted checkpoint was not trained here.")

    config = AutoConfig.from_pretrained(folder)
    context = config.max_position_embeddings
    values = {
        "title": title, "summary": summary, "architecture": _architecture(config, kind, _count_parameters(folder)),
        "model_id": repo_id or "path/to/this/folder", "context": context, "max_new_tokens": min(128, context // 2),
        "origin": (f"## Conversion\n\n{conversion.strip()}\n" if conversion is not None else
                   f"## Training\n\n{_training_section(training, kind)}\n"),
        "evaluation": _evaluation_section(results),
    }
    values["how_to_use"] = usage.strip() if usage is not None else _template(f"usage_{kind}.md").substitute(values).strip()
    block = getattr(config, "diffusion_block_size", None)
    values["length_behaviour"] = (
        "generation fills a canvas of known length and does not stop at EOS." if block is None else
        f"generation decodes blocks of {block} tokens left to right and stops a row at the end of the block where it "
        "generates EOS (`stop_at_eos`).")
    values["limitations"] = _template(f"limitations_{kind}.md").substitute(values).strip()
    body = _template("template.md").substitute(values)

    metadata = ModelCardData(
        library_name="transformers", pipeline_tag="text-generation", license=license, datasets=datasets or None,
        tags=list(dict.fromkeys(KIND_TAGS[kind] + tags)), base_model=base_model, language=language,
        model_name=title if results else None, eval_results=results or None,
    )
    # Parsing the card back checks that the front matter (model-index included) reads as the Hub will read it.
    card = ModelCard(f"---\n{metadata.to_yaml()}\n---\n\n{body}")
    readme = folder / "README.md"
    _write_atomically(readme, str(card))
    return readme


def _template(name: str) -> Template:
    return Template(resources.files("hf_mdm.model_cards").joinpath(name).read_text(encoding="utf-8"))


def _check_value(where: str, value, kind: type, non_negative: bool = True):
    """`value` if it is a non-empty string (kind str) or a finite number (an int for kind int; never a bool)."""
    if kind is str:
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"{where} must be a non-empty string, got {value!r}.")
        return value
    number_types = int if kind is int else (int, float)
    if (not isinstance(value, number_types) or isinstance(value, bool) or not math.isfinite(value)
            or (non_negative and value < 0)):
        what = "integer" if kind is int else "number"
        raise ValueError(f"{where} must be a finite{' non-negative' if non_negative else ''} {what}, got {value!r}.")
    return value


def _string_list(where: str, values: str | Sequence[str]) -> list[str]:
    values = [values] if isinstance(values, str) else list(values or ())
    return [_check_value(f"{where}[{i}]", value, str) for i, value in enumerate(values)]


def _checked_training(training: Mapping | None) -> dict:
    if training is None:
        return {}
    if not isinstance(training, Mapping):
        raise ValueError(f"training must be a mapping with fields from {sorted(TRAINING_FIELDS)}, got {training!r}.")
    unknown = sorted(set(training) - set(TRAINING_FIELDS))
    if unknown:
        raise ValueError(f"training has unknown fields {unknown}; allowed: {sorted(TRAINING_FIELDS)}.")
    return {name: _check_value(f"training[{name!r}]", value, TRAINING_FIELDS[name][0])
            for name, value in training.items()}


def _eval_results(rows: Sequence[Mapping]) -> list[EvalResult]:
    results = []
    for i, row in enumerate(rows):
        where = f"eval_results[{i}]"
        if not isinstance(row, Mapping):
            raise ValueError(f"{where} must be a mapping with keys {list(EVAL_REQUIRED)}, got {row!r}.")
        missing = [key for key in EVAL_REQUIRED if key not in row]
        unknown = sorted(set(row) - set(EVAL_REQUIRED) - set(EVAL_OPTIONAL))
        if missing or unknown:
            raise ValueError(f"{where}: missing {missing}, unknown {unknown}; required {list(EVAL_REQUIRED)}, "
                             f"optional {list(EVAL_OPTIONAL)}.")
        fields = {key: _check_value(f"{where}[{key!r}]", value, float if key == "metric_value" else str,
                                    non_negative=False) for key, value in row.items()}
        results.append(EvalResult(task_type="text-generation", **fields))
    return results


def _count_parameters(folder: Path) -> int:
    """Parameters stored in the folder's safetensors files, read from their headers (no weights are loaded)."""
    from safetensors import safe_open

    total = 0
    for path in folder.glob("*.safetensors"):
        with safe_open(path, framework="pt") as weights:
            total += sum(math.prod(weights.get_slice(name).get_shape()) for name in weights.keys())
    return total


def _architecture(config, kind: str, parameters: int) -> str:
    size = (f"{config.num_hidden_layers} blocks of width {config.hidden_size}, {config.num_attention_heads} heads, "
            f"{_count_text(parameters)} parameters, context {config.max_position_embeddings} tokens")
    if kind == "causal_lm":
        architecture = (config.architectures or [config.model_type])[0]
        return (f"An autoregressive causal language model (transformers `{architecture}`): {size}, "
                f"vocabulary {config.vocab_size}.")
    time_input = "reads the noise level" if config.time_conditioning else "time-agnostic: no time input"
    if config.model_type == "mdm_llama":
        return (f"A masked diffusion language model: a bidirectional Llama-family transformer as hf_mdm's "
                f"`MDMLlamaForMaskedDiffusion`, {size} ({config.num_key_value_heads} key/value heads), "
                f"{config.vocab_size} token ids ([MASK] = {config.mask_token_id}), {time_input}"
                f"{', logits shifted inside the model (Dream)' if config.shift_logits else ''}. `generate()` samples "
                f"with the first-hitting sampler (arXiv:2409.02908, section 4) and float64 categorical draws by default.")
    return (f"A masked diffusion language model: MDLM's diffusion transformer as hf_mdm's `MDMForMaskedDiffusion`, "
            f"{size}, {config.vocab_size} token ids ([MASK] = {config.mask_token_id}), {config.noise_schedule} noise "
            f"schedule, {time_input}. `generate()` samples with the first-hitting sampler (arXiv:2409.02908, "
            f"section 4) and float64 categorical draws by default.")


def _count_text(count: int) -> str:
    if count >= 1e9:
        return f"{count / 1e9:.2f} B"
    return f"{count / 1e6:.1f} M" if count >= 1e6 else f"{count:,}"


def _training_section(training: Mapping, kind: str) -> str:
    if not training:
        return "Not recorded for this checkpoint."
    lines = []
    if "steps" in training:
        lines.append(f"- Optimizer steps: {training['steps']:,}")
    if "tokens_seen" in training:
        lines.append(f"- Tokens seen: {training['tokens_seen']:,}")
    if "hardware" in training:
        lines.append(f"- Hardware: {training['hardware']}")
    measured_on = f" on {training['validation_data']}" if "validation_data" in training else ""
    if "validation_nats_per_token" in training:
        value = training["validation_nats_per_token"]
        perplexity = math.exp(value) if value < 700 else math.inf
        if kind == "mdm":
            lines.append(f"- Validation NELBO{measured_on}: {value:.4f} nats/token, "
                         f"perplexity bound exp(NELBO) = {perplexity:.2f}")
        else:
            lines.append(f"- Validation loss{measured_on}: {value:.4f} nats/token, perplexity {perplexity:.2f}")
    elif measured_on:
        lines.append(f"- Validation data: {training['validation_data']}")
    if "command" in training:
        lines.append(f"\nCommand:\n\n```bash\n{training['command']}\n```")
    return "\n".join(lines)


def _evaluation_section(results: list[EvalResult]) -> str:
    if not results:
        return "No evaluation results are reported for this checkpoint."

    def cell(text) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")

    rows = ["| dataset | split | metric | value |", "| --- | --- | --- | ---: |"]
    for result in results:
        dataset = result.dataset_name + (f" ({result.dataset_config})" if result.dataset_config else "")
        row = (dataset, result.dataset_split or "", result.metric_name or result.metric_type, f"{result.metric_value:.6g}")
        rows.append("| " + " | ".join(map(cell, row)) + " |")
    return "\n".join(rows)


def _write_atomically(path: Path, text: str) -> None:
    """A temp file in the same folder, then os.replace: a reader, or a crash, sees the old file or the new one."""
    descriptor, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temp, 0o644)  # mkstemp makes it private; a card is for everyone
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


# ------------------------------------------------------------------------------------------------ publishing


def check_repo_id(repo_id: str) -> None:
    """Raises ValueError unless `repo_id` is "owner/name" as the Hub spells it: a push needs to know the owner."""
    if not isinstance(repo_id, str) or repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ValueError(f"repo_id must look like 'owner/name', got {repo_id!r}.")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ValueError(f"repo_id {repo_id!r} is not a valid Hub id: {error}") from None


def publish(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    api: HfApi | None = None,
) -> list[str]:
    """Uploads a complete checkpoint folder to the Hub model repo `repo_id` in one commit.

    The repo id and the folder (`checkpoint_files`) are checked before the first network call, so a bad folder never
    leaves a half-made repo. The repo is created if missing, private or public as `private` says; a missing repo with
    `private=None` is refused, so nothing becomes public without being asked for. `revision` is a branch,
    created from main if missing. `token` is used only when `api` (an `HfApi`, or a stand-in in tests) is not given.

    Returns:
        The uploaded paths, relative to the folder and the repo root.
    """
    check_repo_id(repo_id)
    upload = checkpoint_upload(folder)
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(source) if isinstance(source, Path) else source)
                  for name, source in sorted(upload.items())]
    if private not in (None, True, False):
        raise ValueError(f"private must be True, False or None (only for an existing repo), got {private!r}.")
    api = api or HfApi(token=token)
    if private is None:
        if not api.repo_exists(repo_id, repo_type="model"):
            raise ValueError(f"{repo_id} does not exist on the Hub: say whether to create it private or public "
                             "(--private or --public; publish(private=True or False)).")
    else:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    if revision not in (None, "main"):
        api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
    api.create_commit(repo_id=repo_id, operations=operations, repo_type="model", revision=revision,
                      commit_message=commit_message or "Upload checkpoint with hf-mdm publish")
    return sorted(upload)


__all__ = [
    "TRAINING_FIELDS",
    "EVAL_REQUIRED",
    "EVAL_OPTIONAL",
    "read_config",
    "checkpoint_kind",
    "checkpoint_files",
    "write_model_card",
    "check_repo_id",
    "publish",
    "checkpoint_upload",
]
