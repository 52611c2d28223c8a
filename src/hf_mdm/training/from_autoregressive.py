"""An autoregressive causal LM adapted into an hf_mdm masked diffusion model: the recipe of SDAR, Fast-dLLM v2 and
dllm's AR-to-diffusion runs. The transformer stays the same and its weights are mapped one for one; [MASK] is added
where the tokenizer lacks one (a new embedding row, started at the mean of the others); the logits stay shifted as
the AR model's (position i is predicted from the hidden state at i - 1, Fast-dLLM v2's and Dream's choice), so with
blocks of one token the adapted model IS the AR model, and training moves it from there.

    hf-mdm train --init-from path/to/llama-or-qwen --diffusion-block-size 4 ...

Llama, Mistral (without sliding windows), Qwen2 and Qwen3 causal LMs map onto `MDMLlamaForMaskedDiffusion`.
GPT-2-style models (the shipped `shakespeare-ar`) have no hf_mdm backbone yet (learned positions, LayerNorm with
bias, fused Conv1D projections): they are refused with that reason.
"""

import json
from pathlib import Path

import torch

from ..configuration_mdm_llama import MDMLlamaConfig
from ..modeling_mdm_llama import MDMLlamaForMaskedDiffusion

# model_type -> the MDMLlamaConfig fields that tell its layer apart.
CAUSAL_LM_FAMILIES = {
    "llama": {},
    "mistral": {},
    "qwen2": {"attention_bias": True},
    "qwen3": {"qk_norm": True},
}
MASK_TOKEN = "<|mask|>"


def causal_lm_type(folder: Path) -> str | None:
    """The model_type of a causal-LM folder hf_mdm can adapt ('gpt2' included, to refuse it by name); else None."""
    config = Path(folder) / "config.json"
    if not config.is_file():
        return None
    model_type = json.loads(config.read_text()).get("model_type")
    return model_type if model_type in CAUSAL_LM_FAMILIES or model_type == "gpt2" else None


def add_mask_token(tokenizer) -> bool:
    """Gives the tokenizer a mask token if it has none; returns whether it added one."""
    if tokenizer.mask_token is not None:
        return False
    tokenizer.add_special_tokens({"mask_token": MASK_TOKEN})
    return True


def adapt_causal_lm(folder: Path, tokenizer, diffusion_block_size: int | None) -> MDMLlamaForMaskedDiffusion:
    """The causal LM in `folder` as an `MDMLlamaForMaskedDiffusion` with `tokenizer`'s [MASK] (the embedding grows to
    hold it if needed), shifted logits and `diffusion_block_size` (None: a bidirectional MDM, Dream's recipe)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    source = AutoConfig.from_pretrained(folder)
    model_type = source.model_type
    if model_type == "gpt2":
        raise ValueError(f"--init-from {folder}: a GPT-2-style causal LM (model_type 'gpt2') has no hf_mdm backbone "
                         "yet (learned positions, LayerNorm with bias); adaptable: "
                         f"{sorted(CAUSAL_LM_FAMILIES)} causal LMs.")
    if model_type not in CAUSAL_LM_FAMILIES:
        raise ValueError(f"--init-from {folder}: model_type {model_type!r} is not an adaptable causal LM "
                         f"(allowed: {sorted(CAUSAL_LM_FAMILIES)}).")
    checks = [] if model_type == "qwen2" else [("attention_bias", (False, None)), ("mlp_bias", (False, None))]
    checks.append(("sliding_window", (None,)) if model_type == "mistral" else ("use_sliding_window", (False, None)))
    for field, allowed in checks:
        if getattr(source, field, None) not in allowed:
            raise ValueError(f"--init-from {folder}: {field}={getattr(source, field)!r} is not supported (allowed: "
                             f"{allowed}): hf_mdm's Llama-family layer has no such part.")
    mask_id = tokenizer.convert_tokens_to_ids(tokenizer.mask_token)
    vocab_size = max(source.vocab_size, len(tokenizer))
    config = MDMLlamaConfig(
        vocab_size=vocab_size, mask_token_id=mask_id, hidden_size=source.hidden_size,
        intermediate_size=source.intermediate_size, num_hidden_layers=source.num_hidden_layers,
        num_attention_heads=source.num_attention_heads,
        num_key_value_heads=getattr(source, "num_key_value_heads", None) or source.num_attention_heads,
        head_dim=getattr(source, "head_dim", None) or source.hidden_size // source.num_attention_heads,
        rms_norm_eps=source.rms_norm_eps, max_position_embeddings=source.max_position_embeddings,
        rope_parameters=dict(source.rope_parameters), tie_word_embeddings=bool(source.tie_word_embeddings),
        shift_logits=True, diffusion_block_size=diffusion_block_size, source_family=model_type,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        **CAUSAL_LM_FAMILIES[model_type],
    )
    causal_lm = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    weights = causal_lm.state_dict()
    model = MDMLlamaForMaskedDiffusion(config)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        if name in weights and weights[name].shape[0] < vocab_size:  # new rows for [MASK]: the mean embedding
            extra = weights[name].mean(dim=0, keepdim=True).expand(vocab_size - weights[name].shape[0], -1)
            weights[name] = torch.cat([weights[name], extra])
    if config.tie_word_embeddings:
        weights.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [name for name in missing if not (config.tie_word_embeddings and name == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"--init-from {folder}: the {model_type} weights do not map onto hf_mdm's layer (missing "
                         f"{missing[:3]}, unexpected {unexpected[:3]}).")
    if config.tie_word_embeddings:
        model.tie_weights()
    return model


__all__ = ["CAUSAL_LM_FAMILIES", "add_mask_token", "adapt_causal_lm", "causal_lm_type"]
