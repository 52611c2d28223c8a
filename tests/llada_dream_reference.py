"""Our own reference implementations of LLaDA's and Dream's published forward passes, and tiny random checkpoints in
each family's exact Hub layout (config.json field names, weight names, sharding with an index, tokenizer files with a
chat template, generation_config.json, a card with a license), for testing hf_mdm's converters without the Hub.

Written from the public modeling files' behaviour (LLaDA's `modeling_llada.py`, the post-October-2025 revision that
reads `attention_mask`; Dream's `modeling_dream.py` and `generation_utils.py`), not copied from them:

LLaDA: x = wte(ids); per block: h = RMSNorm(x) (float32, cast back, times weight); q, k, v = linear maps (no bias);
    rotary on q, k in float32 with positions 0..L-1 over the whole input (rotate-half, base rope_theta); key/value
    heads repeated in contiguous groups; SDPA with a key-padding bias (only when the mask has a zero), not causal;
    x += attn_out(att); h = RMSNorm(x); x += ff_out(silu(ff_proj(h)) * up_proj(h)); then ln_f and the untied head
    `model.transformer.ff_out` (or wte when weight_tying). Logits at position i: token i.
Dream: Qwen2 blocks with q/k/v biases; positions = `tok_idx` (cumsum of the mask - 1, 1 at pads) when a padded mask is
    given, else 0..L-1; cos/sin cast to the activation dtype before rotating; a (B, 1, L, L) boolean mask
    m_i & m_j; SDPA not causal. The RAW logit at position j predicts token j + 1: callers shift with
    cat(logits[:, :1], logits[:, :-1]).
"""

import json
import random
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file


# ------------------------------------------------------------------------------------------------ shared math


