"""Convert MDLM checkpoints (Sahoo et al., arXiv:2406.07524) into hf_mdm checkpoints with identical outputs.

MDLM's DiT and hf_mdm's `MDMForMaskedDiffusion` are the same network (docs/concepts/mdlm-dit.md), so the
conversion renames weights one for one and checks every name and shape. Two source formats:

Hub layout (`kuleshov-group/mdlm-owt`): a folder with `config.json` (model_type "mdlm"; vocab_size, model_length,
    hidden_dim, cond_dim, n_blocks, n_heads, dropout, time_conditioning) and `model.safetensors` or
    `pytorch_model.bin` (possibly sharded) holding MDLM's DiT under `backbone.`, plus the persistent rotary buffer
    `backbone.rotary_emb.inv_freq`, which is checked and dropped (hf_mdm computes it).

Lightning checkpoint (what MDLM's `main.py` saves, e.g. `mdlm.ckpt`): a `torch.save`d dict whose `state_dict`
    holds the same DiT under `backbone.` (under `backbone.backbone.` for runs with `backbone=hf_dit`). With
    `training.ema > 0`, MDLM's `on_save_checkpoint` adds `ema` = `ExponentialMovingAverage.state_dict()` =
    {decay, num_updates, shadow_params}, where `shadow_params` is a list of tensors in the order of
    `itertools.chain(backbone.parameters(), noise.parameters())` (the noise schedules have no parameters). MDLM
    validates and samples with the EMA weights, so they are converted when present (`use_ema=False` for the raw
    ones). `hyper_parameters` holds the run's omegaconf config (model.n_heads, model.length, time_conditioning,
    noise.type, parameterization, backbone) and the run's tokenizer, both read without constructing them
    (`safe_load.plain_data`, `pickled_tokenizer.read_pickled_tokenizer`).

BD3-LM (`kuleshov-group/bd3lm-owt-block_size4/8/16`, Arriola et al., arXiv:2503.09573) is MDLM's DiT with
    block-causal attention: the Hub layout above with model_type "bd3lm", `block_size` (-> `diffusion_block_size`),
    training-only fields (`cross_attn`: the [x_t; x_0] pass, `attn_backend`, `var_min`, `sampling_eps_min/max`: the
    clipped noise interval its training searched) and two top-level 0-d buffers `sampling_eps_min/max` outside
    `backbone.`, dropped with a note (sampling a time-agnostic model never reads them). `adaln` must be true and
    `causal` false (the released models; the AR baseline is another network).

The converted folder: `MDMConfig` with MDLM's [MASK] (the run's tokenizer's own mask token if it has one, e.g. 103
for bert-base-uncased, else a new last id, `vocab_size - 1`: 50257 for GPT-2), read from the checkpoint's pickled
tokenizer or a tokenizer folder, else assumed `vocab_size - 1` with a note saying how to override it; the bos / eos
/ pad ids of the same tokenizer; the log-linear schedule with eps 1e-3 (MDLM's default); the time input = total
noise sigma(t) = -log alpha_t, which is what MDLM feeds a time-conditioned DiT; optionally MDLM's attention over
padding and length extrapolation (`attend_to_padding`, `length_extrapolation`); an `MDMGenerationConfig` (exact
first-hitting sampling); the tokenizer when the source has tokenizer files; a model card.
"""

import hashlib
import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..configuration_mdm import MDMConfig
from ..generation_mdm import MDMGenerationConfig
from ..modeling_mdm import MDMForMaskedDiffusion
from ..files import staged_folder
from .pickled_tokenizer import PickledTokenizerIds, read_pickled_tokenizer
from .safe_load import (
    ConversionError,
    PickledObject,
    plain_data,
    read_weights_folder,
    require_tensor,
    torch_load_weights_only,
)


# ----------------------------------------------------------------------------------------------------------------
# Names: MDLM's DiT parameters in registration order (= the order of `backbone.parameters()`, hence of the EMA's
# shadow_params) and the hf_mdm parameter each one becomes.
# ----------------------------------------------------------------------------------------------------------------

EMBEDDING_PARAMETERS = (
    ("vocab_embed.embedding", "model.embed_tokens.weight"),
    ("sigma_map.mlp.0.weight", "model.timestep_embedder.mlp.0.weight"),
    ("sigma_map.mlp.0.bias", "model.timestep_embedder.mlp.0.bias"),
    ("sigma_map.mlp.2.weight", "model.timestep_embedder.mlp.2.weight"),
    ("sigma_map.mlp.2.bias", "model.timestep_embedder.mlp.2.bias"),
)
BLOCK_PARAMETERS = (
    ("norm1.weight", "norm1.weight"),
    ("attn_qkv.weight", "self_attn.qkv_proj.weight"),  # rows laid out (three, heads, head_dim) in both
    ("attn_out.weight", "self_attn.o_proj.weight"),
    ("norm2.weight", "norm2.weight"),
    ("mlp.0.weight", "mlp.fc_in.weight"),
    ("mlp.0.bias", "mlp.fc_in.bias"),
    ("mlp.2.weight", "mlp.fc_out.weight"),
    ("mlp.2.bias", "mlp.fc_out.bias"),
    ("adaLN_modulation.weight", "modulation.weight"),  # chunks: shift, scale, gate (attention), then MLP
    ("adaLN_modulation.bias", "modulation.bias"),
)
OUTPUT_PARAMETERS = (
    ("output_layer.norm_final.weight", "output_layer.norm.weight"),
    ("output_layer.linear.weight", "output_layer.linear.weight"),
    ("output_layer.linear.bias", "output_layer.linear.bias"),
    ("output_layer.adaLN_modulation.weight", "output_layer.modulation.weight"),  # chunks: shift, scale
    ("output_layer.adaLN_modulation.bias", "output_layer.modulation.bias"),
)
ROTARY_BUFFER = "rotary_emb.inv_freq"
BACKBONE_PREFIXES = ("backbone.backbone.", "backbone.")  # Lightning run with backbone=hf_dit; everything else

