"""Converting MDLM checkpoints: identical outputs from both source layouts, safety, clear errors, a usable folder.

The reference is the test suite's own MDLM DiT (`mdlm_reference.py`), saved in MDLM's Hub layout and as an MDLM
Lightning checkpoint, converted, loaded back with `AutoModel.from_pretrained`, and compared logit for logit.
"""

import json
import os
import pickle
import subprocess
import sys
import textwrap
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoTokenizer, GPT2Tokenizer

import hf_mdm  # noqa: F401  (registers model_type "mdm")
from hf_mdm import MASK_LOGIT, MDMConfig, MDMForMaskedDiffusion, MDMGenerationConfig
from hf_mdm.convert import ConversionError, UnsafeCheckpointError, convert_mdlm, parameter_map
from hf_mdm.convert.cli import add_convert_parser
from hf_mdm.convert.mdlm import mdm_config_from_mdlm

import mdlm_pickles
from mdlm_reference import (
    MDLMReferenceDiT,
    OmegaConfLikeNode,
    backbone_state,
    mdlm_run_config,
    random_reference,
    save_hub_layout,
    save_lightning_checkpoint,
)


VOCAB = 53  # 52 real tokens + [MASK] = 52
MASK_ID = VOCAB - 1
TOLERANCE = 1e-5
MEASURED = {}  # case -> max |logit difference|, printed at the end of the module (pytest -s)


# ----------------------------------------------------------------------------------------------------------------
# Helpers.
# ----------------------------------------------------------------------------------------------------------------


def gpt2_like_tokenizer() -> GPT2Tokenizer:
    """A tiny byte-level BPE tokenizer built like GPT-2's: 51 symbols + <|endoftext|> = 52 ids, no [MASK]."""
    symbols = "abcdefghijklmnopqrstuvwxyzĠ.,!?ABCDEFGHIJKLMNOPQRST"
    vocab = {symbol: i for i, symbol in enumerate(symbols)}
    vocab["<|endoftext|>"] = len(vocab)
    return GPT2Tokenizer(vocab=vocab, merges=[])


def make_source(tmp_path, layout, reference, raw=None, **kwargs) -> Path:
    """Saves `reference` in one of MDLM's layouts; for "lightning", `raw` are the non-EMA weights."""
    if layout in ("hub_safetensors", "hub_bin"):
        return save_hub_layout(reference, tmp_path / "src", weights=layout.split("_")[1], **kwargs)
    return save_lightning_checkpoint(raw if raw is not None else reference, tmp_path / "last.ckpt", ema_model=reference,
                                     run_config=mdlm_run_config(reference), **kwargs)


def inputs(seed=0, batch=3, length=24):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, MASK_ID, (batch, length), generator=generator)
    ids[torch.rand(batch, length, generator=generator) < 0.4] = MASK_ID
    sigma = torch.rand(batch, generator=generator, dtype=torch.float64).float() * 6.9
    return ids, sigma


def max_logit_difference(reference_logits, logits) -> float:
    """Over the real tokens: MDLM's raw output scores [MASK] too, hf_mdm sets that logit to MASK_LOGIT."""
    assert (logits[..., MASK_ID] == MASK_LOGIT).all()
    return (reference_logits[..., :MASK_ID] - logits[..., :MASK_ID]).abs().max().item()


@torch.no_grad()
def compare(reference: MDLMReferenceDiT, model, case: str) -> None:
    """Unpadded and padded batches against the reference; the padded rows against the sequence alone."""
    ids, sigma = inputs()
    unpadded = max_logit_difference(reference(ids, sigma), model(ids, timesteps=sigma).logits)

    lengths, side = [24, 17, 9], ["none", "left", "right"]
    padded_ids = torch.zeros(3, 24, dtype=torch.long)
    attention_mask = torch.zeros(3, 24, dtype=torch.long)
    spans = []
    for row, (n, where) in enumerate(zip(lengths, side)):
        span = slice(24 - n, 24) if where == "left" else slice(0, n)
        padded_ids[row, span], attention_mask[row, span] = ids[row, :n], 1
        spans.append(span)
    logits = model(padded_ids, attention_mask=attention_mask, timesteps=sigma).logits
    padded = max(
        max_logit_difference(reference(ids[row : row + 1, :n], sigma[row : row + 1])[0], logits[row, spans[row]])
        for row, n in enumerate(lengths)
    )
    MEASURED[f"{case} unpadded"], MEASURED[f"{case} padded"] = unpadded, padded
    assert unpadded <= TOLERANCE, f"{case}: unpadded max |logit difference| {unpadded:.3g}"
    assert padded <= TOLERANCE, f"{case}: padded max |logit difference| {padded:.3g}"


@pytest.fixture(scope="module", autouse=True)
def report_measured_differences():
    yield
    if MEASURED:
        print("\nmax |logit difference| against the MDLM reference:")
        for case, value in MEASURED.items():
            print(f"  {case:45s} {value:.3g}")


# ----------------------------------------------------------------------------------------------------------------
# Equivalence: both layouts, with and without time conditioning, padded and unpadded.
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("time_conditioning", [False, True], ids=["time_agnostic", "time_conditioned"])
@pytest.mark.parametrize("layout", ["hub_safetensors", "hub_bin", "lightning"])
def test_converted_logits_match_the_mdlm_reference(tmp_path, layout, time_conditioning):
    reference = random_reference(seed=1, vocab_size=VOCAB, time_conditioning=time_conditioning)
    raw = random_reference(seed=2, vocab_size=VOCAB, time_conditioning=time_conditioning)  # Lightning: non-EMA weights
    source = make_source(tmp_path, layout, reference, raw=raw)
    result = convert_mdlm(source, tmp_path / "dst")
    model = AutoModel.from_pretrained(tmp_path / "dst").eval()
    assert type(model) is MDMForMaskedDiffusion and model.config.time_conditioning is time_conditioning
    assert result.source.used_ema is (layout == "lightning")
    compare(reference, model, f"{layout} time_conditioning={time_conditioning}")
    if time_conditioning:  # the time input matters, so the comparison above exercised it
        ids, _ = inputs()
        a, b = model(ids, timesteps=torch.full((3,), 0.2)).logits, model(ids, timesteps=torch.full((3,), 3.0)).logits
        assert (a - b)[..., :MASK_ID].abs().max() > 1e-2