def rms_norm(x, weight, eps):
    x32 = x.to(torch.promote_types(x.dtype, torch.float32))  # float32 at least (a float64 check stays float64)
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def linear_of(weights: dict):
    """`linear(h, name)`: h times weight `name.weight` transposed, plus `name.bias` when the weights have one."""
    def linear(h, name):
        out = h @ weights[name + ".weight"].T
        return out + weights[name + ".bias"] if name + ".bias" in weights else out

    return linear


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotary_tables(positions, head_dim, theta):
    """positions (B or 1, L) -> cos, sin (B or 1, 1, L, head_dim) in float32."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    freqs = positions.float()[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos()[:, None], emb.sin()[:, None]


# ------------------------------------------------------------------------------------------------ LLaDA


def llada_reference_logits(config: dict, weights: dict, input_ids, attention_mask=None):
    """LLaDA's forward: (B, L) ids -> (B, L, embedding_size) logits."""
    d, heads = config["d_model"], config["n_heads"]
    kv_heads = 1 if config.get("multi_query_attention") else (config.get("n_kv_heads") or heads)
    head_dim, eps = d // heads, config["rms_norm_eps"]
    batch, length = input_ids.shape
    x = F.embedding(input_ids, weights["model.transformer.wte.weight"])
    bias = None
    if attention_mask is not None and (attention_mask == 0).any():
        bias = (1.0 - attention_mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
        bias = bias + torch.zeros(1, 1, length, length)
    cos, sin = rotary_tables(torch.arange(length)[None], head_dim, config["rope_theta"])

    linear = linear_of(weights)

    for i in range(config["n_layers"]):
        p = f"model.transformer.blocks.{i}."
        h = rms_norm(x, weights[p + "attn_norm.weight"], eps)
        q = linear(h, p + "q_proj").view(batch, length, heads, head_dim).transpose(1, 2)
        k = linear(h, p + "k_proj").view(batch, length, kv_heads, head_dim).transpose(1, 2)
        v = linear(h, p + "v_proj").view(batch, length, kv_heads, head_dim).transpose(1, 2)
        q = (q.float() * cos + rotate_half(q.float()) * sin).to(q.dtype)
        k = (k.float() * cos + rotate_half(k.float()) * sin).to(k.dtype)
        if kv_heads < heads:
            k = k.repeat_interleave(heads // kv_heads, dim=1)
            v = v.repeat_interleave(heads // kv_heads, dim=1)
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=None if bias is None else bias.to(q.dtype),
                                             is_causal=False)
        x = x + att.transpose(1, 2).reshape(batch, length, d) @ weights[p + "attn_out.weight"].T
        h = rms_norm(x, weights[p + "ff_norm.weight"], eps)
        x = x + (F.silu(h @ weights[p + "ff_proj.weight"].T) * (h @ weights[p + "up_proj.weight"].T)) @ weights[p + "ff_out.weight"].T
    x = rms_norm(x, weights["model.transformer.ln_f.weight"], eps)
    head = weights["model.transformer.wte.weight"] if config.get("weight_tying") else weights["model.transformer.ff_out.weight"]
    return x @ head.T


def llada_config(**overrides) -> dict:
    """config.json of a tiny LLaDA, with every field the 8B Instruct config has (its values, but the sizes)."""
    config = {
        "activation_type": "silu", "alibi": False, "alibi_bias_max": 8.0, "architectures": ["LLaDAModelLM"],
        "attention_dropout": 0.0, "attention_layer_norm": False, "attention_layer_norm_with_affine": True,
        "auto_map": {"AutoConfig": "configuration_llada.LLaDAConfig",
                     "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM",
                     "AutoModel": "modeling_llada.LLaDAModelLM"},
        "bias_for_layer_norm": False, "block_group_size": 1, "block_type": "llama", "d_model": 64,
        "embedding_dropout": 0.0, "embedding_size": LLADA_VOCAB, "eos_token_id": LLADA_EOS, "flash_attention": False,
        "include_bias": False, "include_qkv_bias": False, "init_cutoff_factor": None, "init_device": "meta",
        "init_fn": "mitchell", "init_std": 0.02, "input_emb_norm": False, "layer_norm_type": "rms",
        "layer_norm_with_affine": True, "mask_token_id": LLADA_MASK, "max_sequence_length": 64,
        "mlp_hidden_size": 96, "mlp_ratio": 4, "model_type": "llada", "multi_query_attention": None, "n_heads": 4,
        "n_kv_heads": 4, "n_layers": 2, "pad_token_id": LLADA_EOS, "precision": "amp_bf16", "residual_dropout": 0.0,
        "rms_norm_eps": 1e-05, "rope": True, "rope_full_precision": True, "rope_theta": 500000.0,
        "scale_logits": False, "transformers_version": "4.46.3", "use_cache": False, "vocab_size": LLADA_VOCAB,
        "weight_tying": False,
    }
    config.update(overrides)
    return config


def llada_weight_shapes(config: dict) -> dict:
    d, heads = config["d_model"], config["n_heads"]
    kv = config.get("n_kv_heads") or heads
    head_dim, mlp, vocab = d // heads, config["mlp_hidden_size"], config["embedding_size"]
    shapes = {"model.transformer.wte.weight": (vocab, d), "model.transformer.ln_f.weight": (d,)}
    if not config.get("weight_tying"):
        shapes["model.transformer.ff_out.weight"] = (vocab, d)
    for i in range(config["n_layers"]):
        p = f"model.transformer.blocks.{i}."
        shapes.update({
            p + "attn_norm.weight": (d,), p + "q_proj.weight": (heads * head_dim, d),
            p + "k_proj.weight": (kv * head_dim, d), p + "v_proj.weight": (kv * head_dim, d),
            p + "attn_out.weight": (d, heads * head_dim), p + "ff_norm.weight": (d,),
            p + "ff_proj.weight": (mlp, d), p + "up_proj.weight": (mlp, d), p + "ff_out.weight": (d, mlp),
        })
        if config.get("include_qkv_bias"):
            shapes.update({p + "q_proj.bias": (heads * head_dim,), p + "k_proj.bias": (kv * head_dim,),
                           p + "v_proj.bias": (kv * head_dim,)})
    return shapes


# LLaDA's tokenizer layout, shrunk: 256 byte tokens, then its special tokens at their relative places; the
# embedding has padding rows past the last token id, as LLaDA's 126464 rows past 126348.
LLADA_BOS, LLADA_EOS, LLADA_MASK, LLADA_START_HEADER, LLADA_END_HEADER, LLADA_EOT = 256, 257, 258, 259, 260, 261
LLADA_VOCAB = 272
LLADA_SPECIAL = {LLADA_BOS: "<|startoftext|>", LLADA_EOS: "<|endoftext|>", LLADA_MASK: "<|mdm_mask|>",
                 LLADA_START_HEADER: "<|start_header_id|>", LLADA_END_HEADER: "<|end_header_id|>", LLADA_EOT: "<|eot_id|>"}
# LLaDA's chat format: BOS, then per message <|start_header_id|>role<|end_header_id|>\n\ncontent<|eot_id|>, then the
# assistant header (LLaDA's own template appends it whatever add_generation_prompt says).
LLADA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}<|start_header_id|>assistant<|end_header_id|>\n\n"
)


