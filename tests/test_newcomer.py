"""A newcomer's walk, fixed: what a first user tried that crashed, raced, retried the Hub or silently did the wrong
thing, each now a clear answer (issue "Documentation and the newcomer's path", item 5)."""

import argparse
import json
import math

import pytest
import torch

from conftest import run_without_hf_mdm, tiny_model


def test_a_cpu_only_torchrun_launch_joins_one_gloo_job(monkeypatch):
    """torchrun on a machine without an accelerator: Accelerate must be told cpu=True, or every process runs alone
    and they race for the output folder (the documented recipe crashed)."""
    import accelerate

    from hf_mdm import distributed

    built = {}

    class Recorder:
        def __init__(self, **kwargs):
            built.update(kwargs)

    monkeypatch.setattr(accelerate, "Accelerator", Recorder)
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    distributed.make_accelerator(mixed_precision="no")
    assert built == {"mixed_precision": "no", "cpu": True}
    built.clear()
    monkeypatch.setenv("WORLD_SIZE", "1")
    distributed.make_accelerator()
    assert built == {}


def train_args(argv):
    from hf_mdm.training.cli import add_train_parser, config_from_args

    parser = argparse.ArgumentParser()
    add_train_parser(parser.add_subparsers(dest="command"))
    return config_from_args(parser.parse_args(["train", *argv]))


def test_resume_needs_only_the_output_folder(tmp_path):
    from hf_mdm.training.checkpointing import check_output_dir
    from hf_mdm.training.loop import MAY_CHANGE_ON_RESUME

    saved = {"train_files": ["corpus.txt"], "block_size": 32, "max_steps": 2, "output_dir": str(tmp_path),
             "model_config": "tiny"}
    (tmp_path / "run_config.json").write_text(json.dumps(saved))
    config = train_args(["--output-dir", str(tmp_path), "--resume", "--max-steps", "5"])
    assert config.train_files == ["corpus.txt"] and config.block_size == 32 and config.max_steps == 5
    check_output_dir(tmp_path, {**saved, "max_steps": 5, "resume": True}, MAY_CHANGE_ON_RESUME, True)
    changed = train_args(["--output-dir", str(tmp_path), "--resume", "--block-size", "64"])
    with pytest.raises(ValueError, match="holds a different run .*block_size: 32 there, 64 now"):
        check_output_dir(tmp_path, {**saved, "block_size": changed.block_size, "resume": True}, MAY_CHANGE_ON_RESUME,
                         True)
    with pytest.raises(ValueError, match="Give either --train-files or --dataset-name"):  # no run there: as before
        from hf_mdm.training.loop import check_settings

        check_settings(train_args(["--output-dir", str(tmp_path / "new"), "--resume"]), 1)


@pytest.mark.parametrize("name, text, message", [
    ("run.yaml", "max_steps: [1, 2\nlr: 3", r"--config '.*run.yaml' is not valid YAML \(line \d+, column \d+\)"),
    ("run.json", '{"max_steps": 1,}', r"--config '.*run.json' is not valid JSON \(line 1, column \d+\)"),
])
def test_a_malformed_config_file_is_one_line(tmp_path, name, text, message):
    from hf_mdm.training.cli import read_config_file

    (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match=message) as error:
        read_config_file(str(tmp_path / name))
    assert "\n" not in str(error.value)


def test_lora_on_a_model_built_from_scratch_is_refused():
    from hf_mdm.training.loop import TrainConfig, check_settings

    with pytest.raises(ValueError, match="--lora-r adapts a trained model.*give --init-from"):
        check_settings(TrainConfig(train_files=["x.txt"], train_tokenizer=512, lora_r=8, batch_size=8), 1)


def test_lm_eval_runs_on_the_cpu_when_no_device_is_named(monkeypatch):
    """lm-eval's own default device is cuda:0: without CUDA it warned 'cuda:0 asked' when nothing was asked."""
    pytest.importorskip("lm_eval")
    from lm_eval._cli import HarnessCLI

    from hf_mdm.evaluation import harness

    seen = []
    monkeypatch.setattr(HarnessCLI, "execute", lambda self, args: seen.append(args))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    harness.main(["run", "--model", "hf_mdm", "--tasks", "lambada_openai"])
    harness.main(["run", "--model", "hf_mdm", "--tasks", "lambada_openai", "--device", "cuda:1"])
    assert [args.device for args in seen] == ["cpu", "cuda:1"]


