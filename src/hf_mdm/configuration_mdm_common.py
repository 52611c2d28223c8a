"""What every hf_mdm configuration shares: the checks of the fields every family has (vocabulary and special ids,
rotary settings, noise schedule) and the `auto_map` that makes a saved folder load through remote code.

This file travels with every saved checkpoint as remote code: it imports only transformers, never `hf_mdm`.
"""

NOISE_SCHEDULES = ("loglinear", "linear", "cosine")
# Rotary types (transformers' ROPE_INIT_FUNCTIONS): "dynamic" rescales its frequencies once a sequence is longer
# than max_position_embeddings, "yarn" is built for a context `factor` times the original one.
ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")
SPECIAL_TOKEN_FIELDS = ("mask_token_id", "pad_token_id", "bos_token_id", "eos_token_id")


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_positive_ints(config, names) -> None:
    for name in names:
        value = getattr(config, name)
        if not is_int(value) or value < 1:
            raise ValueError(f"{type(config).__name__}.{name} must be a positive integer, got {value!r}.")


def check_shared_fields(config) -> None:
    """The fields every hf_mdm config has: vocabulary and special ids, rotary settings (where the family has them),
    noise schedule, block size.

    Raises ValueError naming the field and what is allowed (plain ValueError, not a strict-dataclass error).
    """
    name = type(config).__name__
    if config.vocab_size < 2:
        raise ValueError(f"{name}.vocab_size must be at least 2 (one real token and [MASK]), got {config.vocab_size}.")
    for field in SPECIAL_TOKEN_FIELDS:
        value = getattr(config, field)
        if value is None and field != "mask_token_id":
            continue
        if not is_int(value) or not 0 <= value < config.vocab_size:
            raise ValueError(f"{name}.{field} must be an integer in [0, vocab_size={config.vocab_size}), got {value!r}.")
    if config.pad_token_id is not None and config.pad_token_id == config.mask_token_id:
        raise ValueError(f"{name}.pad_token_id must differ from mask_token_id ({config.mask_token_id}).")
    if uses_rotary(config):
        check_rope_parameters(config)
    if config.noise_schedule not in NOISE_SCHEDULES:
        raise ValueError(f"{name}.noise_schedule must be one of {NOISE_SCHEDULES}, got {config.noise_schedule!r}.")
    if not is_number(config.noise_eps) or not 0.0 <= config.noise_eps < 1.0:
        raise ValueError(f"{name}.noise_eps must be a number in [0, 1), got {config.noise_eps!r}.")
    block_size = getattr(config, "diffusion_block_size", None)
    if block_size is not None and (not is_int(block_size) or not 1 <= block_size <= config.max_position_embeddings):
        raise ValueError(f"{name}.diffusion_block_size must be None (bidirectional) or an integer in [1, "
                         f"max_position_embeddings={config.max_position_embeddings}], got {block_size!r}.")


def uses_rotary(config) -> bool:
    """Whether the family places tokens with rotary embeddings (`rope_parameters`) rather than learned positions
    (GPT-2's, which end at `max_position_embeddings`)."""
    return hasattr(config, "rope_parameters")


def check_rope_parameters(config) -> None:
    name = type(config).__name__
    rope = config.rope_parameters
    if not isinstance(rope, dict) or rope.get("rope_type") not in ROPE_TYPES:
        raise ValueError(f"{name}.rope_parameters['rope_type'] must be one of {ROPE_TYPES}, got {rope!r}.")
    theta = rope.get("rope_theta")
    if not is_number(theta) or not theta > 0:
        raise ValueError(f"{name}.rope_parameters['rope_theta'] must be a positive number, got {theta!r}.")
    if rope["rope_type"] != "default" and not (is_number(rope.get("factor")) and rope["factor"] > 0):
        raise ValueError(f"{name}.rope_parameters['factor'] must be a positive number for rope_type "
                         f"{rope['rope_type']!r}, got {rope.get('factor')!r}.")


def auto_map(config_class: type, model_module: str, model_class: str) -> dict:
    """The same model class for every Auto class, so that a saved folder loads through remote code with AutoConfig,
    AutoModel and AutoModelForMaskedLM alike, and with AutoModelForCausalLM, which transformers' text-generation
    pipeline loads a folder with (the model's generate() is the diffusion sampler). Always today's file layout: a config read from a folder an earlier
    release saved (with other file names) is saved with the files save_pretrained writes now."""
    config_module = config_class.__module__.rsplit(".", 1)[-1]
    return {
        "AutoConfig": f"{config_module}.{config_class.__name__}",
        "AutoModel": f"{model_module}.{model_class}",
        "AutoModelForMaskedLM": f"{model_module}.{model_class}",
        "AutoModelForCausalLM": f"{model_module}.{model_class}",
    }


__all__ = ["NOISE_SCHEDULES", "ROPE_TYPES", "auto_map", "check_positive_ints", "check_shared_fields", "uses_rotary"]
