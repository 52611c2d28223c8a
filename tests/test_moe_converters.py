"""`hf-mdm convert llada-moe` and `hf-mdm convert rnd1`: tiny random checkpoints in LLaDA-MoE's Hub layout
(model_type "llada", one tensor per expert projection, spread over shards in no order) and RND1's (Qwen3-MoE's),
converted and checked against our own reference implementations of their forward passes (tests/moe_reference.py):
logits within 1e-5 in float32 with and without padding, and the same experts chosen for every token in every layer."""

import json

import pytest
import torch
from safetensors import safe_open

from hf_mdm import MDMLlamaForMaskedDiffusion
from hf_mdm.convert import ConversionError, convert_llada, convert_llada_moe, convert_rnd1
from hf_mdm.modeling_mdm_common import MASK_LOGIT

from moe_reference import MASK, llada_moe_reference_logits, make_llada_moe_checkpoint

TOLERANCE = 1e-5
MEASURED = {}


@pytest.fixture(scope="module", autouse=True)
def report_measured_differences():
    yield
    for case, value in MEASURED.items():
        print(f"max |logit difference| {case}: {value:.3g}")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe_converters")
    out = {}
    config, weights = make_llada_moe_checkpoint(root / "LLaDA-MoE-tiny", seed=1)
    out["llada-moe"] = (config, weights, convert_llada_moe(root / "LLaDA-MoE-tiny", root / "llada-moe-hf"))
    # A variant the released model does not use but the code has: a dense first layer and a shared expert.
    config, weights = make_llada_moe_checkpoint(root / "LLaDA-MoE-dense-first", seed=2, num_shards=1,
                                                moe_layer_freq=[0, 1, 1], shared_expert_intermediate_size=48)
    out["llada-moe dense first, shared expert"] = (
        config, weights, convert_llada_moe(root / "LLaDA-MoE-dense-first", root / "llada-moe-dense-first-hf"))
    return out


def partly_masked(batch=3, length=18, seed=1):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (batch, length), generator=generator)
    ids[torch.rand(batch, length, generator=generator) < 0.4] = MASK
    return ids


def difference(reference, ours):
    assert (ours[..., MASK] == MASK_LOGIT).all()
    keep = torch.arange(ours.shape[-1]) != MASK
    return (reference[..., keep] - ours[..., keep]).abs().max().item()


@pytest.mark.parametrize("case", ["llada-moe", "llada-moe dense first, shared expert"])
def test_converted_llada_moe_matches_the_reference(converted, case):
    config, weights, result = converted[case]
    model = MDMLlamaForMaskedDiffusion.from_pretrained(result.path).eval()
    assert (model.config.num_experts, model.config.num_experts_per_tok, model.config.norm_topk_prob) == (8, 3, False)
    assert model.config.mask_token_id == MASK and not model.config.shift_logits and model.config.qk_norm
    dense_first = case != "llada-moe"
    assert model.config.first_k_dense_replace == int(dense_first)
    assert model.config.num_shared_experts == (2 if dense_first else 0)
    ids = partly_masked()
    with torch.no_grad():
        theirs, their_choices = llada_moe_reference_logits(config, weights, ids)
        out = model(ids, output_router_logits=True)
        unpadded = difference(theirs, out.logits)
        # The same experts for every token in every MoE layer (as sets: the order of a top-k is no decision).
        assert len(out.router_logits) == len(their_choices) == (2 if dense_first else 3)
        for ours, chosen in zip(out.router_logits, their_choices):
            mine = ours.topk(3, dim=-1).indices
            assert torch.equal(mine.sort(-1).values, chosen.sort(-1).values)
        padded_ids, mask = torch.full((3, 22), 256), torch.zeros(3, 22, dtype=torch.long)
        padded_ids[0, 4:], mask[0, 4:] = ids[0], 1
        padded_ids[1, :18], mask[1, :18] = ids[1], 1
        padded_ids[2, 4:], mask[2, 4:] = ids[2], 1
        theirs_padded, _ = llada_moe_reference_logits(config, weights, padded_ids, mask)
        real = mask.bool()
        padded = difference(theirs_padded[real], model(padded_ids, attention_mask=mask).logits[real])
    MEASURED[f"{case} unpadded"], MEASURED[f"{case} padded"] = unpadded, padded
    assert unpadded <= TOLERANCE and padded <= TOLERANCE, (unpadded, padded)