def test_the_default_judge_is_a_hub_id_and_offline_is_named(monkeypatch):
    from huggingface_hub import constants as hub

    from hf_mdm.constants import DEFAULT_JUDGE
    from hf_mdm.evaluation.cli import add_evaluate_parser, check_arguments
    from hf_mdm.evaluation.judge import load_judge
    from hf_mdm.pretrained import resolve_checkpoint

    parser = argparse.ArgumentParser()
    add_evaluate_parser(parser.add_subparsers())
    args = parser.parse_args(["evaluate", "shakespeare-mdm"])
    check_arguments(args)  # the default judge passes the argument checks (it was always refused)
    assert args.judge == DEFAULT_JUDGE == "openai-community/gpt2-large"
    with pytest.raises(ValueError, match="a Hub id has an owner: openai-community/gpt2-large, not gpt2-large"):
        resolve_checkpoint("gpt2-large")
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    with pytest.raises(OSError, match="is a Hub id, hf_mdm is working offline .* not in the Hugging Face cache"):
        load_judge("someone-who/does-not-exist")


def test_bad_generate_inputs_are_refused():
    model = tiny_model()
    ids = torch.tensor([[5, 6, 7, 8]])
    with pytest.raises(ValueError, match="generator must be a torch.Generator .*got int"):
        model.generate(ids, max_new_tokens=2, generator=0)
    with pytest.raises(ValueError, match=r"attention_mask rows \[0\] have padding between real tokens"):
        model.generate(ids, attention_mask=torch.tensor([[1, 0, 1, 0]]), max_new_tokens=2)
    with pytest.raises(ValueError, match="attention_mask must hold only 0 .* and 1"):
        model.generate(ids, attention_mask=torch.tensor([[1, 2, 1, 1]]), max_new_tokens=2)
    generator = torch.Generator().manual_seed(0)
    for mask in ([[0, 0, 1, 1]], [[1, 1, 0, 0]]):  # left and right padding stay accepted
        out = model.generate(ids, attention_mask=torch.tensor(mask), max_new_tokens=2, generator=generator)
        assert out.shape == (1, 6)


def test_temperatures_must_be_finite():
    from hf_mdm.evaluation.cli import add_evaluate_parser, check_arguments
    from hf_mdm.sampling_mdm import CategoricalSampler

    with pytest.raises(ValueError, match="temperature must be a finite number >= 0 \\(0 means greedy\\)"):
        CategoricalSampler(temperature=math.nan)
    parser = argparse.ArgumentParser()
    add_evaluate_parser(parser.add_subparsers())
    args = parser.parse_args(["evaluate", "shakespeare-mdm", "--judge", "shakespeare-ar", "--ar-model",
                              "shakespeare-ar", "--ar-temperatures", "nan"])
    with pytest.raises(ValueError, match="--ar-temperatures must be finite numbers >= 0"):
        check_arguments(args)


def test_a_saved_folder_generates_in_a_text_generation_pipeline_without_hf_mdm(tmp_path):
    """auto_map names AutoModelForCausalLM, which transformers' text-generation pipeline loads a folder with."""
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    model = tiny_model()
    model.save_pretrained(tmp_path / "model")
    backend = Tokenizer(models.WordLevel({f"w{i}": i for i in range(51)}, unk_token="w1"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="w1", pad_token="w0", mask_token="w50").save_pretrained(
        tmp_path / "model")
    script = ("import sys, torch\nfrom transformers import pipeline, PreTrainedTokenizerFast\n"
              "tok = PreTrainedTokenizerFast.from_pretrained(sys.argv[1])\n"
              "pipe = pipeline('text-generation', model=sys.argv[1], tokenizer=tok, trust_remote_code=True)\n"
              "out = pipe('w5 w6', max_new_tokens=4, generator=torch.Generator().manual_seed(0))\n"
              "print(type(pipe.model).__name__, out[0]['generated_text'])\n")
    result = run_without_hf_mdm(script, [tmp_path / "model"], tmp_path)
    name, text = result.stdout.strip().split(" ", 1)
    assert name == "MDMForMaskedDiffusion" and text.startswith("w5 w6w"), result.stdout  # the prompt, then new words
    assert len(text.split()) >= 3, result.stdout
