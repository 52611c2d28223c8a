"""Convert LLaDA, Dream, SDAR / TraDo and Fast-dLLM v2 checkpoints into hf_mdm's `MDMLlamaForMaskedDiffusion`,
streaming shard by shard.

    from hf_mdm.convert import convert_llada, convert_dream
    convert_llada("GSAI-ML/LLaDA-8B-Instruct", "llada-8b-instruct-hf")
    convert_dream("Dream-org/Dream-v0-Instruct-7B", "dream-7b-instruct-hf")

The sources, in the layouts their Hub repos use:

LLaDA (GSAI-ML/LLaDA-8B-Base, -8B-Instruct, LLaDA-1.5): model_type "llada", OLMo-style config.json (d_model,
    n_heads, n_kv_heads, n_layers, mlp_hidden_size, embedding_size, rope_theta, rms_norm_eps, max_sequence_length,
    weight_tying, mask_token_id 126336, ...) and weights under `model.transformer.` (wte, blocks.{i}.{attn_norm,
    q_proj, k_proj, v_proj, attn_out, ff_norm, ff_proj, up_proj, ff_out}, ln_f, ff_out), in shards whose index maps
    names to files in no particular order. The block is Llama's: RMSNorm, SwiGLU with ff_proj as the gate,
    rotary q/k (rotate-half, float32), bidirectional attention; no logit shift.

Dream (Dream-org/Dream-v0-Base-7B, -Instruct-7B): model_type "Dream", Qwen2's config.json fields and weight names
    (model.embed_tokens, model.layers.{i}.self_attn.{q,k,v,o}_proj with q/k/v biases, mlp.{gate,up,down}_proj,
    input_layernorm, post_attention_layernorm, model.norm, lm_head), grouped-query attention, bidirectional; its
    output at position i predicts token i + 1 (initialised from Qwen2.5), which hf_mdm's model shifts internally.

SDAR (JetLM/SDAR-1.7B/4B/8B-Chat, -bN) and TraDo (Gen-Verse/TraDo-4B/8B-Instruct, the same layout): model_type
    "sdar", Qwen3's config fields and weight names (per-head q_norm / k_norm, explicit head_dim, no biases), a
    block-diffusion model (blocks of 4 unless `block_size` or the repo name's -bN says otherwise) whose output at
    position i is token i; the Hub config names no [MASK]: the tokenizer's `<|MASK|>` (151669).

Fast-dLLM v2 (Efficient-Large-Model/Fast_dLLM_v2_1.5B, _7B): model_type "Fast_dLLM_Qwen", Qwen2.5's fields and
    names, `bd_size` (32) blocks, outputs predicting the next token (shifted inside hf_mdm's model); [MASK] is the
    tokenizer's `|<MASK>|` (151665).

LLaDA 2.0 / 2.1 (inclusionAI/LLaDA2.0-mini, -flash, LLaDA2.1-mini, -flash): model_type "llada2_moe", Ling 2.0
    (BailingMoeV2) layers: model.word_embeddings, attention.query_key_value (every query head, then every key head,
    then every value head: cut into q/k/v_proj on conversion, byte ranges of the one tensor), query_layernorm /
    key_layernorm (per head), dense; rotary on the first partial_rotary_factor (0.5) of each head; layer 0 a dense
    MLP, then MoE layers: mlp.gate (sigmoid scores, mlp.gate.expert_bias for choosing only, 8 groups of which 4 are
    kept, top 8 renormalised and scaled by 2.5), per-expert mlp.experts.{e}, mlp.shared_experts; no logit shift;
    decoded as block diffusion in blocks of 32 (hf_mdm's diffusion_block_size); [MASK] 156895 (`<|mask|>`).

RND1 (radicalnumerics/RND1-Base-0910): model_type "rnd1", Qwen3-MoE's fields and weight names (Qwen3-30B-A3B made
    bidirectional: 128 experts, top 8 renormalised, per-head q/k RMSNorm), per-expert tensors; its output at position i
    predicts token i + 1 (shifted inside hf_mdm's model); [MASK] 151669. Its config class overwrites the non-shape
    fields with fixed values when it loads; the conversion uses those values too.

LLaDA-MoE (inclusionAI/LLaDA-MoE-7B-A1B-Base, -Instruct): model_type "llada" (as dense LLaDA's) with OLMoE-style
    fields (num_experts 64, num_experts_per_tok 8, expert_intermediate_size 1024, qk_layernorm, moe_layer_freq, ...)
    and Qwen3-MoE's weight names, one tensor per expert projection (mlp.experts.{e}.{gate,up,down}_proj,
    mlp.gate the router; an optional shared expert beside the MLP, layers.{i}.shared_expert); bidirectional, softmax
    routing whose top-k probabilities are not renormalised, no logit shift; [MASK] 156895 (`<|mask|>`). The experts stay one tensor each in the output (hf_mdm's folders keep them so;
    loading stacks them), so streaming never holds a layer's experts twice.

The conversion, `convert_llama_family`:
    1. Read the source: config.json (every field is known to the converter or refused, naming it, so an MoE or
       other variant never converts silently), the shard index, and the header of every shard (names, shapes,
       dtypes), checking each weight against the shapes the config implies, all before anything is written.
    2. Stream: for each source shard in turn, write one output shard with the tensors renamed and their bytes
       copied unchanged, a chunk at a time (no tensor is loaded: memory stays flat; bf16 stays bf16).
    3. Add config.json (`MDMLlamaConfig`), the remote code, generation_config.json, the tokenizer with its chat
       template, and a model card naming the source and its license.
    4. Verify: every tensor's bytes equal the source's (streamed again), the folder reloads with no missing or
       unexpected weight, and a forward pass gives finite logits.
   Everything is written into a hidden folder beside the destination, renamed into place at the end: the
   destination is never left half-written.
"""

import json
import math
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from ..configuration_mdm_llama import MDMLlamaConfig
from ..generation_mdm import MDMGenerationConfig
from ..modeling_mdm_llama import MDMLlamaForMaskedDiffusion
from ..files import staged_folder
from ..remote_code import write_remote_code
from .mdlm import card_license, resolve_license, resolve_source
from .safe_load import ConversionError, read_weight_map


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja", "chat_template.json", "tokenizer.model")
HUB_PATTERNS = ["config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
                "model-*.safetensors", "README.md", "LICENSE*", *TOKENIZER_FILES]
INDEX_FILE = "model.safetensors.index.json"
ROTARY_BUFFER = re.compile(r".*rotary_emb\.inv_freq$")  # recomputed by hf_mdm, never a weight


# ----------------------------------------------------------------------------------------------------------------
# The two families: config fields and weight names.
# ----------------------------------------------------------------------------------------------------------------

# Fields that change nothing in the forward pass of a trained model (initialisation, dropout at training time,
# bookkeeping), accepted as they come.
COMMON_IGNORED = {"architectures", "auto_map", "model_type", "transformers_version", "torch_dtype", "dtype",
                  "_name_or_path", "use_cache", "initializer_range", "tokenizer_class", "return_dict",
                  "output_hidden_states", "output_attentions", "id2label", "label2id", "pretraining_tp"}


def _require(raw: dict, key: str, allowed, config_path: Path, why: str) -> None:
    value = raw.get(key)
    if value not in allowed:
        raise ConversionError(f"{config_path}: {key}={value!r} is not supported (allowed: {allowed}): {why}.")


def _refuse_unknown(raw: dict, known: set, config_path: Path, family: str) -> None:
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConversionError(
            f"{config_path}: config field {unknown[0]!r} (= {raw[unknown[0]]!r}) is not part of the {family} "
            f"architecture hf_mdm converts{f' ({len(unknown)} unknown fields: {unknown})' if len(unknown) > 1 else ''}; "
            "a variant (e.g. mixture-of-experts) would be converted wrongly, so nothing was written."
        )


LLADA_FIELDS = {
    # mapped onto MDMLlamaConfig
    "d_model", "n_heads", "n_kv_heads", "multi_query_attention", "n_layers", "mlp_hidden_size", "mlp_ratio",
    "vocab_size", "embedding_size", "rope_theta", "rms_norm_eps", "max_sequence_length", "weight_tying",
    "include_bias", "include_qkv_bias", "mask_token_id", "pad_token_id", "eos_token_id", "bos_token_id",
    "attention_dropout",
    # checked: the values that make the network Llama's
    "block_type", "activation_type", "layer_norm_type", "layer_norm_with_affine", "bias_for_layer_norm",
    "attention_layer_norm", "alibi", "rope", "scale_logits", "input_emb_norm", "block_group_size", "clip_qkv",
    # no effect on the forward pass
    "alibi_bias_max", "attention_layer_norm_with_affine", "rope_full_precision", "flash_attention",
    "residual_dropout", "embedding_dropout", "init_device", "init_fn", "init_std", "init_cutoff_factor",
    "precision", "layer_norm_eps", "weight_tying_and_init", "subln", "emb_init_std",
} | COMMON_IGNORED


