"""`hf-mdm convert llada-moe` and `hf-mdm convert rnd1`: tiny random checkpoints in LLaDA-MoE's Hub layout
(model_type "llada", one tensor per expert projection, spread over shards in no order) and RND1's (Qwen3-MoE's),
converted and checked against our own reference implementations of their forward passes (tests/moe_reference.py):
logits within 1e-5 in float32 with and without padding, and the same experts chosen for every token in every layer."""

import json

import pytest
import torch
from safetensors import safe_open

from hf_mdm import MDMLlamaForMaskedDiffusion
from hf_mdm.convert import ConversionError, convert_llada, convert_llada2, convert_llada_moe, convert_rnd1
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
    with torch.no_grad():  # in float64 what remains is rounding
        exact, _ = llada_moe_reference_logits(config, {name: w.double() for name, w in weights.items()}, ids)
        MEASURED[f"{case} float64"] = difference(exact, model.double()(ids).logits)
    assert MEASURED[f"{case} float64"] <= 1e-10


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


BAD_CONFIGS = [
    ("llada-moe", dict(moe_router_enable_expert_bias=True), r"moe_router_enable_expert_bias=True is not supported"),
    ("llada-moe", dict(moe_layer_freq=[1, 0, 1]), r"moe_layer_freq=\[1, 0, 1\] is not supported"),
    ("llada-moe", dict(shared_expert_intermediate_size=30), r"shared_expert_intermediate_size=30 is not supported"),
    ("llada-moe", dict(num_experts_per_tok=9), r"num_experts_per_tok \(9\) must be at most num_experts \(8\)"),
    ("llada-moe", dict(router_jitter_noise=0.1), r"config field 'router_jitter_noise' \(= 0.1\) is not part of the LLaDA-MoE"),
    ("llada2", dict(score_function="relu"), r"score_function='relu' is not supported"),
    ("llada2", dict(use_qkv_bias=True), r"use_qkv_bias=True is not supported"),
    ("llada2", dict(rotary_dim=48), r"rotary_dim=48 contradicts partial_rotary_factor=0.5 of head_dim 16"),
    ("llada2", dict(num_experts_per_tok=20), r"num_experts_per_tok \(20\) must be at most num_experts \(16\)"),
    ("llada2", dict(n_group=5), r"n_group \(5\) must divide num_experts \(16\)"),
    ("llada2", dict(num_nextn_predict_layers=1), r"config field 'num_nextn_predict_layers' \(= 1\) is not part of the LLaDA 2.x"),
]


@pytest.mark.parametrize("family, overrides, message", BAD_CONFIGS)
def test_bad_moe_configs_are_refused_before_anything_is_written(tmp_path, family, overrides, message):
    from moe_reference import make_llada2_checkpoint

    make, convert = {"llada-moe": (make_llada_moe_checkpoint, convert_llada_moe),
                     "llada2": (make_llada2_checkpoint, convert_llada2)}[family]
    make(tmp_path / "src", num_shards=1, **overrides)
    with pytest.raises(ConversionError, match=message):
        convert(tmp_path / "src", tmp_path / "dst")
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
    with torch.no_grad():  # in float64 what remains is rounding
        exact, _ = rnd1_reference_logits(config, {name: w.double() for name, w in weights.items()}, ids)
        MEASURED["rnd1 float64"] = difference(shift_right(exact)[:, 1:], model.double()(ids).logits[:, 1:])
    model.float()
    assert MEASURED["rnd1 float64"] <= 1e-10
    # The comparison can fail: without renormalised experts (what config.json said) the logits move.
    model.config.norm_topk_prob = False
    with torch.no_grad():
        assert difference(shift_right(raw)[:, 1:], model(ids).logits[:, 1:]) > 1e-2
    generation = json.loads((result.path / "generation_config.json").read_text())
    assert generation["sampler"] == "rnd1" and generation["temperature"] == 0.01