# ------------------------------------------------------------------------------------------------ Dream


def dream_reference_logits(config: dict, weights: dict, input_ids, attention_mask=None):
    """Dream's forward as `diffusion_generate` calls it: (B, L) ids -> RAW (B, L, vocab) logits, where position j
    predicts token j + 1. With a padded mask: positions from its cumsum and a (B, 1, L, L) boolean mask."""
    d, heads = config["hidden_size"], config["num_attention_heads"]
    kv_heads, head_dim = config["num_key_value_heads"], d // heads
    eps = config["rms_norm_eps"]
    batch, length = input_ids.shape
    x = F.embedding(input_ids, weights["model.embed_tokens.weight"])
    mask, positions = None, torch.arange(length)[None]
    if attention_mask is not None and (attention_mask == 0).any():
        positions = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)
        m = attention_mask.bool()
        mask = m[:, None, None, :] & m[:, None, :, None]
    cos, sin = rotary_tables(positions, head_dim, config["rope_theta"])
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = rms_norm(x, weights[p + "input_layernorm.weight"], eps)
        q = (h @ weights[p + "self_attn.q_proj.weight"].T + weights[p + "self_attn.q_proj.bias"])
        k = (h @ weights[p + "self_attn.k_proj.weight"].T + weights[p + "self_attn.k_proj.bias"])
        v = (h @ weights[p + "self_attn.v_proj.weight"].T + weights[p + "self_attn.v_proj.bias"])
        q = q.view(batch, length, heads, head_dim).transpose(1, 2)
        k = k.view(batch, length, kv_heads, head_dim).transpose(1, 2)
        v = v.view(batch, length, kv_heads, head_dim).transpose(1, 2)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        groups = heads // kv_heads
        k = k[:, :, None].expand(batch, kv_heads, groups, length, head_dim).reshape(batch, heads, length, head_dim)
        v = v[:, :, None].expand(batch, kv_heads, groups, length, head_dim).reshape(batch, heads, length, head_dim)
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=False)
        x = x + att.transpose(1, 2).reshape(batch, length, d) @ weights[p + "self_attn.o_proj.weight"].T
        h = rms_norm(x, weights[p + "post_attention_layernorm.weight"], eps)
        gate, up = h @ weights[p + "mlp.gate_proj.weight"].T, h @ weights[p + "mlp.up_proj.weight"].T
        x = x + (F.silu(gate) * up) @ weights[p + "mlp.down_proj.weight"].T
    x = rms_norm(x, weights["model.norm.weight"], eps)
    head = weights["model.embed_tokens.weight"] if config.get("tie_word_embeddings") else weights["lm_head.weight"]
    return x @ head.T


def shift_right(logits):
    """Dream's callers' shift: the distribution of token i is the raw logit at i - 1 (position 0 keeps its own)."""
    return torch.cat([logits[:, :1], logits[:, :-1]], dim=1)


