"""Our own reference implementations of the block-diffusion families' published forward passes and decoding loops,
and tiny random checkpoints in each family's exact Hub layout, for testing hf_mdm's converters without the Hub.

Written from reading the public code (JetAstra/SDAR `generate.py` and its training `modeling_sdar.py`; NVlabs
Fast-dLLM `v2/` and the Fast_dLLM_v2 Hub `modeling.py`; kuleshov-group/bd3lms `models/hf/modeling_bd3lm.py`), not
copied from it:

SDAR / TraDo: Qwen3 blocks (per-head RMSNorm on queries and keys before the rotary embedding, no biases, grouped
    key/value heads, an explicit head_dim), attention allowed iff key block <= query block, blocks of `block_size`
    counted from the first token; the logit at position i is the distribution of token i (no shift).
Fast-dLLM v2: Qwen2 blocks (q/k/v biases) under the same block-causal mask (blocks of `bd_size`); the RAW logit at
    position i predicts token i + 1, as the autoregressive Qwen2.5 it was adapted from.
BD3-LM: MDLM's DiT (tests/mdlm_reference.py) under the block-causal mask; weights under `backbone.`, plus the two
    0-d buffers `sampling_eps_min/max` at the top level.

Padding is not part of any of these codes (they decode one sequence at a time). For padded rows the references
count positions and blocks from each row's first real token and mask padded keys, as hf_mdm does.

The decoding loops recompute every forward over the whole prefix instead of keeping a KV cache: under a
block-causal mask the two are the same computation. Where the families' code lets [MASK] take probability mass
(its output row is a real vocabulary row), the references leave it out, as hf_mdm always does; for a trained model
its logit is negligible.
"""

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from llada_dream_reference import (
    byte_level_vocab,
    linear_of,
    qwen_weight_shapes,
    random_weights,
    rms_norm,
    rotary_tables,
    rotate_half,
    write_card,
    write_shards,
)


# ------------------------------------------------------------------------------------------------ the forward


