"""hf_mdm in lm-evaluation-harness: the Monte-Carlo ELBO against an exact oracle, and the real harness on tasks
written here (multiple choice, and generation with a stop string), on one and on two processes."""

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import PreTrainedTokenizerFast
from transformers.modeling_outputs import MaskedLMOutput

from hf_mdm import MDMConfig, MDMForMaskedDiffusion
from hf_mdm.evaluation.likelihood import greedy_matches, mc_loglikelihood

from conftest import randomize_
from oracle import LENGTH, SEQUENCES, OracleDenoiser, oracle_config


# ---------------------------------------------------------------------------------------------------------------
# The estimator against an oracle whose joint is known.
# ---------------------------------------------------------------------------------------------------------------


def exact_loglikelihood(joint, context, continuation):
    """log p(continuation | context) of the oracle's joint over length-4 sequences."""
    prefix = (SEQUENCES[:, : len(context)] == torch.tensor(context)).all(1)
    whole = prefix & (SEQUENCES[:, len(context):] == torch.tensor(continuation)).all(1)
    return math.log(joint[whole].sum() / joint[prefix].sum())


REQUESTS = [([0], [0, 0, 1]), ([2], [1, 2, 2]), ([1, 1], [0, 2]), ([0, 1, 2], [2])]


def test_the_elbo_of_a_perfect_denoiser_is_the_loglikelihood():
    """The estimator's mean over seeds equals the exact log-likelihood within 3 standard errors (for a perfect
    denoiser the bound is tight), and its variance falls as 1 / mc_samples."""
    oracle = OracleDenoiser(oracle_config()).eval()
    seeds = range(30)
    for context, continuation in REQUESTS:
        exact = exact_loglikelihood(oracle.joint, context, continuation)
        means = {}
        for mc in (4, 16):
            values = torch.tensor([mc_loglikelihood(oracle, [(context, continuation)], mc_samples=mc, seed=seed)[0].loglikelihood
                                   for seed in seeds], dtype=torch.float64)
            means[mc] = values
            standard_error = values.std() / math.sqrt(len(values))
            assert abs(values.mean().item() - exact) < 3 * standard_error + 1e-6, (context, continuation, mc)  # float32 logits
        if len(continuation) > 1:  # one token: every draw masks it, so the estimate is exact (zero variance)
            ratio = (means[4].var() / means[16].var()).item()
            assert 2.0 < ratio < 8.0, ratio  # 4x fewer draws, 4x the variance
        else:
            assert means[4].std() < 1e-9


def test_a_single_estimate_reports_its_standard_error_and_is_reproducible():
    oracle = OracleDenoiser(oracle_config()).eval()
    first = mc_loglikelihood(oracle, REQUESTS, mc_samples=64, seed=3)
    again = mc_loglikelihood(oracle, list(reversed(REQUESTS)), mc_samples=64, seed=3, batch_size=5)[::-1]
    for a, b, (context, continuation) in zip(first, again, REQUESTS):
        assert a.loglikelihood == pytest.approx(b.loglikelihood, abs=1e-6)  # batching and order do not matter
        assert len(a.samples) == 64
        exact = exact_loglikelihood(oracle.joint, context, continuation)
        assert abs(a.loglikelihood - exact) < 5 * a.stderr + 1e-6


def test_greedy_fill_matches_the_most_likely_continuation():
    oracle = OracleDenoiser(oracle_config()).eval()
    matches = greedy_matches(oracle, [([0], [0, 0, 0]), ([0], [2, 1, 0])])
    assert matches == [True, False]  # equal neighbours are favoured by the oracle's joint


@pytest.mark.parametrize("requests, message", [([([1], [])], "continuation is empty"),
                                               ([([1], [0] * 17)], "more than the model's context window")])
def test_bad_requests(requests, message):
    with pytest.raises(ValueError, match=message):
        mc_loglikelihood(OracleDenoiser(oracle_config()).eval(), requests)
    with pytest.raises(ValueError, match="mc_samples must be an integer >= 1"):
        mc_loglikelihood(OracleDenoiser(oracle_config()).eval(), REQUESTS, mc_samples=0)


# ---------------------------------------------------------------------------------------------------------------
# Through the real harness.
# ---------------------------------------------------------------------------------------------------------------

CHARACTERS = list("abcdefghijklmnopqrstuvwxyz?. ")