def test_the_reference_comparison_can_fail(converted):
    """Renormalising the chosen experts' probabilities (Qwen3-MoE's default, not LLaDA-MoE's) moves the logits."""
    config, weights, result = converted["llada-moe"]
    model = MDMLlamaForMaskedDiffusion.from_pretrained(result.path).eval()
    model.config.norm_topk_prob = True
    ids = partly_masked()
    with torch.no_grad():
        assert difference(llada_moe_reference_logits(config, weights, ids)[0], model(ids).logits) > 1e-2


def test_experts_are_copied_tensor_by_tensor_and_the_folder_is_hub_ready(converted):
    from transformers import AutoTokenizer

    _, weights, result = converted["llada-moe"]
    folder = result.path
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.layers.2.mlp.experts.5.down_proj.weight"
    with safe_open(str(folder / index[name]), "pt") as handle:
        assert torch.equal(handle.get_tensor(name), weights[name])
    generation = json.loads((folder / "generation_config.json").read_text())
    settings = {**generation.get("sampler_config", {}), **generation}
    assert settings["sampler"] == "confidence" and settings["block_length"] == 32
    card = (folder / "README.md").read_text()
    assert "license: apache-2.0" in card and "| experts | 8 routed (softmax router, top 3, width 24)" in card
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.convert_tokens_to_ids(tokenizer.mask_token) == MASK and tokenizer.chat_template
    assert any("[MASK] is the tokenizer's '<|mask|>'" in note for note in result.notes)


@pytest.mark.parametrize("overrides, message", [
    (dict(moe_router_enable_expert_bias=True), r"moe_router_enable_expert_bias=True is not supported"),
    (dict(moe_layer_freq=[1, 0, 1]), r"moe_layer_freq=\[1, 0, 1\] is not supported"),
    (dict(shared_expert_intermediate_size=30), r"shared_expert_intermediate_size=30 is not supported"),
    (dict(num_experts_per_tok=9), r"num_experts_per_tok \(9\) must be at most num_experts \(8\)"),
    (dict(router_jitter_noise=0.1), r"config field 'router_jitter_noise' \(= 0.1\) is not part of the LLaDA-MoE"),
])
def test_bad_llada_moe_configs_are_refused_before_anything_is_written(tmp_path, overrides, message):
    make_llada_moe_checkpoint(tmp_path / "src", num_shards=1, **overrides)
    with pytest.raises(ConversionError, match=message):
        convert_llada_moe(tmp_path / "src", tmp_path / "dst")
    assert not (tmp_path / "dst").exists()


def test_each_llada_converter_points_at_the_other(tmp_path):
    make_llada_moe_checkpoint(tmp_path / "moe", num_shards=1)
    with pytest.raises(ConversionError, match="this is LLaDA-MoE .* convert it with `hf-mdm convert llada-moe`"):
        convert_llada(tmp_path / "moe", tmp_path / "dst")
    from llada_dream_reference import make_llada_checkpoint

    make_llada_checkpoint(tmp_path / "dense", num_shards=1)
    with pytest.raises(ConversionError, match="a dense LLaDA converts with `hf-mdm convert llada`"):
        convert_llada_moe(tmp_path / "dense", tmp_path / "dst")


def test_an_expert_count_the_weights_contradict_is_refused(tmp_path):
    """config.json says 8 experts but the shards hold a 9th: named, before anything is written."""
    config, weights = make_llada_moe_checkpoint(tmp_path / "src", num_shards=1)
    from safetensors.torch import save_file

    weights["model.layers.0.mlp.experts.8.up_proj.weight"] = weights["model.layers.0.mlp.experts.0.up_proj.weight"].clone()
    (shard,) = set(json.loads((tmp_path / "src" / "model.safetensors.index.json").read_text())["weight_map"].values())
    save_file(weights, str(tmp_path / "src" / shard), metadata={"format": "pt"})
    with pytest.raises(ConversionError, match=r"weight model.layers.0.mlp.experts.8.up_proj.weight .* is not part of"):
        convert_llada_moe(tmp_path / "src", tmp_path / "dst")
    assert not (tmp_path / "dst").exists()


