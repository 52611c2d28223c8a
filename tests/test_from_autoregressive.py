"""`hf-mdm train --init-from CAUSAL_LM --diffusion-block-size B`: an autoregressive Llama / Qwen2 / Qwen3 / GPT-2
causal LM adapted into an hf_mdm (block) diffusion model, its weights mapped one for one and [MASK] added to its
tokenizer.

With blocks of one token the adapted model is the AR model itself (its logits shifted by one position, as hf_mdm's
shifted models lay them out): the tests check that exactly, then that a short run from it trains and samples."""

import pytest
import torch
from transformers import AutoModel, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, \
    Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

from hf_mdm.training import train
from hf_mdm.training.from_autoregressive import adapt_causal_lm, add_mask_token

from conftest import assert_float32_close
from training_scripts.common import one_thread_and_fresh_accelerate_state  # noqa: F401 (autouse fixture)
from training_scripts.common import read_log, tiny_run, write_corpus

SIZES = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
CAUSAL_LMS = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**SIZES, rope_theta=10000.0)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**SIZES, rope_theta=1e6)),
    "qwen3": lambda: Qwen3ForCausalLM(Qwen3Config(**SIZES, head_dim=24, rope_theta=1e6)),
    "qwen3_moe": lambda: Qwen3MoeForCausalLM(Qwen3MoeConfig(**SIZES, head_dim=24, rope_theta=1e6, num_experts=8,
                                                            num_experts_per_tok=2, moe_intermediate_size=32,
                                                            router_aux_loss_coef=0.01)),
}


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE with an end-of-text token and no mask token, as an AR model's tokenizer is."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    vocab = {char: index for index, char in enumerate(sorted(ByteLevel.alphabet(), key=ord))}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def causal_lm_folder(tmp_path, family, seed=0):
    torch.manual_seed(seed)
    model = CAUSAL_LMS[family]()
    with torch.no_grad():  # random norms and biases too, so that a wrongly mapped weight shows
        for name, parameter in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                parameter.add_(0.2 * torch.randn_like(parameter))
    folder = tmp_path / family
    model.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder, model.eval()


@pytest.mark.parametrize("family", CAUSAL_LMS)
def test_with_blocks_of_one_token_the_adapted_model_is_the_ar_model(tmp_path, family):
    folder, causal_lm = causal_lm_folder(tmp_path, family)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.mask_token is None and add_mask_token(tokenizer)
    model = adapt_causal_lm(folder, tokenizer, diffusion_block_size=1).eval()
    mask = tokenizer.mask_token_id
    assert model.config.mask_token_id == mask == 257 and model.config.vocab_size == 300  # [MASK] took a free row
    assert model.config.shift_logits and model.config.qk_norm == family.startswith("qwen3")
    assert model.config.num_experts == (8 if family == "qwen3_moe" else None)
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ar = causal_lm(ids).logits
        ours = model(ids).logits
    keep = torch.arange(300) != mask
    assert_float32_close(ours[:, 1:, keep], ar[:, :-1, keep])
    # The comparison can fail: with blocks of 4, a position also sees the later positions of its block.
    blocked = adapt_causal_lm(folder, tokenizer, diffusion_block_size=4).eval()
    with torch.no_grad():
        assert (blocked(ids).logits[:, 1:, keep] - ar[:, :-1, keep]).abs().max() > 1e-3


def test_a_tokenizer_that_fills_the_vocabulary_grows_the_embedding(tmp_path):
    folder, causal_lm = causal_lm_folder(tmp_path, "llama")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.add_tokens([f"<extra_{i}>" for i in range(300 - len(tokenizer))])  # every row taken
    add_mask_token(tokenizer)
    model = adapt_causal_lm(folder, tokenizer, diffusion_block_size=2)
    assert model.config.vocab_size == 301 and model.config.mask_token_id == 300
    embedding = model.get_input_embeddings().weight
    assert torch.equal(embedding[:300], causal_lm.get_input_embeddings().weight)
    assert torch.allclose(embedding[300], causal_lm.get_input_embeddings().weight.mean(0))


