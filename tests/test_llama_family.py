"""LLaDA and Dream as hf_mdm models: conversion from tiny checkpoints in each family's exact Hub layout, checked
against our own reference implementations of their published forward passes; loading, chat generation with every
sampler, batching, remote code, and the converter's refusals."""

import json
import os
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoModel, AutoTokenizer

import hf_mdm
from hf_mdm import MDMGenerationConfig, MDMLlamaForMaskedDiffusion
from hf_mdm.convert import ConversionError, convert_dream, convert_llada, convert_llama_family
from hf_mdm.convert import llama_family
from hf_mdm.generation_mdm import cut_at_eos
from hf_mdm.hub import checkpoint_files

from hf_mdm.constants import travelling_files

from conftest import FLOAT32_EPS, assert_float32_close, run_without_hf_mdm
from llada_dream_reference import (
    DREAM_EOS, DREAM_IM_END, DREAM_MASK, DREAM_VOCAB, LLADA_BOS, LLADA_EOS, LLADA_EOT, LLADA_MASK, LLADA_VOCAB,
    dream_reference_logits, llada_reference_logits, make_dream_checkpoint, make_llada_checkpoint, shift_right,
)


class Family:
    def __init__(self, name, make, convert, reference, mask, vocab, shift):
        self.name, self.make, self.convert, self.mask, self.vocab, self.shift = name, make, convert, mask, vocab, shift
        self._reference = reference

    def reference(self, config, weights, ids, attention_mask=None):
        """The distribution of token i at position i, as each family's own sampling code reads it."""
        logits = self._reference(config, weights, ids, attention_mask)
        return shift_right(logits) if self.shift else logits


LLADA = Family("llada", make_llada_checkpoint, convert_llada, llada_reference_logits, LLADA_MASK, LLADA_VOCAB, False)
DREAM = Family("dream", make_dream_checkpoint, convert_dream, dream_reference_logits, DREAM_MASK, DREAM_VOCAB, True)
FAMILIES = {"llada": LLADA, "dream": DREAM}

# Layouts each family's Hub repos use or its code allows: untied (LLaDA-8B, Dream-7B), tied, grouped-query heads
# (LLaDA allows n_kv_heads < n_heads; Dream-7B has 7 query heads per key/value head), q/k/v biases on LLaDA.
LAYOUTS = [
    ("llada", "untied", {}),
    ("llada", "tied", {"weight_tying": True}),
    ("llada", "grouped_query", {"n_kv_heads": 2}),
    ("llada", "qkv_bias", {"include_qkv_bias": True}),
    ("dream", "untied_gqa", {}),
    ("dream", "tied", {"tie_word_embeddings": True}),
    ("dream", "full_heads", {"num_key_value_heads": 4}),
]


def real_columns(family):
    return [i for i in range(family.vocab) if i != family.mask]


