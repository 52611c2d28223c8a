"""Our own reference implementations of LLaDA-MoE's and RND1's published forward passes, and tiny random
checkpoints in their exact Hub layouts, for testing `hf-mdm convert llada-moe` and `hf-mdm convert rnd1` without the
Hub.

Written from reading the public code (LLaDA-MoE: the Hub remote code `modeling_lladamoe.py` as vendored by
ZHZisZZ/dllm, and inclusionAI/dInfer's `tools/modeling_fused_lladamoe.py`; RND1: RadicalNumerics/RND1's
`rnd/modeling_rnd.py`, `configuration_rnd.py` and `sampling.py`), not copied from it:

LLaDA-MoE: Qwen3-MoE-style layers. Attention: q/k/v/o projections without bias, every head's query and key
    RMS-normalised over the head (before the rotation), rotate-half rotary embeddings, full bidirectional attention.
    MoE MLP: router `mlp.gate` (no bias); softmax over ALL experts in float32, the top-k probabilities taken as they
    are (its code fixes norm_topk_prob to False: they sum to less than one); each chosen expert a SwiGLU
    (`mlp.experts.{e}.{gate,up,down}_proj`), weighted and summed. No shared experts in the released model (an
    optional shared SwiGLU `layers.{i}.shared_expert` beside the MLP when `shared_expert_intermediate_size` is set);
    `moe_layer_freq` 0 makes a layer's MLP dense (width `dense_intermediate_size`). Final RMSNorm, untied `lm_head`, logit i
    for token i (no shift).

RND1: the same layer as Qwen3-30B-A3B's (grouped key/value heads, explicit head_dim), bidirectional, softmax routing
    with the chosen experts' probabilities renormalised, no shared experts; its raw logit at position i predicts
    token i + 1 (its sampler reads it so).

LLaDA-MoE's published code drops the attention mask (it attends to padding); for padded rows this reference masks padded keys
and counts positions from each row's first real token, as hf_mdm does; unpadded, the two are the same computation.
Experts are computed token by token and expert by expert, the slowest and plainest way.
"""

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from block_diffusion_reference import row_positions, without_mask, write_qwen_tokenizer
from llada_dream_reference import random_weights, rms_norm, rotary_tables, rotate_half, write_card, write_shards

MASK = 259  # `<|mask|>` in the test tokenizer (LLaDA-MoE's own is 156895)


def llada_moe_config(**overrides) -> dict:
    """config.json of a tiny LLaDA-MoE, with the Hub's field names (model_type "llada", as LLaDA-MoE's Hub config
    has it, OLMoE-style MoE fields) and no mask_token_id (the Hub's names none)."""
    config = {
        "architectures": ["LLaDAMoEModelLM"],
        "auto_map": {"AutoConfig": "configuration_lladamoe.LLaDAConfig", "AutoModel": "modeling_lladamoe.LLaDAMoEModelLM",
                     "AutoModelForCausalLM": "modeling_lladamoe.LLaDAMoEModelLM"},
        "model_type": "llada", "attention_bias": False, "attention_dropout": 0.0, "clip_qkv": None,
        "dense_intermediate_size": 96, "eos_token_id": 256, "expert_intermediate_size": 24, "hidden_act": "silu",
        "hidden_size": 64, "initializer_range": 0.02, "max_position_embeddings": 128, "moe_layer_freq": [1, 1, 1],
        "moe_router_enable_expert_bias": False, "moe_router_score_function": "softmax", "norm_topk_prob": False,
        "num_attention_heads": 4, "num_experts": 8, "num_experts_per_tok": 3, "num_hidden_layers": 3,
        "num_key_value_heads": 4, "output_router_logits": False, "pad_token_id": 256, "partial_rotary_factor": 1,
        "qk_layernorm": True, "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 50000.0,
        "routed_scaling_factor": 1, "router_aux_loss_coef": 0.01, "router_num_group": None, "router_topk_group": None,
        "shared_expert_intermediate_size": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "transformers_version": "4.53.2", "use_cache": False, "vocab_size": 264,
    }
    config.update(overrides)
    return config