def test_lightning_raw_weights_and_checkpoints_without_ema(tmp_path):
    reference, raw = random_reference(seed=3, vocab_size=VOCAB), random_reference(seed=4, vocab_size=VOCAB)
    source = make_source(tmp_path, "lightning", reference, raw=raw)
    result = convert_mdlm(source, tmp_path / "raw", use_ema=False)
    assert not result.source.used_ema
    compare(raw, result.model, "lightning --no-ema")

    save_lightning_checkpoint(raw, tmp_path / "no_ema.ckpt", ema_model=None, run_config=mdlm_run_config(raw))
    result = convert_mdlm(tmp_path / "no_ema.ckpt", tmp_path / "no_ema")
    assert not result.source.used_ema and any("no EMA" in note for note in result.notes)
    compare(raw, result.model, "lightning without EMA")


def test_lightning_checkpoint_of_an_hf_dit_run(tmp_path):
    """A run with backbone=hf_dit nests MDLM's HF model: keys under backbone.backbone."""
    reference = random_reference(seed=5, vocab_size=VOCAB)
    save_lightning_checkpoint(reference, tmp_path / "hf_dit.ckpt", run_config=mdlm_run_config(reference, backbone="hf_dit"),
                              prefix="backbone.backbone.")
    compare(reference, convert_mdlm(tmp_path / "hf_dit.ckpt", tmp_path / "dst").model, "lightning hf_dit")


def test_lightning_checkpoint_without_readable_config(tmp_path):
    reference = random_reference(seed=6, vocab_size=VOCAB, time_conditioning=True)
    save_lightning_checkpoint(reference, tmp_path / "bare.ckpt", ema_model=reference)
    with pytest.raises(ConversionError, match=r"n_heads \(--n-heads\).*time_conditioning \(--time-conditioning\)"):
        convert_mdlm(tmp_path / "bare.ckpt", tmp_path / "dst")
    result = convert_mdlm(tmp_path / "bare.ckpt", tmp_path / "dst", n_heads=4, time_conditioning=True, model_length=32)
    compare(reference, result.model, "lightning, sizes given explicitly")


def test_sharded_safetensors(tmp_path):
    reference = random_reference(seed=7, vocab_size=VOCAB)
    folder = save_hub_layout(reference, tmp_path / "src")
    state = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    names = list(state)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2 :]}
    for shard, keys in shards.items():
        save_file({key: state[key] for key in keys}, str(folder / shard))
    weight_map = {key: shard for shard, keys in shards.items() for key in keys}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    compare(reference, convert_mdlm(folder, tmp_path / "dst").model, "hub sharded safetensors")


def test_mdlm_owt_sizes_map_one_to_one():
    """kuleshov-group/mdlm-owt's sizes (on the meta device): every MDLM parameter, in MDLM's order, has its hf_mdm
    counterpart with the same shape, and [MASK] is 50257."""
    fields = dict(vocab_size=50258, model_length=1024, hidden_dim=768, cond_dim=128, n_blocks=12, n_heads=12,
                  dropout=0.1, time_conditioning=False)
    with torch.device("meta"):
        reference = MDLMReferenceDiT(**fields)
        config = mdm_config_from_mdlm(fields)
        model = MDMForMaskedDiffusion(config)
    assert config.mask_token_id == 50257 and config.noise_schedule == "loglinear" and config.noise_eps == 1e-3
    mapping = parameter_map(12)
    assert [name for name, _ in mapping] == [name for name, _ in reference.named_parameters()]
    ours = dict(model.named_parameters())
    assert sorted(target for _, target in mapping) == sorted(ours)
    theirs = dict(reference.named_parameters())
    for source, target in mapping:
        assert theirs[source].shape == ours[target].shape, (source, target)


# ----------------------------------------------------------------------------------------------------------------
# The converted folder.
# ----------------------------------------------------------------------------------------------------------------


def test_converted_folder_is_hub_ready(tmp_path):
    reference = random_reference(seed=8, vocab_size=VOCAB)
    source = save_hub_layout(reference, tmp_path / "src")
    gpt2_like_tokenizer().save_pretrained(source)
    convert_mdlm(source, tmp_path / "dst")
    dst = tmp_path / "dst"
    for name in ("config.json", "model.safetensors", "generation_config.json", "README.md", "configuration_mdm.py",
                 "modeling_mdm.py", "generation_mdm.py", "sampling_mdm.py", "tokenizer.json", "tokenizer_config.json"):
        assert (dst / name).is_file(), name
    config = MDMConfig.from_pretrained(dst)
    assert (config.vocab_size, config.mask_token_id) == (VOCAB, MASK_ID)
    assert (config.noise_schedule, config.noise_eps, config.time_conditioning) == ("loglinear", 1e-3, False)
    assert (config.eos_token_id, config.bos_token_id, config.pad_token_id) == (51, 51, None)
    assert config.auto_map["AutoModel"] == "modeling_mdm.MDMForMaskedDiffusion"
    generation = MDMGenerationConfig.from_pretrained(dst)
    assert generation.sampler == "first_hitting" and generation.eos_token_id == 51
    tokenizer = AutoTokenizer.from_pretrained(dst)
    assert tokenizer.mask_token_id == MASK_ID and tokenizer.eos_token_id == 51
    card = (dst / "README.md").read_text()
    assert str(source) in card and "MDLM Hub layout" in card and "sha256" in card and "model.safetensors" in card