def llada_config(raw: dict, config_path: Path, notes: list[str]) -> dict:
    """MDMLlamaConfig fields from LLaDA's OLMo-style config.json; refuses anything that is not its Llama block."""
    if raw.get("model_type") != "llada":
        raise ConversionError(f"{config_path} has model_type {raw.get('model_type')!r}; a LLaDA checkpoint has 'llada'.")
    if "num_experts" in raw:
        raise ConversionError(f"{config_path}: num_experts={raw['num_experts']!r}: this is LLaDA-MoE (model_type "
                              "'llada' too); convert it with `hf-mdm convert llada-moe`. Nothing was written.")
    _refuse_unknown(raw, LLADA_FIELDS, config_path, "LLaDA")
    _require(raw, "block_type", ("llama",), config_path, "hf_mdm converts LLaDA's Llama block (LLaDALlamaBlock)")
    _require(raw, "activation_type", ("silu",), config_path, "the Llama block's MLP is silu(ff_proj(x)) * up_proj(x)")
    _require(raw, "layer_norm_type", ("rms",), config_path, "the Llama block normalises with RMSNorm")
    _require(raw, "layer_norm_with_affine", (True, None), config_path, "RMSNorm has a weight")
    _require(raw, "bias_for_layer_norm", (False, None), config_path, "RMSNorm has no bias")
    _require(raw, "attention_layer_norm", (False, None), config_path, "there is no query/key norm")
    _require(raw, "alibi", (False, None), config_path, "positions are rotary, not ALiBi")
    _require(raw, "rope", (True,), config_path, "positions are rotary")
    _require(raw, "scale_logits", (False, None), config_path, "logits are not rescaled")
    _require(raw, "input_emb_norm", (False, None), config_path, "embeddings are not rescaled")
    _require(raw, "include_bias", (False, None), config_path, "only q/k/v projections may carry a bias")
    _require(raw, "block_group_size", (1, None), config_path, "blocks are not grouped")
    _require(raw, "clip_qkv", (None,), config_path, "q/k/v are not clipped")
    for key in ("residual_dropout", "embedding_dropout", "attention_dropout"):
        if raw.get(key):
            notes.append(f"{key}={raw[key]} (training only) is not kept")
    if raw.get("rope_full_precision") is False:
        notes.append("the source applies RoPE in its activation dtype; hf_mdm applies it in float32 (more exact)")
    heads = raw["n_heads"]
    # LLaDA's (OLMo's) effective_n_kv_heads: multi_query_attention true means one key/value head, false means
    # n_heads of them; unset, n_kv_heads decides.
    multi_query, kv_heads = raw.get("multi_query_attention"), raw.get("n_kv_heads")
    if multi_query and kv_heads not in (None, 1):
        raise ConversionError(f"{config_path}: multi_query_attention=true but n_kv_heads={kv_heads} (must be 1).")
    if multi_query is False and kv_heads not in (None, heads):
        raise ConversionError(f"{config_path}: multi_query_attention=false but n_kv_heads={kv_heads} != n_heads={heads}.")
    kv_heads = 1 if multi_query else (kv_heads or heads)
    hidden = raw["d_model"]
    intermediate = raw.get("mlp_hidden_size") or int(raw.get("mlp_ratio", 4) * hidden)
    return dict(
        vocab_size=raw.get("embedding_size") or raw["vocab_size"], hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=raw["n_layers"], num_attention_heads=heads, num_key_value_heads=kv_heads,
        rms_norm_eps=raw.get("rms_norm_eps", 1e-5), attention_bias=bool(raw.get("include_qkv_bias")),
        max_position_embeddings=raw["max_sequence_length"],
        rope_parameters={"rope_type": "default", "rope_theta": float(raw.get("rope_theta", 10000.0))},
        tie_word_embeddings=bool(raw.get("weight_tying")), shift_logits=False, mask_token_id=raw.get("mask_token_id"),
        pad_token_id=raw.get("pad_token_id"), eos_token_id=raw.get("eos_token_id"), bos_token_id=raw.get("bos_token_id"),
        source_family="llada",
    )


LLADA_BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "q_proj.weight": "self_attn.q_proj.weight", "q_proj.bias": "self_attn.q_proj.bias",
    "k_proj.weight": "self_attn.k_proj.weight", "k_proj.bias": "self_attn.k_proj.bias",
    "v_proj.weight": "self_attn.v_proj.weight", "v_proj.bias": "self_attn.v_proj.bias",
    "attn_out.weight": "self_attn.o_proj.weight",
    "ff_norm.weight": "post_attention_layernorm.weight",
    "ff_proj.weight": "mlp.gate_proj.weight",  # LLaDA's ff_proj takes the SiLU: the gate
    "up_proj.weight": "mlp.up_proj.weight",
    "ff_out.weight": "mlp.down_proj.weight",  # inside a block, ff_out is the down projection
}
LLADA_TOP_NAMES = {
    "model.transformer.wte.weight": "model.embed_tokens.weight",
    "model.transformer.ln_f.weight": "model.norm.weight",
    "model.transformer.ff_out.weight": "lm_head.weight",  # at the top, ff_out is the LM head
}


def llada_weight_name(name: str) -> str | None:
    """hf_mdm's name for a LLaDA weight, or None for a name LLaDA's architecture does not have."""
    if name in LLADA_TOP_NAMES:
        return LLADA_TOP_NAMES[name]
    match = re.fullmatch(r"model\.transformer\.blocks\.(\d+)\.(.+)", name)
    if match and match.group(2) in LLADA_BLOCK_NAMES:
        return f"model.layers.{match.group(1)}.{LLADA_BLOCK_NAMES[match.group(2)]}"
    return None


DREAM_FIELDS = {
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters", "max_position_embeddings", "vocab_size",
    "tie_word_embeddings", "mask_token_id", "pad_token_id", "bos_token_id", "eos_token_id", "attention_dropout",
    "hidden_act", "use_sliding_window", "sliding_window", "max_window_layers",
} | COMMON_IGNORED


def _rope_parameters(raw: dict, partial: float | None = None) -> dict:
    """transformers 5's rope settings from a source config: its rope_parameters / rope_scaling, rope_theta, and the
    share of each head that turns (`partial`, when not the whole)."""
    rope = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
    rope.setdefault("rope_type", rope.pop("type", "default"))
    rope.setdefault("rope_theta", float(raw.get("rope_theta", 10000.0)))
    if partial is not None and partial != 1:
        rope["partial_rotary_factor"] = float(partial)
    return rope


def _qwen_fields(raw: dict, config_path: Path, notes: list[str], family: str) -> dict:
    """MDMLlamaConfig fields common to the Qwen2/Qwen3-based families (Dream, SDAR and TraDo, Fast-dLLM v2)."""
    _require(raw, "hidden_act", ("silu", None), config_path, "the MLP is silu(gate_proj(x)) * up_proj(x)")
    _require(raw, "use_sliding_window", (False, None), config_path, f"{family}'s attention is full (no sliding window)")
    layer_types = raw.get("layer_types")
    if layer_types is not None and set(layer_types) != {"full_attention"}:
        raise ConversionError(f"{config_path}: layer_types={sorted(set(layer_types))} is not supported (allowed: "
                              f"every layer 'full_attention'): {family}'s layers all attend fully within its mask.")
    if raw.get("attention_dropout"):
        notes.append(f"attention_dropout={raw['attention_dropout']} (training only) is not kept")
    return dict(
        vocab_size=raw["vocab_size"], hidden_size=raw["hidden_size"], intermediate_size=raw["intermediate_size"],
        num_hidden_layers=raw["num_hidden_layers"], num_attention_heads=raw["num_attention_heads"],
        num_key_value_heads=raw.get("num_key_value_heads") or raw["num_attention_heads"], head_dim=raw.get("head_dim"),
        rms_norm_eps=raw.get("rms_norm_eps", 1e-6), max_position_embeddings=raw.get("max_position_embeddings", 32768),
        rope_parameters=_rope_parameters(raw), tie_word_embeddings=bool(raw.get("tie_word_embeddings")),
        pad_token_id=raw.get("pad_token_id"), eos_token_id=raw.get("eos_token_id"), bos_token_id=raw.get("bos_token_id"),
    )


def dream_config(raw: dict, config_path: Path, notes: list[str]) -> dict:
    """MDMLlamaConfig fields from Dream's Qwen2-style config.json: q/k/v biases, grouped-query heads, shifted logits."""
    if raw.get("model_type") != "Dream":
        raise ConversionError(f"{config_path} has model_type {raw.get('model_type')!r}; a Dream checkpoint has 'Dream'.")
    _refuse_unknown(raw, DREAM_FIELDS, config_path, "Dream")
    fields = _qwen_fields(raw, config_path, notes, "Dream")
    fields.update(attention_bias=True, shift_logits=True, mask_token_id=raw.get("mask_token_id"), source_family="dream")
    return fields


def qwen_weight_name(name: str) -> str | None:
    """Dream's, SDAR's and Fast-dLLM v2's names are Qwen2's / Qwen3's, which hf_mdm's Llama family uses as they are."""
    return name


QWEN_FIELDS = DREAM_FIELDS | {"head_dim", "attention_bias", "layer_types", "attn_implementation", "use_mrope"}