def char_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {c: i for i, c in enumerate(CHARACTERS)}
    vocab.update({"[PAD]": len(vocab), "[BOS]": len(vocab) + 1, "[MASK]": len(vocab) + 2})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[PAD]"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", bos_token="[BOS]", mask_token="[MASK]")


def char_config():
    tokenizer = char_tokenizer()
    return MDMConfig(vocab_size=len(tokenizer), mask_token_id=tokenizer.mask_token_id, pad_token_id=tokenizer.pad_token_id,
                     bos_token_id=tokenizer.bos_token_id, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     cond_dim=16, max_position_embeddings=32, dropout=0.0)


class AnswerKey(MDMForMaskedDiffusion):
    """Knows the answers: after "?", the character just before it, then ".", then "z". Any masked position
    elsewhere gets "z". Logits through the real model's contract (positions, padding)."""

    def forward(self, input_ids, attention_mask=None, timesteps=None, output_positions=None, **kwargs):
        vocab = {c: i for i, c in enumerate(CHARACTERS)}
        logits = torch.full(input_ids.shape + (self.config.vocab_size,), -10.0)
        for row, ids in enumerate(input_ids.tolist()):
            question = ids.index(vocab["?"]) if vocab["?"] in ids else None
            for position in range(len(ids)):
                if question is None or position <= question:
                    wanted = vocab["z"]
                else:
                    wanted = [ids[question - 1], vocab["."]][position - question - 1] if position - question <= 2 else vocab["z"]
                logits[row, position, wanted] = 10.0
        logits[..., self.config.mask_token_id] = -1e4
        if output_positions is not None:
            logits = logits.gather(1, output_positions[..., None].expand(-1, -1, logits.shape[-1]))
        return MaskedLMOutput(logits=logits)


def write_tasks(folder, count=45):
    """A multiple-choice task ("what is the letter before '?'") and a generation task, both answered by AnswerKey."""
    generator = torch.Generator().manual_seed(0)
    letters = "xyz"
    mc, gen = [], []
    for i in range(count):
        answer = letters[int(torch.randint(3, (), generator=generator))]
        stem = "".join(CHARACTERS[int(k)] for k in torch.randint(0, 20, (3,), generator=generator))
        mc.append({"question": f"{stem}{answer}?", "choices": list(letters), "answer": letters.index(answer)})
        gen.append({"question": f"{stem}{answer}?", "answer": answer})
    (folder / "mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in mc))
    (folder / "gen.jsonl").write_text("".join(json.dumps(d) + "\n" for d in gen))
    (folder / "mdm_toy_mc.yaml").write_text(textwrap.dedent(f"""\
        task: mdm_toy_mc
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {folder / 'mc.jsonl'}
        test_split: test
        output_type: multiple_choice
        doc_to_text: "{{{{question}}}}"
        doc_to_choice: "{{{{choices}}}}"
        doc_to_target: "{{{{answer}}}}"
        target_delimiter: ""
        metric_list:
          - metric: acc
        """))
    (folder / "mdm_toy_gen.yaml").write_text(textwrap.dedent(f"""\
        task: mdm_toy_gen
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {folder / 'gen.jsonl'}
        test_split: test
        output_type: generate_until
        doc_to_text: "{{{{question}}}}"
        doc_to_target: "{{{{answer}}}}"
        target_delimiter: ""
        generation_kwargs:
          until: ["."]
          max_gen_toks: 4
          do_sample: false
        metric_list:
          - metric: exact_match
        """))
    return folder


def evaluate(model, tokenizer, tasks_folder, tasks, **model_args):
    import lm_eval
    from lm_eval.tasks import TaskManager

    from hf_mdm.evaluation.harness import MDMHarnessLM

    lm = MDMHarnessLM(pretrained=model, tokenizer=tokenizer, **model_args)
    results = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=TaskManager(include_path=str(tasks_folder)),
                                      num_fewshot=0, random_seed=0, numpy_random_seed=0, torch_random_seed=0)
    return results["results"]


def test_the_harness_scores_a_model_that_knows_the_answers_and_one_that_does_not(tmp_path):
    tasks = write_tasks(tmp_path)
    tokenizer = char_tokenizer()
    knows = evaluate(AnswerKey(char_config()), tokenizer, tasks, ["mdm_toy_mc", "mdm_toy_gen"], mc_samples=4,
                     batch_size=8)
    assert knows["mdm_toy_mc"]["acc,none"] == 1.0
    assert knows["mdm_toy_gen"]["exact_match,none"] == 1.0  # "x.zz" cut at the stop string "." is "x"
    torch.manual_seed(0)
    untrained = randomize_(MDMForMaskedDiffusion(char_config()), seed=0)
    chance = evaluate(untrained, tokenizer, tasks, ["mdm_toy_mc"], mc_samples=4, batch_size=8)
    assert 0.1 < chance["mdm_toy_mc"]["acc,none"] < 0.6  # three choices