def test_the_card_carries_the_source_license_and_the_folder_publishes(tmp_path):
    """The source card's license travels; without one the card says 'other' with a note, and --license overrides.
    Either way the converted folder passes publish's checks (a card without a license would be refused)."""
    from hf_mdm.hub import checkpoint_files
    from huggingface_hub import metadata_load

    reference = random_reference(seed=12, vocab_size=VOCAB)
    source = save_hub_layout(reference, tmp_path / "src")
    gpt2_like_tokenizer().save_pretrained(source)

    unlicensed = convert_mdlm(source, tmp_path / "unlicensed", verify=False)
    assert metadata_load(tmp_path / "unlicensed" / "README.md")["license"] == "other"
    assert any("--license" in note for note in unlicensed.notes)
    assert "README.md" in checkpoint_files(tmp_path / "unlicensed")

    (source / "README.md").write_text("---\nlicense: apache-2.0\ntags:\n- mdlm\n---\n# MDLM\n")
    licensed = convert_mdlm(source, tmp_path / "licensed", verify=False)
    assert metadata_load(tmp_path / "licensed" / "README.md")["license"] == "apache-2.0"
    assert not any("license" in note for note in licensed.notes)

    overridden = convert_mdlm(source, tmp_path / "overridden", verify=False, license="mit")
    assert metadata_load(tmp_path / "overridden" / "README.md")["license"] == "mit"
    assert any("overriding the source card's 'apache-2.0'" in note for note in overridden.notes)
    with pytest.raises(ConversionError, match="license must be a non-empty Hub license id"):
        convert_mdlm(source, tmp_path / "bad", license=" ")
    assert not (tmp_path / "bad").exists()  # refused before anything was written