# MDLM's own MDLMConfig defaults: what MDLM uses for a field its config.json leaves out.
MDLM_CONFIG_DEFAULTS = dict(
    vocab_size=50258, model_length=1024, hidden_dim=768, cond_dim=128, n_blocks=12, n_heads=12, dropout=0.1,
    time_conditioning=False,
)
MDLM_MLP_RATIO = 4  # DDiTBlock's default, never overridden by MDLM
MDLM_ROPE_THETA = 10000.0
MDLM_NOISE_EPS = 1e-3  # LogLinearNoise(eps=1e-3)
# BD3-LM's config.json: what the converter understands beyond MDLM's fields, and the buffers outside the backbone.
BD3LM_FIELDS = {"block_size", "cross_attn", "adaln", "causal", "attn_backend", "var_min", "sampling_eps_min",
                "sampling_eps_max", "return_dict", "architectures", "auto_map", "model_type", "torch_dtype", "dtype",
                "transformers_version", "_name_or_path"} | set(MDLM_CONFIG_DEFAULTS)
BD3LM_BUFFERS = ("sampling_eps_min", "sampling_eps_max")

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                   "added_tokens.json", "vocab.txt")
HUB_DOWNLOAD_PATTERNS = ["config.json", "model.safetensors", "model.safetensors.index.json", "model-*.safetensors",
                         "README.md", *TOKENIZER_FILES]  # README.md: the source card, for its license
HUB_BIN_PATTERNS = ["pytorch_model.bin", "pytorch_model.bin.index.json", "pytorch_model-*.bin"]


def parameter_map(num_blocks: int) -> list[tuple[str, str]]:
    """(MDLM name without `backbone.`, hf_mdm name) for every parameter, in MDLM's `parameters()` order."""
    names = list(EMBEDDING_PARAMETERS)
    for i in range(num_blocks):
        names += [(f"blocks.{i}.{mdlm}", f"model.layers.{i}.{ours}") for mdlm, ours in BLOCK_PARAMETERS]
    return names + list(OUTPUT_PARAMETERS)


# ----------------------------------------------------------------------------------------------------------------
# Reading a source.
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class MDLMSource:
    """An MDLM checkpoint read into memory.

    Args:
        name: what the model card calls the source (Hub id or path as given).
        layout: "hub" or "lightning".
        fields: MDLM config fields (vocab_size, model_length, hidden_dim, cond_dim, n_blocks, n_heads, dropout,
            time_conditioning; None where unknown).
        weights: MDLM DiT tensors by name, without the `backbone.` prefix.
        prefix: the prefix the weights had in the file, for error messages.
        files: the files the weights came from.
        tokenizer_folder: a folder with tokenizer files, if any.
        tokenizer_ids: a Lightning checkpoint's pickled tokenizer, read inertly (its [MASK] and special ids).
        license: the Hub license id in the source's model card (README.md front matter), if it has one.
        hub_id, revision: set when the source was downloaded from the Hugging Face Hub.
        used_ema: whether `weights` are a Lightning checkpoint's EMA weights.
        notes: what the reader decided, for the log and the model card.
        family: "mdlm", or "bd3lm" (block-causal; `fields["diffusion_block_size"]`).
    """

    name: str
    layout: str
    fields: dict
    weights: dict[str, torch.Tensor]
    prefix: str
    files: list[Path]
    tokenizer_folder: Path | None = None
    tokenizer_ids: PickledTokenizerIds | None = None
    license: str | None = None
    hub_id: str | None = None
    revision: str | None = None
    used_ema: bool = False
    notes: list[str] = field(default_factory=list)
    family: str = "mdlm"


def _split_backbone(state: dict, where: str) -> tuple[dict, str, list[str]]:
    """(weights without prefix, prefix, keys outside the backbone)."""
    for prefix in BACKBONE_PREFIXES:
        if prefix + EMBEDDING_PARAMETERS[0][0] in state:
            break
    else:
        first = ", ".join(list(state)[:5])
        raise ConversionError(
            f"{where} has no backbone.vocab_embed.embedding, so it does not hold MDLM's DiT under `backbone.` "
            f"(its first keys: {first})."
        )
    weights = {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}
    others = [key for key in state if not key.startswith(prefix)]
    return weights, prefix, others


def _count_blocks(weights: dict) -> int:
    indices = {int(m.group(1)) for key in weights if (m := re.match(r"blocks\.(\d+)\.", key))}
    return max(indices) + 1 if indices else 0


def bd3lm_block_size(raw: dict, config_path: Path) -> int:
    """BD3-LM's block size, after refusing any config field the converter does not understand and the variants it
    does not convert (no adaLN, the causal AR baseline)."""
    unknown = sorted(set(raw) - BD3LM_FIELDS)
    if unknown:
        raise ConversionError(f"{config_path}: config field {unknown[0]!r} (= {raw[unknown[0]]!r}) is not part of "
                              f"BD3-LM's architecture as hf_mdm converts it (known: {sorted(BD3LM_FIELDS)}); nothing "
                              "was written.")
    for key, allowed, why in (("adaln", (True, None), "the released BD3-LMs condition every block with adaLN"),
                              ("causal", (False, None), "causal=true is BD3-LM's autoregressive baseline, not a "
                                                        "block-diffusion model")):
        if raw.get(key) not in allowed:
            raise ConversionError(f"{config_path}: {key}={raw.get(key)!r} is not supported (allowed: {allowed}): {why}.")
    block = raw.get("block_size")
    if not isinstance(block, int) or isinstance(block, bool) or block < 1:
        raise ConversionError(f"{config_path}: block_size must be a positive integer (BD3-LM's block), got {block!r}.")
    return block