def _tokenizer_token_id(folder: Path, spellings: tuple[str, ...]) -> tuple[int, str] | None:
    """(id, spelling) of the first of `spellings` the tokenizer files name (added_tokens.json, or
    tokenizer_config.json's added_tokens_decoder), or None."""
    found = {}
    if (folder / "added_tokens.json").is_file():
        found.update({token: i for token, i in _read_json(folder / "added_tokens.json").items() if isinstance(i, int)})
    if (folder / "tokenizer_config.json").is_file():
        decoder = _read_json(folder / "tokenizer_config.json").get("added_tokens_decoder") or {}
        found.update({entry.get("content"): int(i) for i, entry in decoder.items()
                      if isinstance(entry, dict) and str(i).isdigit()})
    for spelling in spellings:
        if spelling in found:
            return found[spelling], spelling
    return None


def _mask_token_id(raw: dict, config_path: Path, notes: list[str], spellings: tuple[str, ...], default: int,
                   family: str) -> int:
    """[MASK]: config.json's mask_token_id, else the tokenizer's mask token, else the family's published id."""
    if raw.get("mask_token_id") is not None:
        return raw["mask_token_id"]
    found = _tokenizer_token_id(config_path.parent, spellings)
    if found is not None:
        notes.append(f"config.json has no mask_token_id: [MASK] is the tokenizer's {found[1]!r}, id {found[0]}")
        return found[0]
    notes.append(f"config.json has no mask_token_id and the tokenizer names none of {spellings}: [MASK] is "
                 f"{family}'s published id {default}")
    return default


SDAR_FIELDS = QWEN_FIELDS | {"block_size", "fuse_cross_entropy", "debug", "ep_size", "micro_forward",
                             "skip_checkpoint", "use_deepep"}
SDAR_MASK_SPELLINGS = ("<|MASK|>", "<MASK>")


def sdar_config(raw: dict, config_path: Path, notes: list[str]) -> dict:
    """MDMLlamaConfig fields from SDAR's (and TraDo's) Qwen3-style config.json: per-head q/k RMSNorm, no biases,
    no logit shift, blocks of `block_size` (4 unless the config or the repo name says -bN)."""
    if raw.get("model_type") != "sdar":
        raise ConversionError(f"{config_path} has model_type {raw.get('model_type')!r}; an SDAR or TraDo checkpoint "
                              "has 'sdar'.")
    _refuse_unknown(raw, SDAR_FIELDS, config_path, "SDAR")
    _require(raw, "attention_bias", (False, None), config_path, "SDAR's (Qwen3's) projections have no bias")
    fields = _qwen_fields(raw, config_path, notes, "SDAR")
    block = raw.get("block_size")
    if block is None:
        named = re.search(r"-b(\d+)(?:$|[-_/])", str(raw.get("_name_or_path") or config_path.parent.name) + "/")
        block = int(named.group(1)) if named else 4
        notes.append(f"config.json has no block_size: {block}, " + ("from the repository name" if named else
                     "SDAR's default (its -b8/-b16/... repositories name theirs)"))
    for key in ("fuse_cross_entropy", "micro_forward", "use_deepep", "ep_size", "skip_checkpoint", "debug"):
        if raw.get(key) not in (None, False, 1):
            notes.append(f"{key}={raw[key]!r} (a training kernel setting) is not kept")
    fields.update(attention_bias=False, qk_norm=True, shift_logits=False, diffusion_block_size=block,
                  mask_token_id=_mask_token_id(raw, config_path, notes, SDAR_MASK_SPELLINGS, 151669, "SDAR"),
                  source_family="sdar")
    return fields


FAST_DLLM_V2_FIELDS = QWEN_FIELDS | {"bd_size", "conplemenrary_mask", "complementary_mask"}


def fast_dllm_v2_config(raw: dict, config_path: Path, notes: list[str]) -> dict:
    """MDMLlamaConfig fields from Fast-dLLM v2's Qwen2.5-style config.json: q/k/v biases, logits shifted as the AR
    model's (position i predicts token i + 1), blocks of `bd_size` (32)."""
    if raw.get("model_type") != "Fast_dLLM_Qwen":
        raise ConversionError(f"{config_path} has model_type {raw.get('model_type')!r}; a Fast-dLLM v2 checkpoint has "
                              "'Fast_dLLM_Qwen'.")
    _refuse_unknown(raw, FAST_DLLM_V2_FIELDS, config_path, "Fast-dLLM v2")
    fields = _qwen_fields(raw, config_path, notes, "Fast-dLLM v2")
    block = raw.get("bd_size")
    if block is None:
        block = 32
        notes.append("config.json has no bd_size: 32, Fast-dLLM v2's")
    fields.update(attention_bias=True, qk_norm=False, shift_logits=True, diffusion_block_size=block,
                  mask_token_id=_mask_token_id(raw, config_path, notes, ("|<MASK>|",), 151665, "Fast-dLLM v2"),
                  source_family="fast_dllm_v2")
    return fields


LLADA_MOE_FIELDS = {
    "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size", "rms_norm_eps",
    "rope_theta", "rope_scaling", "partial_rotary_factor", "max_position_embeddings", "tie_word_embeddings",
    "pad_token_id", "bos_token_id", "eos_token_id", "mask_token_id", "attention_bias", "attention_dropout",
    "hidden_act", "clip_qkv", "qk_layernorm", "num_experts", "num_experts_per_tok", "expert_intermediate_size",
    "dense_intermediate_size", "shared_expert_intermediate_size", "moe_layer_freq", "norm_topk_prob",
    "router_aux_loss_coef", "output_router_logits", "moe_router_enable_expert_bias", "moe_router_score_function",
    "routed_scaling_factor", "router_num_group", "router_topk_group",
} | COMMON_IGNORED
LLADA_MOE_MASK_SPELLINGS = ("<|mask|>",)


def llada_moe_config(raw: dict, config_path: Path, notes: list[str]) -> dict:
    """MDMLlamaConfig fields from LLaDA-MoE's config.json (model_type "llada" on the Hub, "lladamoe" in dllm's
    copy): Qwen3-MoE's layer (per-head q/k RMSNorm, softmax routing) with the chosen experts' probabilities NOT
    renormalised (its code fixes norm_topk_prob to False), bidirectional, no logit shift."""
    if raw.get("model_type") not in ("llada", "lladamoe") or "num_experts" not in raw:
        raise ConversionError(f"{config_path} (model_type {raw.get('model_type')!r}, num_experts "
                              f"{raw.get('num_experts')!r}) is not LLaDA-MoE, whose config has model_type 'llada' and "
                              "num_experts; a dense LLaDA converts with `hf-mdm convert llada`.")
    _refuse_unknown(raw, LLADA_MOE_FIELDS, config_path, "LLaDA-MoE")
    _require(raw, "hidden_act", ("silu", None), config_path, "every expert is silu(gate_proj(x)) * up_proj(x)")
    _require(raw, "attention_bias", (False, None), config_path, "LLaDA-MoE's projections have no bias")
    _require(raw, "clip_qkv", (None,), config_path, "q/k/v are not clipped")
    _require(raw, "moe_router_enable_expert_bias", (False, None), config_path,
             "LLaDA-MoE's code adds such a bias to the probabilities it weights experts by, which hf_mdm's router "
             "(a choice-only bias) does not")
    layers = raw["num_hidden_layers"]
    frequency = raw.get("moe_layer_freq") or [1] * layers
    frequency = frequency if isinstance(frequency, list) else [1] * layers
    dense_first = next((i for i, moe in enumerate(frequency) if moe), len(frequency))
    if len(frequency) != layers or any(not moe for moe in frequency[dense_first:]) or dense_first == layers:
        raise ConversionError(f"{config_path}: moe_layer_freq={raw.get('moe_layer_freq')!r} is not supported (allowed: "
                              f"{layers} entries, dense layers (0) only before the first MoE layer (1)).")
    width = raw["expert_intermediate_size"]
    shared = raw.get("shared_expert_intermediate_size")
    if shared is not None and shared % width:
        raise ConversionError(f"{config_path}: shared_expert_intermediate_size={shared} is not supported (allowed: "
                              f"None or a multiple of expert_intermediate_size={width}).")
    for key, inert in (("moe_router_score_function", "softmax"), ("routed_scaling_factor", 1),
                       ("router_num_group", None), ("router_topk_group", None), ("norm_topk_prob", False)):
        if raw.get(key, inert) != inert:
            notes.append(f"{key}={raw[key]!r} is read by LLaDA-MoE's code but changes nothing there; hf_mdm does "
                         f"as its code does ({key}={inert!r})")
    if raw.get("attention_dropout"):
        notes.append(f"attention_dropout={raw['attention_dropout']} (training only) is not kept")
    notes.append("LLaDA-MoE's code attends to padding (it drops the attention mask); hf_mdm masks padding, which "
                 "changes nothing for unpadded inputs")
    return dict(
        vocab_size=raw["vocab_size"], hidden_size=raw["hidden_size"],
        intermediate_size=raw.get("dense_intermediate_size") or 4 * raw["hidden_size"],
        num_hidden_layers=layers, num_attention_heads=raw["num_attention_heads"],
        num_key_value_heads=raw.get("num_key_value_heads") or raw["num_attention_heads"],
        rms_norm_eps=raw.get("rms_norm_eps", 1e-5), max_position_embeddings=raw.get("max_position_embeddings", 4096),
        rope_parameters=_rope_parameters(raw, partial=raw.get("partial_rotary_factor")),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings")), qk_norm=bool(raw.get("qk_layernorm", True)),
        num_experts=raw["num_experts"], num_experts_per_tok=raw["num_experts_per_tok"], moe_intermediate_size=width,
        num_shared_experts=(shared or 0) // width, first_k_dense_replace=dense_first, norm_topk_prob=False,
        router_score_function="softmax", router_aux_loss_coef=float(raw.get("router_aux_loss_coef") or 0.0),
        shift_logits=False, pad_token_id=raw.get("pad_token_id"), eos_token_id=raw.get("eos_token_id"),
        bos_token_id=raw.get("bos_token_id"), source_family="llada_moe",
        mask_token_id=_mask_token_id(raw, config_path, notes, LLADA_MOE_MASK_SPELLINGS, 156895, "LLaDA-MoE"),
    )