def test_a_tokenizer_with_its_own_mask_token_decides_the_mask_id(tmp_path):
    """MDLM's rule: [MASK] is the tokenizer's mask token when it has one (BERT-tokenized runs), else a new last id."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(VOCAB)}
    vocab.update({"[UNK]": 0, "[MASK]": 4})
    vocab.pop("w0"), vocab.pop("w4")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="[UNK]")),
                                        unk_token="[UNK]", mask_token="[MASK]")
    reference = random_reference(seed=22, vocab_size=VOCAB)
    (tmp_path / "tok").mkdir()
    tokenizer.save_pretrained(tmp_path / "tok")
    source = save_hub_layout(reference, tmp_path / "src")
    result = convert_mdlm(source, tmp_path / "dst", tokenizer=tmp_path / "tok")
    assert result.model.config.mask_token_id == 4
    assert AutoTokenizer.from_pretrained(tmp_path / "dst").mask_token_id == 4
    with pytest.raises(ConversionError, match="mask_token_id=52 was asked, but the tokenizer's '\\[MASK\\]' is id 4"):
        convert_mdlm(source, tmp_path / "dst2", tokenizer=tmp_path / "tok", mask_token_id=52)


@pytest.mark.parametrize("time_conditioning", [False, True], ids=["time_agnostic", "time_conditioned"])
def test_converted_checkpoint_generates(tmp_path, time_conditioning):
    reference = random_reference(seed=9, vocab_size=VOCAB, time_conditioning=time_conditioning)
    source = save_hub_layout(reference, tmp_path / "src")
    gpt2_like_tokenizer().save_pretrained(source)
    convert_mdlm(source, tmp_path / "dst")
    model = AutoModel.from_pretrained(tmp_path / "dst")
    out = model.generate(max_new_tokens=12, num_return_sequences=3, generator=torch.Generator().manual_seed(0),
                         return_dict_in_generate=True)
    assert out.sequences.shape == (3, 12) and (out.sequences != MASK_ID).all() and out.nfe == 12
    prompt = torch.tensor([[5, 6, 7]])
    ancestral = model.generate(prompt, max_new_tokens=8, sampler="ancestral", steps=16,
                               generator=torch.Generator().manual_seed(1))
    assert torch.equal(ancestral[:, :3], prompt) and (ancestral != MASK_ID).all()
    text = AutoTokenizer.from_pretrained(tmp_path / "dst").decode(out.sequences[0])
    assert isinstance(text, str) and text


REMOTE_SCRIPT = textwrap.dedent(
    """
    import importlib.abc, sys
    class BlockHfMdm(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "hf_mdm" or name.startswith("hf_mdm."):
                raise ImportError("hf_mdm is not importable in this process")
    sys.meta_path.insert(0, BlockHfMdm())
    import torch
    from transformers import AutoModel
    model = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
    ids = torch.load(sys.argv[2])
    with torch.no_grad():
        torch.save(model(ids, timesteps=torch.tensor([0.5, 3.0])).logits, sys.argv[3])
    """
)


def test_converted_folder_loads_as_remote_code(tmp_path):
    reference = random_reference(seed=10, vocab_size=VOCAB, time_conditioning=True)
    convert_mdlm(save_hub_layout(reference, tmp_path / "src"), tmp_path / "dst")
    ids, _ = inputs(batch=2)
    torch.save(ids, tmp_path / "ids.pt")
    (tmp_path / "remote.py").write_text(REMOTE_SCRIPT)
    (tmp_path / "hf_home").mkdir()
    env = {"PATH": os.environ["PATH"], "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home"), "HOME": str(tmp_path)}
    result = subprocess.run([sys.executable, "-I", str(tmp_path / "remote.py"), str(tmp_path / "dst"),
                             str(tmp_path / "ids.pt"), str(tmp_path / "logits.pt")],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    with torch.no_grad():
        expected = reference(ids, torch.tensor([0.5, 3.0]))
    assert max_logit_difference(expected, torch.load(tmp_path / "logits.pt")) <= TOLERANCE


def test_hub_repo_id_is_downloaded(tmp_path, monkeypatch):
    import huggingface_hub

    reference = random_reference(seed=11, vocab_size=VOCAB)
    folder = save_hub_layout(reference, tmp_path / "snapshot")
    calls = []

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None, **kwargs):
        calls.append((repo_id, revision, allow_patterns))
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    result = convert_mdlm("kuleshov-group/mdlm-owt", tmp_path / "dst", revision="main")
    assert calls[0][:2] == ("kuleshov-group/mdlm-owt", "main") and "config.json" in calls[0][2]
    assert not any(pattern.endswith(".bin") for pattern in calls[0][2])  # safetensors found: no .bin download
    card = (tmp_path / "dst" / "README.md").read_text()
    assert "base_model: kuleshov-group/mdlm-owt" in card and "revision main" in card
    compare(reference, result.model, "hub repo id")

    def offline(*args, **kwargs):
        raise OSError("offline: cannot reach the Hub")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(ConversionError, match="downloading it from the Hugging Face Hub failed: offline"):
        convert_mdlm("kuleshov-group/mdlm-owt", tmp_path / "dst2")


# ----------------------------------------------------------------------------------------------------------------
# Safety: safetensors or torch.load(weights_only=True) only; nothing pickled is ever constructed.
# ----------------------------------------------------------------------------------------------------------------


class RunsCommand:
    """A pickle that runs a shell command when unpickled with arbitrary unpickling."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class Payload:
    """An arbitrary object; unpickling it for real would call __setstate__."""

    def __setstate__(self, state):
        raise AssertionError("constructed a pickled object")


def test_only_safe_loaders_are_used(tmp_path, monkeypatch):
    calls = []
    real_load = torch.load

    def recording_load(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    reference = random_reference(seed=12, vocab_size=VOCAB)
    convert_mdlm(make_source(tmp_path, "hub_bin", reference), tmp_path / "a")
    save_lightning_checkpoint(reference, tmp_path / "x.ckpt", ema_model=reference, run_config=mdlm_run_config(reference),
                              tokenizer=gpt2_like_tokenizer())
    convert_mdlm(tmp_path / "x.ckpt", tmp_path / "b")
    assert calls and all(weights_only is True for weights_only in calls)


def test_lightning_hyper_parameters_are_never_constructed(tmp_path):
    """MDLM pickles its omegaconf config and tokenizer into the checkpoint; torch.load(weights_only=True) refuses
    them, so they are left as inert stand-ins: read (the config) but never constructed."""
    reference = random_reference(seed=13, vocab_size=VOCAB, n_heads=8)
    path = save_lightning_checkpoint(reference, tmp_path / "x.ckpt", ema_model=reference,
                                     run_config=mdlm_run_config(reference), tokenizer=gpt2_like_tokenizer())
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)
    OmegaConfLikeNode.constructed.clear()
    result = convert_mdlm(path, tmp_path / "dst")
    assert OmegaConfLikeNode.constructed == []
    assert result.model.config.num_attention_heads == 8  # read from the stand-in's recorded state
    compare(reference, result.model, "lightning, 8 heads from hyper_parameters")


def test_refuses_a_pickle_that_runs_code(tmp_path):
    reference = random_reference(seed=14, vocab_size=VOCAB)
    marker = tmp_path / "pwned"
    path = save_lightning_checkpoint(reference, tmp_path / "evil.ckpt", run_config=mdlm_run_config(reference))
    checkpoint = torch.load(path, weights_only=False)
    checkpoint["hyper_parameters"]["callback"] = RunsCommand(f"touch {marker}")
    torch.save(checkpoint, path)
    with pytest.raises(UnsafeCheckpointError, match=r"refusing .*evil\.ckpt: its pickle calls (posix|nt)\.system"):
        convert_mdlm(path, tmp_path / "dst")
    assert not marker.exists() and not (tmp_path / "dst").exists()


@pytest.mark.parametrize("layout", ["lightning", "hub_bin"])
def test_refuses_a_pickled_object_in_place_of_a_weight(tmp_path, layout):
    reference = random_reference(seed=15, vocab_size=VOCAB)
    source = make_source(tmp_path, layout, reference)
    file = source if layout == "lightning" else source / "pytorch_model.bin"
    checkpoint = torch.load(file, weights_only=False)
    state = checkpoint["state_dict"] if layout == "lightning" else checkpoint
    state["backbone.blocks.0.norm1.weight"] = Payload()
    torch.save(checkpoint, file)
    with pytest.raises(UnsafeCheckpointError,
                       match=r"backbone\.blocks\.0\.norm1\.weight.* is a pickled .*Payload object, not a tensor.*arbitrary unpickling"):
        convert_mdlm(source, tmp_path / "dst")


def test_refuses_a_legacy_pickle_it_cannot_inspect(tmp_path):
    reference = random_reference(seed=16, vocab_size=VOCAB)
    checkpoint = {"state_dict": backbone_state(reference), "hyper_parameters": {"config": Payload()}}
    torch.save(checkpoint, tmp_path / "legacy.ckpt", _use_new_zipfile_serialization=False)
    with pytest.raises(UnsafeCheckpointError, match="not in torch.save's zip format.*arbitrary unpickling"):
        convert_mdlm(tmp_path / "legacy.ckpt", tmp_path / "dst")
    # The legacy format itself is fine when it holds only tensors and plain containers.
    torch.save({"state_dict": backbone_state(reference)}, tmp_path / "plain.ckpt", _use_new_zipfile_serialization=False)
    result = convert_mdlm(tmp_path / "plain.ckpt", tmp_path / "dst", n_heads=4, time_conditioning=False, model_length=32)
    compare(reference, result.model, "legacy-format plain checkpoint")


# ----------------------------------------------------------------------------------------------------------------
# Clear errors: the key and both shapes.
# ----------------------------------------------------------------------------------------------------------------


def edit_safetensors(folder, edit):
    state = load_file(str(folder / "model.safetensors"))
    edit(state)
    save_file(state, str(folder / "model.safetensors"))


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(config={"cond_dim": 16}),
         r"shape mismatch for backbone\.sigma_map\.mlp\.0\.weight: the checkpoint has \(32, 256\), hf_mdm's "
         r"model\.timestep_embedder\.mlp\.0\.weight needs \(16, 256\)"),
        (dict(config={"hidden_dim": 32}),
         r"shape mismatch for backbone\.vocab_embed\.embedding: the checkpoint has \(53, 64\), hf_mdm's "
         r"model\.embed_tokens\.weight needs \(53, 32\)"),
        (dict(config={"n_heads": 8}),
         r"shape mismatch for backbone\.rotary_emb\.inv_freq: the checkpoint has \(8,\), hf_mdm computes \(4,\)"),
        (dict(config={"n_blocks": 1}),
         r"unexpected weight backbone\.blocks\.1\.\S+ with shape"),
        (dict(config={"n_blocks": 3}),
         r"missing weight backbone\.blocks\.2\.norm1\.weight \(hf_mdm model\.layers\.2\.norm1\.weight, shape \(64,\)\)"),
        (dict(drop="backbone.blocks.1.mlp.2.bias"),
         r"missing weight backbone\.blocks\.1\.mlp\.2\.bias \(hf_mdm model\.layers\.1\.mlp\.fc_out\.bias, shape \(64,\)\)"),
        (dict(add=("backbone.blocks.0.extra.weight", (3,))),
         r"unexpected weight backbone\.blocks\.0\.extra\.weight with shape \(3,\)"),
        (dict(add=("head.weight", (2, 2))),
         r"unexpected weight head\.weight with shape \(2, 2\) in model\.safetensors"),
        (dict(reshape=("backbone.blocks.1.attn_out.weight", (64, 32))),
         r"shape mismatch for backbone\.blocks\.1\.attn_out\.weight: the checkpoint has \(64, 32\), hf_mdm's "
         r"model\.layers\.1\.self_attn\.o_proj\.weight needs \(64, 64\)"),
        (dict(config={"model_type": "udlm"}),
         r"model_type 'udlm'; MDLM's masked-diffusion DiT \(model_type 'mdlm'\) and BD3-LM's"),
    ],
    ids=["cond_dim", "hidden_dim", "n_heads", "fewer_blocks", "more_blocks", "missing", "unexpected", "outside_backbone",
         "reshaped", "model_type"],
)
def test_mismatches_name_the_key_and_both_shapes(tmp_path, change, message):
    reference = random_reference(seed=17, vocab_size=VOCAB)
    folder = save_hub_layout(reference, tmp_path / "src", **change.get("config", {}))
    if "drop" in change:
        edit_safetensors(folder, lambda state: state.pop(change["drop"]))
    if "add" in change:
        edit_safetensors(folder, lambda state: state.__setitem__(change["add"][0], torch.zeros(change["add"][1])))
    if "reshape" in change:
        key, shape = change["reshape"]
        edit_safetensors(folder, lambda state: state.__setitem__(key, torch.zeros(shape)))
    with pytest.raises(ConversionError, match=message):
        convert_mdlm(folder, tmp_path / "dst")