def test_rnd1_configs_it_cannot_be_are_refused(tmp_path):
    from moe_reference import make_rnd1_checkpoint

    make_rnd1_checkpoint(tmp_path / "causal", num_shards=1, is_causal=True)
    with pytest.raises(ConversionError, match=r"is_causal=True is not supported \(allowed: False\)"):
        convert_rnd1(tmp_path / "causal", tmp_path / "dst")
    make_rnd1_checkpoint(tmp_path / "odd", num_shards=1, shared_expert_intermediate_size=20)
    with pytest.raises(ConversionError, match="config field 'shared_expert_intermediate_size'"):
        convert_rnd1(tmp_path / "odd", tmp_path / "dst")
    assert not (tmp_path / "dst").exists()


# ------------------------------------------------------------------------------------------------ LLaDA 2.x


@pytest.fixture(scope="module")
def llada2(tmp_path_factory):
    from moe_reference import make_llada2_checkpoint

    root = tmp_path_factory.mktemp("llada2")
    config, weights = make_llada2_checkpoint(root / "LLaDA2.0-tiny", seed=4)
    result = convert_llada2(root / "LLaDA2.0-tiny", root / "llada2-hf")
    return config, weights, result, MDMLlamaForMaskedDiffusion.from_pretrained(result.path).eval()


@pytest.fixture(scope="module")
def llada2_sharp(tmp_path_factory):
    """The same with a confident output layer, for decoding."""
    from moe_reference import make_llada2_checkpoint

    root = tmp_path_factory.mktemp("llada2_sharp")
    config, weights = make_llada2_checkpoint(root / "LLaDA2.0-tiny", seed=6, sharpen=True)
    result = convert_llada2(root / "LLaDA2.0-tiny", root / "llada2-hf")
    return config, weights, result, MDMLlamaForMaskedDiffusion.from_pretrained(result.path).eval()


def test_converted_llada2_matches_the_reference(llada2):
    from moe_reference import llada2_reference_logits

    config, weights, result, model = llada2
    assert model.config.diffusion_block_size == 32 and model.config.rope_parameters["partial_rotary_factor"] == 0.5
    assert (model.config.router_score_function, model.config.n_group, model.config.topk_group) == ("sigmoid", 4, 2)
    assert model.config.router_expert_bias and model.config.first_k_dense_replace == 1
    ids = partly_masked(length=70)  # three blocks of 32, the last partial
    with torch.no_grad():
        theirs, their_choices = llada2_reference_logits(config, weights, ids)
        out = model(ids, output_router_logits=True)
        unpadded = difference(theirs, out.logits)
        assert len(out.router_logits) == len(their_choices) == 2
        for ours, chosen in zip(out.router_logits, their_choices):
            bias = model.model.layers[1].mlp.gate.expert_bias if ours is out.router_logits[0] else \
                model.model.layers[2].mlp.gate.expert_bias
            assert chosen.shape == (210, 4) and bias.abs().max() > 0
        padded_ids, mask = torch.full((3, 75), 256), torch.zeros(3, 75, dtype=torch.long)
        padded_ids[:, 5:], mask[:, 5:] = ids, 1
        theirs_padded, _ = llada2_reference_logits(config, weights, padded_ids, mask)
        padded = difference(theirs_padded[:, 5:], model(padded_ids, attention_mask=mask).logits[:, 5:])
    MEASURED["llada2 unpadded"], MEASURED["llada2 padded"] = unpadded, padded
    assert unpadded <= TOLERANCE and padded <= TOLERANCE, (unpadded, padded)
    # In float64 both are exact up to rounding: what remains of a real difference would show here.
    with torch.no_grad():
        exact, _ = llada2_reference_logits(config, {name: w.double() for name, w in weights.items()}, ids)
        double = difference(exact, model.double()(ids).logits)
    model.float()
    MEASURED["llada2 float64"] = double
    assert double <= 1e-10, double