def read_hub_folder(folder: Path, name: str | None = None) -> MDLMSource:
    """A folder in the Hub layout of `kuleshov-group/mdlm-owt` (see the module docstring)."""
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ConversionError(
            f"{folder} has no config.json: an MDLM Hub-layout folder needs one (model_type 'mdlm'). "
            "For a Lightning checkpoint, pass the .ckpt file itself."
        )
    raw = json.loads(config_path.read_text())
    model_type = raw.get("model_type")
    if model_type not in ("mdlm", "bd3lm"):
        hint = " It is already an hf_mdm checkpoint: load it with AutoModel.from_pretrained." if model_type == "mdm" else ""
        raise ConversionError(
            f"{config_path} has model_type {model_type!r}; MDLM's masked-diffusion DiT (model_type 'mdlm') and "
            f"BD3-LM's block-diffusion DiT ('bd3lm') convert.{hint}"
        )
    source = MDLMSource(name=name or str(folder), layout="hub", fields={}, weights={}, prefix="backbone.", files=[],
                        family=model_type)
    if model_type == "bd3lm":
        source.fields["diffusion_block_size"] = bd3lm_block_size(raw, config_path)
    for key, default in MDLM_CONFIG_DEFAULTS.items():
        if key in raw:
            source.fields[key] = raw[key]
        else:
            source.fields[key] = default
            source.notes.append(f"config.json has no {key}; used MDLM's default {default!r}")
    state, source.files = read_weights_folder(folder)
    where = ", ".join(path.name for path in source.files)
    source.weights, source.prefix, others = _split_backbone(state, where)
    if source.family == "bd3lm":
        for key in [key for key in others if key in BD3LM_BUFFERS]:
            others.remove(key)
            source.notes.append(f"the stored {key} = {float(state[key]):.4g} (the noise interval BD3-LM's training "
                                "searched) is dropped: sampling a time-agnostic model never reads it")
    if others:
        key = others[0]
        raise ConversionError(
            f"unexpected weight {key} with shape {tuple(state[key].shape)} in {where}: MDLM's Hub layout keeps "
            f"every weight under {source.prefix}"
        )
    if any((folder / name).is_file() for name in TOKENIZER_FILES):
        source.tokenizer_folder = folder
    source.license = card_license(folder / "README.md")
    return source


def card_license(readme: Path) -> str | None:
    """The `license` of a model card's front matter; None without a card, front matter or license."""
    if not readme.is_file():
        return None
    from huggingface_hub import ModelCard

    try:
        license = ModelCard.load(readme).data.license
    except Exception:  # a card that does not parse tells us nothing about the license
        return None
    return license if isinstance(license, str) and license.strip() else None


def resolve_license(license: str | None, source_license: str | None, notes: list[str]) -> str:
    """The card's license: the one given, else the source card's, else "other" (converted weights keep their
    source's terms, so a converter never guesses one); what was decided goes into `notes`."""
    if license is None:
        if source_license is None:
            notes.append("the source has no license in a model card: the card says license 'other'; set the "
                         "source's license (--license) before publishing")
        return source_license or "other"
    if source_license not in (None, license):
        notes.append(f"license {license!r} given, overriding the source card's {source_license!r}")
    return license


def read_lightning_checkpoint(path: Path, use_ema: bool = True, name: str | None = None) -> MDLMSource:
    """A Lightning checkpoint saved by MDLM's `main.py` (see the module docstring)."""
    checkpoint = torch_load_weights_only(path)
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        keys = list(checkpoint)[:6] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ConversionError(
            f"{path} is not a Lightning checkpoint: it has no state_dict entry (found {keys}). "
            "A Hub-layout folder (config.json + weights) is passed as the folder."
        )
    state = checkpoint["state_dict"]
    if not isinstance(state, dict):
        require_tensor(state, f"{path.name}: state_dict")  # a stand-in: refused with the reason
        raise ConversionError(f"{path.name}: state_dict must be a dict of tensors, got {type(state).__name__}.")
    weights, prefix, others = _split_backbone(state, f"{path.name}: state_dict")
    weights = {key: require_tensor(value, f"{path.name}: state_dict[{prefix + key!r}]") for key, value in weights.items()}
    source = MDLMSource(name=name or str(path), layout="lightning", fields={}, weights=weights, prefix=prefix,
                        files=[path])
    if others:
        source.notes.append(f"ignored {len(others)} state_dict entries outside the DiT: {', '.join(others[:5])}")

    # The architecture: the run's config where it can be read, the weight shapes for the rest.
    hyper = plain_data(checkpoint.get("hyper_parameters"), f"{path.name}: hyper_parameters")
    run_config = hyper.get("config") if isinstance(hyper, dict) else None
    run_config = run_config if isinstance(run_config, dict) else {}
    model = run_config.get("model") if isinstance(run_config.get("model"), dict) else {}
    _check_run_config(run_config, path)

    def known(value):
        value = _follow_interpolation(value, run_config)
        return None if isinstance(value, (PickledObject, dict, list)) or (isinstance(value, str) and "${" in value) else value

    embedding = weights[EMBEDDING_PARAMETERS[0][0]]
    sigma_map = weights.get(EMBEDDING_PARAMETERS[1][0])
    source.fields = dict(
        vocab_size=embedding.shape[0],
        model_length=known(model.get("length")),
        hidden_dim=known(model.get("hidden_size")) or embedding.shape[1],
        cond_dim=known(model.get("cond_dim")) or (sigma_map.shape[0] if sigma_map is not None else None),
        n_blocks=known(model.get("n_blocks")) or _count_blocks(weights),
        n_heads=known(model.get("n_heads")),
        dropout=known(model.get("dropout")),
        time_conditioning=known(run_config.get("time_conditioning")),
    )
    if source.fields["dropout"] is None:
        source.fields["dropout"] = MDLM_CONFIG_DEFAULTS["dropout"]
    if run_config:
        source.notes.append("read the architecture from the checkpoint's hyper_parameters.config")
    else:
        source.notes.append("the checkpoint's hyper_parameters hold no readable config: architecture from weight shapes")
    data = run_config.get("data") if isinstance(run_config.get("data"), dict) else {}
    if data.get("wrap") is False:
        source.notes.append("the run trained on padded sequences (data.wrap = False), and MDLM's DiT attends to its "
                            "padding: convert with attend_to_padding=True (--attend-to-padding) to do the same")

    # The run's tokenizer, pickled by save_hyperparameters(): it decides [MASK] and the special ids.
    raw_hyper = checkpoint.get("hyper_parameters")
    pickled_tokenizer = raw_hyper.get("tokenizer") if isinstance(raw_hyper, dict) else None
    if isinstance(pickled_tokenizer, PickledObject):
        source.tokenizer_ids = read_pickled_tokenizer(pickled_tokenizer)

    ema = checkpoint.get("ema")
    if use_ema and ema is not None:
        source.weights = _ema_weights(weights, ema, source.fields["n_blocks"], f"{path.name}: ema")
        source.used_ema = True
        source.notes.append("used the EMA weights (ema.shadow_params), as MDLM does for evaluation and sampling")
    elif use_ema:
        source.notes.append("the checkpoint has no EMA (training.ema = 0): converted the raw weights")
    else:
        source.notes.append("converted the raw (non-EMA) weights, as asked")
    return source