def test_ema_in_another_order_is_refused(tmp_path):
    reference = random_reference(seed=18, vocab_size=VOCAB)
    path = save_lightning_checkpoint(reference, tmp_path / "x.ckpt", ema_model=reference,
                                     run_config=mdlm_run_config(reference))
    checkpoint = torch.load(path, weights_only=False)
    shadow = checkpoint["ema"]["shadow_params"]
    shadow[0], shadow[1] = shadow[1], shadow[0]  # vocab_embed.embedding <-> sigma_map.mlp.0.weight
    torch.save(checkpoint, path)
    with pytest.raises(ConversionError, match=r"shape mismatch for x\.ckpt: ema\.shadow_params\[0\], which should be "
                                              r"backbone\.vocab_embed\.embedding: the EMA has \(32, 256\), the state_dict \(53, 64\)"):
        convert_mdlm(path, tmp_path / "dst")
    checkpoint["ema"]["shadow_params"] = shadow[:5]
    torch.save(checkpoint, path)
    with pytest.raises(ConversionError, match=r"shadow_params holds 5 tensors, but MDLM's DiT with 2 blocks has 30 parameters"):
        convert_mdlm(path, tmp_path / "dst")


@pytest.mark.parametrize("overrides, message", [
    (dict(parameterization="sedd"), r"parameterization='sedd'"),
    (dict(noise={"type": "cosine"}), r"noise\.type='cosine'"),
    (dict(backbone="dimamba"), r"backbone='dimamba'"),
])
def test_lightning_runs_that_are_not_mdlm_dits_are_refused(tmp_path, overrides, message):
    reference = random_reference(seed=19, vocab_size=VOCAB)
    path = save_lightning_checkpoint(reference, tmp_path / "x.ckpt", run_config=mdlm_run_config(reference, **overrides))
    with pytest.raises(ConversionError, match=message):
        convert_mdlm(path, tmp_path / "dst")


def test_other_source_and_destination_errors(tmp_path):
    reference = random_reference(seed=20, vocab_size=VOCAB)
    folder = save_hub_layout(reference, tmp_path / "src")
    with pytest.raises(ConversionError, match="does not exist"):
        convert_mdlm(tmp_path / "nothing-here", tmp_path / "dst")
    with pytest.raises(ConversionError, match="bare weights file: pass the folder"):
        convert_mdlm(folder / "model.safetensors", tmp_path / "dst")
    with pytest.raises(ConversionError, match="has no config.json"):
        convert_mdlm(tmp_path, tmp_path / "dst")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file.txt").write_text("x")
    with pytest.raises(ConversionError, match="not empty; pass overwrite=True"):
        convert_mdlm(folder, tmp_path / "busy")
    convert_mdlm(folder, tmp_path / "busy", overwrite=True)
    with pytest.raises(ConversionError, match="is the source itself"):
        convert_mdlm(folder, folder, overwrite=True)
    torch.save({"weights": backbone_state(reference)}, tmp_path / "plain.pt")
    with pytest.raises(ConversionError, match="not a Lightning checkpoint: it has no state_dict entry"):
        convert_mdlm(tmp_path / "plain.pt", tmp_path / "dst")