def dream_config(**overrides) -> dict:
    """config.json of a tiny Dream (Qwen2 field names; Dream's mask/pad ids at their relative places)."""
    config = {
        "architectures": ["DreamModel"],
        "auto_map": {"AutoConfig": "configuration_dream.DreamConfig", "AutoModel": "modeling_dream.DreamModel"},
        "attention_dropout": 0.0, "bos_token_id": DREAM_EOS, "eos_token_id": DREAM_EOS, "hidden_act": "silu",
        "hidden_size": 64, "initializer_range": 0.02, "intermediate_size": 112, "mask_token_id": DREAM_MASK,
        "max_position_embeddings": 128, "max_window_layers": 2, "model_type": "Dream", "num_attention_heads": 4,
        "num_hidden_layers": 2, "num_key_value_heads": 2, "pad_token_id": DREAM_EOS, "rms_norm_eps": 1e-06,
        "rope_scaling": None, "rope_theta": 1000000.0, "sliding_window": None, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "transformers_version": "4.46.2", "use_cache": False, "use_sliding_window": False,
        "vocab_size": DREAM_VOCAB,
    }
    config.update(overrides)
    return config


def qwen_weight_shapes(config: dict, bias: bool, qk_norm: bool = False) -> dict:
    """Weight names and shapes of a Qwen2 (q/k/v biases) or Qwen3 (q/k norms, explicit head_dim) decoder."""
    d, heads, kv = config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or d // heads
    mlp, vocab = config["intermediate_size"], config["vocab_size"]
    shapes = {"model.embed_tokens.weight": (vocab, d)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (d,),
            p + "self_attn.q_proj.weight": (heads * head_dim, d), p + "self_attn.k_proj.weight": (kv * head_dim, d),
            p + "self_attn.v_proj.weight": (kv * head_dim, d), p + "self_attn.o_proj.weight": (d, heads * head_dim),
            p + "post_attention_layernorm.weight": (d,),
            p + "mlp.gate_proj.weight": (mlp, d), p + "mlp.up_proj.weight": (mlp, d), p + "mlp.down_proj.weight": (d, mlp),
        })
        if bias:
            shapes.update({p + "self_attn.q_proj.bias": (heads * head_dim,), p + "self_attn.k_proj.bias": (kv * head_dim,),
                           p + "self_attn.v_proj.bias": (kv * head_dim,)})
        if qk_norm:
            shapes.update({p + "self_attn.q_norm.weight": (head_dim,), p + "self_attn.k_norm.weight": (head_dim,)})
    shapes["model.norm.weight"] = (d,)
    if not config.get("tie_word_embeddings"):
        shapes["lm_head.weight"] = (vocab, d)
    return shapes


def dream_weight_shapes(config: dict) -> dict:
    return qwen_weight_shapes(config, bias=True)


# Dream's (Qwen2's) special tokens after 256 byte tokens; <|endoftext|> is EOS, PAD and BOS as in Dream's config.
DREAM_EOS, DREAM_IM_START, DREAM_IM_END, DREAM_MASK = 256, 257, 258, 259
DREAM_VOCAB = 264
DREAM_SPECIAL = {DREAM_EOS: "<|endoftext|>", DREAM_IM_START: "<|im_start|>", DREAM_IM_END: "<|im_end|>",
                 DREAM_MASK: "<|mask|>"}