def llada_moe_weight_shapes(config: dict) -> dict:
    """Every tensor of the Hub layout (one tensor per expert projection) with its shape."""
    d, heads, kv_heads = config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"]
    head_dim, width, vocab = config.get("head_dim") or d // heads, config["expert_intermediate_size"], config["vocab_size"]
    shapes = {"model.embed_tokens.weight": (vocab, d), "model.norm.weight": (d,), "lm_head.weight": (vocab, d)}
    for i, moe in enumerate(config["moe_layer_freq"]):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
            p + "self_attn.q_proj.weight": (heads * head_dim, d), p + "self_attn.k_proj.weight": (kv_heads * head_dim, d),
            p + "self_attn.v_proj.weight": (kv_heads * head_dim, d), p + "self_attn.o_proj.weight": (d, heads * head_dim),
            p + "self_attn.q_norm.weight": (head_dim,), p + "self_attn.k_norm.weight": (head_dim,),
        })
        if not moe:
            dense = config["dense_intermediate_size"]
            shapes.update({p + "mlp.gate_proj.weight": (dense, d), p + "mlp.up_proj.weight": (dense, d),
                           p + "mlp.down_proj.weight": (d, dense)})
            continue
        shapes[p + "mlp.gate.weight"] = (config["num_experts"], d)
        for e in range(config["num_experts"]):
            shapes.update({f"{p}mlp.experts.{e}.gate_proj.weight": (width, d),
                           f"{p}mlp.experts.{e}.up_proj.weight": (width, d),
                           f"{p}mlp.experts.{e}.down_proj.weight": (d, width)})
        if config.get("shared_expert_intermediate_size"):
            shared = config["shared_expert_intermediate_size"]
            shapes.update({p + "shared_expert.gate_proj.weight": (shared, d),  # beside the MLP, not in it
                           p + "shared_expert.up_proj.weight": (shared, d),
                           p + "shared_expert.down_proj.weight": (d, shared)})
    return shapes


def swiglu(x, weights, prefix):
    return (F.silu(x @ weights[prefix + "gate_proj.weight"].T) * (x @ weights[prefix + "up_proj.weight"].T)) \
        @ weights[prefix + "down_proj.weight"].T


def llada_moe_reference_logits(config: dict, weights: dict, input_ids, attention_mask=None):
    """(B, L) -> (B, L, V) logits, and the experts each token chose in each MoE layer: a list of (B * L, k)."""
    return moe_reference_logits(config, weights, input_ids, attention_mask, renormalise=False)


def rnd1_reference_logits(config: dict, weights: dict, input_ids, attention_mask=None):
    """(B, L) -> RAW (B, L, V) logits (position i predicts token i + 1) and the experts chosen."""
    return moe_reference_logits({**config, "moe_layer_freq": [1] * config["num_hidden_layers"]}, weights, input_ids,
                                attention_mask, renormalise=True)


