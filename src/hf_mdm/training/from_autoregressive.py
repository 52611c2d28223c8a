"""An autoregressive causal LM adapted into an hf_mdm masked diffusion model: the recipe of SDAR, Fast-dLLM v2 and
dllm's AR-to-diffusion runs. The transformer stays the same and its weights are mapped one for one; [MASK] is added
where the tokenizer lacks one (a new embedding row, started at the mean of the others); the logits stay shifted as
the AR model's (position i is predicted from the hidden state at i - 1, Fast-dLLM v2's and Dream's choice), so with
blocks of one token the adapted model IS the AR model, and training moves it from there.

    hf-mdm train --init-from path/to/llama-or-qwen --diffusion-block-size 4 ...

Llama, Mistral (without sliding windows), Qwen2, Qwen3 and Qwen3-MoE causal LMs (the last RND1's recipe) map onto
`MDMLlamaForMaskedDiffusion`; GPT-2 causal LMs (the shipped `shakespeare-ar`) onto `MDMGPT2ForMaskedDiffusion`,
GPT-2's `Conv1D` matrices transposed.
"""

import json
from pathlib import Path

import torch

from ..configuration_mdm_gpt2 import MDMGPT2Config
from ..configuration_mdm_llama import MDMLlamaConfig
from ..modeling_mdm_gpt2 import MDMGPT2ForMaskedDiffusion
from ..modeling_mdm_llama import MDMLlamaForMaskedDiffusion

# model_type -> the MDMLlamaConfig fields that tell its layer apart.
LLAMA_LIKE = {
    "llama": {},
    "mistral": {},
    "qwen2": {"attention_bias": True},
    "qwen3": {"qk_norm": True},
    "qwen3_moe": {"qk_norm": True},  # RND1's recipe: Qwen3-30B-A3B made a diffusion model
}
# Qwen3-MoE's expert settings under hf_mdm's names (its experts are stored fused, as hf_mdm stores them).
QWEN3_MOE_FIELDS = {"num_experts": "num_experts", "num_experts_per_tok": "num_experts_per_tok",
                    "moe_intermediate_size": "moe_intermediate_size", "norm_topk_prob": "norm_topk_prob",
                    "router_aux_loss_coef": "router_aux_loss_coef"}
CAUSAL_LM_FAMILIES = (*LLAMA_LIKE, "gpt2")
# GPT-2 options hf_mdm's GPT-2 layer does not have, and the values it computes.
GPT2_FIXED = {"scale_attn_weights": (True,), "scale_attn_by_inverse_layer_idx": (False,),
              "reorder_and_upcast_attn": (False,), "add_cross_attention": (False,)}
MASK_TOKEN = "<|mask|>"


def causal_lm_type(folder: Path) -> str | None:
    """The model_type of a causal-LM folder hf_mdm can adapt; else None."""
    config = Path(folder) / "config.json"
    if not config.is_file():
        return None
    model_type = json.loads(config.read_text()).get("model_type")
    return model_type if model_type in CAUSAL_LM_FAMILIES else None


def add_mask_token(tokenizer) -> bool:
    """Gives the tokenizer a mask token if it has none; returns whether it added one."""
    if tokenizer.mask_token is not None:
        return False
    tokenizer.add_special_tokens({"mask_token": MASK_TOKEN})
    return True


def adapt_causal_lm(folder: Path, tokenizer, diffusion_block_size: int | None):
    """The causal LM in `folder` as an hf_mdm model with `tokenizer`'s [MASK] (the embedding grows to hold it if
    needed), shifted logits and `diffusion_block_size` (None: a bidirectional MDM, Dream's recipe)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    source = AutoConfig.from_pretrained(folder)
    model_type = source.model_type
    if model_type not in CAUSAL_LM_FAMILIES:
        raise ValueError(f"--init-from {folder}: model_type {model_type!r} is not an adaptable causal LM "
                         f"(allowed: {sorted(CAUSAL_LM_FAMILIES)}).")
    for field, allowed in unsupported_fields(source):
        if getattr(source, field, None) not in allowed:
            raise ValueError(f"--init-from {folder}: {field}={getattr(source, field)!r} is not supported (allowed: "
                             f"{allowed}): hf_mdm's {model_type} layer has no such part.")
    mask_id = tokenizer.convert_tokens_to_ids(tokenizer.mask_token)
    vocab_size = max(source.vocab_size, len(tokenizer))
    shared = dict(vocab_size=vocab_size, mask_token_id=mask_id, shift_logits=True,
                  diffusion_block_size=diffusion_block_size, source_family=model_type,
                  tie_word_embeddings=bool(source.tie_word_embeddings), pad_token_id=tokenizer.pad_token_id,
                  bos_token_id=start_token_id(tokenizer, source), eos_token_id=tokenizer.eos_token_id)
    causal_lm = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    if model_type == "gpt2":
        model, weights = gpt2_model(source, shared), gpt2_weights(causal_lm.state_dict())
    else:
        model, weights = llama_model(source, shared), causal_lm.state_dict()
    config = model.config
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


def start_token_id(tokenizer, source) -> int | None:
    """The token a shifted model reads before the first one it predicts: the tokenizer's BOS, else the source
    config's, else EOS (GPT-2's convention: its documents are packed after an end-of-text token, which is what
    starts an unconditional sample). A source id the tokenizer does not have is passed over."""
    for token_id in (tokenizer.bos_token_id, getattr(source, "bos_token_id", None), tokenizer.eos_token_id):
        if isinstance(token_id, int) and 0 <= token_id < len(tokenizer):
            return token_id
    return None


def unsupported_fields(source) -> list[tuple[str, tuple]]:
    """(field, allowed values) of the source config that hf_mdm's matching layer cannot represent otherwise."""
    if source.model_type == "gpt2":
        return list(GPT2_FIXED.items())
    checks = [] if source.model_type == "qwen2" else [("attention_bias", (False, None)), ("mlp_bias", (False, None))]
    checks.append(("sliding_window", (None,)) if source.model_type == "mistral" else ("use_sliding_window", (False, None)))
    if source.model_type == "qwen3_moe":  # every layer a mixture of experts, as hf_mdm's layer has it
        checks += [("decoder_sparse_step", (1,)), ("mlp_only_layers", ([], None))]
    return checks