def row_positions(input_ids, attention_mask):
    """(B, L) positions counted from each row's first real token (0 at padding), and the (B, L) real-token mask."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    real = attention_mask.bool()
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0).masked_fill(~real, 0), real


def block_causal_mask(positions, real, block_size):
    """(B, 1, L, L) boolean: a query sees the real keys of its own and earlier blocks (a padded query sees every
    real key, so that its softmax is defined; its output is never read)."""
    blocks = torch.div(positions, block_size, rounding_mode="floor")
    allowed = (blocks[:, :, None] >= blocks[:, None, :]) & real[:, None, :]
    allowed |= ~real[:, :, None] & real[:, None, :]
    return allowed[:, None]


def qwen_block_reference_logits(config: dict, weights: dict, input_ids, attention_mask=None, *, block_size: int):
    """The Qwen2 / Qwen3 decoder of SDAR and Fast-dLLM v2 under their block-causal mask: (B, L) -> (B, L, V) raw
    logits. q/k/v biases when the weights have them; per-head q/k RMSNorm when they have q_norm/k_norm."""
    d, heads = config["hidden_size"], config["num_attention_heads"]
    kv_heads = config["num_key_value_heads"]
    head_dim = config.get("head_dim") or d // heads
    eps = config["rms_norm_eps"]
    batch, length = input_ids.shape
    positions, real = row_positions(input_ids, attention_mask)
    mask = block_causal_mask(positions, real, block_size)
    x = F.embedding(input_ids, weights["model.embed_tokens.weight"])
    cos, sin = rotary_tables(positions, head_dim, config["rope_theta"])
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)

    project = linear_of(weights)

    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = rms_norm(x, weights[p + "input_layernorm.weight"], eps)
        q = project(h, p + "self_attn.q_proj").view(batch, length, heads, head_dim)
        k = project(h, p + "self_attn.k_proj").view(batch, length, kv_heads, head_dim)
        v = project(h, p + "self_attn.v_proj").view(batch, length, kv_heads, head_dim)
        if p + "self_attn.q_norm.weight" in weights:  # Qwen3: each head normalised before the rotation
            q = rms_norm(q, weights[p + "self_attn.q_norm.weight"], eps)
            k = rms_norm(k, weights[p + "self_attn.k_norm.weight"], eps)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        groups = heads // kv_heads
        k = k[:, :, None].expand(batch, kv_heads, groups, length, head_dim).reshape(batch, heads, length, head_dim)
        v = v[:, :, None].expand(batch, kv_heads, groups, length, head_dim).reshape(batch, heads, length, head_dim)
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=False)
        x = x + att.transpose(1, 2).reshape(batch, length, heads * head_dim) @ weights[p + "self_attn.o_proj.weight"].T
        h = rms_norm(x, weights[p + "post_attention_layernorm.weight"], eps)
        gate, up = h @ weights[p + "mlp.gate_proj.weight"].T, h @ weights[p + "mlp.up_proj.weight"].T
        x = x + (F.silu(gate) * up) @ weights[p + "mlp.down_proj.weight"].T
    x = rms_norm(x, weights["model.norm.weight"], eps)
    head = weights["model.embed_tokens.weight"] if config.get("tie_word_embeddings") else weights["lm_head.weight"]
    return x @ head.T


# ------------------------------------------------------------------------------------------------ tokenizers

# Qwen's special tokens after 256 byte tokens; the mask token is each family's own spelling.
EOS, IM_START, IM_END, MASK = 256, 257, 258, 259
VOCAB = 264
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def write_qwen_tokenizer(folder: Path, mask_spelling: str, added_tokens_spelling: str | None = None,
                         mask_is_special: bool = True) -> None:
    """Slow-tokenizer files as SDAR's and Fast-dLLM v2's repos ship them: vocab.json, merges.txt, added_tokens.json
    (SDAR spells its mask `<MASK>` there and `<|MASK|>` in tokenizer_config.json), tokenizer_config.json naming
    Qwen2Tokenizer with an auto_map to the repo's own tokenization module."""
    vocab = byte_level_vocab()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    special = {EOS: "<|endoftext|>", IM_START: "<|im_start|>", IM_END: "<|im_end|>", MASK: mask_spelling}
    added = {str(i): {"content": token, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                      "special": token != mask_spelling or mask_is_special} for i, token in special.items()}
    (folder / "added_tokens.json").write_text(json.dumps(
        {**{token: i for i, token in special.items() if i != MASK}, (added_tokens_spelling or mask_spelling): MASK}))
    settings = {
        "added_tokens_decoder": added, "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "auto_map": {"AutoTokenizer": ["tokenization_qwen2.Qwen2Tokenizer", "tokenization_qwen2_fast.Qwen2TokenizerFast"]},
        "bos_token": None, "chat_template": CHAT_TEMPLATE, "clean_up_tokenization_spaces": False,
        "eos_token": "<|endoftext|>", "errors": "replace", "mask_token": mask_spelling, "model_max_length": 131072,
        "pad_token": "<|endoftext|>", "split_special_tokens": False, "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(settings, indent=2, ensure_ascii=False))


# ------------------------------------------------------------------------------------------------ checkpoints


def sdar_config(**overrides) -> dict:
    """config.json of a tiny SDAR (Qwen3 field names; head_dim not hidden / heads, as SDAR-4B's; no block_size and
    no mask_token_id, as the Hub's)."""
    config = {
        "architectures": ["SDARForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_sdar.SDARConfig", "AutoModel": "modeling_sdar.SDARModel",
                     "AutoModelForCausalLM": "modeling_sdar.SDARForCausalLM"},
        "attention_bias": False, "attention_dropout": 0.0, "attn_implementation": "flex_attention",
        "bos_token_id": EOS, "eos_token_id": EOS, "head_dim": 24, "hidden_act": "silu", "hidden_size": 64,
        "initializer_range": 0.02, "intermediate_size": 112, "max_position_embeddings": 128, "max_window_layers": 2,
        "model_type": "sdar", "num_attention_heads": 4, "num_hidden_layers": 2, "num_key_value_heads": 2,
        "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000.0, "sliding_window": None,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.52.4", "use_cache": False,
        "use_sliding_window": False, "vocab_size": VOCAB, "debug": False, "ep_size": 1, "fuse_cross_entropy": True,
        "micro_forward": False, "skip_checkpoint": False, "use_deepep": False,
    }
    config.update(overrides)
    return {key: value for key, value in config.items() if value is not None or key in ("rope_scaling", "sliding_window")}


def fast_dllm_v2_config(**overrides) -> dict:
    """config.json of a tiny Fast-dLLM v2 (Qwen2 field names, bd_size, its misspelt conplemenrary_mask; no
    mask_token_id, as the Hub's)."""
    config = {
        "architectures": ["Fast_dLLM_QwenForCausalLM"],
        "auto_map": {"AutoConfig": "configuration.Fast_dLLM_QwenConfig", "AutoModel": "modeling.Fast_dLLM_QwenModel",
                     "AutoModelForCausalLM": "modeling.Fast_dLLM_QwenForCausalLM"},
        "attention_dropout": 0.0, "bd_size": 8, "bos_token_id": EOS, "conplemenrary_mask": True, "eos_token_id": IM_END,
        "hidden_act": "silu", "hidden_size": 64, "initializer_range": 0.02, "intermediate_size": 112,
        "layer_types": ["full_attention", "full_attention"], "max_position_embeddings": 128, "max_window_layers": 2,
        "model_type": "Fast_dLLM_Qwen", "num_attention_heads": 4, "num_hidden_layers": 2, "num_key_value_heads": 2,
        "pad_token_id": IM_END, "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000.0,
        "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "transformers_version": "4.53.1", "use_cache": True, "use_sliding_window": False, "vocab_size": VOCAB,
    }
    config.update(overrides)
    return config


def make_qwen_checkpoint(folder: Path, config: dict, seed: int, num_shards: int, dtype, generation: dict,
                         mask_spelling: str, **tokenizer_options):
    """A tiny Qwen-based block-diffusion checkpoint in its Hub layout; returns (config dict, weights by name)."""
    folder.mkdir(parents=True, exist_ok=True)
    shapes = qwen_weight_shapes(config, bias=config["model_type"] == "Fast_dLLM_Qwen", qk_norm=config["model_type"] == "sdar")
    weights = sharpened(random_weights(shapes, seed, dtype), config)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": EOS, "do_sample": True, "eos_token_id": [IM_END, EOS], "pad_token_id": EOS, **generation}))
    write_shards(folder, weights, num_shards, shuffle_seed=None) if num_shards > 1 else save_single(folder, weights)
    write_qwen_tokenizer(folder, mask_spelling, **tokenizer_options)
    write_card(folder, "apache-2.0")
    return config, weights


def make_sdar_checkpoint(folder: Path, seed: int = 0, num_shards: int = 2, dtype=torch.float32, **overrides):
    """A tiny SDAR (or TraDo: the same layout): its mask spelt `<|MASK|>`, not special, and `<MASK>` in
    added_tokens.json, as the Hub's tokenizer files have it."""
    return make_qwen_checkpoint(folder, sdar_config(**overrides), seed, num_shards, dtype,
                                {"temperature": 0.6, "top_k": 20, "top_p": 0.95, "transformers_version": "4.52.4"},
                                "<|MASK|>", added_tokens_spelling="<MASK>", mask_is_special=False)


def make_fast_dllm_v2_checkpoint(folder: Path, seed: int = 0, num_shards: int = 1, dtype=torch.float32, **overrides):
    """A tiny Fast-dLLM v2 in its Hub layout."""
    return make_qwen_checkpoint(folder, fast_dllm_v2_config(**overrides), seed, num_shards, dtype,
                                {"repetition_penalty": 1.05, "temperature": 0.7, "top_k": 20, "top_p": 0.8,
                                 "transformers_version": "4.53.1"}, "|<MASK>|")


def sharpened(weights: dict, config: dict, scale: float = 6.0) -> dict:
    """The output projection scaled up, so that the tiny random model is often confident (as a trained one is) and
    threshold rules commit several tokens per call."""
    name = "model.embed_tokens.weight" if config.get("tie_word_embeddings") else "lm_head.weight"
    weights[name] = weights[name] * scale
    return weights


def save_single(folder: Path, weights: dict) -> None:
    from safetensors.torch import save_file

    save_file({name: tensor.contiguous() for name, tensor in weights.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})


# ------------------------------------------------------------------------------------------------ decoding


def without_mask(logits: torch.Tensor, mask_id: int) -> torch.Tensor:
    """(..., V) logits with [MASK] given no probability (see the module docstring)."""
    logits = logits.double().clone()
    logits[..., mask_id] = float("-inf")
    return logits


def sdar_reference_decode(logits_of, prompt: list[int], mask_id: int, gen_length: int, block_length: int,
                          denoising_steps: int, remasking_strategy: str, threshold: float, stop_ids) -> list[int]:
    """SDAR's `block_diffusion_generate`, greedy (top_k = 1, temperature 1: its evaluation decoder), one sequence:
    a canvas of ceil((P + gen) / B) blocks; prompt blocks are context; each later block takes up to
    `denoising_steps` calls, call s committing n_s = B // S (+1 for s < B % S) positions by the remasking rule
    (dynamic: every confidence > threshold if at least n_s, else the n_s most confident; static: the n_s most
    confident; sequential: the first n_s masked), capped at the masked positions; generation stops after a block in
    which a stop id appears. `logits_of(ids) -> (len, V)` is the model on a prefix of the canvas. Returns the canvas
    up to the end of the last decoded block."""
    P, B, S = len(prompt), block_length, denoising_steps
    num_blocks = math.ceil((P + gen_length) / B)
    x = list(prompt) + [mask_id] * (num_blocks * B - P)
    quota = [B // S + (1 if s < B % S else 0) for s in range(S)]
    end = P
    for k in range(P // B, num_blocks):
        start, end = k * B, (k + 1) * B
        for step in range(S):
            masked = [i for i in range(start, end) if x[i] == mask_id]
            if not masked:
                break
            probs = torch.softmax(without_mask(logits_of(torch.tensor(x[:end]))[masked], mask_id), dim=-1)
            tokens, confidence = probs.argmax(-1).tolist(), probs.max(-1).values.tolist()
            n = min(quota[step], len(masked))
            by_confidence = sorted(range(len(masked)), key=lambda j: -confidence[j])[:n]
            if remasking_strategy == "sequential":
                chosen = list(range(n))
            elif remasking_strategy == "low_confidence_static":
                chosen = by_confidence
            else:
                sure = [j for j in range(len(masked)) if confidence[j] > threshold]
                chosen = sure if len(sure) >= n else by_confidence
            for j in chosen:
                x[masked[j]] = tokens[j]
        assert mask_id not in x[start:end], "every block finishes within its steps (B divisible by S)"
        if any(token in stop_ids for token in x[P:end]):
            break
    return x[:end]


def fast_dllm_v2_reference_decode(raw_logits_of, prompt: list[int], mask_id: int, max_new_tokens: int,
                                  bd_size: int, small_block_size: int, threshold: float, stop_id: int) -> list[int]:
    """Fast-dLLM v2's `generate`, greedy, one sequence: after the prompt (a prompt that fills whole blocks is
    followed by the argmax of its last raw logit: the AR step), each block is padded with [MASK] to a multiple of
    `bd_size` and decoded sub-block by sub-block (`small_block_size`, left to right): a call gives position p the
    raw logit at p - 1; every masked position of the sub-block whose probability exceeds `threshold` is committed,
    and always the most probable one; a finished block's last raw logit gives the next block's first token (the AR
    step). Stops once the stop token is out; returns the sequence cut just after it (or after
    max_new_tokens // bd_size blocks). `raw_logits_of(ids) -> (len, V)`."""
    B, S = bd_size, small_block_size
    x = list(prompt)
    L = len(x)

    def next_token():
        return int(without_mask(raw_logits_of(torch.tensor(x))[-1], mask_id).argmax())

    if L > B and L % B == 0:
        x.append(next_token())
    for _ in range(max_new_tokens // B):
        if stop_id in x[L:]:
            break
        x += [mask_id] * ((B - len(x) % B) % B)
        start = len(x) - B
        for s in range(B // S):
            sub = range(start + s * S, start + (s + 1) * S)
            while any(x[p] == mask_id for p in sub):
                raw = raw_logits_of(torch.tensor(x))
                masked = [p for p in sub if x[p] == mask_id]
                probs = torch.softmax(without_mask(raw[[p - 1 for p in masked]], mask_id), dim=-1)
                tokens, confidence = probs.argmax(-1).tolist(), probs.max(-1).values.tolist()
                best = max(range(len(masked)), key=lambda j: confidence[j])
                for j, p in enumerate(masked):
                    if confidence[j] > threshold or j == best:
                        x[p] = tokens[j]
        x.append(next_token())
    if stop_id in x[L:]:
        x = x[: x.index(stop_id, L) + 1]
    return x
