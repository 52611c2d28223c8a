"""Evaluation: token entropy, generative perplexity, MAUVE, the NELBO module, the offline `evaluate` modules and a
tiny end-to-end `hf-mdm evaluate`. Every model is built here (a 1-layer GPT-2 judge, a tiny MDM) from a BPE
tokenizer trained on a generated corpus: nothing comes from the Hub."""

import json
import math
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

from hf_mdm import MDMConfig, MDMForMaskedDiffusion
from hf_mdm.evaluation import (
    METRICS,
    Judge,
    generative_perplexity,
    load_judge,
    load_metric,
    mauve_score,
    mdm_nelbo,
    token_entropy,
    unigram_entropy,
)
from hf_mdm.evaluation.cli import main as evaluate_main
from hf_mdm.evaluation.sweep import SamplerSetting, expand_settings, parse_setting
from hf_mdm.training.objectives import validation_nelbo
from hf_mdm.training.tokenizer import train_bpe_tokenizer


WORDS = ("the cat dog sat on a mat and ran to house tree big small red blue green quick slow jumps over "
         "under near far walks talks sees many few some all").split()
JUDGE_CONTEXT = 16


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A corpus, its BPE tokenizer, a 1-layer GPT-2 judge (context 16) and a tiny MDM (length 16), saved."""
    root = tmp_path_factory.mktemp("evaluation")
    rng = random.Random(0)
    paragraphs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 30))) + "." for _ in range(300)]
    corpus = root / "corpus.txt"
    corpus.write_text("\n\n".join(paragraphs) + "\n")
    tokenizer = train_bpe_tokenizer([corpus], vocab_size=300, output_dir=root / "tokenizer")

    torch.manual_seed(0)
    judge_model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_layer=1, n_embd=32, n_head=2,
                                             n_positions=JUDGE_CONTEXT, eos_token_id=tokenizer.eos_token_id,
                                             bos_token_id=tokenizer.eos_token_id))
    with torch.no_grad():  # GPT-2's init predicts almost uniformly; these weights give a judge with preferences
        for param in judge_model.parameters():
            param.normal_(0, 0.3)
    judge_model.save_pretrained(root / "judge")
    tokenizer.save_pretrained(root / "judge")

    mdm = MDMForMaskedDiffusion(MDMConfig(
        vocab_size=len(tokenizer), mask_token_id=tokenizer.mask_token_id, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, cond_dim=16,
        max_position_embeddings=16, dropout=0.0))
    with torch.no_grad():  # adaLN-zero init predicts uniformly: random weights give a model with preferences
        for param in mdm.parameters():
            param.normal_(0, 0.2)
    mdm.save_pretrained(root / "mdm")
    tokenizer.save_pretrained(root / "mdm")
    return dict(root=root, corpus=corpus, tokenizer=tokenizer, judge_dir=root / "judge", mdm_dir=root / "mdm",
                paragraphs=paragraphs)


@pytest.fixture(scope="module")
def judge(assets):
    return load_judge(str(assets["judge_dir"]), device="cpu")


# ---------------------------------------------------------------------------------------------------- entropy


def test_token_entropy_hand_computed():
    assert unigram_entropy([7, 7, 7, 7]) == 0.0
    assert unigram_entropy([1, 2]) == pytest.approx(math.log(2))
    assert unigram_entropy([0, 1, 2, 3]) == pytest.approx(math.log(4))
    # counts 2, 1, 1 over 4 tokens: -(1/2 log 1/2 + 2 * 1/4 log 1/4) = 1.5 log 2
    assert unigram_entropy([5, 5, 6, 9]) == pytest.approx(1.5 * math.log(2))
    result = token_entropy(torch.tensor([[5, 5, 6, 9], [1, 1, 1, 1]]))
    assert result.per_sample == pytest.approx([1.5 * math.log(2), 0.0])
    assert result.token_entropy == pytest.approx(0.75 * math.log(2))
    metric = load_metric("token_entropy")
    assert metric.compute(predictions=[[5, 5, 6, 9], [1, 2]])["token_entropy"] == pytest.approx(
        (1.5 * math.log(2) + math.log(2)) / 2)


def test_token_entropy_bad_input():
    with pytest.raises(ValueError, match="empty list"):
        token_entropy([])
    with pytest.raises(ValueError, match="empty sample"):
        token_entropy([[1, 2], []])


# ---------------------------------------------------------------------------------------- generative perplexity


def direct_nll(model, ids: list[int], context: int) -> tuple[float, int]:
    """Sum of next-token NLL and number of predictions, one unpadded chunk of `context` tokens at a time."""
    total, count = 0.0, 0
    for start in range(0, len(ids), context):
        chunk = torch.tensor([ids[start : start + context]])
        if chunk.shape[1] < 2:
            continue
        logits = model(chunk).logits[0, :-1]
        total += F.cross_entropy(logits.double(), chunk[0, 1:], reduction="sum").item()
        count += chunk.shape[1] - 1
    return total, count


def test_generative_perplexity_equals_direct_computation(assets, judge):
    texts = [assets["paragraphs"][0], "the cat sat", " ".join(assets["paragraphs"][1:4])]  # the last: > 3 contexts
    ids = [judge.tokenizer(t)["input_ids"] for t in texts]
    assert len(ids[2]) > 3 * JUDGE_CONTEXT and len(ids[1]) < JUDGE_CONTEXT
    with torch.no_grad():
        direct = [direct_nll(judge.model, i, JUDGE_CONTEXT) for i in ids]
    result = generative_perplexity(texts, judge, batch_size=2)
    for (nll, count), value in zip(direct, result.per_sample):
        assert value == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert result.num_tokens == sum(c for _, c in direct)
    assert result.num_tokens == sum(len(i) - math.ceil(len(i) / JUDGE_CONTEXT) for i in ids)  # first of each chunk
    assert result.generative_perplexity == pytest.approx(
        math.exp(sum(n for n, _ in direct) / result.num_tokens), rel=1e-5)
    assert result.excluded == [] and result.num_scored == 3
    # Same through the evaluate module, with the judge given as a path; the batch size does not matter.
    metric = load_metric("generative_perplexity")
    out = metric.compute(predictions=texts, judge=str(assets["judge_dir"]), batch_size=3, device="cpu")
    assert out["generative_perplexity"] == pytest.approx(result.generative_perplexity, rel=1e-5)


def test_generative_perplexity_bad_input(assets, judge):
    with pytest.raises(ValueError, match="empty list"):
        generative_perplexity([], judge)
    with pytest.raises(ValueError, match="empty list"):
        load_metric("generative_perplexity").compute(predictions=[], judge=judge)
    # Texts shorter than two judge tokens are left out and counted, never NaN.
    result = generative_perplexity(["the cat sat on a mat", "", "a"], judge)
    assert result.excluded == [1, 2] and result.per_sample[1:] == [None, None] and result.num_scored == 1
    assert math.isfinite(result.generative_perplexity)
    assert result.generative_perplexity == pytest.approx(generative_perplexity(["the cat sat on a mat"], judge).generative_perplexity)
    with pytest.raises(ValueError, match="fewer than two"):
        generative_perplexity(["", "a"], judge)


def test_judge_without_pad_token(assets, judge):
    """Padding is masked: a tokenizer with no pad token (like GPT-2's) gives the same values, batched or not."""
    no_pad = AutoTokenizer.from_pretrained(assets["judge_dir"])
    no_pad.pad_token = None
    assert no_pad.pad_token_id is None
    bare = Judge(judge.model, no_pad, "no-pad")
    texts = ["the cat", assets["paragraphs"][5], "red dog jumps over the small tree"]
    batched = generative_perplexity(texts, bare, batch_size=3)
    single = [generative_perplexity([t], judge, batch_size=1).generative_perplexity for t in texts]
    assert batched.per_sample == pytest.approx(single, rel=1e-5)


def test_judge_load_errors(tmp_path):
    with pytest.raises(OSError, match="Could not load the judge"):
        load_judge(str(tmp_path / "missing"))


# ----------------------------------------------------------------------------------------------------- MAUVE


def test_mauve_near_one_for_one_distribution_and_lower_for_another():
    """300 points per side in 8 dimensions, fixed seeds: two draws of N(0, I) give MAUVE > 0.9; shifting one
    coordinate of the reference by 2 standard deviations gives < 0.4 (measured: ~0.95-0.98 and ~0.15-0.23)."""
    rng = np.random.default_rng(0)
    generated = rng.normal(size=(300, 8))
    same = rng.normal(size=(300, 8))
    shifted = rng.normal(size=(300, 8))
    shifted[:, 0] += 2.0
    near = mauve_score(features=generated, reference_features=same, seed=25)
    far = mauve_score(features=generated, reference_features=shifted, seed=25)
    assert near.mauve > 0.9
    assert far.mauve < 0.4
    # Through the evaluate module: features as predictions, references as a keyword argument.
    out = load_metric("mauve").compute(predictions=generated.tolist(), reference_features=same, seed=25)
    assert out["mauve"] == pytest.approx(near.mauve)


def test_mauve_on_texts_and_missing_references(assets, judge):
    texts = assets["paragraphs"][:20]
    result = mauve_score(texts=texts, reference_texts=assets["paragraphs"][20:40], judge=judge)
    assert 0 < result.mauve <= 1 and result.num_predictions == result.num_references == 20
    with pytest.raises(ValueError, match="reference texts"):
        mauve_score(texts=texts, judge=judge)
    with pytest.raises(ValueError, match="reference texts"):
        load_metric("mauve").compute(predictions=texts, judge=judge)
    with pytest.raises(ValueError, match="reference texts"):  # before trying to load the default judge
        load_metric("mauve").compute(predictions=[[0.0, 1.0]])


# ------------------------------------------------------------------------------------------------------ NELBO


def test_mdm_nelbo_module_reuses_validation_nelbo(assets):
    """The module packs texts as training does and returns exactly `validation_nelbo` on those blocks."""
    from hf_mdm.training.data import load_documents, tokenize_and_pack

    model = MDMForMaskedDiffusion.from_pretrained(assets["mdm_dir"])
    texts = assets["paragraphs"][:30]
    documents = load_documents([assets["corpus"]]).select(range(30))
    blocks = tokenize_and_pack(documents, assets["tokenizer"], 16)[:]["input_ids"]
    expected = validation_nelbo(model, blocks, seed=3, num_passes=2)
    out = load_metric("mdm_nelbo").compute(predictions=texts, model=str(assets["mdm_dir"]), seed=3, num_passes=2,
                                           device="cpu")
    assert out["nelbo"] == pytest.approx(expected.nats_per_token, rel=1e-6)
    assert out["perplexity_bound"] == pytest.approx(math.exp(expected.nats_per_token), rel=1e-6)
    assert out["num_blocks"] == len(blocks)
    direct = mdm_nelbo(model, input_ids=blocks, seed=3, num_passes=2)
    assert direct.nats_per_token == pytest.approx(expected.nats_per_token, rel=1e-6)
    with pytest.raises(ValueError, match="fewer than 16 tokens"):
        mdm_nelbo(model, texts=["the cat"], tokenizer=assets["tokenizer"])


def test_load_text_blocks_packs_files_as_training_does(assets, tmp_path):
    """The references of `hf-mdm evaluate` are the training packing of the files, cut to `count` (0: all)."""
    from hf_mdm.evaluation import load_text_blocks
    from hf_mdm.training.data import load_documents, tokenize_and_pack

    expected = tokenize_and_pack(load_documents([assets["corpus"]]), assets["tokenizer"], 16)[:]["input_ids"]
    assert len(expected) > 5
    assert torch.equal(load_text_blocks([assets["corpus"]], assets["tokenizer"], 16), expected)
    assert torch.equal(load_text_blocks([assets["corpus"]], assets["tokenizer"], 16, count=0), expected)
    assert torch.equal(load_text_blocks([assets["corpus"]], assets["tokenizer"], 16, count=5), expected[:5])
    with pytest.raises(ValueError, match="does not exist"):
        load_text_blocks([tmp_path / "missing.txt"], assets["tokenizer"], 16)


# ------------------------------------------------------------------------------------------- offline loading


def test_every_module_loads_offline(tmp_path):
    """In a fresh process with HF_HUB_OFFLINE=1 and an empty HF_HOME, every module loads and computes."""
    script = (
        "from hf_mdm.evaluation import METRICS, load_metric\n"
        "for name in METRICS:\n"
        "    print(name, type(load_metric(name)).__name__)\n"
        "print(load_metric('token_entropy').compute(predictions=[[1, 2]])['token_entropy'])\n"
    )
    hf_home = tmp_path / "hf_home"
    hf_home.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(hf_home), "HF_DATASETS_OFFLINE": "1"}
    env.pop("HF_MODULES_CACHE", None)
    env.pop("HF_EVALUATE_CACHE", None)
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert [line.split()[0] for line in lines[: len(METRICS)]] == list(METRICS)
    assert float(lines[-1]) == pytest.approx(math.log(2))