def _follow_interpolation(value, run_config: dict, depth: int = 0):
    """A plain `${a.b.c}` (an absolute omegaconf interpolation, without resolver) looked up in the run's config;
    anything else unchanged."""
    match = re.fullmatch(r"\$\{([A-Za-z_][\w]*(?:\.[A-Za-z_][\w]*)*)\}", value) if isinstance(value, str) else None
    if match is None or depth > 8:
        return value
    node = run_config
    for key in match.group(1).split("."):
        if not isinstance(node, dict) or key not in node:
            return value
        node = node[key]
    return _follow_interpolation(node, run_config, depth + 1)


def _check_run_config(run_config: dict, path: Path) -> None:
    """Refuses runs whose network is not MDLM's masked-diffusion DiT with the log-linear schedule."""
    checks = (
        ("backbone", ("dit", "hf_dit"), "hf_mdm implements MDLM's DiT only"),
        ("parameterization", ("subs",), "only the SUBS (masked diffusion) parameterization gives hf_mdm's logits"),
    )
    for key, allowed, why in checks:
        value = run_config.get(key)
        if isinstance(value, str) and value not in allowed:
            raise ConversionError(f"{path}: the run has {key}={value!r}, expected one of {allowed}: {why}.")
    noise = run_config.get("noise")
    noise_type = noise.get("type") if isinstance(noise, dict) else None
    if isinstance(noise_type, str) and noise_type != "loglinear":
        raise ConversionError(
            f"{path}: the run has noise.type={noise_type!r}; hf_mdm converts MDLM's 'loglinear' schedule only "
            "(MDLM's other schedules define sigma(t) differently from hf_mdm's)."
        )


def _ema_weights(weights: dict, ema, num_blocks: int, where: str) -> dict:
    """The EMA weights: `shadow_params[i]` is the i-th parameter of MDLM's DiT in `parameters()` order."""
    shadow = ema.get("shadow_params") if isinstance(ema, dict) else None
    if not isinstance(shadow, (list, tuple)):
        raise ConversionError(f"{where} has no shadow_params list (MDLM's ExponentialMovingAverage.state_dict()).")
    names = [mdlm for mdlm, _ in parameter_map(num_blocks)]
    if len(shadow) < len(names):
        raise ConversionError(
            f"{where}.shadow_params holds {len(shadow)} tensors, but MDLM's DiT with {num_blocks} blocks has "
            f"{len(names)} parameters, so they cannot be matched to names. Convert the raw weights (--no-ema)."
        )
    averaged = dict(weights)
    for index, name in enumerate(names):
        tensor = require_tensor(shadow[index], f"{where}.shadow_params[{index}]")
        if name in weights and tensor.shape != weights[name].shape:
            raise ConversionError(
                f"shape mismatch for {where}.shadow_params[{index}], which should be backbone.{name}: the EMA has "
                f"{tuple(tensor.shape)}, the state_dict {tuple(weights[name].shape)}. The EMA is not in the order of "
                "MDLM's DiT parameters; convert the raw weights (--no-ema)."
            )
        averaged[name] = tensor
    return averaged


def resolve_source(src: str | Path, revision: str | None = None, allow_patterns=HUB_DOWNLOAD_PATTERNS,
                   fallback_patterns=HUB_BIN_PATTERNS, example: str = "kuleshov-group/mdlm-owt") -> tuple[Path, str | None]:
    """A local path, or a Hub repo id ("owner/name") downloaded with huggingface_hub: (path, hub_id or None).

    `allow_patterns` are downloaded first; `fallback_patterns` are added when that gives no safetensors.
    """
    path = Path(src).expanduser()
    if path.exists():
        return path, None
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", str(src)):
        raise ConversionError(f"{src} does not exist (and is not a Hub repo id such as {example}).")
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(str(src), revision=revision, allow_patterns=list(allow_patterns)))
        if not any(folder.glob("*.safetensors")) and fallback_patterns:
            folder = Path(snapshot_download(str(src), revision=revision,
                                            allow_patterns=list(allow_patterns) + list(fallback_patterns)))
    except Exception as error:
        raise ConversionError(f"{src} is not a local path, and downloading it from the Hugging Face Hub failed: {error}") from error
    return folder, str(src)