def test_the_command_line_converts_llada_moe(tmp_path, capsys):
    from hf_mdm_cli import main  # the `hf-mdm` console script

    make_llada_moe_checkpoint(tmp_path / "src", num_shards=2)
    main(["convert", "llada-moe", str(tmp_path / "src"), str(tmp_path / "dst")])
    assert "dst" in capsys.readouterr().out
    model = MDMLlamaForMaskedDiffusion.from_pretrained(tmp_path / "dst")
    assert model.config.source_family == "llada_moe" and model.config.num_experts == 8


# ------------------------------------------------------------------------------------------------ RND1


def test_converted_rnd1_matches_the_reference(tmp_path):
    from llada_dream_reference import shift_right
    from moe_reference import make_rnd1_checkpoint, rnd1_reference_logits

    config, weights = make_rnd1_checkpoint(tmp_path / "RND1-tiny", norm_topk_prob=False)  # RND1's code forces True
    result = convert_rnd1(tmp_path / "RND1-tiny", tmp_path / "rnd1-hf")
    assert any("norm_topk_prob=False; RND1's code runs norm_topk_prob=True" in note for note in result.notes)
    model = MDMLlamaForMaskedDiffusion.from_pretrained(result.path).eval()
    assert model.config.shift_logits and model.config.norm_topk_prob and model.config.num_experts == 8
    ids = partly_masked()
    ids[:, 0] = 5  # a shifted model predicts nothing at the first position
    with torch.no_grad():
        raw, their_choices = rnd1_reference_logits(config, weights, ids)
        out = model(ids, output_router_logits=True)
        unpadded = difference(shift_right(raw)[:, 1:], out.logits[:, 1:])
        for ours, chosen in zip(out.router_logits, their_choices):
            assert torch.equal(ours.topk(2, dim=-1).indices.sort(-1).values, chosen.sort(-1).values)
        padded_ids, mask = torch.full((3, 21), 256), torch.zeros(3, 21, dtype=torch.long)
        padded_ids[:, 3:], mask[:, 3:] = ids, 1
        raw_padded, _ = rnd1_reference_logits(config, weights, padded_ids, mask)
        padded = difference(shift_right(raw_padded)[:, 4:], model(padded_ids, attention_mask=mask).logits[:, 4:])
    MEASURED["rnd1 unpadded"], MEASURED["rnd1 padded"] = unpadded, padded
    assert unpadded <= TOLERANCE and padded <= TOLERANCE, (unpadded, padded)
    # The comparison can fail: without renormalised experts (what config.json said) the logits move.
    model.config.norm_topk_prob = False
    with torch.no_grad():
        assert difference(shift_right(raw)[:, 1:], model(ids).logits[:, 1:]) > 1e-2
    generation = json.loads((result.path / "generation_config.json").read_text())
    settings = {**generation.get("sampler_config", {}), **generation}
    assert (settings["sampler"], settings["order"]) == ("confidence", "entropy")


def test_rnd1_configs_it_cannot_be_are_refused(tmp_path):
    from moe_reference import make_rnd1_checkpoint

    make_rnd1_checkpoint(tmp_path / "causal", num_shards=1, is_causal=True)
    with pytest.raises(ConversionError, match=r"is_causal=True is not supported \(allowed: False\)"):
        convert_rnd1(tmp_path / "causal", tmp_path / "dst")
    make_rnd1_checkpoint(tmp_path / "odd", num_shards=1, shared_expert_intermediate_size=20)
    with pytest.raises(ConversionError, match="config field 'shared_expert_intermediate_size'"):
        convert_rnd1(tmp_path / "odd", tmp_path / "dst")
    assert not (tmp_path / "dst").exists()