def llama_model(source, shared: dict) -> MDMLlamaForMaskedDiffusion:
    if source.model_type == "qwen3_moe":
        shared = {**shared, **{ours: getattr(source, theirs) for ours, theirs in QWEN3_MOE_FIELDS.items()}}
    return MDMLlamaForMaskedDiffusion(MDMLlamaConfig(
        hidden_size=source.hidden_size, intermediate_size=source.intermediate_size,
        num_hidden_layers=source.num_hidden_layers, num_attention_heads=source.num_attention_heads,
        num_key_value_heads=getattr(source, "num_key_value_heads", None) or source.num_attention_heads,
        head_dim=getattr(source, "head_dim", None) or source.hidden_size // source.num_attention_heads,
        rms_norm_eps=source.rms_norm_eps, max_position_embeddings=source.max_position_embeddings,
        rope_parameters=dict(source.rope_parameters), **shared, **LLAMA_LIKE[source.model_type]))


def gpt2_model(source, shared: dict) -> MDMGPT2ForMaskedDiffusion:
    return MDMGPT2ForMaskedDiffusion(MDMGPT2Config(
        hidden_size=source.n_embd, num_hidden_layers=source.n_layer, num_attention_heads=source.n_head,
        intermediate_size=source.n_inner or 4 * source.n_embd, activation_function=source.activation_function,
        layer_norm_eps=source.layer_norm_epsilon, max_position_embeddings=source.n_positions,
        embedding_dropout=source.embd_pdrop, residual_dropout=source.resid_pdrop,
        attention_dropout=source.attn_pdrop, **shared))


# GPT-2's parameter names -> hf_mdm's GPT-2 layer's: outside the blocks, and in block N ("transformer.h.N.").
GPT2_OUTSIDE = {"wte.weight": "model.embed_tokens.weight", "wpe.weight": "model.embed_positions.weight",
                "ln_f.weight": "model.norm.weight", "ln_f.bias": "model.norm.bias"}
GPT2_IN_BLOCK = {"ln_1": "input_layernorm", "attn.c_attn": "self_attn.qkv_proj", "attn.c_proj": "self_attn.o_proj",
              "ln_2": "post_attention_layernorm", "mlp.c_fc": "mlp.fc_in", "mlp.c_proj": "mlp.fc_out"}


def gpt2_weights(state_dict: dict) -> dict:
    """GPT2LMHeadModel's weights under hf_mdm's names; its `Conv1D` matrices (in, out) transposed to `nn.Linear`'s
    (out, in)."""
    weights = {}
    for name, tensor in state_dict.items():
        if name.endswith(".attn.bias") or name.endswith(".attn.masked_bias"):
            continue  # GPT-2's causal-mask buffers (older checkpoints)
        if name == "lm_head.weight":
            weights[name] = tensor
            continue
        name = name.removeprefix("transformer.")
        if name in GPT2_OUTSIDE:
            weights[GPT2_OUTSIDE[name]] = tensor
            continue
        _, layer, rest = name.split(".", 2)  # h.N.rest
        module, kind = rest.rsplit(".", 1)
        is_conv1d = module.startswith(("attn.", "mlp.")) and kind == "weight"
        weights[f"model.layers.{layer}.{GPT2_IN_BLOCK[module]}.{kind}"] = tensor.t().contiguous() if is_conv1d else tensor
    return weights


__all__ = ["CAUSAL_LM_FAMILIES", "add_mask_token", "adapt_causal_lm", "causal_lm_type", "gpt2_weights"]