def moe_reference_logits(config: dict, weights: dict, input_ids, attention_mask, renormalise: bool):
    d, heads, kv_heads = config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"]
    head_dim, eps, k = config.get("head_dim") or d // heads, config["rms_norm_eps"], config["num_experts_per_tok"]
    batch, length = input_ids.shape
    positions, real = row_positions(input_ids, attention_mask)
    allowed = (real[:, None, :] | ~real[:, :, None])[:, None]  # padded keys hidden from real queries
    x = F.embedding(input_ids, weights["model.embed_tokens.weight"])
    cos, sin = rotary_tables(positions, head_dim, config["rope_theta"])
    chosen_by_layer = []
    for i, moe in enumerate(config["moe_layer_freq"]):
        p = f"model.layers.{i}."
        h = rms_norm(x, weights[p + "input_layernorm.weight"], eps)
        q = (h @ weights[p + "self_attn.q_proj.weight"].T).view(batch, length, heads, head_dim)
        key = (h @ weights[p + "self_attn.k_proj.weight"].T).view(batch, length, kv_heads, head_dim)
        v = (h @ weights[p + "self_attn.v_proj.weight"].T).view(batch, length, kv_heads, head_dim).transpose(1, 2)
        q = rms_norm(q, weights[p + "self_attn.q_norm.weight"], eps).transpose(1, 2)
        key = rms_norm(key, weights[p + "self_attn.k_norm.weight"], eps).transpose(1, 2)
        q, key = q * cos + rotate_half(q) * sin, key * cos + rotate_half(key) * sin
        key = key.repeat_interleave(heads // kv_heads, dim=1)
        v = v.repeat_interleave(heads // kv_heads, dim=1)
        att = F.scaled_dot_product_attention(q, key, v, attn_mask=allowed)
        x = x + att.transpose(1, 2).reshape(batch, length, heads * head_dim) @ weights[p + "self_attn.o_proj.weight"].T
        h = rms_norm(x, weights[p + "post_attention_layernorm.weight"], eps)
        if not moe:
            x = x + swiglu(h, weights, p + "mlp.")
            continue
        tokens = h.reshape(-1, d)
        at_least_32 = torch.promote_types(tokens.dtype, torch.float32)
        probs = (tokens.to(at_least_32) @ weights[p + "mlp.gate.weight"].to(at_least_32).T).softmax(dim=-1)
        top, chosen = probs.topk(k, dim=-1)
        if renormalise:  # RND1 (Qwen3-MoE's norm_topk_prob); LLaDA-MoE takes them as they are
            top = top / top.sum(dim=-1, keepdim=True)
        chosen_by_layer.append(chosen)
        out = torch.zeros_like(tokens)
        for t in range(tokens.shape[0]):
            for slot in range(k):
                out[t] += top[t, slot].to(tokens.dtype) * swiglu(tokens[t], weights, f"{p}mlp.experts.{int(chosen[t, slot])}.")
        if config.get("shared_expert_intermediate_size"):
            out = out + swiglu(tokens, weights, p + "shared_expert.")
        x = x + out.view(batch, length, d)
    x = rms_norm(x, weights["model.norm.weight"], eps)
    return x @ weights["lm_head.weight"].T, chosen_by_layer


def write_moe_checkpoint(folder: Path, config: dict, shapes: dict, seed: int, num_shards: int, dtype, shuffle: bool,
                         license: str, sharpen: bool = False):
    """Random weights for `shapes` (routers that clearly prefer some experts, as trained ones do; expert biases
    where the layout has them; with `sharpen` a confident output layer) written in the Hub layout; returns them."""
    from block_diffusion_reference import sharpened

    folder.mkdir(parents=True, exist_ok=True)
    weights = random_weights(shapes, seed, dtype)
    generator = torch.Generator().manual_seed(seed + 100)
    for name in weights:
        if name.endswith("mlp.gate.weight"):
            weights[name] = (torch.randn(weights[name].shape, generator=generator) * 0.6).to(dtype)
        elif name.endswith("expert_bias"):
            weights[name] = (torch.randn(weights[name].shape, generator=generator) * 0.3).to(dtype)
    if sharpen:
        weights = sharpened(weights, config)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    write_shards(folder, weights, num_shards, shuffle_seed=seed if shuffle else None)
    write_qwen_tokenizer(folder, "<|mask|>")
    write_card(folder, license)
    return weights


def make_llada_moe_checkpoint(folder: Path, seed: int = 0, num_shards: int = 3, dtype=torch.float32, **overrides):
    """A tiny LLaDA-MoE in its Hub layout (experts spread over the shards in no order); returns (config, weights)."""
    config = llada_moe_config(**overrides)
    weights = write_moe_checkpoint(folder, config, llada_moe_weight_shapes(config), seed, num_shards, dtype,
                                   shuffle=True, license="apache-2.0")
    return config, weights


def rnd1_config(**overrides) -> dict:
    """config.json of a tiny RND1, with the fields RND1's config class saves (its forced values, Qwen3-MoE's names)."""
    config = {
        "architectures": ["RND1LM"], "auto_map": {"AutoConfig": "configuration_rnd.RND1Config",
                                                  "AutoModel": "modeling_rnd.RND1Model",
                                                  "AutoModelForMaskedLM": "modeling_rnd.RND1LM"},
        "model_type": "rnd1", "attention_bias": False, "attention_dropout": 0.0, "decoder_sparse_step": 1,
        "eos_token_id": 258, "head_dim": 24, "hidden_act": "silu", "hidden_size": 64, "initializer_range": 0.02,
        "intermediate_size": 96, "max_position_embeddings": 128, "max_window_layers": 2, "mlp_only_layers": [],
        "moe_intermediate_size": 20, "norm_topk_prob": True, "num_attention_heads": 4, "num_experts": 8,
        "num_experts_per_tok": 2, "num_hidden_layers": 2, "num_key_value_heads": 2, "output_router_logits": False,
        "pad_token_id": 256, "rms_norm_eps": 1e-06, "rope_scaling": False, "rope_theta": 1000000.0,
        "router_aux_loss_coef": 0.001, "sliding_window": False, "tie_word_embeddings": False, "dtype": "bfloat16",
        "use_cache": False, "use_sliding_window": False, "vocab_size": 264, "moe_backend": "hf",
        "num_diffusion_steps": 256, "mask_token_id": MASK, "is_causal": False, "transformers_version": "4.57.1",
    }
    config.update(overrides)
    return config


def rnd1_weight_shapes(config: dict) -> dict:
    return llada_moe_weight_shapes({**config, "moe_layer_freq": [1] * config["num_hidden_layers"],
                                    "expert_intermediate_size": config["moe_intermediate_size"]})


def make_rnd1_checkpoint(folder: Path, seed: int = 0, num_shards: int = 2, dtype=torch.float32, **overrides):
    """A tiny RND1 in its Hub layout (Qwen3's tokenizer files, no chat template: RND1's demo uses none)."""
    config = rnd1_config(**overrides)
    weights = write_moe_checkpoint(folder, config, rnd1_weight_shapes(config), seed, num_shards, dtype,
                                   shuffle=False, license="apache-2.0")
    return config, weights


# ------------------------------------------------------------------------------------------------ LLaDA 2.x


def llada2_config(**overrides) -> dict:
    """config.json of a tiny LLaDA 2.x (the Hub's field names for LLaDA2.0-mini / 2.1-mini, Ling 2.0's layer)."""
    config = {
        "architectures": ["LLaDA2MoeModelLM"],
        "auto_map": {"AutoConfig": "configuration_llada2_moe.LLaDA2MoeConfig",
                     "AutoModel": "modeling_llada2_moe.LLaDA2MoeModel",
                     "AutoModelForCausalLM": "modeling_llada2_moe.LLaDA2MoeModelLM"},
        "model_type": "llada2_moe", "attention_dropout": 0.0, "embedding_dropout": 0.0, "output_dropout": 0.0,
        "first_k_dense_replace": 1, "head_dim": 16, "hidden_act": "silu", "hidden_size": 64, "initializer_range": 0.02,
        "intermediate_size": 80, "max_position_embeddings": 128, "max_window_layers": 3, "moe_intermediate_size": 16,
        "moe_router_enable_expert_bias": True, "n_group": 4, "norm_head": False, "norm_softmax": False,
        "norm_topk_prob": True, "num_attention_heads": 4, "num_experts": 16, "num_experts_per_tok": 4,
        "num_hidden_layers": 3, "num_key_value_heads": 2, "num_shared_experts": 1, "output_router_logits": False,
        "pad_token_id": 256, "eos_token_id": 256, "partial_rotary_factor": 0.5, "rms_norm_eps": 1e-06,
        "rope_scaling": None, "rope_theta": 600000, "routed_scaling_factor": 2.5, "router_dtype": "fp32",
        "score_function": "sigmoid", "sliding_window": 4096, "tie_word_embeddings": False, "topk_group": 2,
        "torch_dtype": "bfloat16", "transformers_version": "4.57.1", "use_bias": False, "use_cache": False,
        "use_qk_norm": True, "use_qkv_bias": False, "use_rmsnorm": True, "use_sliding_window": False,
        "vocab_size": 264,
    }
    config.update(overrides)
    return config


def llada2_weight_shapes(config: dict) -> dict:
    d, heads, kv_heads, head_dim = (config["hidden_size"], config["num_attention_heads"],
                                    config["num_key_value_heads"], config["head_dim"])
    vocab, width, experts = config["vocab_size"], config["moe_intermediate_size"], config["num_experts"]
    shapes = {"model.word_embeddings.weight": (vocab, d), "model.norm.weight": (d,), "lm_head.weight": (vocab, d)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
            p + "attention.query_key_value.weight": ((heads + 2 * kv_heads) * head_dim, d),
            p + "attention.query_layernorm.weight": (head_dim,), p + "attention.key_layernorm.weight": (head_dim,),
            p + "attention.dense.weight": (d, heads * head_dim),
        })
        if i < config["first_k_dense_replace"]:
            dense = config["intermediate_size"]
            shapes.update({p + "mlp.gate_proj.weight": (dense, d), p + "mlp.up_proj.weight": (dense, d),
                           p + "mlp.down_proj.weight": (d, dense)})
            continue
        shapes.update({p + "mlp.gate.weight": (experts, d), p + "mlp.gate.expert_bias": (experts,)})
        for e in range(experts):
            shapes.update({f"{p}mlp.experts.{e}.gate_proj.weight": (width, d),
                           f"{p}mlp.experts.{e}.up_proj.weight": (width, d),
                           f"{p}mlp.experts.{e}.down_proj.weight": (d, width)})
        shared = width * config["num_shared_experts"]
        shapes.update({p + "mlp.shared_experts.gate_proj.weight": (shared, d),
                       p + "mlp.shared_experts.up_proj.weight": (shared, d),
                       p + "mlp.shared_experts.down_proj.weight": (d, shared)})
    return shapes


def llada2_reference_logits(config: dict, weights: dict, input_ids, attention_mask=None, block_size: int = 32):
    """LLaDA 2.x's forward under its block-causal mask: (B, L) -> (B, L, V) logits (no shift), and the experts each
    token chose in each MoE layer. The fused query_key_value is read as [all query heads; all key heads; all value
    heads]; rotary turns the first `partial_rotary_factor` of each head; routing: sigmoid scores, the expert bias for
    choosing only, groups scored by their two best biased scores, the best `topk_group` groups kept, the chosen
    unbiased scores renormalised and scaled by `routed_scaling_factor`."""
    from block_diffusion_reference import block_causal_mask

    d, heads, kv_heads, head_dim = (config["hidden_size"], config["num_attention_heads"],
                                    config["num_key_value_heads"], config["head_dim"])
    eps, k, experts = config["rms_norm_eps"], config["num_experts_per_tok"], config["num_experts"]
    rotary = int(head_dim * config["partial_rotary_factor"])
    batch, length = input_ids.shape
    positions, real = row_positions(input_ids, attention_mask)
    mask = block_causal_mask(positions, real, block_size)
    x = F.embedding(input_ids, weights["model.word_embeddings.weight"])
    cos, sin = rotary_tables(positions, rotary, config["rope_theta"])

    def turn(t):
        return torch.cat([t[..., :rotary] * cos + rotate_half(t[..., :rotary]) * sin, t[..., rotary:]], dim=-1)

    chosen_by_layer = []
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = rms_norm(x, weights[p + "input_layernorm.weight"], eps)
        qkv = (h @ weights[p + "attention.query_key_value.weight"].T).view(batch, length, heads + 2 * kv_heads, head_dim)
        q, key, v = qkv.split([heads, kv_heads, kv_heads], dim=2)
        q = turn(rms_norm(q, weights[p + "attention.query_layernorm.weight"], eps).transpose(1, 2))
        key = turn(rms_norm(key, weights[p + "attention.key_layernorm.weight"], eps).transpose(1, 2))
        key = key.repeat_interleave(heads // kv_heads, dim=1)
        v = v.transpose(1, 2).repeat_interleave(heads // kv_heads, dim=1)
        att = F.scaled_dot_product_attention(q, key, v, attn_mask=mask)
        x = x + att.transpose(1, 2).reshape(batch, length, heads * head_dim) @ weights[p + "attention.dense.weight"].T
        h = rms_norm(x, weights[p + "post_attention_layernorm.weight"], eps)
        if i < config["first_k_dense_replace"]:
            x = x + swiglu(h, weights, p + "mlp.")
            continue
        tokens = h.reshape(-1, d)
        at_least_32 = torch.promote_types(tokens.dtype, torch.float32)
        scores = (tokens.to(at_least_32) @ weights[p + "mlp.gate.weight"].to(at_least_32).T).sigmoid()
        biased = scores + weights[p + "mlp.gate.expert_bias"].to(at_least_32)
        groups = biased.view(-1, config["n_group"], experts // config["n_group"])
        best_groups = groups.topk(2, dim=-1).values.sum(-1).topk(config["topk_group"], dim=-1).indices
        keep = torch.zeros(groups.shape[:2], dtype=torch.bool).scatter(1, best_groups, True)
        chosen = groups.masked_fill(~keep[..., None], float("-inf")).flatten(1).topk(k, dim=-1).indices
        chosen_by_layer.append(chosen)
        weight = scores.gather(1, chosen)
        weight = weight / (weight.sum(-1, keepdim=True) + 1e-20) * config["routed_scaling_factor"]
        out = torch.zeros_like(tokens)
        for t in range(tokens.shape[0]):
            for slot in range(k):
                out[t] += weight[t, slot].to(tokens.dtype) * swiglu(tokens[t], weights, f"{p}mlp.experts.{int(chosen[t, slot])}.")
        x = x + out.view(batch, length, d) + swiglu(h, weights, p + "mlp.shared_experts.")
    x = rms_norm(x, weights["model.norm.weight"], eps)
    return x @ weights["lm_head.weight"].T, chosen_by_layer


def make_llada2_checkpoint(folder: Path, seed: int = 0, num_shards: int = 2, dtype=torch.float32, sharpen=False,
                           **overrides):
    """A tiny LLaDA 2.x in its Hub layout; with `sharpen`, its output projection scaled up so that threshold decoding
    commits several tokens per call, as a trained model does (its logits, ~30, are then beyond a 1e-5 float32
    comparison)."""
    config = llada2_config(**overrides)
    weights = write_moe_checkpoint(folder, config, llada2_weight_shapes(config), seed, num_shards, dtype,
                                   shuffle=True, license="mit", sharpen=sharpen)
    return config, weights


def llada21_reference_decode(logits_of, prompt: list[int], mask_id: int, gen_length: int, block_length: int,
                             threshold: float, editing_threshold: float, max_post_steps: int,
                             num_to_transfer: int = 1) -> list[int]:
    """LLaDA 2.1's generate() with token editing, greedy, one sequence (read from its Hub code as vendored by
    lingjiechen2/dllm, with dllm's fix of its attention mask: block-causal, as its model is trained): blocks of
    `block_length` from position 0, the first one holding the prompt's end; in each block, every iteration
    (1) counts a post-fill iteration when the block has no [MASK] at its start, and stops past `max_post_steps` of
    them, before calling; (2) calls the model on the canvas up to the block's end; (3) mask to token: the masked
    positions whose greedy probability exceeds `threshold` if at least `num_to_transfer`, else the most confident
    `num_to_transfer`; token to token: every non-mask, non-prompt position of the block whose argmax differs from its
    token with probability above `editing_threshold`; (4) stops when the block had no [MASK] at the start and nothing
    was edited. No end-of-sequence stop (its eos_early_stop is off by default). Returns the whole canvas."""
    P, B = len(prompt), block_length
    num_blocks = -(-(P + gen_length) // B)
    x = list(prompt) + [mask_id] * (num_blocks * B - P)
    for b in range(P // B, num_blocks):
        start, end = b * B, (b + 1) * B
        post = 0
        while True:
            old = x[start:end]
            active = [token == mask_id for token in old]
            if not any(active):
                post += 1
            if post > max_post_steps:
                break
            probs = torch.softmax(without_mask(logits_of(torch.tensor(x[:end]))[start:end], mask_id), dim=-1)
            tokens, confidence = probs.argmax(-1).tolist(), probs.max(-1).values.tolist()
            fill = []
            if any(active):
                sure = [i for i in range(B) if active[i] and confidence[i] > threshold]
                ranked = sorted((i for i in range(B) if active[i]), key=lambda i: -confidence[i])
                fill = sure if len(sure) >= num_to_transfer else ranked[:num_to_transfer]
            editable = [not active[i] and start + i >= P for i in range(B)]
            edits = [i for i in range(B) if editable[i] and confidence[i] > editing_threshold and tokens[i] != old[i]]
            for i in fill + edits:
                x[start + i] = tokens[i]
            if not any(active) and not edits:
                break
    return x


def rnd1_reference_decode(raw_logits_of, canvas: list[int], mask_id: int, num_steps: int) -> tuple[list[int], int]:
    """RND1's `diffusion_sample` with its default schedule, greedy at temperature 1, one sequence (read from
    RadicalNumerics/RND1 `rnd/sampling.py`): `canvas` is its layout (prompt, [MASK] x (N - 1), the reserved last
    slot), the masked positions the maskable ones. A call gives position i the raw logits at i - 1 (its shift);
    step = N - 1, ..., 1: keep masked the floor(n * step / N) maskable positions of highest entropy (n the maskable
    count at the start; the product in float32, as its tensors compute it), write the argmax at the other maskable
    ones, call again if any is left; finally fill what is left from the last call. Returns the canvas and the
    number of calls."""
    x = list(canvas)
    maskable = [token == mask_id for token in x]
    total = sum(maskable)

    def scores():
        raw = without_mask(raw_logits_of(torch.tensor(x)), mask_id)
        logp = torch.log_softmax(raw, dim=-1)
        prediction = [x[0]] + logp.argmax(-1).tolist()[:-1]
        entropy = [0.0] + (-(logp.exp() * logp.clamp(min=-1e30)).sum(-1)).tolist()[:-1]  # [MASK]'s 0 log 0 = 0
        return prediction, entropy

    prediction, entropy = scores()
    calls = 1
    for step in range(num_steps - 1, 0, -1):
        keep = int((torch.tensor(total) * (step / num_steps)).long())
        candidates = sorted((i for i in range(len(x)) if maskable[i]), key=lambda i: -entropy[i])
        kept = set(candidates[:keep])
        for i in candidates:
            if i not in kept:
                x[i], maskable[i] = prediction[i], False
        if any(maskable):
            prediction, entropy = scores()
            calls += 1
    for i in range(len(x)):
        if maskable[i]:
            x[i] = prediction[i]
    return x, calls