def test_the_same_experts_are_chosen_as_llada2s_router_chooses(llada2):
    """Routing decisions, compared directly: hf_mdm's router on the reference's own hidden states."""
    from hf_mdm.modeling_mdm_llama import MDMRouter

    config, weights, _, model = llada2
    tokens = torch.randn(200, 64, generator=torch.Generator().manual_seed(5))
    router = model.model.layers[1].mlp.gate
    assert isinstance(router, MDMRouter)
    with torch.no_grad():
        _, ours_weights, ours = router(tokens)
    scores = (tokens @ weights["model.layers.1.mlp.gate.weight"].T).sigmoid()
    biased = (scores + weights["model.layers.1.mlp.gate.expert_bias"]).view(200, 4, 4)
    best = biased.topk(2, dim=-1).values.sum(-1).topk(2, dim=-1).indices
    keep = torch.zeros(200, 4, dtype=torch.bool).scatter(1, best, True)
    theirs = biased.masked_fill(~keep[..., None], float("-inf")).flatten(1).topk(4, dim=-1).indices
    assert torch.equal(ours.sort(-1).values, theirs.sort(-1).values)
    expected = scores.gather(1, ours)
    torch.testing.assert_close(ours_weights, expected / expected.sum(-1, keepdim=True) * 2.5)


def test_the_fused_query_key_value_is_cut_byte_for_byte(llada2):
    config, weights, result, _ = llada2
    folder = result.path
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    fused = weights["model.layers.2.attention.query_key_value.weight"]
    parts = []
    for name in ("q_proj", "k_proj", "v_proj"):
        key = f"model.layers.2.self_attn.{name}.weight"
        with safe_open(str(folder / index[key]), "pt") as handle:
            parts.append(handle.get_tensor(key))
    assert [part.shape[0] for part in parts] == [64, 32, 32] and torch.equal(torch.cat(parts), fused)
    settings = json.loads((folder / "generation_config.json").read_text())
    settings = {**settings.get("sampler_config", {}), **settings}
    assert (settings["sampler"], settings["denoising_steps"], settings["confidence_threshold"]) == ("sdar", 32, 0.95)
    assert "license: mit" in (folder / "README.md").read_text()


@pytest.mark.parametrize("prompt_length", [5, 32, 45])
@pytest.mark.parametrize("threshold", [0.95, 0.5, 0.1])
def test_llada2_decoding_is_its_own_token_for_token(llada2_sharp, prompt_length, threshold):
    """LLaDA 2.0's generate(), greedy: blocks of 32, a quota of 32 // steps per call, every masked position above the
    threshold if there are at least that many, else the quota's most confident; it stops after the block holding
    EOS. Read from its code, that loop is SDAR's dynamic rule step for step, so SDAR's reference loop (from SDAR's
    code) runs it here, on LLaDA 2.x's own reference forward."""
    from block_diffusion_reference import sdar_reference_decode
    from moe_reference import llada2_reference_logits

    config, weights, _, model = llada2_sharp
    prompt = partly_masked(batch=1, length=prompt_length, seed=prompt_length)[0].clamp(max=200)
    gen = 96 - prompt_length  # the canvas ends on a block boundary, as LLaDA 2.x's does
    with torch.no_grad():
        theirs = sdar_reference_decode(lambda ids: llada2_reference_logits(config, weights, ids[None])[0][0],
                                       prompt.tolist(), MASK, gen, 32, 32, "low_confidence_dynamic", threshold,
                                       stop_ids={256})
        for use_cache in (False, True):
            ours = model.generate(prompt[None], max_new_tokens=gen, use_cache=use_cache, confidence_threshold=threshold,
                                  eos_token_id=256, pad_token_id=256, return_dict_in_generate=True)
            assert ours.sequences[0, : len(theirs)].tolist() == theirs, (use_cache, threshold)
    if threshold == 0.1:  # the threshold commits several tokens per call: the comparison exercises it
        assert ours.tokens_per_forward[0] > 1.5