# ChatML with Qwen2.5's default system message.
DREAM_CHAT_TEMPLATE = (
    "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# ------------------------------------------------------------------------------------------------ checkpoints


def random_weights(shapes: dict, seed: int, dtype=torch.float32) -> dict:
    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for name, shape in shapes.items():
        if name.endswith("norm.weight") or name.endswith("ln_f.weight"):
            weights[name] = (1.0 + 0.1 * torch.randn(shape, generator=generator)).to(dtype)
        else:
            weights[name] = (0.15 * torch.randn(shape, generator=generator)).to(dtype)
    return weights


def write_shards(folder: Path, weights: dict, num_shards: int, shuffle_seed: int | None) -> None:
    """Shards named as the Hub names them, with model.safetensors.index.json; with `shuffle_seed` the names are
    spread over the shards in no order (as LLaDA's index is), else in order (as Qwen2's)."""
    names = list(weights)
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(names)
    groups = [names[i::num_shards] if shuffle_seed is not None else names[i * len(names) // num_shards:(i + 1) * len(names) // num_shards]
              for i in range(num_shards)]
    weight_map, total = {}, 0
    for number, group in enumerate(groups, start=1):
        file_name = f"model-{number:05d}-of-{num_shards:05d}.safetensors"
        save_file({name: weights[name].contiguous() for name in group}, str(folder / file_name), metadata={"format": "pt"})
        for name in group:
            weight_map[name] = file_name
            total += weights[name].numel() * weights[name].element_size()
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def byte_level_vocab() -> dict:
    from tokenizers.pre_tokenizers import ByteLevel

    return {char: index for index, char in enumerate(sorted(ByteLevel.alphabet(), key=lambda c: ord(c)))}


def write_llada_tokenizer(folder: Path) -> None:
    """A fast tokenizer (tokenizer.json + tokenizer_config.json + special_tokens_map.json) as LLaDA ships one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(vocab=byte_level_vocab(), merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=LLADA_SPECIAL[LLADA_BOS],
                                   eos_token=LLADA_SPECIAL[LLADA_EOS], pad_token=LLADA_SPECIAL[LLADA_EOS])
    fast.add_special_tokens({"additional_special_tokens": [LLADA_SPECIAL[i] for i in sorted(LLADA_SPECIAL)
                                                           if i not in (LLADA_BOS, LLADA_EOS)]})
    assert [fast.convert_tokens_to_ids(LLADA_SPECIAL[i]) for i in sorted(LLADA_SPECIAL)] == sorted(LLADA_SPECIAL)
    fast.chat_template = LLADA_CHAT_TEMPLATE
    fast.save_pretrained(str(folder))


def write_dream_tokenizer(folder: Path) -> None:
    """Slow-tokenizer files (vocab.json, merges.txt) and a tokenizer_config.json naming Dream's remote-code class."""
    vocab = byte_level_vocab()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    added = {str(i): {"content": token, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                      "special": True} for i, token in DREAM_SPECIAL.items()}
    settings = {
        "added_tokens_decoder": added, "additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<|mask|>"],
        "auto_map": {"AutoTokenizer": ["tokenization_dream.DreamTokenizer", None]}, "bos_token": None,
        "chat_template": DREAM_CHAT_TEMPLATE, "clean_up_tokenization_spaces": False, "eos_token": "<|endoftext|>",
        "errors": "replace", "mask_token": "<|mask|>", "model_max_length": 131072, "pad_token": "<|endoftext|>",
        "split_special_tokens": False, "tokenizer_class": "DreamTokenizer", "unk_token": None,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(settings, indent=2, ensure_ascii=False))


def write_card(folder: Path, license: str) -> None:
    (folder / "README.md").write_text(f"---\nlicense: {license}\nlibrary_name: transformers\n---\n# A tiny checkpoint\n")


def make_llada_checkpoint(folder: Path, seed: int = 0, num_shards: int = 3, dtype=torch.float32, **overrides):
    """A tiny LLaDA in its Hub layout; returns (config dict, weights by LLaDA name)."""
    folder.mkdir(parents=True, exist_ok=True)
    config = llada_config(**overrides)
    weights = random_weights(llada_weight_shapes(config), seed, dtype)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "generation_config.json").write_text(json.dumps(
        {"_from_model_config": True, "bos_token_id": LLADA_BOS, "eos_token_id": LLADA_EOS, "transformers_version": "4.38.2"}))
    write_shards(folder, weights, num_shards, shuffle_seed=seed)
    write_llada_tokenizer(folder)
    write_card(folder, "mit")
    return config, weights


def make_dream_checkpoint(folder: Path, seed: int = 0, num_shards: int = 2, dtype=torch.float32, **overrides):
    """A tiny Dream in its Hub layout; returns (config dict, weights by Dream name)."""
    folder.mkdir(parents=True, exist_ok=True)
    config = dream_config(**overrides)
    weights = random_weights(dream_weight_shapes(config), seed, dtype)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "generation_config.json").write_text(json.dumps(
        {"alg": "origin", "alg_temp": None, "bos_token_id": DREAM_EOS, "eos_token_id": DREAM_EOS, "eps": 0.001,
         "mask_token_id": None, "output_history": False, "pad_token_id": DREAM_EOS, "steps": 512, "temperature": 0.0,
         "top_k": None, "top_p": None, "transformers_version": "4.46.2"}))
    write_shards(folder, weights, num_shards, shuffle_seed=None)
    write_dream_tokenizer(folder)
    write_card(folder, "apache-2.0")
    return config, weights
