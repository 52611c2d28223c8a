"""`hf-mdm convert bd3lm | sdar | fast-dllm-v2`: tiny random checkpoints in each family's Hub layout, converted and
checked against our own reference implementations of the families' forward passes (logits within 1e-5 in float32,
with and without padding) and of their own decoding loops (token for token in greedy settings)."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_mdm import MDMForMaskedDiffusion, MDMLlamaForMaskedDiffusion
from hf_mdm.convert import ConversionError, convert_bd3lm, convert_fast_dllm_v2, convert_sdar
from hf_mdm.modeling_mdm_common import MASK_LOGIT

from block_diffusion_reference import (
    EOS,
    IM_END,
    MASK,
    VOCAB,
    fast_dllm_v2_reference_decode,
    make_fast_dllm_v2_checkpoint,
    make_sdar_checkpoint,
    qwen_block_reference_logits,
    sdar_reference_decode,
)
from llada_dream_reference import shift_right
from mdlm_reference import random_reference, save_hub_layout

TOLERANCE = 1e-5
MEASURED = {}  # case -> max |logit difference|, printed at the end of the module (pytest -s)


@pytest.fixture(scope="module", autouse=True)
def report_measured_differences():
    yield
    for case, value in MEASURED.items():
        print(f"max |logit difference| {case}: {value:.3g}")


def make_bd3lm_checkpoint(folder, block_size=4, **overrides):
    """A tiny BD3-LM in its Hub layout (MDLM's DiT fields, block_size, the training-only fields, and the 0-d buffers
    sampling_eps_min/max beside `backbone.`); returns the reference network."""
    reference = random_reference(seed=3, vocab_size=53, model_length=32)
    fields = dict(architectures=["BD3LM"], model_type="bd3lm", block_size=block_size, cross_attn=True,
                  attn_backend="sdpa", var_min=True, sampling_eps_min=0.001, sampling_eps_max=0.999,
                  auto_map={"AutoConfig": "configuration_bd3lm.BD3LMConfig",
                            "AutoModelForMaskedLM": "modeling_bd3lm.BD3LM"})
    fields.update(overrides)
    save_hub_layout(reference, folder, **fields)
    state = load_file(str(folder / "model.safetensors"))
    state["sampling_eps_min"], state["sampling_eps_max"] = torch.tensor(0.2), torch.tensor(0.7)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "README.md").write_text("---\nlicense: apache-2.0\n---\n# tiny bd3lm\n")
    return reference


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("block_converters")
    out = {}
    config, weights = make_sdar_checkpoint(root / "SDAR-tiny-Chat", seed=1)  # no block_size: SDAR's default 4
    out["sdar"] = (config, weights, 4, convert_sdar(root / "SDAR-tiny-Chat", root / "sdar-hf"))
    config, weights = make_sdar_checkpoint(root / "SDAR-tiny-Chat-b8", seed=2, num_shards=1, tie_word_embeddings=True)
    out["sdar-b8-tied"] = (config, weights, 8, convert_sdar(root / "SDAR-tiny-Chat-b8", root / "sdar-b8-hf"))
    config, weights = make_fast_dllm_v2_checkpoint(root / "fast-dllm-v2", seed=3)
    out["fast_dllm_v2"] = (config, weights, 8, convert_fast_dllm_v2(root / "fast-dllm-v2", root / "fast-dllm-v2-hf"))
    reference = make_bd3lm_checkpoint(root / "bd3lm")
    out["bd3lm"] = (None, reference, 4, convert_bd3lm(root / "bd3lm", root / "bd3lm-hf"))
    return out


LOADED = {}


def load(result):
    """The converted folder, loaded once per module."""
    if result.path not in LOADED:
        cls = MDMForMaskedDiffusion if isinstance(getattr(result, "model", None), MDMForMaskedDiffusion) \
            else MDMLlamaForMaskedDiffusion
        LOADED[result.path] = cls.from_pretrained(result.path).eval()
    return LOADED[result.path]


def partly_masked(vocab, mask_id, batch=3, length=20, seed=1):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, min(vocab, 256), (batch, length), generator=generator)
    ids[torch.rand(batch, length, generator=generator) < 0.4] = mask_id
    ids[:, 0] = 5  # a real first token (a shifted model predicts nothing there)
    return ids


def difference(reference, ours, mask_id):
    assert (ours[..., mask_id] == MASK_LOGIT).all()
    keep = torch.ones(ours.shape[-1], dtype=torch.bool)
    keep[mask_id] = False
    return (reference[..., keep] - ours[..., keep]).abs().max().item()


@pytest.mark.parametrize("case", ["sdar", "sdar-b8-tied", "fast_dllm_v2"])
def test_converted_qwen_families_match_the_reference(converted, case):
    config, weights, block, result = converted[case]
    model = load(result)
    assert model.config.diffusion_block_size == block and model.config.mask_token_id == MASK
    shifted = case == "fast_dllm_v2"
    assert model.config.shift_logits == shifted and model.config.qk_norm == (not shifted)

    def reference(ids, mask=None):
        raw = qwen_block_reference_logits(config, weights, ids, mask, block_size=block)
        return shift_right(raw) if shifted else raw

    ids = partly_masked(VOCAB, MASK)
    with torch.no_grad():
        unpadded = difference(reference(ids), model(ids).logits, MASK)
        # Left- and right-padded rows: blocks and positions count from each row's first real token.
        padded_ids, mask = torch.full((3, 24), EOS), torch.zeros(3, 24, dtype=torch.long)
        padded_ids[0, 4:], mask[0, 4:] = ids[0], 1
        padded_ids[1, :20], mask[1, :20] = ids[1], 1
        padded_ids[2, 4:], mask[2, 4:] = ids[2], 1
        mask[2, 4:7] = 0  # a prompt that starts later still: 3 more padding columns
        ours = model(padded_ids, attention_mask=mask).logits
        theirs = reference(padded_ids, mask)
        real = mask.bool()
        first = torch.zeros_like(real)
        first[torch.arange(3), real.int().argmax(1)] = True  # a shifted model predicts nothing at a row's first token
        keep = real & ~first if shifted else real
        padded = difference(theirs[keep], ours[keep], MASK)
    MEASURED[f"{case} unpadded"], MEASURED[f"{case} padded"] = unpadded, padded
    assert unpadded <= TOLERANCE and padded <= TOLERANCE, (unpadded, padded)


def test_converted_bd3lm_matches_the_reference(converted):
    _, reference, block, result = converted["bd3lm"]
    model = MDMForMaskedDiffusion.from_pretrained(result.path).eval()
    assert model.config.diffusion_block_size == block
    ids = partly_masked(53, 52, length=14)
    position = torch.arange(14)
    attend = (position[:, None] // block) >= (position[None, :] // block)
    with torch.no_grad():
        theirs = reference(ids, torch.zeros(3), attend=attend)
        unpadded = difference(theirs, model(ids).logits, 52)
        padded_ids, mask = torch.zeros(3, 17, dtype=torch.long), torch.zeros(3, 17, dtype=torch.long)
        padded_ids[:, 3:], mask[:, 3:] = ids, 1
        padded = difference(theirs, model(padded_ids, attention_mask=mask).logits[:, 3:], 52)
    MEASURED["bd3lm unpadded"], MEASURED["bd3lm padded"] = unpadded, padded
    assert unpadded <= TOLERANCE and padded <= TOLERANCE, (unpadded, padded)
    assert any("sampling_eps_min = 0.2" in note for note in result.notes)


def test_the_reference_comparison_can_fail(converted):
    """The same comparison against a reference that forgets the block mask (full attention) is far off."""
    config, weights, block, result = converted["sdar"]
    model = load(result)
    ids = partly_masked(VOCAB, MASK)
    with torch.no_grad():
        bidirectional = qwen_block_reference_logits(config, weights, ids, block_size=10_000)
        assert difference(bidirectional, model(ids).logits, MASK) > 1e-2


def test_converted_folders_are_hub_ready(converted):
    from transformers import AutoTokenizer

    for case, (sampler, extra) in {"sdar": ("sdar", {"denoising_steps": 4, "confidence_threshold": 0.9}),
                                   "fast_dllm_v2": ("fast_dllm_v2", {"block_length": 8, "confidence_threshold": 0.9}),
                                   "bd3lm": ("first_hitting", {"top_p": 0.9})}.items():
        folder = converted[case][3].path
        generation = json.loads((folder / "generation_config.json").read_text())
        assert generation["sampler"] == sampler, case
        settings = {**generation.get("sampler_config", {}), **generation}
        for key, value in extra.items():
            assert settings[key] == value, (case, key)
        card = (folder / "README.md").read_text()
        assert "license: apache-2.0" in card and "block-causal" in card, case
        if case != "bd3lm":
            tokenizer = AutoTokenizer.from_pretrained(folder)
            assert tokenizer.convert_tokens_to_ids(tokenizer.mask_token) == MASK and tokenizer.chat_template
    sdar = json.loads((converted["sdar"][3].path / "generation_config.json").read_text())
    assert sdar["eos_token_id"] == [EOS, IM_END] or sorted(sdar["eos_token_id"]) == sorted([EOS, IM_END])
    assert any("[MASK] is the tokenizer's '<|MASK|>'" in note for note in converted["sdar"][3].notes)


# ------------------------------------------------------------------------------------------------ decoding


SDAR_SETTINGS = [
    # (remasking_strategy, denoising_steps, threshold)
    ("low_confidence_dynamic", 4, 0.9),
    ("low_confidence_dynamic", 4, 0.1),
    ("low_confidence_dynamic", 2, 0.05),
    ("low_confidence_static", 4, 0.9),
    ("low_confidence_static", 2, 0.9),
    ("sequential", 2, 0.9),
]


@pytest.mark.parametrize("case, prompt_length", [("sdar", 5), ("sdar", 8), ("sdar", 11), ("sdar-b8-tied", 13)])
@pytest.mark.parametrize("setting", SDAR_SETTINGS, ids=lambda s: f"{s[0]}-{s[1]}-{s[2]}")
def test_sdar_decoding_is_sdars_own_token_for_token(converted, case, prompt_length, setting):
    config, weights, block, result = converted[case]
    remasking, steps, threshold = setting
    model = load(result)
    prompt = partly_masked(VOCAB, MASK, batch=1, length=prompt_length, seed=prompt_length)[0].clamp(max=200)
    gen = 3 * block - prompt_length % block  # the canvas ends on a block boundary, as SDAR's does
    with torch.no_grad():
        theirs = sdar_reference_decode(
            lambda ids: qwen_block_reference_logits(config, weights, ids[None], block_size=block)[0],
            prompt.tolist(), MASK, gen, block, steps, remasking, threshold, stop_ids={EOS, IM_END})
        for use_cache in (False, True):
            ours = model.generate(prompt[None], max_new_tokens=gen, sampler="sdar", remasking_strategy=remasking,
                                  denoising_steps=steps, confidence_threshold=threshold, temperature=0.0,
                                  use_cache=use_cache, eos_token_id=[EOS, IM_END], pad_token_id=EOS)[0]
            assert ours[: len(theirs)].tolist() == theirs, (use_cache, ours.tolist(), theirs)


@pytest.mark.parametrize("prompt_length", [5, 16, 13])
@pytest.mark.parametrize("small_block", [4, 2])
@pytest.mark.parametrize("threshold", [0.9, 0.2, 0.05])
def test_fast_dllm_v2_decoding_is_its_own_token_for_token(converted, prompt_length, small_block, threshold):
    config, weights, block, result = converted["fast_dllm_v2"]
    model = load(result)
    prompt = partly_masked(VOCAB, MASK, batch=1, length=prompt_length, seed=prompt_length)[0].clamp(max=200)
    new_tokens = 24
    with torch.no_grad():
        theirs = fast_dllm_v2_reference_decode(
            lambda ids: qwen_block_reference_logits(config, weights, ids[None], block_size=block)[0],
            prompt.tolist(), MASK, new_tokens, block, small_block, threshold, stop_id=IM_END)
        for use_cache in (False, True):
            ours = model.generate(prompt[None], max_new_tokens=new_tokens, sampler="fast_dllm_v2",
                                  block_length=small_block, confidence_threshold=threshold, temperature=0.0,
                                  use_cache=use_cache, eos_token_id=IM_END, pad_token_id=EOS)[0].tolist()
            common = min(len(ours), len(theirs))
            assert common >= prompt_length + 8
            assert ours[:common] == theirs[:common], (use_cache, ours, theirs)


# ------------------------------------------------------------------------------------------------ bad input


def test_a_checkpoint_of_another_family_is_refused(tmp_path):
    make_fast_dllm_v2_checkpoint(tmp_path / "fast")
    with pytest.raises(ConversionError, match=r"model_type 'Fast_dLLM_Qwen'; an SDAR or TraDo checkpoint has 'sdar'"):
        convert_sdar(tmp_path / "fast", tmp_path / "out")
    make_sdar_checkpoint(tmp_path / "sdar")
    with pytest.raises(ConversionError, match=r"model_type 'sdar'; a Fast-dLLM v2 checkpoint has 'Fast_dLLM_Qwen'"):
        convert_fast_dllm_v2(tmp_path / "sdar", tmp_path / "out")
    save_hub_layout(random_reference(seed=1), tmp_path / "mdlm")
    with pytest.raises(ConversionError, match=r"is a mdlm checkpoint .*hf-mdm convert mdlm"):
        convert_bd3lm(tmp_path / "mdlm", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("family, overrides, message", [
    ("sdar", {"num_experts": 8}, r"config field 'num_experts' \(= 8\) is not part of the SDAR architecture"),
    ("sdar", {"attention_bias": True}, r"attention_bias=True is not supported \(allowed: \(False, None\)\)"),
    ("sdar", {"use_sliding_window": True}, r"use_sliding_window=True is not supported"),
    ("fast_dllm_v2", {"layer_types": ["sliding_attention", "full_attention"]}, r"layer_types=\['full_attention', "
                                                                             r"'sliding_attention'\] is not supported"),
    ("bd3lm", {"causal": True}, r"causal=True is not supported \(allowed: \(False, None\)\)"),
    ("bd3lm", {"block_size": 0}, r"block_size must be a positive integer \(BD3-LM's block\), got 0"),
    ("bd3lm", {"cross_attn_mode": "x"}, r"config field 'cross_attn_mode' \(= 'x'\) is not part of BD3-LM's"),
])
def test_config_fields_the_converters_do_not_understand(tmp_path, family, overrides, message):
    if family == "bd3lm":
        make_bd3lm_checkpoint(tmp_path / "src", **overrides)
        convert = convert_bd3lm
    elif family == "sdar":
        make_sdar_checkpoint(tmp_path / "src", **overrides)
        convert = convert_sdar
    else:
        make_fast_dllm_v2_checkpoint(tmp_path / "src", **overrides)
        convert = convert_fast_dllm_v2
    with pytest.raises(ConversionError, match=message):
        convert(tmp_path / "src", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert [path.name for path in tmp_path.iterdir()] == ["src"]  # no hidden staging folder left either