# ---------------------------------------------------------------------------------------------- sweep settings


def test_a_block_models_cache_is_labelled_as_its_exact_block_cache():
    """Fast-dLLM's prefix cache approximates a bidirectional model; a block-diffusion model's cache is exact, and the
    tables say which ran."""
    cached = parse_setting("sampler=first_hitting,use_cache=true")
    assert cached.label == cached.describe(block_diffusion=False) == "FHS k=1 prefix cache float64"
    assert cached.describe(block_diffusion=True) == "FHS k=1 block cache float64"
    dual = parse_setting("sampler=confidence,block_length=8,use_cache=true,cache_mode=dual")
    assert dual.label.endswith("blocks 8 dual cache float64")


def test_sampler_settings_cross_product_and_errors():
    settings = expand_settings(["first_hitting", "ancestral"], steps=[8, 32], tokens_per_step=[1, 2],
                               sampling_dtypes=["float64", "float32"], temperatures=[1.0])
    # tokens_per_step varies FHS only, steps the ancestral sampler only: (2 + 2) x 2 dtypes.
    assert len(settings) == 8
    assert SamplerSetting("first_hitting", tokens_per_step=2, sampling_dtype="float32") in settings
    assert SamplerSetting("ancestral", steps=32, sampling_dtype="float64") in settings
    assert all(s.settings.steps is None for s in settings if s.sampler == "first_hitting")
    assert parse_setting("sampler=ancestral,steps=256,sampling_dtype=float32") == SamplerSetting(
        "ancestral", steps=256, sampling_dtype="float32")
    with pytest.raises(ValueError, match=r"sampler must be one of \('first_hitting', 'confidence', 'dream', 'sdar', 'fast_dllm_v2', 'token_editing', 'rnd1', 'ancestral', 'ancestral_cache', 'remdm'\).*got 'ddpm'"):
        expand_settings(["ddpm"])
    with pytest.raises(ValueError, match="sampling_dtype must be .*float64"):
        expand_settings(["first_hitting"], sampling_dtypes=["float8"])
    with pytest.raises(ValueError, match="FIELD one of"):
        parse_setting("sampler=ancestral,step=256")
    with pytest.raises(ValueError, match="steps must be int"):
        parse_setting("sampler=ancestral,steps=many")
    with pytest.raises(ValueError, match="tokens_per_step=2 is not a setting of sampler='ancestral'"):
        parse_setting("sampler=ancestral,tokens_per_step=2")