# ----------------------------------------------------------------------------------------------------------------
# Command line.
# ----------------------------------------------------------------------------------------------------------------


def test_command_line(tmp_path):
    reference = random_reference(seed=21, vocab_size=VOCAB)
    path = save_lightning_checkpoint(reference, tmp_path / "last.ckpt", ema_model=reference,
                                     run_config=mdlm_run_config(reference))
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-m", "hf_mdm.convert.cli", "mdlm", str(path), str(tmp_path / "dst")],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "EMA weights" in result.stdout and "[MASK] = 52" in result.stdout and "verified" in result.stdout
    compare(reference, AutoModel.from_pretrained(tmp_path / "dst"), "command line")

    failed = subprocess.run([sys.executable, "-m", "hf_mdm.convert.cli", "mdlm", str(path), str(tmp_path / "dst")],
                            capture_output=True, text=True, timeout=300, env=env)
    assert failed.returncode == 2 and "error:" in failed.stderr and "not empty" in failed.stderr

    import argparse

    parser = argparse.ArgumentParser(prog="hf-mdm")
    add_convert_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["convert", "mdlm", str(path), str(tmp_path / "dst2"), "--no-ema", "--time-conditioning", "false"])
    assert (args.format, args.no_ema, args.time_conditioning) == ("mdlm", True, False)
    args.func(args)
    assert (tmp_path / "dst2" / "config.json").is_file()


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints as MDLM's training really writes them (tests/mdlm_pickles.py): omegaconf / hydra containers with a
# filled resolver cache, the run's tokenizer and its own [MASK], MDLM's attention and lengths.
# ----------------------------------------------------------------------------------------------------------------

REAL_PICKLES = Path(__file__).parent / "data" / "mdlm_pickles"


def inert_tree(value, seen=()):
    """A comparable picture of what the inert unpickler built: stand-ins by name, args and state; sets unordered."""
    from hf_mdm.convert.safe_load import PickledObject

    if isinstance(value, PickledObject):
        if id(value) in seen:
            return ("cycle", value.qualified_name)
        seen = seen + (id(value),)
        return ("object", value.qualified_name, inert_tree(list(value.args), seen), inert_tree(value.state, seen))
    if isinstance(value, type) and issubclass(value, PickledObject):
        return ("class", value.qualified_name)
    if isinstance(value, dict):
        return ("dict", type(value).__name__, {key: inert_tree(item, seen) for key, item in value.items()})
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, [inert_tree(item, seen) for item in value])
    if isinstance(value, set):
        return ("set", frozenset(value))
    return value


def test_the_writer_pickles_what_omegaconf_hydra_and_transformers_pickle():
    """tests/data/mdlm_pickles/*.pkl were pickled by omegaconf 2.3.0 / hydra-core 1.3.2 / transformers 4.38.2
    (make_real_pickles.py). mdlm_pickles.py must write the same globals, the same opcode sequence and, read back
    inertly, the same objects (only the order of a set's elements may differ, with the hash seed)."""
    import io
    import pickletools

    from hf_mdm.convert.safe_load import load_pickle_inertly

    real_config = {"mode": "train", "backbone": "dit", "parameterization": "subs", "time_conditioning": False,
                   "model": {"hidden_size": 64, "n_heads": 4, "length": 32, "dropout": 0.1},
                   "noise": {"type": "loglinear", "sigma_min": 1e-4},
                   "wandb": {"tags": ["${noise.type}", "owt"]}, "hydra_mode": mdlm_pickles.RUN_MODE,
                   "run_dir": "./outputs/${now:%Y.%m.%d}/${now:%H%M%S}"}
    bert_words = ["[PAD]", "[unused0]", "[unused1]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list("abcdefghij") + ["the", "##s"]
    ours = {"omegaconf_config": mdlm_pickles.omegaconf_config(real_config, mdlm_pickles.NOW_CACHE),
            "bert_tokenizer": mdlm_pickles.bert_tokenizer(bert_words),
            "gpt2_tokenizer_fast": mdlm_pickles.gpt2_tokenizer_fast("abcdefghijĠ.,"),
            "text8_tokenizer": mdlm_pickles.text8_tokenizer()}
    for name, obj in ours.items():
        real = (REAL_PICKLES / f"{name}.pkl").read_bytes()
        buffer = io.BytesIO()
        mdlm_pickles.NamedGlobalPickler(buffer, protocol=2).dump(obj)
        written = buffer.getvalue()

        def opcodes(data):
            return [(op.name, arg if op.name == "GLOBAL" else None) for op, arg, _ in pickletools.genops(data)]

        assert opcodes(written) == opcodes(real), name
        assert len(written) == len(real), name
        assert inert_tree(load_pickle_inertly(written)) == inert_tree(load_pickle_inertly(real)), name
    config = load_pickle_inertly((REAL_PICKLES / "omegaconf_config.pkl").read_bytes())
    assert config.state["_metadata"].state["resolver_cache"] == mdlm_pickles.NOW_CACHE  # read as a plain dict


@pytest.fixture
def import_traps(tmp_path, monkeypatch):
    """Importable `omegaconf`, `hydra` and `dataloader` (MDLM's module) that record being imported: unpickling the
    checkpoint for real would import them to build its objects."""
    traps = tmp_path / "traps"
    traps.mkdir()
    marker = tmp_path / "imported.txt"
    for name in ("omegaconf", "hydra", "dataloader"):
        (traps / f"{name}.py").write_text(f"open({str(marker)!r}, 'a').write('{name}\\n')\n")
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.syspath_prepend(str(traps))
    yield marker
    assert not marker.exists(), f"imported while converting: {marker.read_text()}"
    for name in ("omegaconf", "hydra", "dataloader"):
        assert name not in sys.modules


def _mdlm_style_checkpoint(tmp_path, kind, seed=30, time_conditioning=False, **config_overrides):
    make_tokenizer, ids = mdlm_pickles.TOKENIZERS[kind]
    reference = random_reference(seed=seed, vocab_size=ids["vocab_size"], time_conditioning=time_conditioning)
    raw = random_reference(seed=seed + 1, vocab_size=ids["vocab_size"], time_conditioning=time_conditioning)
    config = mdlm_pickles.omegaconf_config(mdlm_pickles.mdlm_hydra_config(reference, **config_overrides),
                                           mdlm_pickles.NOW_CACHE)
    path = mdlm_pickles.save_mdlm_checkpoint(tmp_path / f"{kind}.ckpt", raw, ema_model=reference, config=config,
                                             tokenizer=make_tokenizer())
    return path, reference, ids


def compare_any_vocab(reference, model, mask_id, case, length=24, **inputs_kwargs):
    """`compare` for any vocabulary and [MASK] id: random partly masked ids, padded rows against the row alone."""
    vocab = reference.fields["vocab_size"]
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (3, length), generator=generator)
    ids[ids == mask_id] = (mask_id + 1) % vocab
    ids[torch.rand(3, length, generator=generator) < 0.4] = mask_id
    sigma = torch.rand(3, generator=generator, dtype=torch.float64).float() * 6.9
    keep = [i for i in range(vocab) if i != mask_id]
    with torch.no_grad():
        difference = (reference(ids, sigma)[..., keep] - model(ids, timesteps=sigma).logits[..., keep]).abs().max().item()
    MEASURED[case] = difference
    assert difference <= TOLERANCE, f"{case}: max |logit difference| {difference:.3g}"
    return ids, sigma