@pytest.mark.parametrize("prompt_length", [5, 40])
@pytest.mark.parametrize("threshold, editing_threshold, max_post_steps", [
    (0.95, 0.9, 16),  # its generate()'s defaults
    (0.7, 0.5, 16),  # "quality" mode
    (0.5, 0.0, 16),  # "speed" mode: every changed argmax is taken
    (0.3, 0.0, 2),
])
def test_llada21_token_editing_is_its_own_token_for_token(llada2_sharp, prompt_length, threshold, editing_threshold,
                                                          max_post_steps):
    from moe_reference import llada21_reference_decode, llada2_reference_logits

    config, weights, _, model = llada2_sharp
    prompt = partly_masked(batch=1, length=prompt_length, seed=prompt_length)[0].clamp(max=200)
    gen = 96 - prompt_length
    settings = dict(confidence_threshold=threshold, editing_threshold=editing_threshold, max_post_steps=max_post_steps)

    def reference(editing):
        return llada21_reference_decode(lambda ids: llada2_reference_logits(config, weights, ids[None])[0][0],
                                        prompt.tolist(), MASK, gen, 32, threshold, editing, max_post_steps)

    with torch.no_grad():
        theirs = reference(editing_threshold)
        for use_cache in (False, True):
            ours = model.generate(prompt[None], max_new_tokens=gen, sampler="token_editing", temperature=0.0,
                                  use_cache=use_cache, stop_at_eos=False, **settings)
            assert ours[0].tolist() == theirs, (use_cache, settings)
        assert theirs != reference(1.0)  # the edits change the text: the comparison would catch their absence


def test_a_llada21_checkpoint_gets_token_editing_as_its_decoding(tmp_path):
    """LLaDA 2.1 shares 2.0's layout; its name tells them apart, and its generation_config is its own decoding."""
    from moe_reference import make_llada2_checkpoint

    make_llada2_checkpoint(tmp_path / "LLaDA2.1-mini", num_shards=1)
    result = convert_llada2(tmp_path / "LLaDA2.1-mini", tmp_path / "dst")
    settings = json.loads((result.path / "generation_config.json").read_text())
    settings = {**settings.get("sampler_config", {}), **settings}
    assert (settings["sampler"], settings["editing_threshold"], settings["max_post_steps"]) == ("token_editing", 0.9, 16)
    assert "sampler='token_editing'" in (result.path / "README.md").read_text()


@pytest.mark.parametrize("prompt_length, new_tokens, num_steps", [(4, 12, 12), (7, 16, 6), (5, 20, 40)])
def test_rnd1_decoding_is_its_own_token_for_token(tmp_path, prompt_length, new_tokens, num_steps):
    """RND1's sampler (sampler="rnd1"), greedy, on its canvas: the prompt, N - 1 masks and its reserved last slot
    (padding), given to generate() as an infilling canvas; num_steps = new tokens (one per call), fewer (several a
    call) and more (calls that commit nothing, as RND1 makes them)."""
    from moe_reference import make_rnd1_checkpoint, rnd1_reference_decode, rnd1_reference_logits

    config, weights = make_rnd1_checkpoint(tmp_path / "RND1-tiny", seed=3)
    model = MDMLlamaForMaskedDiffusion.from_pretrained(convert_rnd1(tmp_path / "RND1-tiny", tmp_path / "hf").path).eval()
    prompt = torch.randint(0, 256, (prompt_length,), generator=torch.Generator().manual_seed(prompt_length))
    canvas = torch.cat([prompt, torch.full((new_tokens - 1,), MASK), torch.tensor([256])])
    with torch.no_grad():
        theirs, calls = rnd1_reference_decode(lambda ids: rnd1_reference_logits(config, weights, ids[None])[0][0],
                                              canvas.tolist(), MASK, num_steps)
        out = model.generate(canvas[None], attention_mask=torch.ones(1, len(canvas), dtype=torch.long), max_new_tokens=0,
                             sampler="rnd1", steps=num_steps, temperature=0.0,
                             return_dict_in_generate=True)
    assert out.sequences[0].tolist() == theirs and out.nfe == calls  # the same calls too, idle ones included