def read_mdlm_source(src: str | Path, revision: str | None = None, use_ema: bool = True) -> MDLMSource:
    """Reads either layout: a folder (or Hub id) is the Hub layout, a file a Lightning checkpoint."""
    path, hub_id = resolve_source(src, revision)
    if path.is_dir():
        source = read_hub_folder(path, name=hub_id or str(src))
    elif path.suffix == ".safetensors":
        raise ConversionError(f"{path} is a bare weights file: pass the folder that also holds its config.json.")
    else:
        source = read_lightning_checkpoint(path, use_ema=use_ema, name=str(src))
    source.hub_id, source.revision = hub_id, revision
    return source


# ----------------------------------------------------------------------------------------------------------------
# Building the hf_mdm model.
# ----------------------------------------------------------------------------------------------------------------


def mdm_config_from_mdlm(fields: dict, mask_token_id: int | None = None, attend_to_padding: bool = False,
                         length_extrapolation: bool = False, **special_tokens) -> MDMConfig:
    """The `MDMConfig` of an MDLM DiT: same sizes, [MASK] = `vocab_size - 1` unless given, MDLM's log-linear schedule;
    `attend_to_padding` / `length_extrapolation` choose MDLM's handling of padding and of longer sequences."""
    missing = [key for key in ("vocab_size", "hidden_dim", "cond_dim", "n_blocks", "n_heads", "model_length",
                               "time_conditioning") if fields.get(key) is None]
    if missing:
        options = {"n_heads": "--n-heads", "model_length": "--model-length", "time_conditioning": "--time-conditioning"}
        hints = [f"{key} ({options[key]})" if key in options else key for key in missing]
        raise ConversionError(f"the source does not say {', '.join(hints)}; pass them explicitly.")
    vocab_size = int(fields["vocab_size"])
    try:
        return MDMConfig(
            vocab_size=vocab_size,
            mask_token_id=vocab_size - 1 if mask_token_id is None else mask_token_id,
            hidden_size=int(fields["hidden_dim"]),
            num_hidden_layers=int(fields["n_blocks"]),
            num_attention_heads=int(fields["n_heads"]),
            cond_dim=int(fields["cond_dim"]),
            mlp_ratio=MDLM_MLP_RATIO,
            dropout=float(fields["dropout"]),
            max_position_embeddings=int(fields["model_length"]),
            rope_parameters={"rope_type": "default", "rope_theta": MDLM_ROPE_THETA},
            time_conditioning=bool(fields["time_conditioning"]),
            noise_schedule="loglinear",
            noise_eps=MDLM_NOISE_EPS,
            attend_to_padding=attend_to_padding,
            length_extrapolation=length_extrapolation,
            diffusion_block_size=fields.get("diffusion_block_size"),
            **{key: value for key, value in special_tokens.items() if value is not None},
        )
    except ValueError as error:
        raise ConversionError(f"the MDLM config does not make a valid hf_mdm config: {error}") from error


def check_mdlm_weights(config: MDMConfig, weights: dict, prefix: str = "backbone.") -> None:
    """Checks every name and shape of MDLM DiT weights (names without `prefix`) against the model `config` makes,
    built on the meta device: a wrong config is refused before the model costs any memory."""
    with torch.device("meta"):
        target = MDMForMaskedDiffusion(config).state_dict()
    mapping = parameter_map(config.num_hidden_layers)
    for source_name, target_name in mapping:
        expected = tuple(target[target_name].shape)
        if source_name not in weights:
            raise ConversionError(f"missing weight {prefix}{source_name} (hf_mdm {target_name}, shape {expected}).")
        if tuple(weights[source_name].shape) != expected:
            raise ConversionError(
                f"shape mismatch for {prefix}{source_name}: the checkpoint has {tuple(weights[source_name].shape)}, "
                f"hf_mdm's {target_name} needs {expected} (from the config: hidden={config.hidden_size}, "
                f"cond_dim={config.cond_dim}, vocab_size={config.vocab_size})."
            )
    unexpected = sorted(set(weights) - {name for name, _ in mapping} - {ROTARY_BUFFER})
    if unexpected:
        key = unexpected[0]
        raise ConversionError(
            f"unexpected weight {prefix}{key} with shape {tuple(weights[key].shape)} ({len(unexpected)} unexpected in "
            f"all): not part of MDLM's DiT with {config.num_hidden_layers} blocks."
        )


def load_mdlm_weights(model: MDMForMaskedDiffusion, weights: dict, prefix: str = "backbone.") -> None:
    """Copies MDLM DiT weights (names without `prefix`) into `model`, checking every name and shape first."""
    check_mdlm_weights(model.config, weights, prefix)
    target = model.state_dict()
    converted = {target_name: weights[source_name].to(target[target_name].dtype)
                 for source_name, target_name in parameter_map(model.config.num_hidden_layers)}
    if ROTARY_BUFFER in weights:  # MDLM's persistent buffer: it must be the one hf_mdm computes
        inv_freq, ours = weights[ROTARY_BUFFER].float(), model.model.rotary_emb.compute_parameters()[0]
        if inv_freq.shape != ours.shape:
            raise ConversionError(
                f"shape mismatch for {prefix}{ROTARY_BUFFER}: the checkpoint has {tuple(inv_freq.shape)}, hf_mdm "
                f"computes {tuple(ours.shape)} (head_dim / 2 for n_heads={model.config.num_attention_heads})."
            )
        if not torch.allclose(inv_freq, ours, rtol=1e-6, atol=0):
            raise ConversionError(f"{prefix}{ROTARY_BUFFER} is not the rotary base-10000 table that MDLM and hf_mdm use.")
    model.load_state_dict(converted, strict=True)