def gpt2_folder(tmp_path, **overrides):
    """A random GPT-2 causal LM (random LayerNorms and biases too) with the byte tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    fields = dict(vocab_size=300, n_embd=64, n_layer=2, n_head=4, n_inner=96, n_positions=64)
    model = GPT2LMHeadModel(GPT2Config(**fields, **overrides))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "ln_" in name or name.endswith("bias"):
                parameter.add_(0.2 * torch.randn_like(parameter))
    folder = tmp_path / "gpt2"
    model.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder, model.eval()


def test_a_gpt2_model_adapted_with_blocks_of_one_token_is_the_gpt2_model(tmp_path):
    """GPT-2's learned positions, LayerNorms with biases, Conv1D (transposed) projections and tied head map onto
    hf_mdm's GPT-2 family; with left padding too, when GPT-2 is given the positions hf_mdm counts."""
    folder, gpt2 = gpt2_folder(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    add_mask_token(tokenizer)
    model = adapt_causal_lm(folder, tokenizer, diffusion_block_size=1).eval()
    assert model.config.model_type == "mdm_gpt2" and model.config.tie_word_embeddings and model.config.shift_logits
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    keep = torch.arange(300) != tokenizer.mask_token_id
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # row 1 left-padded
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        ar = gpt2(ids, attention_mask=mask, position_ids=positions).logits
        ours = model(ids, attention_mask=mask).logits
        assert_float32_close(ours[0, 1:, keep], ar[0, :-1, keep])
        assert_float32_close(ours[1, 6:, keep], ar[1, 5:-1, keep])
        blocked = adapt_causal_lm(folder, tokenizer, diffusion_block_size=4).eval()
        assert (blocked(ids).logits[:, 1:, keep] - gpt2(ids).logits[:, :-1, keep]).abs().max() > 1e-3


def test_the_shipped_gpt2_model_adapts_exactly():
    from transformers import AutoModelForCausalLM

    from hf_mdm import pretrained_path

    folder = pretrained_path("shakespeare-ar")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert not add_mask_token(tokenizer)  # it shares shakespeare-mdm's tokenizer, [MASK] included
    gpt2 = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    model = adapt_causal_lm(folder, tokenizer, diffusion_block_size=1).eval()
    ids = torch.randint(3, 4099, (2, 64), generator=torch.Generator().manual_seed(2))
    keep = torch.arange(4099) != tokenizer.mask_token_id
    with torch.no_grad():
        assert_float32_close(model(ids).logits[:, 1:, keep], gpt2(ids).logits[:, :-1, keep])
    # Its tokenizer has no BOS: an unconditional sample starts after end-of-text, as GPT-2's documents do.
    assert tokenizer.bos_token_id is None and model.config.bos_token_id == tokenizer.eos_token_id == 0
    out = model.generate(max_new_tokens=8, stop_at_eos=False, generator=torch.Generator().manual_seed(0))
    assert out.shape == (1, 9) and out[0, 0] == 0 and not (out == tokenizer.mask_token_id).any()


@pytest.mark.parametrize("field, value", [("scale_attn_by_inverse_layer_idx", True), ("reorder_and_upcast_attn", True),
                                          ("scale_attn_weights", False)])
def test_a_gpt2_option_the_layer_lacks_is_refused_by_name(tmp_path, field, value):
    folder, _ = gpt2_folder(tmp_path, **{field: value})
    with pytest.raises(ValueError, match=rf"{field}={value} is not supported \(allowed: \({not value},\)\)"):
        adapt_causal_lm(folder, byte_tokenizer(), diffusion_block_size=4)


@pytest.mark.parametrize("family", ["qwen2", "qwen3_moe"])
def test_train_init_from_a_causal_lm_into_block_diffusion(tmp_path, family):
    """A dense and a mixture-of-experts causal LM (RND1's recipe; its load-balancing loss in the training loss)."""
    corpus = write_corpus(tmp_path)
    folder, _ = causal_lm_folder(tmp_path, family)
    train(tiny_run(corpus, tmp_path / "run", train_tokenizer=None, model_config=None, init_from=str(folder),
                   diffusion_block_size=4, max_steps=20, block_size=32))
    validation = read_log(tmp_path / "run", "val/nats_per_token")
    assert validation[20] < validation[0] - 0.5, validation  # it learns the toy corpus
    model = AutoModel.from_pretrained(tmp_path / "run" / "model")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "run" / "model")
    assert model.config.diffusion_block_size == 4 and model.config.mask_token_id == tokenizer.mask_token_id
    prompt = tokenizer("the old cat", return_tensors="pt").input_ids
    out = model.generate(prompt, max_new_tokens=8, use_cache=True, stop_at_eos=False,
                         generator=torch.Generator().manual_seed(0))
    assert out.shape == (1, prompt.shape[1] + 8) and not (out == tokenizer.mask_token_id).any()