@pytest.mark.parametrize("kind", ["bert", "gpt2", "text8"], ids=["lm1b_bert", "owt_gpt2", "text8"])
def test_a_checkpoint_written_as_mdlm_writes_it_converts(tmp_path, kind, import_traps):
    """MDLM's Lightning checkpoint: hydra's omegaconf config with the `now` resolver cache filled (a non-empty
    defaultdict), the run's tokenizer, EMA. It converts without constructing anything, with the run's own [MASK]
    and special ids, to the EMA network's logits."""
    path, reference, ids = _mdlm_style_checkpoint(tmp_path, kind)
    assert "collections.defaultdict" in torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)
    result = convert_mdlm(path, tmp_path / "dst")
    config = result.model.config
    expected_pad = None if ids["pad"] == ids["mask"] else ids["pad"]  # GPT-2 runs: MDLM's [PAD] is the [MASK] id
    assert (config.vocab_size, config.mask_token_id) == (ids["vocab_size"], ids["mask"])
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (ids["bos"], ids["eos"], expected_pad)
    assert result.source.used_ema and config.num_attention_heads == reference.fields["n_heads"]
    assert any("read from the checkpoint" in note for note in result.notes)
    assert not any("assumed [MASK]" in note for note in result.notes)
    if expected_pad is None:
        assert any("pad_token_id left unset" in note for note in result.notes)
    generation = MDMGenerationConfig.from_pretrained(tmp_path / "dst")
    assert (generation.bos_token_id, generation.eos_token_id, generation.pad_token_id) == (ids["bos"], ids["eos"], expected_pad)
    compare_any_vocab(reference, AutoModel.from_pretrained(tmp_path / "dst").eval(), ids["mask"], f"MDLM-written {kind}")


def test_the_run_tokenizer_mask_id_wins_and_cannot_be_contradicted(tmp_path):
    """bert-base-uncased's [MASK] is 103, not vocab_size - 1: a converter that ignored the pickled tokenizer would
    set 109 here. Asking for another id is refused; asking for the same one is fine."""
    path, reference, ids = _mdlm_style_checkpoint(tmp_path, "bert", seed=32)
    assert ids["mask"] == 103 and ids["vocab_size"] - 1 == 109
    with pytest.raises(ConversionError, match=r"mask_token_id=109 was asked, but the run's tokenizer pickled in the "
                                              r"checkpoint \(transformers\.models\.bert\.tokenization_bert\.BertTokenizer\) "
                                              r"gives \[MASK\] = 103"):
        convert_mdlm(path, tmp_path / "dst", mask_token_id=109)
    result = convert_mdlm(path, tmp_path / "same", mask_token_id=103, verify=False)
    assert result.model.config.mask_token_id == 103


def test_an_unreadable_tokenizer_says_which_mask_id_it_assumed_and_how_to_override(tmp_path):
    reference = random_reference(seed=33, vocab_size=40)
    config = mdlm_pickles.omegaconf_config(mdlm_pickles.mdlm_hydra_config(reference), mdlm_pickles.NOW_CACHE)
    custom = mdlm_pickles.make("my_project.tokenizers", "CharTokenizer", alphabet="abc")  # no special tokens recorded
    path = mdlm_pickles.save_mdlm_checkpoint(tmp_path / "x.ckpt", reference, config=config, tokenizer=custom)
    with pytest.warns(UserWarning, match=r"assumed \[MASK\] = 39 .*my_project\.tokenizers\.CharTokenizer.*"
                                         r"--mask-token-id ID \(mask_token_id=ID\)"):
        result = convert_mdlm(path, tmp_path / "dst")
    assert result.model.config.mask_token_id == 39
    assert any("assumed [MASK] = 39" in note for note in result.notes)
    assert "assumed [MASK] = 39" in (tmp_path / "dst" / "README.md").read_text()
    overridden = convert_mdlm(path, tmp_path / "dst2", mask_token_id=4)
    assert overridden.model.config.mask_token_id == 4 and not any("assumed" in n for n in overridden.notes)
    compare_any_vocab(reference, overridden.model, 4, "unreadable tokenizer, --mask-token-id 4")

    env = dict(os.environ, HF_HUB_OFFLINE="1")
    cli = subprocess.run([sys.executable, "-m", "hf_mdm.convert.cli", "mdlm", str(path), str(tmp_path / "dst3")],
                         capture_output=True, text=True, timeout=300, env=env)
    assert cli.returncode == 0, cli.stderr[-3000:]
    assert "note: assumed [MASK] = 39" in cli.stdout and "--mask-token-id" in cli.stdout