def test_model_args_are_checked_before_anything_loads(tmp_path):
    from hf_mdm.evaluation.harness import MDMHarnessLM

    for args, message in [(dict(pretrained="nowhere", colour="red"), "unknown argument 'colour'"),
                          (dict(pretrained="nowhere", mc_samples=0), "mc_samples must be an integer >= 1"),
                          (dict(pretrained="nowhere", batch_size="auto"), "no 'auto'"),
                          (dict(pretrained="nowhere", unmasking="best"), "unmasking must be one of")]:
        with pytest.raises(ValueError, match=message):
            MDMHarnessLM(**args)
    lm_args = "pretrained=shakespeare-mdm,mc_samples=2,batch_size=4,unmasking=confidence"
    from lm_eval.api.registry import get_model

    model = get_model("hf_mdm").create_from_arg_string(lm_args, {"batch_size": 1, "device": None})
    assert model.mc_samples == 2 and model.batch_size == 4 and model.generation == {"unmasking": "confidence"}
    assert get_model("hf").__name__ == "HFLM"  # registering hf_mdm leaves lm-eval's own models in place


@pytest.mark.slow
def test_the_command_line_on_one_and_two_processes(tmp_path):
    """`hf-mdm lm-eval` (lm-eval's CLI) and the same under 2 processes give the same accuracy."""
    tasks = write_tasks(tmp_path, count=12)
    torch.manual_seed(0)
    model = randomize_(MDMForMaskedDiffusion(char_config()), seed=0)
    model.save_pretrained(tmp_path / "model")
    char_tokenizer().save_pretrained(tmp_path / "model")
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    common = ["--model", "hf_mdm", "--model_args", f"pretrained={tmp_path / 'model'},mc_samples=4,batch_size=8",
              "--tasks", "mdm_toy_mc", "--include_path", str(tasks), "--seed", "0"]
    one = subprocess.run([sys.executable, "-m", "hf_mdm_cli", "lm-eval", "run", *common, "--output_path",
                          str(tmp_path / "one")], capture_output=True, text=True, env=env, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "hf_mdm.evaluation.harness", "run", *common, "--output_path", str(tmp_path / "two")],
                         capture_output=True, text=True, env=env, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]

    def accuracy(folder):
        result = json.loads(next(folder.rglob("results_*.json")).read_text())
        return result["results"]["mdm_toy_mc"]["acc,none"]

    assert accuracy(tmp_path / "one") == accuracy(tmp_path / "two")


def test_rolling_loglikelihood_and_sampling_settings_on_a_shifted_model(monkeypatch):
    from types import SimpleNamespace

    from conftest import tiny_llama_model
    from hf_mdm.evaluation.harness import MDMHarnessLM

    model = tiny_llama_model(dream=True, bos_token_id=char_tokenizer().bos_token_id, vocab_size=len(char_tokenizer()),
                             mask_token_id=char_tokenizer().mask_token_id, max_position_embeddings=16)
    lm = MDMHarnessLM(pretrained=model, tokenizer=char_tokenizer(), mc_samples=2, batch_size=8)
    request = lambda *args: SimpleNamespace(args=args)
    totals = lm.loglikelihood_rolling([request("abcdefghij"), request("abcdefghijklmnopqrstuvwxyz" * 2)])
    assert len(totals) == 2 and all(math.isfinite(t) and t < 0 for t in totals)  # longer than the window: fine

    seen = []
    monkeypatch.setattr(type(model), "generate", lambda self, *a, **k: seen.append(k) or torch.cat(
        [a[0], torch.full((a[0].shape[0], k["max_new_tokens"]), 3)], dim=1))
    lm.generate_until([request("abc?", {"until": ["."], "max_gen_toks": 2, "do_sample": False, "temperature": 0.7})])
    lm.generate_until([request("abc?", {"until": ["."], "max_gen_toks": 2})])
    lm.generate_until([request("abc?", {"until": ["."], "max_gen_toks": 2, "temperature": 0.5})])
    assert [k["temperature"] for k in seen] == [0.0, 0.0, 0.5]
