"""The networks a run trains: an MDM (`MDMForMaskedDiffusion`) or a transformers causal LM for the AR baseline.

`--model-config` is a preset name below or a JSON file: MDMConfig fields for the MDM, or a transformers config
with its `model_type` ("gpt2", "llama", ...) for the AR baseline. The vocabulary and special-token ids always come
from the tokenizer, so the model and the tokenizer cannot disagree.
"""

import json
from pathlib import Path

from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerBase

from ..configuration_mdm import MDMConfig
from ..modeling_mdm import MDMForMaskedDiffusion


MDM_PRESETS = {
    # For tests and CPU smoke runs.
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, cond_dim=32, max_position_embeddings=256,
                 dropout=0.0),
    # A few million parameters: minutes on a laptop CPU.
    "mini": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, cond_dim=64, max_position_embeddings=512),
    # MDLM's OpenWebText model (the MDMConfig defaults: 12 blocks of width 768, context 1024).
    "mdlm-owt": dict(),
}

AR_PRESETS = {
    "gpt2-tiny": dict(model_type="gpt2", n_embd=64, n_layer=2, n_head=4, n_positions=256),
    "gpt2-mini": dict(model_type="gpt2", n_embd=256, n_layer=4, n_head=4, n_positions=512),  # ~ the MDM "mini"
    "llama-tiny": dict(model_type="llama", hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256),
    # GPT-2 small (124M), the size of mdlm-owt: the paper's MDM-versus-ARM comparison.
    "gpt2-small": dict(model_type="gpt2"),
}


def model_config_fields(model_config: str, autoregressive: bool) -> dict:
    """The fields named by `--model-config`: a preset name or a JSON file."""
    presets = AR_PRESETS if autoregressive else MDM_PRESETS
    if model_config in presets:
        return dict(presets[model_config])
    path = Path(model_config)
    if not path.is_file():
        raise ValueError(
            f"--model-config {model_config!r} is neither a preset ({', '.join(presets)}) nor a JSON file."
        )
    try:
        fields = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"--model-config {model_config!r} is not valid JSON: {error}.") from None
    if not isinstance(fields, dict):
        raise ValueError(f"--model-config {model_config!r} must hold a JSON object of config fields.")
    if autoregressive and "model_type" not in fields:
        raise ValueError(
            f"--model-config {model_config!r} needs a 'model_type' (e.g. \"gpt2\", \"llama\") for --objective ar."
        )
    return fields


def build_model_config(model_config: str, autoregressive: bool, tokenizer: PreTrainedTokenizerBase, block_size: int,
                       diffusion_block_size: int | None = None):
    """The model's config, with vocabulary and special tokens from the tokenizer; checks `block_size` fits.
    `diffusion_block_size` makes the MDM block-causal (block diffusion)."""
    fields = model_config_fields(model_config, autoregressive)
    if diffusion_block_size is not None:
        fields["diffusion_block_size"] = diffusion_block_size
    vocab_size = fields.pop("vocab_size", len(tokenizer))
    if vocab_size < len(tokenizer):
        raise ValueError(f"The model config's vocab_size ({vocab_size}) is smaller than the tokenizer's ({len(tokenizer)}).")
    special = dict(eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.mask_token_id:
        special["pad_token_id"] = tokenizer.pad_token_id
    if autoregressive:
        config = AutoConfig.for_model(fields.pop("model_type"), vocab_size=vocab_size, **special, **fields)
    else:
        config = MDMConfig(vocab_size=vocab_size, mask_token_id=tokenizer.mask_token_id, **special, **fields)
    if block_size > config.max_position_embeddings:
        raise ValueError(
            f"--block-size {block_size} is above the model's max_position_embeddings ({config.max_position_embeddings})."
        )
    return config


def build_model(config):
    """A freshly initialised model for this config."""
    if isinstance(config, MDMConfig):
        return MDMForMaskedDiffusion(config)
    return AutoModelForCausalLM.from_config(config)