# What RND1's own config class forces, whatever config.json says (its `set_config_defaults`): the values its code
# runs. Shapes are read from config.json (and checked against the weights); these are not shapes.
RND1_FORCED = {"norm_topk_prob": True, "rms_norm_eps": 1e-6, "rope_theta": 1e6, "rope_scaling": False,
               "attention_bias": False, "hidden_act": "silu", "decoder_sparse_step": 1, "mlp_only_layers": [],
               "tie_word_embeddings": False, "use_sliding_window": False, "router_aux_loss_coef": 0.001}
RND1_FIELDS = {
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
    "num_experts", "num_experts_per_tok", "moe_intermediate_size", "max_position_embeddings", "vocab_size",
    "eos_token_id", "pad_token_id", "bos_token_id", "mask_token_id", "attention_dropout", "sliding_window",
    "max_window_layers", "output_router_logits", "rope_parameters", "moe_backend", "num_diffusion_steps", "is_causal",
    *RND1_FORCED,
} | COMMON_IGNORED


def rnd1_config(raw: dict, config_path: Path, notes: list[str]) -> dict:
    """MDMLlamaConfig fields from RND1's config.json (model_type "rnd1"): Qwen3-MoE's layer made bidirectional,
    softmax routing with the chosen experts renormalised, logits shifted as the autoregressive Qwen3-30B-A3B's it
    was converted from (position i predicts token i + 1). RND1's config class overwrites the non-shape fields with
    its own values on load; the converter does the same, noting any disagreement."""
    if raw.get("model_type") != "rnd1":
        raise ConversionError(f"{config_path} has model_type {raw.get('model_type')!r}; an RND1 checkpoint has 'rnd1'.")
    _refuse_unknown(raw, RND1_FIELDS, config_path, "RND1")
    if raw.get("is_causal"):
        raise ConversionError(f"{config_path}: is_causal=True is not supported (allowed: False): RND1 is bidirectional.")
    for key, forced in RND1_FORCED.items():
        if key in raw and raw[key] != forced and not (key == "rope_scaling" and raw[key] is None):
            notes.append(f"config.json says {key}={raw[key]!r}; RND1's code runs {key}={forced!r} whatever the file "
                         "says, and so does the conversion")
    if raw.get("moe_backend", "hf") != "hf":
        notes.append(f"moe_backend={raw['moe_backend']!r} is a kernel choice; hf_mdm runs transformers' expert kernels")
    if raw.get("num_diffusion_steps") is not None:
        notes.append(f"num_diffusion_steps={raw['num_diffusion_steps']} is RND1's default sampling budget; hf_mdm's "
                     "generation_config takes one token per call unless asked otherwise")
    return dict(
        vocab_size=raw["vocab_size"], hidden_size=raw["hidden_size"], intermediate_size=raw["intermediate_size"],
        num_hidden_layers=raw["num_hidden_layers"], num_attention_heads=raw["num_attention_heads"],
        num_key_value_heads=raw["num_key_value_heads"], head_dim=raw.get("head_dim"),
        rms_norm_eps=RND1_FORCED["rms_norm_eps"], max_position_embeddings=raw.get("max_position_embeddings", 40960),
        rope_parameters={"rope_type": "default", "rope_theta": RND1_FORCED["rope_theta"]}, tie_word_embeddings=False,
        qk_norm=True, attention_bias=False, num_experts=raw["num_experts"],
        num_experts_per_tok=raw["num_experts_per_tok"], moe_intermediate_size=raw["moe_intermediate_size"],
        norm_topk_prob=True, router_score_function="softmax",
        router_aux_loss_coef=RND1_FORCED["router_aux_loss_coef"], shift_logits=True,
        pad_token_id=raw.get("pad_token_id", 151643), eos_token_id=raw.get("eos_token_id", 151645),
        bos_token_id=raw.get("bos_token_id"), mask_token_id=raw.get("mask_token_id", 151669), source_family="rnd1",
    )


LLADA2_FIELDS = {
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
    "vocab_size", "rms_norm_eps", "rope_theta", "rope_scaling", "partial_rotary_factor", "rotary_dim",
    "max_position_embeddings", "tie_word_embeddings", "pad_token_id", "bos_token_id", "eos_token_id", "mask_token_id",
    "hidden_act", "num_experts", "num_experts_per_tok", "num_shared_experts", "moe_intermediate_size",
    "first_k_dense_replace", "n_group", "topk_group", "routed_scaling_factor", "score_function", "norm_topk_prob",
    "moe_router_enable_expert_bias", "router_dtype", "use_qk_norm", "use_qkv_bias", "use_bias", "use_rmsnorm",
    "norm_head", "norm_softmax", "using_split_qkv_in_self_attention", "embedding_dropout", "attention_dropout",
    "output_dropout", "use_sliding_window", "sliding_window", "max_window_layers", "output_router_logits",
    "router_aux_loss_coef",
} | COMMON_IGNORED
LLADA2_BLOCK = 32  # LLaDA 2.x's generate() decodes blocks of 32 (block_length); its config names none


def llada2_config(raw: dict, config_path: Path, notes: list[str]) -> dict:
    """MDMLlamaConfig fields from LLaDA 2.0's / 2.1's config.json (model_type "llada2_moe"; Ling 2.0 layers): a fused
    query_key_value (split on conversion), per-head q/k RMSNorm, rotary on the first half of each head, a dense
    first layer, sigmoid routing over groups with a choice-only expert bias, a shared expert; block diffusion with
    blocks of 32, no logit shift."""
    if raw.get("model_type") not in ("llada2_moe", "llada2_moe_veomni"):
        raise ConversionError(f"{config_path} has model_type {raw.get('model_type')!r}; a LLaDA 2.x checkpoint has "
                              "'llada2_moe'.")
    _refuse_unknown(raw, LLADA2_FIELDS, config_path, "LLaDA 2.x")
    _require(raw, "hidden_act", ("silu", None), config_path, "every MLP and expert is silu(gate_proj(x)) * up_proj(x)")
    for key, why in (("use_qkv_bias", "the fused query_key_value has no bias"), ("use_bias", "no projection has one"),
                     ("norm_head", "the head is not normalised"), ("norm_softmax", "the softmax is not normalised"),
                     ("using_split_qkv_in_self_attention", "query, key and value come fused"),
                     ("use_sliding_window", "attention is not windowed")):
        _require(raw, key, (False, None), config_path, why)
    _require(raw, "use_rmsnorm", (True, None), config_path, "the norms are RMSNorm")
    _require(raw, "use_qk_norm", (True, None), config_path, "hf_mdm converts the per-head q/k RMSNorm layout")
    _require(raw, "score_function", ("sigmoid", "softmax", None), config_path, "the router scores are sigmoid or softmax")
    head_dim = raw.get("head_dim") or raw["hidden_size"] // raw["num_attention_heads"]
    partial = raw.get("partial_rotary_factor")
    if raw.get("rotary_dim") is not None:
        if partial is not None and int(head_dim * partial) != raw["rotary_dim"]:
            raise ConversionError(f"{config_path}: rotary_dim={raw['rotary_dim']} contradicts partial_rotary_factor="
                                  f"{partial} of head_dim {head_dim}; nothing was written.")
        partial = raw["rotary_dim"] / head_dim
    if raw.get("router_dtype") not in (None, "fp32"):
        notes.append(f"router_dtype={raw['router_dtype']!r}: hf_mdm always routes in float32")
    for key in ("embedding_dropout", "attention_dropout", "output_dropout"):
        if raw.get(key):
            notes.append(f"{key}={raw[key]} (training only) is not kept")
    notes.append(f"the config names no block size: {LLADA2_BLOCK}, LLaDA 2.x's generate() block_length")
    return dict(
        vocab_size=raw["vocab_size"], hidden_size=raw["hidden_size"], intermediate_size=raw["intermediate_size"],
        num_hidden_layers=raw["num_hidden_layers"], num_attention_heads=raw["num_attention_heads"],
        num_key_value_heads=raw.get("num_key_value_heads") or raw["num_attention_heads"], head_dim=head_dim,
        rms_norm_eps=raw.get("rms_norm_eps", 1e-6), max_position_embeddings=raw.get("max_position_embeddings", 16384),
        rope_parameters=_rope_parameters(raw, partial=partial),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings")), qk_norm=True, attention_bias=False,
        num_experts=raw["num_experts"], num_experts_per_tok=raw["num_experts_per_tok"],
        moe_intermediate_size=raw["moe_intermediate_size"], num_shared_experts=raw.get("num_shared_experts") or 0,
        first_k_dense_replace=raw.get("first_k_dense_replace") or 0,
        router_score_function=raw.get("score_function") or "softmax", norm_topk_prob=bool(raw.get("norm_topk_prob")),
        routed_scaling_factor=float(raw.get("routed_scaling_factor") or 1.0), n_group=raw.get("n_group"),
        topk_group=raw.get("topk_group"), router_expert_bias=bool(raw.get("moe_router_enable_expert_bias")),
        router_aux_loss_coef=float(raw.get("router_aux_loss_coef") or 0.0), shift_logits=False,
        diffusion_block_size=LLADA2_BLOCK, pad_token_id=raw.get("pad_token_id"), eos_token_id=raw.get("eos_token_id"),
        bos_token_id=raw.get("bos_token_id"), source_family="llada2",
        mask_token_id=_mask_token_id(raw, config_path, notes, ("<|mask|>",), 156895, "LLaDA 2.x"),
    )