def test_lora_adapts_the_experts_of_a_mixture_of_experts(tmp_path):
    """LoRA on an MoE diffusion model: the attention projections and every MoE layer's stacked experts (peft's
    parameter LoRA); the adapter loads with peft and merges to the same logits."""
    from peft import PeftModel
    from safetensors import safe_open

    corpus = write_corpus(tmp_path)
    folder, _ = causal_lm_folder(tmp_path, "qwen3_moe")
    train(tiny_run(corpus, tmp_path / "base", train_tokenizer=None, model_config=None, init_from=str(folder),
                   diffusion_block_size=4, max_steps=2, block_size=32))
    base_folder = tmp_path / "base" / "model"
    train(tiny_run(corpus, tmp_path / "lora", train_tokenizer=None, model_config=None, init_from=str(base_folder),
                   max_steps=10, block_size=32, lora_r=4, lr=2e-2))
    with safe_open(str(tmp_path / "lora" / "adapter" / "adapter_model.safetensors"), "pt") as handle:
        names = list(handle.keys())
    assert any("experts" in name and "lora_A" in name for name in names), names[:5]
    assert any("self_attn.q_proj.lora_A" in name for name in names)
    adapted = PeftModel.from_pretrained(AutoModel.from_pretrained(base_folder), tmp_path / "lora" / "adapter").eval()
    merged = AutoModel.from_pretrained(tmp_path / "lora" / "model").eval()
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    ids[:, ::3] = merged.config.mask_token_id
    with torch.no_grad():
        original = AutoModel.from_pretrained(base_folder)(ids).logits
        torch.testing.assert_close(merged(ids).logits, adapted(ids).logits, rtol=1e-4, atol=1e-4)
        assert (merged(ids).logits - original).abs().max() > 1e-3  # the adapter learned something
    with pytest.raises(ValueError, match="--lora-dropout 0.1 cannot apply to stacked expert weights"):
        train(tiny_run(corpus, tmp_path / "bad", train_tokenizer=None, model_config=None, init_from=str(base_folder),
                       lora_r=4, lora_dropout=0.1))


@pytest.mark.slow
def test_fsdp_trains_a_mixture_of_experts_as_one_process_does(tmp_path):
    """FSDP2 on two CPU processes (each MDMLlamaBlock a unit, its experts sharded with it) gives the training and
    validation losses of one process, the routers' load-balancing loss included."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from training_scripts.common import cli_args, subprocess_env

    corpus = write_corpus(tmp_path)
    folder, _ = causal_lm_folder(tmp_path, "qwen3_moe")
    train(tiny_run(corpus, tmp_path / "base", train_tokenizer=None, model_config=None, init_from=str(folder),
                   diffusion_block_size=4, max_steps=2, block_size=32))
    settings = dict(train_tokenizer=None, model_config=None, init_from=str(tmp_path / "base" / "model"), block_size=32,
                    batch_size=4, max_steps=6, eval_every=3, eval_blocks=8, warmup_steps=2, save_every=3)
    script = Path(__file__).parent / "training_scripts" / "fsdp_cpu.py"
    commands = {"one": [sys.executable, "-m", "hf_mdm.training.cli"],
                "fsdp": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", script]}
    for name, command in commands.items():
        result = subprocess.run([*command, *cli_args(corpus, tmp_path / name, **settings)], capture_output=True,
                                text=True, timeout=300, env={**subprocess_env(), "FSDP_BLOCK_CLASS": "MDMLlamaBlock"})
        assert result.returncode == 0, result.stderr[-3000:]
    for key in ("train/nats_per_token", "val/nats_per_token"):
        one, two = read_log(tmp_path / "one", key), read_log(tmp_path / "fsdp", key)
        assert one.keys() == two.keys() and len(one) >= 3
        assert list(two.values()) == pytest.approx(list(one.values()), rel=1e-4), key
    assert os.path.isfile(tmp_path / "fsdp" / "model" / "config.json")
    from hf_mdm.training.checkpointing import latest_checkpoint  # sharded checkpoints: FSDP was on, not DDP

    assert any(p.name.startswith("pytorch_model_fsdp") for p in latest_checkpoint(tmp_path / "fsdp").iterdir())
