"""The GPT-2-style family ("mdm_gpt2"): what a GPT-2 causal LM becomes when adapted into (block) diffusion. Its
equivalence with GPT-2 itself is in test_from_autoregressive.py, its block-diffusion behaviour (blocks never see
later blocks, padding, the training pass, cached = uncached generation for every strategy) in
test_block_diffusion.py; here: its config's checks, saving and loading (with and without hf_mdm), and the end of
its learned positions."""

import textwrap

import pytest
import torch
from transformers import AutoConfig, AutoModel

from hf_mdm.configuration_mdm_gpt2 import MDMGPT2Config
from hf_mdm.modeling_mdm_gpt2 import MDMGPT2ForMaskedDiffusion

from conftest import run_without_hf_mdm, tiny_gpt2_model

SIZES = dict(vocab_size=51, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64)


@pytest.mark.parametrize("field, value, message", [
    ("num_attention_heads", 5, r"num_attention_heads \(5\) must divide hidden_size \(64\)"),
    ("activation_function", "swish2", r"activation_function must be one of \[.*'gelu_new'.*\], got 'swish2'"),
    ("layer_norm_eps", 0, "layer_norm_eps must be a positive number, got 0"),
    ("residual_dropout", 1.0, r"residual_dropout must be a number in \[0, 1\), got 1.0"),
    ("shift_logits", 1, "shift_logits must be True or False, got 1"),
    ("intermediate_size", 0, "intermediate_size must be a positive integer, got 0"),
    ("time_conditioning", True, "time_conditioning must be False"),
])
def test_bad_config_fields_are_refused_by_name(field, value, message):
    with pytest.raises(ValueError, match=rf"MDMGPT2Config\.{message}"):
        MDMGPT2Config(**{**SIZES, field: value})


def test_defaults_are_gpt2_small_and_carry_no_rotary_settings():
    config = MDMGPT2Config()
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.intermediate_size,
            config.max_position_embeddings) == (768, 12, 12, 3072, 1024)
    assert config.mask_token_id == 50257 and config.tie_word_embeddings and not hasattr(config, "rope_parameters")


def test_a_fresh_model_starts_as_gpt2_does():
    """Normal(0, 0.02) weights, unit LayerNorm weights and zero biases, the head tied to the embedding."""
    model = MDMGPT2ForMaskedDiffusion(MDMGPT2Config(**SIZES))
    norm = model.model.layers[0].input_layernorm
    assert torch.equal(norm.weight, torch.ones(64)) and torch.equal(norm.bias, torch.zeros(64))
    assert torch.equal(model.model.layers[0].self_attn.qkv_proj.bias, torch.zeros(192))
    assert abs(float(model.model.embed_positions.weight.detach().std()) - 0.02) < 0.002
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_save_and_load_keep_every_logit(tmp_path):
    model = tiny_gpt2_model(seed=3, diffusion_block_size=4)
    model.save_pretrained(tmp_path / "saved")
    assert AutoConfig.from_pretrained(tmp_path / "saved").model_type == "mdm_gpt2"
    loaded = AutoModel.from_pretrained(tmp_path / "saved").eval()
    assert type(loaded) is MDMGPT2ForMaskedDiffusion and loaded.config.diffusion_block_size == 4
    ids = torch.randint(2, 50, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)


REMOTE_SCRIPT = textwrap.dedent(
    """
    import torch
    from transformers import AutoModel
    folder, ids_file, out_file = sys.argv[1:4]
    model = AutoModel.from_pretrained(folder, trust_remote_code=True)
    assert type(model).__name__ == "MDMGPT2ForMaskedDiffusion" and "hf_mdm" not in sys.modules
    ids = torch.load(ids_file)
    out = model.generate(ids[:, :5], max_new_tokens=7, use_cache=True, stop_at_eos=False,
                         generator=torch.Generator().manual_seed(0))
    torch.save(out, out_file)
    """
)


def test_remote_code_loads_and_generates_without_hf_mdm(tmp_path):
    model = tiny_gpt2_model(seed=5, diffusion_block_size=4)
    model.save_pretrained(tmp_path / "saved")
    ids = torch.randint(2, 50, (2, 8), generator=torch.Generator().manual_seed(1))
    torch.save(ids, tmp_path / "ids.pt")
    run_without_hf_mdm(REMOTE_SCRIPT, [tmp_path / "saved", tmp_path / "ids.pt", tmp_path / "out.pt"], tmp_path)
    expected = model.generate(ids[:, :5], max_new_tokens=7, use_cache=True, stop_at_eos=False,
                              generator=torch.Generator().manual_seed(0))
    assert torch.equal(torch.load(tmp_path / "out.pt"), expected)


def test_learned_positions_end_at_the_context():
    model = tiny_gpt2_model()
    with pytest.raises(ValueError, match=r"seq_len 65 is longer than max_position_embeddings \(64\): this model's "
                                         "positions are learned"):
        model(torch.full((1, 65), 3))
    with pytest.raises(ValueError, match=r"exceeds the model's max_position_embeddings \(64\), where its learned "
                                         "positions end"):
        model.generate(torch.full((1, 10), 3), max_new_tokens=60)