LLADA2_NAMES = {"attention.query_layernorm.": "self_attn.q_norm.", "attention.key_layernorm.": "self_attn.k_norm.",
                "attention.dense.": "self_attn.o_proj.", "attention.query_key_value.": "self_attn.qkv."}


def llada2_weight_name(name: str) -> str | None:
    """LLaDA 2.x's names: Ling's attention (word_embeddings, attention.{query_key_value,query_layernorm,
    key_layernorm,dense}) and Qwen-MoE's MLPs and experts. The fused query_key_value becomes a placeholder
    `self_attn.qkv`, which `llada2_split` cuts into q_proj, k_proj and v_proj."""
    if name == "model.word_embeddings.weight":
        return "model.embed_tokens.weight"
    for theirs, ours in LLADA2_NAMES.items():
        if f".{theirs}" in name:
            return name.replace(theirs, ours)
    return name


def llada2_split(target: str, config: MDMLlamaConfig):
    """The fused query_key_value's rows: every query head, then every key head, then every value head."""
    if not target.endswith("self_attn.qkv.weight"):
        return None
    prefix = target.removesuffix("qkv.weight")
    queries, keys = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    return [(prefix + "q_proj.weight", 0, queries), (prefix + "k_proj.weight", queries, queries + keys),
            (prefix + "v_proj.weight", queries + keys, queries + 2 * keys)]


def llada_moe_weight_name(name: str) -> str | None:
    """LLaDA-MoE's names are Qwen3-MoE's, but for the shared expert, which it keeps beside the MLP
    (`layers.{i}.shared_expert`) where hf_mdm keeps it inside (`layers.{i}.mlp.shared_experts`)."""
    return re.sub(r"^(model\.layers\.\d+)\.shared_expert\.", r"\1.mlp.shared_experts.", name)


@dataclass(frozen=True)
class Family:
    name: str  # "llada" or "dream"
    title: str
    config_fields: object  # (raw config, config path, notes) -> MDMLlamaConfig kwargs
    weight_name: object  # source name -> hf_mdm name, or None
    example: str
    # The end-of-turn tokens decoded output is cut at, when the tokenizer has them.
    end_of_turn_tokens: tuple[str, ...]
    paper: str
    # generation_config.json: how the family's authors decode it (one token per network call, 128 new tokens).
    generation: dict
    # Block diffusion: stop at the end of the block with an end-of-turn token (the family's own decoders do).
    stop_at_eos: bool | None = None
    # A source tensor hf_mdm keeps as several (LLaDA 2.x's fused query_key_value): (hf_mdm name from weight_name,
    # config) -> [(hf_mdm name, first row, end row)], or None to keep it whole. Rows are contiguous bytes, so the
    # pieces are still copied byte for byte.
    split: object = None
    # Versions that share the layout but decode otherwise, told apart by the source's name: {regex: generation}.
    versions: dict = field(default_factory=dict)


FAMILIES = {
    # LLaDA's chat.py: greedy, low-confidence remasking, semi-autoregressive blocks of 32, steps = answer length.
    "llada": Family("llada", "LLaDA", llada_config, llada_weight_name, "GSAI-ML/LLaDA-8B-Instruct", ("<|eot_id|>",),
                    "Nie et al., *Large Language Diffusion Models*, arXiv:2502.09992",
                    dict(sampler="confidence", order="confidence", block_length=32, temperature=0.0)),
    # Dream's README: its own decoding loop (sampler="dream"), entropy order, temperature 0.2, top_p 0.95, alg_temp 0,
    # steps = answer length, eps 1e-3.
    "dream": Family("dream", "Dream", dream_config, qwen_weight_name, "Dream-org/Dream-v0-Instruct-7B", ("<|im_end|>",),
                    "Ye et al., *Dream 7B: Diffusion Large Language Models*, arXiv:2508.15487",
                    dict(sampler="dream", alg="entropy", eps=1e-3, alg_temp=0.0, temperature=0.2, top_p=0.95)),
    # SDAR's README and JetEngine/lmdeploy examples: blocks of 4, 4 denoising steps, low_confidence_dynamic at 0.9,
    # greedy (its reported evaluations).
    "sdar": Family("sdar", "SDAR", sdar_config, qwen_weight_name, "JetLM/SDAR-1.7B-Chat", ("<|im_end|>", "<|endoftext|>"),
                   "Cheng et al., *SDAR: A Synergistic Diffusion-AutoRegression Paradigm*, arXiv:2510.06303",
                   dict(sampler="sdar", remasking_strategy="low_confidence_dynamic", denoising_steps=4,
                        confidence_threshold=0.9, temperature=0.0), stop_at_eos=True),
    # LLaDA-MoE's model card: LLaDA's low-confidence remasking, greedy, semi-autoregressive blocks of 32.
    "llada_moe": Family("llada_moe", "LLaDA-MoE", llada_moe_config, llada_moe_weight_name,
                        "inclusionAI/LLaDA-MoE-7B-A1B-Instruct", ("<|role_end|>",),
                        "Zhu et al., *LLaDA-MoE: A Sparse MoE Diffusion Language Model*, arXiv:2509.24389",
                        dict(sampler="confidence", order="confidence", block_length=32, temperature=0.0)),
    # RND1's README and demo: its sampler (the highest-entropy positions stay masked longest), 256 steps for 256
    # tokens, temperature 0.01.
    "rnd1": Family("rnd1", "RND1", rnd1_config, qwen_weight_name, "radicalnumerics/RND1-Base-0910",
                   ("<|im_end|>", "<|endoftext|>"),
                   "Radical Numerics, *RND1* (github.com/RadicalNumerics/RND1)",
                   dict(sampler="rnd1", temperature=0.01)),
    # LLaDA 2.0's generate(): blocks of 32, 32 steps per block, every token above 0.95 (else the step's quota of
    # the most confident), greedy: SDAR's dynamic low-confidence rule, the same computation.
    "llada2": Family("llada2", "LLaDA 2.x", llada2_config, llada2_weight_name, "inclusionAI/LLaDA2.0-mini",
                     ("<|role_end|>", "<|endoftext|>"),
                     "inclusionAI, *LLaDA2.0* technical report (github.com/inclusionAI/LLaDA2.X)",
                     dict(sampler="sdar", remasking_strategy="low_confidence_dynamic", denoising_steps=32,
                          confidence_threshold=0.95, temperature=0.0), stop_at_eos=True, split=llada2_split,
                     # LLaDA 2.1's generate(): the same blocks, with token editing (its defaults).
                     versions={r"(?i)llada-?2\.1": dict(sampler="token_editing", confidence_threshold=0.95,
                                                         editing_threshold=0.9, max_post_steps=16, temperature=0.0)}),
    # Fast-dLLM v2's evaluation and model card: sub-blocks of 8 in blocks of 32, threshold 0.9, greedy.
    "fast_dllm_v2": Family("fast_dllm_v2", "Fast-dLLM v2", fast_dllm_v2_config, qwen_weight_name,
                           "Efficient-Large-Model/Fast_dLLM_v2_1.5B", ("<|im_end|>",),
                           "Wu et al., *Fast-dLLM v2: Efficient Block-Diffusion LLM*, arXiv:2509.26328",
                           dict(sampler="fast_dllm_v2", block_length=8, confidence_threshold=0.9, temperature=0.0),
                           stop_at_eos=True),
}


# ----------------------------------------------------------------------------------------------------------------
# Reading a source without loading its weights.
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Shard:
    path: Path
    names: list[str]  # source names, in file order


@dataclass
class LlamaFamilySource:
    """A LLaDA or Dream checkpoint, read down to its shard headers.

    Args:
        name: what the card calls the source (Hub id or path as given).
        folder: where its files are.
        family: "llada" or "dream".
        raw_config: its config.json.
        config: the `MDMLlamaConfig` it converts to.
        shards: its weight files with the names each holds.
        dtype: the weights' dtype (one for all of them).
        license: the source card's license, if any.
        hub_id, revision: set when downloaded from the Hub.
        notes: what was decided on the way.
    """

    name: str
    folder: Path
    family: str
    raw_config: dict
    config: MDMLlamaConfig
    shards: list[Shard]
    dtype: torch.dtype
    license: str | None = None
    hub_id: str | None = None
    revision: str | None = None
    notes: list[str] = field(default_factory=list)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise ConversionError(f"{path} cannot be read as JSON: {error}") from None
    if not isinstance(data, dict):
        raise ConversionError(f"{path} must hold a JSON object.")
    return data