def test_generate_samples_splits_the_work_across_processes():
    """Process r of P draws samples r, r + P, ...: with 7 samples, batches of 2 and 3 processes, ranks draw 3, 2 and
    2 samples, each batch with its own seed (here no process group exists, so gathering returns the local list)."""
    from types import SimpleNamespace

    from hf_mdm.evaluation.sweep import generate_samples

    seen = {}
    for rank in range(3):
        accelerator = SimpleNamespace(process_index=rank, num_processes=3, is_main_process=rank == 0,
                                      wait_for_everyone=lambda: None)
        seeds = []

        def sample_batch(size, seed):
            seeds.append(seed)
            return torch.full((size, 4), seed), torch.full((size,), 4)

        samples = generate_samples(sample_batch, 7, 2, accelerator, seed=5)
        seen[rank] = (samples.sequences.shape[0], seeds)
        assert samples.nfe.tolist() == [4] * samples.sequences.shape[0]
    assert [count for count, _ in seen.values()] == [3, 2, 2]
    all_seeds = [seed for _, seeds in seen.values() for seed in seeds]
    assert len(set(all_seeds)) == len(all_seeds) == 4 and seen[0][1] == [5, 6]


def test_mdm_sampler_progress_counts_unmasked_tokens_and_leaves_samples_unchanged(assets, monkeypatch):
    """The per-batch bar ends at batch x length unmasked tokens, rises monotonically, and draws no random numbers:
    the samples are identical with and without it."""
    from hf_mdm.evaluation import sweep

    model = MDMForMaskedDiffusion.from_pretrained(assets["mdm_dir"]).eval()
    setting = SamplerSetting(sampler="ancestral_cache", steps=24)
    counts = []
    original = sweep.UnmaskingProgress.put_draft

    def recording_put_draft(self, value):
        original(self, value)
        counts.append(self.bar.n)

    monkeypatch.setattr(sweep.UnmaskingProgress, "put_draft", recording_put_draft)
    with_bar, nfe = sweep.mdm_sampler(model, setting, 12)(3, 7)
    assert counts[-1] == 3 * 12 and counts == sorted(counts) and len(counts) == 24 and counts[0] < 3 * 12
    without_bar, _ = sweep.mdm_sampler(model, setting, 12, show_progress=False)(3, 7)
    assert torch.equal(with_bar, without_bar)
    assert (with_bar != model.config.mask_token_id).all() and nfe.max() <= 24