def _run_tokenizer_ids(ids: PickledTokenizerIds, vocab_size: int, mask_token_id: int | None, notes: list[str]):
    """[MASK] and the special ids from the run's pickled tokenizer, by MDLM's rule; None if it cannot be read."""
    if not ids.readable:
        return None
    run_mask = ids.ids["mask_token_id"] if ids.mask_token is not None else vocab_size - 1
    if not 0 <= run_mask < vocab_size:
        raise ConversionError(f"the run's tokenizer ({ids.class_name}) has [MASK] id {run_mask}, outside the model's "
                              f"vocabulary of {vocab_size} ids.")
    if mask_token_id is not None and mask_token_id != run_mask:
        raise ConversionError(
            f"mask_token_id={mask_token_id} was asked, but the run's tokenizer pickled in the checkpoint "
            f"({ids.class_name}) gives [MASK] = {run_mask}, which is what MDLM trained with."
        )
    if ids.mask_token is not None:
        notes.append(f"[MASK] = {run_mask}: the mask token {ids.mask_token!r} of the run's tokenizer ({ids.class_name}, "
                     "read from the checkpoint)")
    else:
        expected = "" if ids.vocab_size in (None, vocab_size - 1) else (
            f"; note that its vocabulary has {ids.vocab_size} tokens, where MDLM's rule expects {vocab_size - 1}")
        notes.append(f"[MASK] = {run_mask}: the run's tokenizer ({ids.class_name}, read from the checkpoint) has no mask "
                     f"token, so MDLM added one as the last id{expected}")
    special = {}
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = ids.ids.get(name)
        if value is None:
            continue
        if value == run_mask:
            notes.append(f"the run's {name.replace('_id', '')} is id {value}, the [MASK] id (MDLM adds [PAD] after "
                         f"GPT-2's vocabulary, where [MASK] is too): {name} left unset")
        elif not 0 <= value < vocab_size:
            notes.append(f"the run's {name} {value} lies outside the model's {vocab_size} ids: left unset")
        else:
            special[name] = value
    return run_mask, special