def _shard_files(folder: Path) -> list[Path]:
    index = folder / INDEX_FILE
    if index.is_file():
        weight_map = read_weight_map(index)
        files = []
        for name in dict.fromkeys(weight_map.values()):
            path = folder / name
            if path.parent != folder or not path.is_file():
                raise ConversionError(f"{index} names the shard {name}, which is missing from {folder}; nothing was written.")
            files.append(path)
        return files
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    if any(folder.glob("*.bin")):
        raise ConversionError(f"{folder} holds pytorch .bin weights; hf_mdm converts LLaDA and Dream from safetensors, "
                              "as their Hub repos ship them.")
    raise ConversionError(f"{folder} has no weights: expected {INDEX_FILE} with its shards, or model.safetensors.")


STACKED_EXPERTS = re.compile(r"(.*\.mlp\.experts)\.(gate_up_proj|down_proj)$")


def expected_shapes(config: MDMLlamaConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a folder of hf_mdm's model holds for this config, with its shape (the model is built on the meta
    device): its weights and saved buffers (a router's expert bias), with routed experts one tensor per expert
    projection, as they are saved (stacked in memory)."""
    with torch.device("meta"):
        model = MDMLlamaForMaskedDiffusion(config)
    shapes = {}
    for name, tensor in model.state_dict().items():
        stacked = STACKED_EXPERTS.fullmatch(name)
        if stacked is None:
            shapes[name] = tuple(tensor.shape)
            continue
        experts, rows, columns = tensor.shape
        for expert in range(experts):
            if stacked.group(2) == "down_proj":
                shapes[f"{stacked.group(1)}.{expert}.down_proj.weight"] = (rows, columns)
            else:  # gate rows first, then up rows
                for projection in ("gate_proj", "up_proj"):
                    shapes[f"{stacked.group(1)}.{expert}.{projection}.weight"] = (rows // 2, columns)
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    return shapes


@dataclass(frozen=True)
class Piece:
    """One output tensor: rows [start, stop) of the source tensor `source` (all of it when stop is None)."""

    source: str
    target: str
    start: int = 0
    stop: int | None = None


def _pieces(spec: "Family", config: MDMLlamaConfig, name: str) -> list[Piece] | None:
    """The output tensors a source tensor becomes (None: not part of the architecture)."""
    target = spec.weight_name(name)
    if target is None:
        return None
    parts = spec.split(target, config) if spec.split is not None else None
    if parts is None:
        return [Piece(name, target)]
    return [Piece(name, part, start, stop) for part, start, stop in parts]


def read_llama_family_source(family: str, src: str | Path, revision: str | None = None) -> LlamaFamilySource:
    """Reads config.json, the index and every shard header of a LLaDA or Dream checkpoint, and checks them all."""
    spec = FAMILIES[family]
    folder, hub_id = resolve_source(src, revision, allow_patterns=HUB_PATTERNS, fallback_patterns=(), example=spec.example)
    if not folder.is_dir():
        raise ConversionError(f"{folder} is a file; a {spec.title} checkpoint is a folder (config.json, shards, tokenizer).")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ConversionError(f"{folder} has no config.json: it is not a {spec.title} checkpoint folder.")
    raw = _read_json(config_path)
    if raw.get("model_type") in ("mdm", "mdm_llama"):
        raise ConversionError(f"{config_path}: this is already an hf_mdm checkpoint; load it with AutoModel.from_pretrained.")
    notes: list[str] = []
    fields = spec.config_fields(raw, config_path, notes)
    generation = folder / "generation_config.json"
    if fields.get("bos_token_id") is None and generation.is_file():
        fields["bos_token_id"] = _read_json(generation).get("bos_token_id")
    try:
        config = MDMLlamaConfig(**fields)
    except (ValueError, TypeError) as error:
        raise ConversionError(f"{config_path} gives an invalid hf_mdm config: {error}") from None
    if fields.get("mask_token_id") is None:
        raise ConversionError(f"{config_path} has no mask_token_id; {spec.title} checkpoints name their [MASK] id there.")

    shards, dtypes, seen, stored_head, embedding_at = [], {}, {}, None, None
    shapes = expected_shapes(config)
    for path in _shard_files(folder):
        try:
            with safe_open(str(path), framework="pt") as handle:
                names = list(handle.keys())
                for name in names:
                    piece = handle.get_slice(name)
                    if ROTARY_BUFFER.match(name):
                        continue
                    got = tuple(piece.get_shape())
                    parts = _pieces(spec, config, name)
                    if parts is None or any(part.target not in shapes for part in parts) and not (
                            config.tie_word_embeddings and parts[0].target == "lm_head.weight"):
                        raise ConversionError(
                            f"{path.name}: weight {name} (shape {got}) is not part of the "
                            f"{spec.title} architecture of {config_path.name}; nothing was written."
                        )
                    target = parts[0].target
                    if config.tie_word_embeddings and target == "lm_head.weight":
                        if got != shapes["model.embed_tokens.weight"]:
                            raise ConversionError(f"{path.name}: weight {name} has shape {got}, but config.json "
                                                  f"implies {shapes['model.embed_tokens.weight']}; nothing was written.")
                        stored_head = (path, name)
                        continue
                    rows = sum((part.stop - part.start) for part in parts) if parts[0].stop is not None else got[0]
                    for part in parts:
                        want = shapes[part.target]
                        have = got if part.stop is None else (part.stop - part.start, *got[1:])
                        if have != want or rows != got[0]:
                            raise ConversionError(
                                f"{path.name}: weight {name} has shape {got}, but config.json implies {want} for "
                                f"hf_mdm {part.target}; nothing was written."
                            )
                        if part.target in seen:
                            raise ConversionError(f"{path.name}: weight {name} is also in {seen[part.target]}.")
                        seen[part.target] = path.name
                    if target == "model.embed_tokens.weight":
                        embedding_at = (path, name)
                    dtypes[piece.get_dtype()] = dtypes.get(piece.get_dtype(), 0) + math.prod(piece.get_shape())
        except ConversionError:
            raise
        except Exception as error:  # a truncated or corrupt file
            raise ConversionError(f"{path} is not a readable safetensors file: {error}") from None
        shards.append(Shard(path, names))
    missing = sorted(set(shapes) - set(seen))
    if missing:
        raise ConversionError(
            f"{folder}: the shards lack {len(missing)} weight(s) of the architecture config.json describes, e.g. "
            f"hf_mdm {missing[0]} (shape {shapes[missing[0]]}); nothing was written."
        )
    dtype_name = max(dtypes, key=dtypes.get)  # the dtype of most weights: what dtype="auto" loads
    if len(dtypes) > 1:
        notes.append(f"the weights mix dtypes {sorted(dtypes)}: the files keep each tensor's own, and the config says "
                     f"{dtype_name} (most weights), which `dtype='auto'` loads them all in")
    if stored_head is not None:
        same = _same_bytes(stored_head[0], embedding_at[0], Piece(stored_head[1], stored_head[1]),
                           Piece(embedding_at[1], embedding_at[1]))
        notes.append(f"the embeddings are tied, so the stored {stored_head[1]} is dropped (the embedding is the head, "
                     f"as transformers ties them); it {'equals' if same else 'DIFFERS from'} the embedding")
    dtype = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}.get(dtype_name, torch.float32)
    source = LlamaFamilySource(name=hub_id or str(src), folder=folder, family=family, raw_config=raw, config=config,
                               shards=shards, dtype=dtype, license=card_license(folder / "README.md"), hub_id=hub_id,
                               revision=revision, notes=notes)
    return source


# ----------------------------------------------------------------------------------------------------------------
# Writing.
# ----------------------------------------------------------------------------------------------------------------


def _copied_weights(source: LlamaFamilySource, shard: Shard):
    """The `Piece`s of `shard` that the output keeps: not rotary buffers (recomputed) nor, with tied embeddings, a
    stored copy of the head (the embedding is the head)."""
    spec = FAMILIES[source.family]
    for name in shard.names:
        if ROTARY_BUFFER.match(name):
            continue
        parts = _pieces(spec, source.config, name)
        if source.config.tie_word_embeddings and parts[0].target == "lm_head.weight":
            continue
        yield from parts


def _byte_range(info: dict, piece: Piece) -> tuple[int, int, list[int]]:
    """(first byte, end byte) of `piece` within its source tensor's data, and the piece's shape: rows of a row-major
    tensor are contiguous bytes."""
    begin, end = info["data_offsets"]
    shape = list(info["shape"])
    if piece.stop is None:
        return begin, end, shape
    row_bytes = (end - begin) // shape[0]
    return begin + piece.start * row_bytes, begin + piece.stop * row_bytes, [piece.stop - piece.start, *shape[1:]]


def copy_safetensors(source: Path, target: Path, pieces: list[Piece], chunk_bytes: int = 64 << 20) -> int:
    """Writes `target` holding `pieces` of the tensors of `source` (whole tensors or row ranges, under new names),
    their bytes copied unchanged, `chunk_bytes` at a time: no tensor is ever materialised, so memory stays flat
    whatever the shard size. Returns the bytes of tensor data written.

    The safetensors layout: an 8-byte little-endian header length, a JSON header {name: {dtype, shape,
    data_offsets: [begin, end]}} padded with spaces to a multiple of 8, then the tensors' bytes, contiguous.
    """
    with open(source, "rb") as src:
        header_length = int.from_bytes(src.read(8), "little")
        header = json.loads(src.read(header_length))
        data_start = 8 + header_length
        entries = sorted((*_byte_range(header[piece.source], piece), piece.target, piece.source) for piece in pieces)
        new_header, offset = {"__metadata__": {"format": "pt"}}, 0
        for begin, end, shape, new_name, name in entries:
            new_header[new_name] = {"dtype": header[name]["dtype"], "shape": shape,
                                    "data_offsets": [offset, offset + end - begin]}
            offset += end - begin
        encoded = json.dumps(new_header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)
        with open(target, "wb") as dst:
            dst.write(len(encoded).to_bytes(8, "little"))
            dst.write(encoded)
            for begin, end, _, _, name in entries:
                src.seek(data_start + begin)
                remaining = end - begin
                while remaining:
                    block = src.read(min(chunk_bytes, remaining))
                    if not block:
                        raise ConversionError(f"{source} ends inside the data of {name}: the file is truncated.")
                    dst.write(block)
                    remaining -= len(block)
    return offset


def _stream_weights(source: LlamaFamilySource, out: Path) -> None:
    """One output shard per source shard, written by `copy_safetensors` (renamed, bytes unchanged, flat memory)."""
    count = len(source.shards)
    weight_map, total = {}, 0
    for number, shard in enumerate(source.shards, start=1):
        file_name = "model.safetensors" if count == 1 else f"model-{number:05d}-of-{count:05d}.safetensors"
        pieces = list(_copied_weights(source, shard))
        total += copy_safetensors(shard.path, out / file_name, pieces)
        weight_map.update({piece.target: file_name for piece in pieces})
    if count > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def _save_tokenizer(source: LlamaFamilySource, out: Path, notes: list[str]):
    """The source tokenizer with its chat template, loadable without remote code; None if the source has none."""
    from transformers import AutoTokenizer, PreTrainedTokenizerBase

    folder = source.folder
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        notes.append("the source has no tokenizer files: none is shipped")
        return None
    settings = _read_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() else {}
    # The tokenizer files alone, in a scratch folder: next to the source's config.json (model_type "llada" with an
    # auto_map), AutoTokenizer would ask to run the source's remote code.
    with tempfile.TemporaryDirectory() as scratch:
        for name in TOKENIZER_FILES:
            if (folder / name).is_file():
                shutil.copyfile(folder / name, Path(scratch) / name)
        try:
            if settings.get("tokenizer_class") == "DreamTokenizer":
                # Dream's tokenizer is remote code around Qwen2's byte-level BPE: transformers' own class reads its files.
                from transformers import Qwen2Tokenizer

                tokenizer = Qwen2Tokenizer.from_pretrained(scratch, local_files_only=True)
                notes.append("Dream's DreamTokenizer (remote code) is shipped as transformers' Qwen2Tokenizer, the same BPE")
            else:
                tokenizer = AutoTokenizer.from_pretrained(scratch, local_files_only=True, trust_remote_code=False)
        except Exception as error:
            raise ConversionError(f"{folder} has tokenizer files that transformers cannot load: {error}") from None
    assert isinstance(tokenizer, PreTrainedTokenizerBase)
    config = source.config
    if tokenizer.mask_token_id != config.mask_token_id:
        token = tokenizer.convert_ids_to_tokens(config.mask_token_id)
        if isinstance(token, str) and tokenizer.convert_tokens_to_ids(token) == config.mask_token_id:
            tokenizer.mask_token = token
            notes.append(f"the tokenizer's mask_token is now {token!r} (id {config.mask_token_id}, the model's [MASK])")
    if not getattr(tokenizer, "chat_template", None):
        notes.append("the tokenizer has no chat template")
    tokenizer.save_pretrained(str(out))
    saved = out / "tokenizer_config.json"
    if saved.is_file():  # no remote code: drop an auto_map that points to the source's tokenizer module
        data = _read_json(saved)
        leaked = [key for key in ("auto_map", "local_files_only", "is_local", "trust_remote_code") if key in data]
        for key in leaked:  # the source's remote-code pointer, and arguments of our own scratch load
            data.pop(key)
        if leaked:
            saved.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    return tokenizer


def _generation_config(source: LlamaFamilySource, tokenizer) -> MDMGenerationConfig:
    """The family's own decoding (`Family.generation`, one token per network call, float64 draws), 128 new tokens
    (LLaDA's and Dream's demo length), stopping at the family's end-of-turn token too when the tokenizer has it."""
    config = source.config
    stops = [config.eos_token_id] if config.eos_token_id is not None else []
    if tokenizer is not None:
        for token in FAMILIES[source.family].end_of_turn_tokens:
            token_id = tokenizer.convert_tokens_to_ids(token)
            if isinstance(token_id, int) and token_id != tokenizer.unk_token_id and token_id not in stops:
                stops.append(token_id)
    eos = stops[0] if len(stops) == 1 else (stops or None)
    new_tokens = min(128, config.max_position_embeddings // 2)  # 128, or half the context of a small model
    return MDMGenerationConfig(sampling_dtype="float64", max_new_tokens=new_tokens,
                               bos_token_id=config.bos_token_id, eos_token_id=eos, pad_token_id=config.pad_token_id,
                               stop_at_eos=FAMILIES[source.family].stop_at_eos, **family_generation(source))


def family_generation(source: LlamaFamilySource) -> dict:
    """The family's own decoding settings, or those of the version the source's name says it is (LLaDA 2.1)."""
    spec = FAMILIES[source.family]
    for pattern, generation in spec.versions.items():
        if re.search(pattern, f"{source.name} {source.folder.name}"):
            return generation
    return spec.generation


def _write_card(folder: Path, source: LlamaFamilySource, license: str, notes: list[str], tokenizer_saved: bool) -> Path:
    """The README.md of a converted folder, through `hub.write_model_card` (the one card writer)."""
    from ..hub import write_model_card

    spec = FAMILIES[source.family]
    config = source.config
    revision = f" (revision {source.revision})" if source.revision else ""
    generation = ", ".join(f"{key}={value!r}" for key, value in family_generation(source).items())
    shift = (f"{spec.title}'s network predicts token i + 1 at position i (it was initialised from an autoregressive "
             "Qwen model); hf_mdm shifts its logits inside the model, so logits at position i are the distribution of "
             "token i and the first position of every sequence must be a real token (a prompt, or BOS)."
             if config.shift_logits else "No logit shift: the output at position i is the distribution of token i.")
    block = config.diffusion_block_size
    attention = ("a bidirectional Llama-family transformer" if block is None else
                 f"a block-diffusion Llama-family transformer (bidirectional within blocks of {block} tokens, causal "
                 "across them: `generate()` decodes block by block with an exact KV cache)")
    summary = (f"Converted from **{source.name}**{revision} with `hf-mdm convert {source.family.replace('_', '-')}`: {spec.title} "
               f"({spec.paper}) as hf_mdm's `MDMLlamaForMaskedDiffusion`, {attention} "
               "that loads with transformers 5 (`AutoModel.from_pretrained`, in-library or with "
               "`trust_remote_code=True`) and samples with every hf_mdm decoding strategy through `generate()`. The "
               f"weights are copied unchanged ({str(source.dtype).replace('torch.', '')}); the conversion checks that "
               "the folder reloads to them bit for bit. Use of these weights is governed by the source's license "
               "and model card.")
    usage = """```python
import torch
from transformers import AutoModel, AutoTokenizer
from hf_mdm.generation_mdm import cut_at_eos

model = AutoModel.from_pretrained("path/to/this/folder", dtype=torch.bfloat16, trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")
prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Explain diffusion models."}],
                                       add_generation_prompt=True, return_tensors="pt", return_dict=True)
out = model.generate(**prompt, max_new_tokens=128, generator=torch.Generator().manual_seed(0))
answer = cut_at_eos(out, model.generation_config.eos_token_id, start=prompt["input_ids"].shape[1])[0]
print(tokenizer.decode(answer, skip_special_tokens=True))
```

(`cut_at_eos` is in the folder's `generation_mdm.py`, or `hf_mdm.generation_mdm`: instruct MDMs fill the tail of
the answer with EOS.) Or `hf-mdm generate path/to/this/folder --chat "Explain diffusion models." --max-new-tokens 128`."""
    moe_row = "" if config.num_experts is None else (
        f"| experts | {config.num_experts} routed ({config.router_score_function} router, top {config.num_experts_per_tok}"
        f"{', renormalised' if config.norm_topk_prob else ''}, width {config.moe_intermediate_size}), "
        f"{config.num_shared_experts} shared, {config.first_k_dense_replace} dense first layer(s) |\n")
    conversion = f"""| field | value |
| --- | --- |
| layers / width / heads / key-value heads / MLP | {config.num_hidden_layers} / {config.hidden_size} / {config.num_attention_heads} / {config.num_key_value_heads} / {config.intermediate_size} |
| vocab_size (embedding rows) | {config.vocab_size} |
| mask_token_id | {config.mask_token_id} (never predicted: its logit is MASK_LOGIT) |
| rotary | base {config.rope_parameters['rope_theta']}, applied in float32 |
| RMSNorm eps | {config.rms_norm_eps} |
| q/k/v bias / per-head q/k norm | {config.attention_bias} / {config.qk_norm} |
{moe_row}| attention | {"bidirectional" if block is None else f"block-causal, diffusion_block_size={block}"} |
| tied embeddings | {config.tie_word_embeddings} |
| logits | {shift} |
| tokenizer | {"copied from the source, with its chat template" if tokenizer_saved else "none in the source"} |
| generation | `MDMGenerationConfig`: {generation}, float64 sampling, 128 new tokens; `generate(sampler="first_hitting", block_length=None, temperature=1.0, top_p=1.0)` samples the model exactly |
"""
    if notes:
        conversion += "\nConversion notes:\n" + "".join(f"- {note}\n" for note in notes)
    return write_model_card(folder, title=f"{Path(str(source.name)).name} for hf_mdm", summary=summary,
                            license=license, tags=[source.family], base_model=source.hub_id, conversion=conversion,
                            usage=usage)


def _same_bytes(first: Path, second: Path, first_piece: Piece, second_piece: Piece, chunk_bytes: int = 64 << 20) -> bool:
    """Whether a piece of a tensor of file `first` and one of `second` have the same dtype, shape and bytes, read a
    chunk at a time (memory stays flat)."""
    def locate(path, piece):
        handle = open(path, "rb")
        length = int.from_bytes(handle.read(8), "little")
        info = json.loads(handle.read(length))[piece.source]
        begin, end, shape = _byte_range(info, piece)
        handle.seek(8 + length + begin)
        return handle, (info["dtype"], shape), end - begin

    a, a_kind, a_size = locate(first, first_piece)
    b, b_kind, b_size = locate(second, second_piece)
    with a, b:
        if a_kind != b_kind or a_size != b_size:
            return False
        while a_size:
            step = min(chunk_bytes, a_size)
            if a.read(step) != b.read(step):
                return False
            a_size -= step
    return True


def verify_converted(source: LlamaFamilySource, folder: Path) -> None:
    """Checks the written folder: every tensor's bytes equal the source's (streamed, flat memory); transformers
    reloads it with no missing, unexpected or mismatched weight, in the source's dtype; a forward pass is finite."""
    index = folder / INDEX_FILE
    weight_map = _read_json(index)["weight_map"] if index.is_file() else None
    for shard in source.shards:
        for piece in _copied_weights(source, shard):
            written = folder / (weight_map[piece.target] if weight_map else "model.safetensors")
            if not _same_bytes(shard.path, written, piece, Piece(piece.target, piece.target)):
                raise ConversionError(f"{written.name}: {piece.target} differs from the source's {piece.source}; "
                                      "please report this.")
    model, info = MDMLlamaForMaskedDiffusion.from_pretrained(folder, dtype=source.dtype, output_loading_info=True)
    problems = {key: value for key, value in info.items() if value}
    if problems:
        raise ConversionError(f"{folder} does not reload cleanly: {problems}; please report this.")
    config = model.config
    ids = torch.randint(0, config.vocab_size, (1, min(8, config.max_position_embeddings)),
                        generator=torch.Generator().manual_seed(0))
    ids[0, 1::2] = config.mask_token_id
    with torch.no_grad():
        logits = model(ids).logits
    if logits.dtype != source.dtype or not torch.isfinite(logits).all():
        raise ConversionError(f"{folder} gives {logits.dtype} logits with non-finite values; please report this.")


@dataclass
class LlamaFamilyConversion:
    """What a conversion made: where, from what, and what was decided on the way."""

    path: Path
    source: LlamaFamilySource
    notes: list[str]


def _check_destination(dst: Path, overwrite: bool, source_folder: Path | None = None) -> None:
    if dst.exists() and not dst.is_dir():
        raise ConversionError(f"{dst} is a file; the output is a folder.")
    if dst.exists() and any(dst.iterdir()) and not overwrite:
        raise ConversionError(f"{dst} exists and is not empty; pass overwrite=True (--overwrite) to replace it.")
    if source_folder is not None and dst.resolve() == source_folder.resolve():
        raise ConversionError(f"{dst} is the source itself; choose another output folder.")


def convert_llama_family(
    family: str,
    src: str | Path,
    dst: str | Path,
    *,
    revision: str | None = None,
    license: str | None = None,
    overwrite: bool = False,
    verify: bool = True,
) -> LlamaFamilyConversion:
    """Converts a LLaDA (`family="llada"`) or Dream (`family="dream"`) checkpoint into a hub-ready hf_mdm folder;
    the steps are in the module docstring.

    Args:
        src: a folder in the source's Hub layout, or a Hub repo id (downloaded).
        dst: the output folder; must be absent or empty unless `overwrite`.
        license: the card's Hub license id; default the source card's, else "other" with a note.
        verify: compare every written tensor with the source's, byte for byte, and reload the output.
    """
    if family not in FAMILIES:
        raise ConversionError(f"family must be one of {tuple(FAMILIES)}, got {family!r}.")
    if license is not None and (not isinstance(license, str) or not license.strip()):
        raise ConversionError(f"license must be a non-empty Hub license id (e.g. mit), got {license!r}.")
    dst = Path(dst)
    _check_destination(dst, overwrite)

    # 1. Read and check everything before writing anything.
    source = read_llama_family_source(family, src, revision)
    _check_destination(dst, overwrite, source.folder)
    notes = list(source.notes)
    license = resolve_license(license, source.license, notes)

    # Everything is written into a hidden sibling folder, which becomes dst only once complete and verified.
    with staged_folder(dst, overwrite, error=ConversionError) as staging:
        # 2. The weights, shard by shard.
        _stream_weights(source, staging)
        # 3. Config, remote code, generation config, tokenizer, card.
        config = source.config
        config.dtype = source.dtype
        config.architectures = ["MDMLlamaForMaskedDiffusion"]
        config.save_pretrained(staging)
        write_remote_code(staging, config.model_type)
        tokenizer = _save_tokenizer(source, staging, notes)
        _generation_config(source, tokenizer).save_pretrained(staging)
        _write_card(staging, source, license, notes, tokenizer is not None)
        # 4. Verify (then staged_folder moves it into place).
        if verify:
            verify_converted(source, staging)
    return LlamaFamilyConversion(path=dst, source=source, notes=notes)


def convert_llada(src, dst, **kwargs) -> LlamaFamilyConversion:
    """`convert_llama_family("llada", src, dst, ...)`: GSAI-ML/LLaDA-8B-Base, -8B-Instruct, LLaDA-1.5."""
    return convert_llama_family("llada", src, dst, **kwargs)


def convert_dream(src, dst, **kwargs) -> LlamaFamilyConversion:
    """`convert_llama_family("dream", src, dst, ...)`: Dream-org/Dream-v0-Base-7B, -Instruct-7B."""
    return convert_llama_family("dream", src, dst, **kwargs)


def convert_sdar(src, dst, **kwargs) -> LlamaFamilyConversion:
    """`convert_llama_family("sdar", src, dst, ...)`: JetLM/SDAR-1.7B/4B/8B-Chat (and -bN), Gen-Verse/TraDo-4B/8B-Instruct
    (the same layout and model_type)."""
    return convert_llama_family("sdar", src, dst, **kwargs)


def convert_llada_moe(src, dst, **kwargs) -> LlamaFamilyConversion:
    """`convert_llama_family("llada_moe", src, dst, ...)`: inclusionAI/LLaDA-MoE-7B-A1B-Base, -Instruct."""
    return convert_llama_family("llada_moe", src, dst, **kwargs)


def convert_llada2(src, dst, **kwargs) -> LlamaFamilyConversion:
    """`convert_llama_family("llada2", src, dst, ...)`: inclusionAI/LLaDA2.0-mini, -flash, LLaDA2.1-mini, -flash."""
    return convert_llama_family("llada2", src, dst, **kwargs)


def convert_rnd1(src, dst, **kwargs) -> LlamaFamilyConversion:
    """`convert_llama_family("rnd1", src, dst, ...)`: radicalnumerics/RND1-Base-0910."""
    return convert_llama_family("rnd1", src, dst, **kwargs)


def convert_fast_dllm_v2(src, dst, **kwargs) -> LlamaFamilyConversion:
    """`convert_llama_family("fast_dllm_v2", src, dst, ...)`: Efficient-Large-Model/Fast_dLLM_v2_1.5B, _7B."""
    return convert_llama_family("fast_dllm_v2", src, dst, **kwargs)


__all__ = [
    "FAMILIES",
    "LlamaFamilySource",
    "LlamaFamilyConversion",
    "read_llama_family_source",
    "convert_llama_family",
    "convert_llada",
    "convert_dream",
    "convert_sdar",
    "convert_fast_dllm_v2",
    "convert_llada_moe",
    "convert_rnd1",
    "convert_llada2",
    "llada_weight_name",
    "expected_shapes",
    "verify_converted",
]