@pytest.mark.parametrize("where", ["resolver_cache_factory", "enum_member"])
def test_code_running_globals_inside_omegaconf_containers_are_refused(tmp_path, where):
    """The containers are read; what they name is still checked: a defaultdict whose default factory is
    os.system, or an "enum member" REDUCE'd through builtins.eval, is refused before anything is unpickled."""
    reference = random_reference(seed=34, vocab_size=VOCAB)
    content = mdlm_pickles.mdlm_hydra_config(reference)
    config = mdlm_pickles.omegaconf_config(content, mdlm_pickles.NOW_CACHE)
    if where == "resolver_cache_factory":
        config._metadata.resolver_cache = defaultdict(os.system, {"now": {}})
        expected = r"(posix|nt)\.system"
    else:
        class EvalMember:
            def __reduce_ex__(self, protocol):
                return eval, ("1 + 1",)

        config._content["hydra_mode"]._val = EvalMember()
        expected = r"builtins\.eval"
    path = mdlm_pickles.save_mdlm_checkpoint(tmp_path / "evil.ckpt", reference, config=config,
                                             tokenizer=mdlm_pickles.text8_tokenizer())
    with pytest.raises(UnsafeCheckpointError, match=rf"refusing .*evil\.ckpt: its pickle calls .*{expected}"):
        convert_mdlm(path, tmp_path / "dst")
    assert not (tmp_path / "dst").exists()


def test_mdlm_attention_over_padding_as_a_conversion_choice(tmp_path):
    """MDLM's DiT has no attention mask: on a padded batch it attends to the padding. attend_to_padding=True gives
    exactly MDLM's logits on the padded ids; the default (padding masked) gives each row's logits alone."""
    path, reference, ids = _mdlm_style_checkpoint(tmp_path, "text8", seed=35,
                                                  data={"train": "text8", "wrap": False})
    mdlm_like = convert_mdlm(path, tmp_path / "mdlm_like", attend_to_padding=True)
    default = convert_mdlm(path, tmp_path / "default")
    assert any("data.wrap = False" in note and "--attend-to-padding" in note for note in default.notes)
    assert MDMConfig.from_pretrained(tmp_path / "mdlm_like").attend_to_padding is True
    assert MDMConfig.from_pretrained(tmp_path / "default").attend_to_padding is False
    assert "attended to, attention_mask ignored" in (tmp_path / "mdlm_like" / "README.md").read_text()

    generator = torch.Generator().manual_seed(1)
    padded = torch.randint(8, 35, (2, 20), generator=generator)
    attention_mask = torch.ones(2, 20, dtype=torch.long)
    padded[0, 14:], attention_mask[0, 14:] = ids["pad"], 0  # right padding with the run's [PAD]
    padded[1, :5], attention_mask[1, :5] = ids["pad"], 0  # left padding
    padded[:, 7] = ids["mask"]
    keep = [i for i in range(35) if i != ids["mask"]]
    model = AutoModel.from_pretrained(tmp_path / "mdlm_like").eval()
    with torch.no_grad():
        theirs = reference(padded, torch.zeros(2))
        ours = model(padded, attention_mask=attention_mask).logits
        masked = default.model(padded, attention_mask=attention_mask).logits
        alone = default.model(padded[:1, :14]).logits
    MEASURED["attend_to_padding, padded batch"] = (theirs - ours)[..., keep].abs().max().item()
    assert MEASURED["attend_to_padding, padded batch"] <= TOLERANCE
    assert (theirs - masked)[..., keep].abs().max() > 1e-2  # the default does differ from MDLM on padding
    assert (alone[0] - masked[0, :14])[..., keep].abs().max() <= TOLERANCE


def test_mdlm_length_extrapolation_as_a_conversion_choice(tmp_path):
    """MDLM's rotary DiT runs sequences longer than its training length (here 32). So does forward, as in every
    transformers model, with a warning, and gives MDLM's logits; generate() refuses such a canvas unless the
    conversion chose length_extrapolation=True, naming the setting."""
    from transformers.utils import logging as hf_logging

    from hf_mdm import modeling_mdm_common as modeling_mdm

    path, reference, ids = _mdlm_style_checkpoint(tmp_path, "gpt2", seed=36, time_conditioning=True)
    longer = convert_mdlm(path, tmp_path / "longer", length_extrapolation=True).model
    default = convert_mdlm(path, tmp_path / "default").model
    assert MDMConfig.from_pretrained(tmp_path / "longer").length_extrapolation is True
    hf_logging.enable_propagation()
    type(modeling_mdm.logger).warning_once.cache_clear()
    import logging

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    modeling_mdm.logger.addHandler(handler)
    try:
        compare_any_vocab(reference, longer, ids["mask"], "length_extrapolation, 48 > 32 positions", length=48)
    finally:
        modeling_mdm.logger.removeHandler(handler)
    assert any("longer than max_position_embeddings (32): running anyway" in record.getMessage() for record in records)
    zeros, noise = torch.zeros(1, 48, dtype=torch.long), torch.tensor([0.5])
    torch.testing.assert_close(default(zeros, timesteps=noise).logits, longer(zeros, timesteps=noise).logits,
                               rtol=0, atol=0)
    out = longer.generate(max_new_tokens=40, generator=torch.Generator().manual_seed(0))
    assert out.shape == (1, 40) and (out != ids["mask"]).all()
    with pytest.raises(ValueError, match=r"exceeds the model's max_position_embeddings \(32\).*length_extrapolation"):
        default.generate(max_new_tokens=40)