# ------------------------------------------------------------------------------------------------ end to end


def test_evaluate_end_to_end(assets, tmp_path):
    """A tiny `hf-mdm evaluate`: 2 MDM settings x 4 samples of 16 tokens, an AR baseline at 2 temperatures,
    references, NELBO: writes results.json, results.md and plot.png."""
    out = tmp_path / "eval"
    results = evaluate_main([
        str(assets["mdm_dir"]), "--judge", str(assets["judge_dir"]), "--reference-files", str(assets["corpus"]),
        "--samplers", "first_hitting", "ancestral", "--steps", "8", "--sampling-dtypes", "float32",
        "--setting", "sampler=first_hitting,tokens_per_step=4,sampling_dtype=float64",
        "--num-samples", "4", "--batch-size", "3", "--length", "16", "--num-references", "12",
        "--ar-model", str(assets["judge_dir"]), "--ar-temperatures", "0.7", "1.0", "--nelbo",
        "--output-dir", str(out), "--save-samples",
    ])
    assert (out / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((out / "results.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(results["rows"]))
    kinds = [row["kind"] for row in saved["rows"]]
    assert kinds == ["reference", "mdm", "mdm", "mdm", "ar", "ar"]
    rows = {row["label"]: row for row in saved["rows"]}
    assert set(rows) == {"reference texts", "FHS k=1 float32", "ancestral 8 steps float32", "FHS k=4 float64",
                         "T=0.7", "T=1"}
    for row in saved["rows"]:
        assert math.isfinite(row["generative_perplexity"]) and 0 < row["token_entropy"] <= math.log(16)
        if row["kind"] != "reference":
            assert row["num_samples"] == 4 and 0 < row["mauve"] <= 1 and row["seconds"] > 0
    assert rows["FHS k=1 float32"]["nfe_per_sample"] == 16
    assert rows["FHS k=4 float64"]["nfe_per_sample"] == 4
    assert rows["ancestral 8 steps float32"]["nfe_per_sample"] <= 8
    assert rows["T=1"]["nfe_per_sample"] == 15
    assert rows["reference texts"]["num_samples"] == 12
    assert rows["T=0.7"]["token_entropy"] != rows["T=1"]["token_entropy"]
    assert math.isfinite(saved["nelbo"]["nelbo"])
    table = (out / "results.md").read_text()
    assert table.startswith("| model | setting |") and "| MDM | FHS k=4 float64 | 4 |" in table and "NELBO" in table
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 5 * 4
    for label, row in rows.items():  # each sample's own figures, which a seed-to-seed test needs
        if label != "reference texts":
            mine = [sample for sample in samples if sample["label"] == label]
            assert sum(s["token_entropy"] for s in mine) / len(mine) == pytest.approx(row["token_entropy"])
            assert all(s["gen_ppl"] > 1 for s in mine)


@pytest.mark.slow
def test_evaluate_under_two_processes(assets, tmp_path):
    """`torchrun --nproc_per_node 2` (gloo on CPU): 5 samples per setting split 3 + 2, gathered on the main process,
    which alone judges them and writes the results."""
    out = tmp_path / "eval2"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "hf_mdm.evaluation.cli",
               str(assets["mdm_dir"]), "--judge", str(assets["judge_dir"]), "--setting", "sampler=first_hitting",
               "--setting", "sampler=ancestral,steps=4", "--num-samples", "5", "--batch-size", "2", "--length", "16",
               "--output-dir", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "1"}  # gloo, no GPU
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    saved = json.loads((out / "results.json").read_text())
    assert saved["num_processes"] == 2
    assert [(row["label"], row["num_samples"]) for row in saved["rows"]] == [
        ("FHS k=1 float64", 5), ("ancestral 4 steps float64", 5)]
    assert (out / "plot.png").is_file() and (out / "results.md").is_file()


def test_evaluate_rejects_bad_settings_before_generating(assets, tmp_path, monkeypatch, capsys):
    common = [str(assets["mdm_dir"]), "--judge", str(tmp_path / "no-judge"), "--output-dir", str(tmp_path / "o")]
    with pytest.raises(SystemExit) as exit_info:  # on the command line: one line, exit code 2
        evaluate_main(common + ["--setting", "sampler=ddpm"])
    assert exit_info.value.code == 2 and capsys.readouterr().err.startswith("hf-mdm evaluate: error: sampler must be")
    monkeypatch.setenv("HF_MDM_DEBUG", "1")  # the errors themselves, as the library raises them
    # The judge does not exist either: the settings are checked first, so the error is about them.
    with pytest.raises(ValueError, match="sampling_dtype must be"):
        evaluate_main(common + ["--sampling-dtypes", "float64", "double"])
    with pytest.raises(ValueError, match="sampler must be one of"):
        evaluate_main(common + ["--setting", "sampler=ddpm"])
    with pytest.raises(ValueError, match="--nelbo .* --reference-files"):
        evaluate_main(common + ["--nelbo"])
    with pytest.raises(ValueError, match="does not exist"):
        evaluate_main(common + ["--reference-files", str(tmp_path / "missing.txt")])
    assert not (tmp_path / "o").exists()