def _tokenizer_settings(folder: Path, vocab_size: int, mask_token_id: int | None, notes: list[str]):
    """Loads the source tokenizer; returns (tokenizer, mask id by MDLM's rule, special token ids)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as error:
        raise ConversionError(f"{folder} has tokenizer files that transformers cannot load: {error}") from error
    if tokenizer.mask_token is not None:  # MDLM: mask_index = tokenizer.mask_token_id when the tokenizer has one
        if mask_token_id is not None and mask_token_id != tokenizer.mask_token_id:
            raise ConversionError(
                f"mask_token_id={mask_token_id} was asked, but the tokenizer's {tokenizer.mask_token!r} is id "
                f"{tokenizer.mask_token_id}, which is what MDLM trained with."
            )
        mask_token_id = tokenizer.mask_token_id
    else:  # MDLM: no mask token, so [MASK] is a new last id
        mask_token_id = vocab_size - 1 if mask_token_id is None else mask_token_id
        if len(tokenizer) == mask_token_id:
            tokenizer.add_special_tokens({"mask_token": "[MASK]"})
            notes.append(f"added [MASK] (id {mask_token_id}) to the tokenizer")
        else:
            notes.append(f"the tokenizer ({len(tokenizer)} tokens) has no mask token; [MASK] is id {mask_token_id}")
    if len(tokenizer) > vocab_size:
        notes.append(f"the tokenizer has {len(tokenizer)} tokens, more than the model's {vocab_size}")
    special = {}
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int) and 0 <= value < vocab_size and value != mask_token_id:
            special[name] = value
    return tokenizer, mask_token_id, special


# ----------------------------------------------------------------------------------------------------------------
# The whole conversion.
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class ConversionResult:
    """What `convert_mdlm` made: the model (in memory), where it was saved, and what was decided on the way."""

    model: MDMForMaskedDiffusion
    path: Path
    source: MDLMSource
    notes: list[str]


def convert_mdlm(
    src: str | Path,
    dst: str | Path,
    *,
    revision: str | None = None,
    use_ema: bool = True,
    n_heads: int | None = None,
    model_length: int | None = None,
    time_conditioning: bool | None = None,
    mask_token_id: int | None = None,
    tokenizer: str | Path | None = None,
    attend_to_padding: bool = False,
    length_extrapolation: bool = False,
    license: str | None = None,
    overwrite: bool = False,
    verify: bool = True,
    family: str | None = None,
) -> ConversionResult:
    """Converts an MDLM (or BD3-LM) checkpoint into a hub-ready hf_mdm folder.

    The steps:
        1. Read the source: a folder in the Hub layout, a Hub repo id (downloaded), or a Lightning checkpoint
           (EMA weights unless `use_ema=False`). Only safetensors and `torch.load(weights_only=True)` are used.
        2. Make the `MDMConfig`: the source's sizes (`n_heads`, `model_length`, `time_conditioning` override it;
           a Lightning checkpoint whose config cannot be read needs them), log-linear schedule with eps 1e-3, and
           [MASK] by MDLM's rule from the run's tokenizer: the one pickled in a Lightning checkpoint (read
           inertly), else the tokenizer folder, else `vocab_size - 1`, assumed with a note and a warning saying
           how to override it (`mask_token_id`). bos / eos / pad come from the same tokenizer.
        3. Copy the weights, checking every name and shape (errors name the key and both shapes).
        4. Save with `save_pretrained` (remote code included), the generation config (first-hitting), the tokenizer
           (from `tokenizer` or the source folder) and a model card naming the source, into a hidden sibling of
           `dst` (holding `dst`'s lock: one conversion at a time).
        5. With `verify`, reload that folder and check that it gives the same logits as the converted model; only
           then does it become `dst` (an atomic swap with what was there, with `overwrite`).

    Args:
        src: Hub-layout folder, Hub repo id ("kuleshov-group/mdlm-owt") or Lightning `.ckpt` file.
        dst: output folder; must be empty or absent unless `overwrite`.
        mask_token_id: [MASK] id; default: the run's tokenizer's mask token, else `vocab_size - 1` (MDLM's rule).
            Refused when it contradicts a tokenizer that says otherwise.
        tokenizer: a folder with tokenizer files to ship with the model (default: the source folder's, if any).
        attend_to_padding: MDLM's DiT attends to every position, padding included (it has no attention mask);
            True gives the converted model that behaviour (`MDMConfig.attend_to_padding`). Default False: padding is
            never attended to and a padded row gives the logits it would give alone.
        length_extrapolation: MDLM's rotary DiT runs sequences longer than its training length; True lets the
            converted model do so with a warning (`MDMConfig.length_extrapolation`). Default False: refused.
        license: the card's Hub license id. Default: the source card's; "other" when it has none (weights keep
            their source's terms, so the converter never guesses a license), with a note to set it before publishing.
        family: "mdlm" or "bd3lm" to refuse a source of the other one (default: either).
    """
    if family not in (None, "mdlm", "bd3lm"):
        raise ConversionError(f"family must be 'mdlm', 'bd3lm' or None, got {family!r}.")
    dst = Path(dst)
    if dst.exists() and not dst.is_dir():
        raise ConversionError(f"{dst} is a file; the output is a folder.")
    if dst.exists() and any(dst.iterdir()) and not overwrite:
        raise ConversionError(f"{dst} exists and is not empty; pass overwrite=True (--overwrite) to replace it.")
    if license is not None and (not isinstance(license, str) or not license.strip()):
        raise ConversionError(f"license must be a non-empty Hub license id (e.g. apache-2.0), got {license!r}.")

    # 1. Read the source.
    source = read_mdlm_source(src, revision=revision, use_ema=use_ema)
    if family is not None and source.family != family:
        raise ConversionError(f"{src} is a {source.family} checkpoint (model_type {source.family!r}); use "
                              f"`hf-mdm convert {source.family}`.")
    source_folders = {path.parent.resolve() for path in source.files} if source.layout == "hub" else set()
    if dst.resolve() in source_folders:
        raise ConversionError(f"{dst} is the source itself; choose another output folder.")
    notes = list(source.notes)
    license = resolve_license(license, source.license, notes)
    for key, value in (("n_heads", n_heads), ("model_length", model_length), ("time_conditioning", time_conditioning)):
        if value is not None:
            if source.fields.get(key) not in (None, value):
                notes.append(f"{key}={value!r} given, overriding the source's {source.fields[key]!r}")
            source.fields[key] = value

    # 2. The config (and the run's tokenizer, which decides [MASK] and the special tokens).
    vocab_size = int(source.fields["vocab_size"])
    tokenizer_folder = Path(tokenizer) if tokenizer is not None else source.tokenizer_folder
    loaded_tokenizer, special, decided = None, {}, mask_token_id is not None
    run_ids = source.tokenizer_ids
    from_run = _run_tokenizer_ids(run_ids, vocab_size, mask_token_id, notes) if run_ids is not None else None
    if from_run is not None:
        (mask_token_id, special), decided = from_run, True
    if tokenizer_folder is not None:
        loaded_tokenizer, mask_token_id, folder_special = _tokenizer_settings(tokenizer_folder, vocab_size,
                                                                              mask_token_id, notes)
        special = {**folder_special, **special}  # the run's own ids first
        decided = True
    if not decided:
        why = (f"the checkpoint pickles the run's tokenizer ({run_ids.class_name}), but {'; '.join(run_ids.problems)}"
               if run_ids is not None else "the source has no tokenizer")
        message = (f"assumed [MASK] = {vocab_size - 1} (vocab_size - 1, MDLM's rule for a tokenizer without a mask "
                   f"token): {why}. If the run's tokenizer has its own mask token (bert-base-uncased: 103), pass "
                   "--mask-token-id ID (mask_token_id=ID) or its tokenizer folder (--tokenizer DIR)")
        notes.append(message)
        warnings.warn(f"hf_mdm convert mdlm: {message}.", stacklevel=2)
    for flag, value in (("attend_to_padding", attend_to_padding), ("length_extrapolation", length_extrapolation)):
        if not isinstance(value, bool):
            raise ConversionError(f"{flag} must be True or False, got {value!r}.")
    if attend_to_padding:
        notes.append("attend_to_padding: the model attends to padding and ignores attention_mask, as MDLM's DiT does")
    if length_extrapolation:
        notes.append("length_extrapolation: sequences longer than max_position_embeddings run with a warning "
                     "(rotary positions extrapolate), as MDLM's DiT runs them")
    config = mdm_config_from_mdlm(source.fields, mask_token_id=mask_token_id, attend_to_padding=attend_to_padding,
                                  length_extrapolation=length_extrapolation, **special)

    # 3. The weights: names and shapes checked on the meta device, then the model is built and filled.
    check_mdlm_weights(config, source.weights, source.prefix)
    model = MDMForMaskedDiffusion(config)
    load_mdlm_weights(model, source.weights, source.prefix)
    model.eval()
    # BD3-LM's own sampling (its README's scripts): exact first hitting in each block, nucleus 0.9, float64 draws.
    decoding = dict(sampler="first_hitting", top_p=0.9) if source.family == "bd3lm" else {}
    model.generation_config = MDMGenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id, **decoding
    )

    # 4. Save into a hidden sibling folder, 5. verify it; it becomes dst only then (staged_folder).
    with staged_folder(dst, overwrite, error=ConversionError) as staging:
        model.save_pretrained(staging)
        if loaded_tokenizer is not None:
            loaded_tokenizer.save_pretrained(staging)
        write_card(staging, source, config, notes, tokenizer_saved=loaded_tokenizer is not None, license=license)
        if verify:
            verify_saved_model(model, staging)
    return ConversionResult(model=model, path=dst, source=source, notes=notes)


def convert_bd3lm(src, dst, **kwargs) -> ConversionResult:
    """`convert_mdlm(src, dst, family="bd3lm", ...)`: kuleshov-group/bd3lm-owt-block_size4, _size8, _size16 (GPT-2's
    tokenizer; [MASK] = 50257, as BD3-LM adds it)."""
    return convert_mdlm(src, dst, family="bd3lm", **kwargs)


def verify_saved_model(model: MDMForMaskedDiffusion, folder: Path) -> None:
    """Reloads `folder` and checks that it computes exactly the logits of `model` on a fixed partly masked input."""
    reloaded = MDMForMaskedDiffusion.from_pretrained(folder).eval()
    config = model.config
    length = min(16, config.max_position_embeddings)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (2, length), generator=generator)
    ids[:, ::3] = config.mask_token_id
    timesteps = torch.tensor([0.5, 2.0]) if config.time_conditioning else None
    with torch.no_grad():
        expected = model(ids, timesteps=timesteps).logits
        got = reloaded(ids, timesteps=timesteps).logits
    if not torch.equal(expected, got):
        raise ConversionError(f"{folder} does not reload to the converted model (max |logit difference| "
                              f"{(expected - got).abs().nan_to_num().max():.3g}); please report this.")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_card(folder: Path, source: MDLMSource, config: MDMConfig, notes: list[str], tokenizer_saved: bool,
               license: str = "other") -> Path:
    """The README.md of a converted folder (through `hub.write_model_card`, the one card writer): where it came from
    and what the conversion decided."""
    from ..hub import write_model_card

    layout = {"hub": f"{'BD3-LM' if source.family == 'bd3lm' else 'MDLM'} Hub layout",
              "lightning": "MDLM Lightning checkpoint"}[source.layout]
    weights = "EMA weights" if source.used_ema else "weights"
    revision = f" (revision {source.revision})" if source.revision else ""
    files = "\n".join(f"- `{path.name}`: sha256 `{_sha256(path)}`" for path in source.files)
    conditioning = ("reads the noise level: hf_mdm feeds it the total noise sigma(t) = -log alpha_t, as MDLM does"
                    if config.time_conditioning else "ignores the noise level (time_conditioning = False), as MDLM's does")
    network = ("MDLM's diffusion transformer (Sahoo et al., *Simple and Effective Masked Diffusion Language Models*, "
               "arXiv:2406.07524)" if source.family == "mdlm" else
               "BD3-LM's block-diffusion transformer (Arriola et al., *Block Diffusion: Interpolating Between "
               "Autoregressive and Diffusion Language Models*, arXiv:2503.09573; bidirectional within blocks of "
               f"{config.diffusion_block_size} tokens, causal across them, decoded block by block with an exact KV cache)")
    summary = (f"Converted from **{source.name}**{revision} ({layout}, {weights}) with `hf-mdm convert {source.family}`: "
               f"{network} as an hf_mdm `MDMForMaskedDiffusion`. The weights are copied unchanged; the "
               "conversion checks that the folder reloads to the same logits. Use of these weights is governed by the "
               "source's license and model card.")
    conversion = f"""Source files:
{files}

| field | value |
| --- | --- |
| vocab_size | {config.vocab_size} |
| mask_token_id | {config.mask_token_id} (the network never predicts it) |
| hidden_size / layers / heads / cond_dim | {config.hidden_size} / {config.num_hidden_layers} / {config.num_attention_heads} / {config.cond_dim} |
| max_position_embeddings | {config.max_position_embeddings}{" (longer sequences run, with a warning: length_extrapolation)" if config.length_extrapolation else " (longer sequences are refused)"} |
| padding | {"attended to, attention_mask ignored, as MDLM's DiT does (attend_to_padding)" if config.attend_to_padding else "never attended to: a padded row gives the logits it would give alone"} |
| noise schedule | log-linear, alpha_t = 1 - (1 - {config.noise_eps}) t (MDLM's) |
| time conditioning | {config.time_conditioning}: the network {conditioning} |
| tokenizer | {"copied from the source" if tokenizer_saved else "none in the source (MDLM's OpenWebText models use GPT-2's)"} |
| attention | {"bidirectional" if config.diffusion_block_size is None else f"block-causal, diffusion_block_size={config.diffusion_block_size}"} |
| generation | `MDMGenerationConfig`: first_hitting{", top_p 0.9 (BD3-LM's scripts)" if source.family == "bd3lm" else ""}, float64 sampling |
"""
    if notes:
        conversion += "\nConversion notes:\n" + "".join(f"- {note}\n" for note in notes)
    return write_model_card(folder, title=f"{Path(str(source.name)).name or source.name} for hf_mdm", summary=summary,
                            license=license, tags=[source.family], base_model=source.hub_id, conversion=conversion)


__all__ = [
    "MDLMSource",
    "ConversionResult",
    "parameter_map",
    "read_hub_folder",
    "read_lightning_checkpoint",
    "read_mdlm_source",
    "resolve_source",
    "mdm_config_from_mdlm",
    "load_mdlm_weights",
    "convert_mdlm",
    "convert_bd3lm",
    "verify_saved_model",
    "write_card",
]