def partly_masked(family, batch=3, length=20, seed=1):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (batch, length), generator=generator)
    ids[torch.rand(batch, length, generator=generator) < 0.4] = family.mask
    ids[:, 0] = 7  # the first position is always a real token (Dream predicts token i from position i - 1)
    return ids


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Every layout converted once: name -> (family, source config, source weights, converted folder)."""
    root = tmp_path_factory.mktemp("llama_family")
    cases = {}
    for family_name, layout, overrides in LAYOUTS:
        family = FAMILIES[family_name]
        source = root / f"{family_name}-{layout}-src"
        config, weights = family.make(source, seed=len(cases), **overrides)
        family.convert(source, root / f"{family_name}-{layout}")
        cases[f"{family_name}-{layout}"] = (family, config, weights, root / f"{family_name}-{layout}")
    return cases


def max_difference(a, b, columns):
    return (a[..., columns] - b[..., columns]).abs().max().item()


# ---------------------------------------------------------------------------------------------------------------
# Exactness against the references.
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", [f"{f}-{layout}" for f, layout, _ in LAYOUTS])
def test_converted_logits_match_the_reference(converted, case):
    family, config, weights, folder = converted[case]
    model = AutoModel.from_pretrained(folder).eval()
    assert type(model) is MDMLlamaForMaskedDiffusion and model.config.shift_logits == family.shift
    columns = real_columns(family)
    ids = partly_masked(family)
    with torch.no_grad():
        ours = model(ids).logits
        unpadded = max_difference(ours, family.reference(config, weights, ids), columns)

        # Left and right padding: each real row equals the reference on that row alone.
        lengths, sides = [20, 13, 7], ["none", "left", "right"]
        padded = torch.full((3, 20), model.config.pad_token_id)
        mask = torch.zeros(3, 20, dtype=torch.long)
        spans = []
        for row, (n, side) in enumerate(zip(lengths, sides)):
            span = slice(20 - n, 20) if side == "left" else slice(0, n)
            padded[row, span], mask[row, span] = ids[row, :n], 1
            spans.append(span)
        ours_padded = model(padded, attention_mask=mask).logits
        padding = 0.0
        for row, span in enumerate(spans):
            alone = family.reference(config, weights, ids[row : row + 1, : lengths[row]])[0]
            # A shifted model's first real position has no prediction of its own (it reads the position before).
            first = 1 if family.shift else 0
            padding = max(padding, max_difference(ours_padded[row, span][first:], alone[first:], columns))
        # Each family's own padded call agrees too: Dream's positions from the mask and (B, 1, L, L) mask; LLaDA's
        # key-padding bias with positions 0..L-1 over the padded row (rotary attention sees relative positions only).
        own = family.reference(config, weights, padded, mask)
        first = 1 if family.shift else 0
        for row, span in enumerate(spans):
            padding = max(padding, max_difference(ours_padded[row, span][first:], own[row, span][first:], columns))

        # output_positions: the projection at the asked positions only, equal to the full output there.
        positions = torch.tensor([[0, 5, 19], [3, 3, 12], [1, 18, 0]])
        partial = model(padded, attention_mask=mask, output_positions=positions).logits
        expected = torch.stack([ours_padded[b, positions[b]] for b in range(3)])
        assert_float32_close(partial, expected)  # a projection of 3 rows, not 20: another blocking of the same sums
    # A padded row runs other shapes (masked attention over 20 keys, not n): its sums are reordered, which moves
    # float32 logits by a few units in the last place of their scale per layer (measured: up to ~8). A wrong mask,
    # position or weight moves them by 1e-2 or more: thousands of ulps.
    ulp = FLOAT32_EPS * ours[..., columns].abs().max().item()
    print(f"\n{case}: max |logit difference| unpadded {unpadded:.2e}, padded {padding:.2e} = {padding / ulp:.1f} ulps "
          "of the logits' scale (float32)")
    assert unpadded <= 16 * ulp and padding <= 64 * ulp


def test_the_reference_comparison_can_fail(converted):
    """The check above is sensitive: an unshifted Dream, or another rotary base, is far outside its tolerance."""
    family, config, weights, folder = converted["dream-untied_gqa"]
    model = AutoModel.from_pretrained(folder)
    ids = partly_masked(family)
    columns = real_columns(family)
    with torch.no_grad():
        unshifted = dream_reference_logits(config, weights, ids)
        assert max_difference(model(ids).logits, unshifted, columns) > 1e-2
        family, config, weights, folder = converted["llada-untied"]
        model = AutoModel.from_pretrained(folder)
        ids = partly_masked(family)
        other_theta = llada_reference_logits({**config, "rope_theta": 10000.0}, weights, ids)
        assert max_difference(model(ids).logits, other_theta, real_columns(family)) > 1e-3


# ---------------------------------------------------------------------------------------------------------------
# The converted folder.
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family_name", ["llada", "dream"])
def test_conversion_streams_shards_and_keeps_bfloat16(tmp_path, family_name):
    family = FAMILIES[family_name]
    config, weights = family.make(tmp_path / "src", seed=3, num_shards=3, dtype=torch.bfloat16)
    result = family.convert(tmp_path / "src", tmp_path / "dst")
    shards = sorted((tmp_path / "dst").glob("model-*.safetensors"))
    assert len(shards) == 3 and (tmp_path / "dst" / "model.safetensors.index.json").is_file()
    from safetensors import safe_open

    dtypes = set()
    for shard in shards:
        with safe_open(str(shard), "pt") as handle:
            dtypes |= {handle.get_slice(name).get_dtype() for name in handle.keys()}
    assert dtypes == {"BF16"} and result.source.dtype == torch.bfloat16
    model = AutoModel.from_pretrained(tmp_path / "dst", dtype="auto")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    # The same weights: our bf16 forward equals the reference's bf16 forward to bf16 rounding.
    ids = partly_masked(family)
    with torch.no_grad():
        ours, reference = model(ids).logits.float(), family.reference(config, weights, ids).float()
    agreement = (ours[..., real_columns(family)].argmax(-1) == reference[..., real_columns(family)].argmax(-1))
    assert agreement.float().mean() > 0.9


@pytest.mark.parametrize("family_name", ["llada", "dream"])
def test_converted_folder_is_hub_ready(converted, family_name):
    case = "llada-untied" if family_name == "llada" else "dream-untied_gqa"
    family, config, _, folder = converted[case]
    files = checkpoint_files(folder)  # publish's checks: weights, config, remote code, tokenizer, card
    assert set(travelling_files("mdm_llama")) <= set(files)
    card = (folder / "README.md").read_text()
    assert f"license: {'mit' if family_name == 'llada' else 'apache-2.0'}" in card  # the source card's license
    assert f"hf-mdm convert {family_name}" in card
    generation = MDMGenerationConfig.from_pretrained(folder)
    assert generation.sampling_dtype == "float64"
    if family_name == "llada":  # LLaDA's chat.py: greedy low-confidence remasking in blocks of 32
        assert (generation.sampler, generation.order, generation.block_length) == ("confidence", "confidence", 32)
        assert generation.temperature == 0
    else:  # Dream's README: its own loop, entropy order, temperature 0.2, top-p 0.95, alg_temp 0
        assert (generation.sampler, generation.alg, generation.alg_temp, generation.eps) == ("dream", "entropy", 0, 1e-3)
        assert (generation.temperature, generation.top_p) == (0.2, 0.95)
    end_of_turn = LLADA_EOT if family_name == "llada" else DREAM_IM_END
    assert generation.eos_token_id == [config["eos_token_id"], end_of_turn]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.mask_token_id == family.mask and tokenizer.chat_template
    assert not {"auto_map", "local_files_only", "is_local"} & set(json.loads((folder / "tokenizer_config.json").read_text()))
    saved = json.loads((folder / "config.json").read_text())
    assert saved["model_type"] == "mdm_llama" and saved["source_family"] == family_name


def test_hub_repo_id_is_downloaded(tmp_path, monkeypatch):
    import huggingface_hub

    make_llada_checkpoint(tmp_path / "snapshot")
    calls = []

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None, **kwargs):
        calls.append((repo_id, revision, allow_patterns))
        return str(tmp_path / "snapshot")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    convert_llada("GSAI-ML/LLaDA-8B-Instruct", tmp_path / "dst", revision="main")
    repo, revision, patterns = calls[0]
    assert (repo, revision) == ("GSAI-ML/LLaDA-8B-Instruct", "main")
    assert {"config.json", "model.safetensors.index.json", "model-*.safetensors", "tokenizer_config.json"} <= set(patterns)
    assert not any(pattern.endswith((".bin", ".py")) for pattern in patterns)  # no remote code is fetched
    assert "base_model: GSAI-ML/LLaDA-8B-Instruct" in (tmp_path / "dst" / "README.md").read_text()


REMOTE_SCRIPT = textwrap.dedent(
    """
    import torch
    from transformers import AutoModel
    folder, ids_file, out_file = sys.argv[1:4]
    model = AutoModel.from_pretrained(folder, trust_remote_code=True)
    assert type(model).__name__ == "MDMLlamaForMaskedDiffusion" and "hf_mdm" not in sys.modules
    ids = torch.load(ids_file)
    out = model.generate(ids[:, :4], max_new_tokens=6, generator=torch.Generator().manual_seed(0))
    assert out.shape == (ids.shape[0], 10) and not (out == model.config.mask_token_id).any()
    torch.save(model(ids).logits, out_file)
    """
)


def test_remote_code_loads_without_hf_mdm(converted, tmp_path):
    family, _, _, folder = converted["dream-untied_gqa"]
    ids = partly_masked(family)
    torch.save(ids, tmp_path / "ids.pt")
    run_without_hf_mdm(REMOTE_SCRIPT, [folder, tmp_path / "ids.pt", tmp_path / "out.pt"], tmp_path)
    with torch.no_grad():
        expected = AutoModel.from_pretrained(folder)(ids).logits
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), expected, rtol=0, atol=0)


def test_loads_with_a_device_map_and_on_the_meta_device(converted):
    _, _, _, folder = converted["llada-untied"]
    mapped = AutoModel.from_pretrained(folder, device_map="auto", dtype=torch.bfloat16)
    assert {p.dtype for p in mapped.parameters()} == {torch.bfloat16}
    assert MDMLlamaForMaskedDiffusion._no_split_modules == ["MDMLlamaBlock"]
    with torch.device("meta"):
        empty = MDMLlamaForMaskedDiffusion(mapped.config)
    assert {p.device.type for p in empty.parameters()} == {"meta"}


# ---------------------------------------------------------------------------------------------------------------
# Chat and generation.
# ---------------------------------------------------------------------------------------------------------------


def chat_batch(tokenizer, messages):
    """Chat-templated prompts of different lengths, left-padded by the tokenizer."""
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": m}], add_generation_prompt=True, tokenize=False)
             for m in messages]
    tokenizer.padding_side = "left"
    return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)


@pytest.mark.parametrize("case", ["llada-untied", "dream-untied_gqa"])
@pytest.mark.parametrize("settings", [dict(sampler="first_hitting"), dict(sampler="first_hitting", tokens_per_step=3),
                                      dict(sampler="ancestral", steps=12), dict(sampler="ancestral_cache", steps=12)],
                         ids=["fhs", "parallel_fhs", "ancestral", "ancestral_cache"])
def test_chat_prompts_generate_batched_with_every_sampler(converted, case, settings):
    family, _, _, folder = converted[case]
    model = AutoModel.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    batch = chat_batch(tokenizer, ["hi", "tell me a longer story"])
    out = model.generate(**batch, max_new_tokens=10, generator=torch.Generator().manual_seed(0),
                         return_dict_in_generate=True, **settings)
    prompt_length = batch["input_ids"].shape[1]
    assert out.sequences.shape == (2, prompt_length + 10)
    assert not (out.sequences == family.mask).any()
    assert torch.equal(out.sequences[:, :prompt_length][batch["attention_mask"].bool()],
                       batch["input_ids"][batch["attention_mask"].bool()])
    if settings.get("tokens_per_step") == 3:
        assert out.nfe == 4  # ceil(10 / 3) calls


@pytest.mark.parametrize("case", ["llada-untied", "dream-untied_gqa"])
def test_batched_greedy_decoding_equals_each_prompt_alone(converted, case):
    """What users report broken in LLaDA and Dream: a prompt's greedy answer must not depend on the other prompts
    of its batch. Greedy in one network call (every position filled by argmax) is deterministic, so batched and
    alone must agree token for token; the logits themselves agree to float tolerance (test above)."""
    _, _, _, folder = converted[case]
    model = AutoModel.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    messages = ["hi", "tell me a longer story", "and a third one, of another length"]
    batch = chat_batch(tokenizer, messages)
    together = model.generate(**batch, max_new_tokens=8, temperature=0, steps=1, tokens_per_step=None)
    for row, message in enumerate(messages):
        alone_batch = chat_batch(tokenizer, [message])
        alone = model.generate(**alone_batch, max_new_tokens=8, temperature=0, steps=1)
        assert torch.equal(together[row, -8:], alone[0, -8:]), message


def test_a_shifted_model_needs_a_real_first_token(converted):
    family, _, _, folder = converted["dream-untied_gqa"]
    model = AutoModel.from_pretrained(folder)
    with pytest.raises(ValueError, match="first real token"):
        model.generate(torch.tensor([[family.mask, 5, 6]]), max_new_tokens=2)
    with pytest.raises(ValueError, match="all zeros"):
        model.generate(torch.tensor([[5, 6, 7], [1, 2, 3]]), attention_mask=torch.tensor([[0, 0, 0], [1, 1, 1]]),
                       max_new_tokens=2)
    out = model.generate(max_new_tokens=5, generator=torch.Generator().manual_seed(0))  # no prompt: BOS first
    assert out.shape == (1, 6) and out[0, 0] == model.config.bos_token_id


def test_sampling_stays_in_float64_for_a_bfloat16_model(converted, monkeypatch):
    from hf_mdm import sampling_mdm

    _, _, _, folder = converted["llada-untied"]
    model = AutoModel.from_pretrained(folder, dtype=torch.bfloat16)
    seen = []
    original = sampling_mdm.CategoricalSampler.choose  # every strategy's tokens pass through it (the race, or greedy)

    def recording_choose(self, probs):
        seen.append(probs.dtype)
        return original(self, probs)

    monkeypatch.setattr(sampling_mdm.CategoricalSampler, "choose", recording_choose)
    model.generate(torch.tensor([[LLADA_BOS, 5, 6]]), max_new_tokens=4, generator=torch.Generator().manual_seed(0))
    assert seen and set(seen) == {torch.float64}


def test_cut_at_eos():
    sequences = torch.tensor([[9, 9, 4, 5, 2, 6, 2], [9, 9, 4, 3, 3, 3, 3], [9, 9, 7, 5, 6, 2, 2]])
    assert cut_at_eos(sequences, 2, start=2) == [[4, 5], [4, 3, 3, 3, 3], [7, 5, 6]]
    assert cut_at_eos(sequences, [2, 3], start=2) == [[4, 5], [4], [7, 5, 6]]
    assert cut_at_eos(sequences, None) == sequences.tolist()


def test_command_line_convert_and_chat(tmp_path, capsys):
    from hf_mdm_cli import main

    make_llada_checkpoint(tmp_path / "src")
    main(["convert", "llada", str(tmp_path / "src"), str(tmp_path / "dst")])
    printed = capsys.readouterr().out
    assert "verified" in printed and "[MASK] = 258" in printed
    main(["generate", str(tmp_path / "dst"), "--chat", "hi there", "--max-new-tokens", "8", "--no-stream",
          "--temperature", "0"])
    printed = capsys.readouterr().out
    assert "--- sample 0" in printed and "<|start_header_id|>" not in printed  # the answer only
    main(["generate", str(tmp_path / "dst"), "--chat", "hi", "--no-stream"])  # the folder's own length: 32 here
    assert "for 32 tokens" in capsys.readouterr().out
    with pytest.raises(SystemExit) as error:
        main(["convert", "llada", str(tmp_path / "src"), str(tmp_path / "dst")])  # not empty
    assert error.value.code == 2 and "not empty" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# Bad input: a one-line error naming the file, key and shapes, before anything is written.
# ---------------------------------------------------------------------------------------------------------------


def assert_nothing_written(parent: Path, dst: Path):
    assert not dst.exists()
    assert not [p for p in parent.iterdir() if p.name.startswith(f".{dst.name}.")]


def test_a_checkpoint_of_another_family_is_refused(tmp_path):
    make_dream_checkpoint(tmp_path / "dream")
    with pytest.raises(ConversionError, match="model_type 'Dream'; a LLaDA checkpoint has 'llada'"):
        convert_llada(tmp_path / "dream", tmp_path / "dst")
    with pytest.raises(ConversionError, match="family must be one of"):
        convert_llama_family("gpt2", tmp_path / "dream", tmp_path / "dst")
    assert_nothing_written(tmp_path, tmp_path / "dst")


@pytest.mark.parametrize(
    "family_name, overrides, message",
    [
        ("llada", {"moe_num_experts": 8}, "config field 'moe_num_experts'"),
        ("llada", {"block_type": "sequential"}, "block_type='sequential' is not supported"),
        ("llada", {"alibi": True}, "alibi=True"),
        ("llada", {"attention_layer_norm": True}, "attention_layer_norm"),
        ("llada", {"multi_query_attention": True}, "multi_query_attention=true but n_kv_heads=4"),
        ("llada", {"multi_query_attention": False, "n_kv_heads": 2}, "multi_query_attention=false but n_kv_heads=2"),
        ("dream", {"num_experts": 4, "moe_intermediate_size": 32}, "config field 'moe_intermediate_size'"),
        ("dream", {"use_sliding_window": True}, "use_sliding_window"),
    ],
)
def test_config_fields_the_converter_does_not_understand(tmp_path, family_name, overrides, message):
    FAMILIES[family_name].make(tmp_path / "src", **overrides)
    with pytest.raises(ConversionError, match=message):
        FAMILIES[family_name].convert(tmp_path / "src", tmp_path / "dst")
    assert_nothing_written(tmp_path, tmp_path / "dst")


def test_missing_shard_wrong_shape_and_unknown_weight(tmp_path):
    from safetensors.torch import load_file, save_file

    make_llada_checkpoint(tmp_path / "src")
    index = json.loads((tmp_path / "src" / "model.safetensors.index.json").read_text())
    shard = tmp_path / "src" / "model-00002-of-00003.safetensors"
    tensors = load_file(str(shard))

    shard.rename(shard.with_suffix(".moved"))
    with pytest.raises(ConversionError, match="model-00002-of-00003.safetensors, which is missing"):
        convert_llada(tmp_path / "src", tmp_path / "dst")
    shard.with_suffix(".moved").rename(shard)

    name = sorted(k for k in tensors if k.endswith("q_proj.weight"))[0]
    wrong = dict(tensors)
    wrong[name] = torch.zeros(64, 32)
    save_file(wrong, str(shard))
    with pytest.raises(ConversionError, match=rf"model-00002-of-00003.safetensors: weight {name} has shape \(64, 32\), "
                                              r"but config.json implies \(64, 64\)"):
        convert_llada(tmp_path / "src", tmp_path / "dst")

    extra = dict(tensors)
    extra["model.transformer.blocks.0.q_norm.weight"] = torch.ones(64)
    save_file(extra, str(shard))
    with pytest.raises(ConversionError, match="q_norm.weight .* is not part of the LLaDA architecture"):
        convert_llada(tmp_path / "src", tmp_path / "dst")

    missing = {k: v for k, v in tensors.items() if k != name}
    save_file(missing, str(shard))
    with pytest.raises(ConversionError, match="lack 1 weight"):
        convert_llada(tmp_path / "src", tmp_path / "dst")
    assert_nothing_written(tmp_path, tmp_path / "dst")
    assert index["weight_map"][name] == shard.name


def test_copy_safetensors_renames_without_loading(tmp_path):
    from safetensors.torch import load_file, save_file

    tensors = {"b": torch.arange(6, dtype=torch.bfloat16).view(2, 3), "a": torch.randn(4, dtype=torch.float32),
               "c": torch.tensor([1, 2, 3], dtype=torch.int64)}
    save_file(tensors, str(tmp_path / "in.safetensors"))
    Piece = llama_family.Piece
    written = llama_family.copy_safetensors(tmp_path / "in.safetensors", tmp_path / "out.safetensors",
                                            [Piece("a", "x.a"), Piece("b", "x.b")], chunk_bytes=5)
    out = load_file(str(tmp_path / "out.safetensors"))
    assert set(out) == {"x.a", "x.b"} and written == 4 * 4 + 6 * 2
    assert torch.equal(out["x.a"], tensors["a"]) and torch.equal(out["x.b"], tensors["b"])
    assert out["x.b"].dtype == torch.bfloat16
    # Row ranges of one tensor become tensors of their own (LLaDA 2.x's fused query_key_value), still byte copies.
    rows = {"qkv": torch.arange(24, dtype=torch.bfloat16).view(6, 4)}
    save_file(rows, str(tmp_path / "fused.safetensors"))
    llama_family.copy_safetensors(tmp_path / "fused.safetensors", tmp_path / "split.safetensors",
                                  [Piece("qkv", "q", 0, 4), Piece("qkv", "k", 4, 5), Piece("qkv", "v", 5, 6)],
                                  chunk_bytes=3)
    split = load_file(str(tmp_path / "split.safetensors"))
    assert torch.equal(torch.cat([split["q"], split["k"], split["v"]]), rows["qkv"]) and split["k"].shape == (1, 4)


def test_a_failure_mid_write_leaves_no_half_written_destination(tmp_path, monkeypatch):
    make_llada_checkpoint(tmp_path / "src")
    original = llama_family.copy_safetensors
    calls = []

    def failing_copy(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return original(*args, **kwargs)

    monkeypatch.setattr(llama_family, "copy_safetensors", failing_copy)
    with pytest.raises(OSError, match="disk full"):
        convert_llada(tmp_path / "src", tmp_path / "dst")
    assert_nothing_written(tmp_path, tmp_path / "dst")

    # With --overwrite, the old folder stays whole until the new one is complete.
    (tmp_path / "dst").mkdir()
    (tmp_path / "dst" / "keep.txt").write_text("old")
    calls.clear()
    with pytest.raises(OSError, match="disk full"):
        convert_llada(tmp_path / "src", tmp_path / "dst", overwrite=True)
    assert [p.name for p in (tmp_path / "dst").iterdir()] == ["keep.txt"]
    monkeypatch.setattr(llama_family, "copy_safetensors", original)
    convert_llada(tmp_path / "src", tmp_path / "dst", overwrite=True)
    assert not (tmp_path / "dst" / "keep.txt").exists() and (tmp_path / "dst" / "config.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".dst.")]


def test_a_tied_checkpoint_that_stores_its_head_says_so(tmp_path):
    from safetensors.torch import load_file, save_file

    _, weights = make_dream_checkpoint(tmp_path / "src", tie_word_embeddings=True)
    shard = tmp_path / "src" / "model-00002-of-00002.safetensors"
    tensors = load_file(str(shard))
    tensors["lm_head.weight"] = weights["model.embed_tokens.weight"] + 1.0  # stored, and not the embedding
    save_file(tensors, str(shard))
    index = json.loads((tmp_path / "src" / "model.safetensors.index.json").read_text())
    index["weight_map"]["lm_head.weight"] = shard.name
    (tmp_path / "src" / "model.safetensors.index.json").write_text(json.dumps(index))
    result = convert_dream(tmp_path / "src", tmp_path / "dst")
    assert any("lm_head.weight is dropped" in note and "DIFFERS" in note for note in result.notes)


def test_hf_mdm_evaluate_runs_on_a_converted_dream(converted, tmp_path):
    from hf_mdm.evaluation.cli import main as evaluate

    _, _, _, folder = converted["dream-untied_gqa"]
    results = evaluate([str(folder), "--judge", "shakespeare-ar", "--num-samples", "2", "--batch-size", "2",
                        "--length", "8", "--output-dir", str(tmp_path / "eval"), "--setting", "unmasking=entropy,steps=4"])
    rows = [row for row in results["rows"] if row["kind"] == "mdm"]
    assert len(rows) == 1 and rows[0]["num_samples"] == 2 and rows[0]["label"] == "entropy 4 calls float64"
    assert rows[0]["nfe_per_sample"] == 4 and (tmp_path / "eval" / "plot.png").is_file()
