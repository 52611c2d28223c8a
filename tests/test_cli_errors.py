"""The CLI's error boundary: an everyday mistake is one line on stderr naming what and where, and exit code 2.

The `generate` cases run the real console entry point (`python -m hf_mdm_cli`) in a subprocess; the `train` cases
call the same entry point in-process (each subprocess costs an import of torch and transformers).
"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hf_mdm_cli
from hf_mdm import pretrained_path


def hf_mdm(*args, env=None):
    environment = {name: value for name, value in os.environ.items() if name != "HF_MDM_DEBUG"}
    environment.update(HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", **(env or {}))
    return subprocess.run([sys.executable, "-m", "hf_mdm_cli", *args], capture_output=True, text=True,
                          env=environment, timeout=300)


def error_line(result, command: str) -> str:
    """The single error line (progress bars aside), after checking exit code 2 and that no traceback was shown."""
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith(f"hf-mdm {command}: error: ")]
    assert len(lines) == 1, result.stderr[-2000:]
    return lines[0]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_errors")
    corrupt = root / "corrupt"
    shutil.copytree(pretrained_path("shakespeare-mdm"), corrupt)
    weights = corrupt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # a download cut short
    (root / "run" / "model").mkdir(parents=True)
    shutil.copy(pretrained_path("shakespeare-mdm") / "config.json", root / "run" / "model")
    (root / "a_file").write_text("not a checkpoint")
    return root


GENERATE_CASES = {
    "an autoregressive model": (lambda f: ["shakespeare-ar"], "is a 'gpt2' model, not an hf_mdm masked diffusion"),
    "a training run's folder": (lambda f: [str(f / "run")], f"its model is '{{root}}/run/model'"),
    "a corrupt weights file": (lambda f: [str(f / "corrupt")], "'{root}/corrupt/model.safetensors' is not a readable"),
    "a file": (lambda f: [str(f / "a_file")], "is a file; a checkpoint is a folder"),
    "a missing folder": (lambda f: [str(f / "missing")], "is not a folder, a shipped name"),
    "a Hub id offline": (lambda f: ["no-such-owner/no-such-model"], "OSError: "),
    "a prompt longer than the context": (lambda f: ["--prompt", "the " * 400, "--no-stream"],
                                         "the prompt (401 tokens) is longer than the model's context"),
}


@pytest.mark.parametrize("case", GENERATE_CASES)
def test_generate_mistakes_are_one_line(case, folders):
    arguments, expected = GENERATE_CASES[case]
    line = error_line(hf_mdm("generate", *arguments(folders)), "generate")
    assert expected.format(root=folders) in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_generate_on_cuda_without_cuda_is_one_line():
    line = error_line(hf_mdm("generate", "--device", "cuda"), "generate")
    assert "this machine has no CUDA device" in line


def test_debug_shows_the_traceback(folders):
    for result in (hf_mdm("--debug", "generate", str(folders / "missing")),
                   hf_mdm("generate", str(folders / "missing"), env={"HF_MDM_DEBUG": "1"})):
        assert result.returncode == 1 and "Traceback" in result.stderr and "is not a folder" in result.stderr


TRAIN_CASES = {
    ("--lr", "0"): "--lr must be > 0",
    ("--eval-blocks", "0"): "--eval-blocks must be at least 1",
    ("--grad-clip", "-1"): "--grad-clip must be > 0, or 0 for no clipping",
    ("--min-lr", "1"): "--min-lr must lie in [0, --lr = 0.0003]",
    ("--report-to", "tensorboard"): "the tensorboard package is not installed",
}


@pytest.mark.parametrize("flags", TRAIN_CASES)
def test_train_mistakes_are_one_line_and_write_nothing(flags, tmp_path, capsys):
    if flags[0] == "--report-to" and any(importlib.util.find_spec(name) for name in ("tensorboard", "tensorboardX")):
        pytest.skip("tensorboard is installed")
    output = tmp_path / "run"
    train_file = tmp_path / "train.txt"
    train_file.write_text("To be, or not to be, that is the question.\n" * 20)
    with pytest.raises(SystemExit) as exit_info:
        hf_mdm_cli.main(["train", "--train-files", str(train_file), "--tokenizer", str(pretrained_path()),
                         "--output-dir", str(output), *flags])
    assert exit_info.value.code == 2
    message = [line for line in capsys.readouterr().err.splitlines() if line.startswith("hf-mdm train: ")]
    assert len(message) == 1 and TRAIN_CASES[flags] in message[0], message
    assert not output.exists()


def test_help_and_version_do_not_import_torch():
    """Nor does any command's --help (hf_mdm_cli.cached_help): each answers in a fraction of a second."""
    commands = json.loads((Path(hf_mdm_cli.CONSTANTS.__file__).parent / "command_help.json").read_text())
    helps = [[*key.split(), "--help"] for key in commands]
    code = ("import sys, hf_mdm_cli\n"
            f"for argv in (['--help'], ['--version'], *{helps!r}):\n"
            "    try:\n        hf_mdm_cli.main(argv)\n    except SystemExit as e:\n        assert e.code == 0, e.code\n"
            "print(sorted(m for m in ('torch', 'transformers', 'hf_mdm') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "generate" in result.stdout and "hf_mdm " in result.stdout  # the command list and the version
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_the_launcher_lists_exactly_the_commands_of_the_full_parser(capsys):
    from hf_mdm_cli import main

    with pytest.raises(SystemExit):
        main(["no-such-command"])  # argparse names the real parser's choices in its error
    error = capsys.readouterr().err
    choices = error[error.index("choose from") + len("choose from"):].strip().rstrip(")")
    assert {choice.strip(" '") for choice in choices.split(",")} == set(hf_mdm_cli.COMMANDS)


@pytest.fixture(scope="module")
def model():
    from transformers import AutoModel

    return AutoModel.from_pretrained(pretrained_path()).eval()


SILENT_BEFORE = {  # generate() arguments once accepted silently, with what the error now says
    "float input_ids": (dict(input_ids=torch.tensor([[5.7, 9.2]])), "input_ids must hold integer token ids"),
    "bool input_ids": (dict(input_ids=torch.tensor([[True, False]])), "got dtype torch.bool"),
    "max_new_tokens=True": (dict(max_new_tokens=True), "max_new_tokens must be an integer >= 0 (or None), got True"),
    "return_dict_in_generate=1": (dict(return_dict_in_generate=1), "return_dict_in_generate must be True or False"),
    "noise_removal with first_hitting": (dict(noise_removal=True), "noise_removal=True is not a setting of sampler='first_hitting'"),
}


@pytest.mark.parametrize("case", SILENT_BEFORE)
def test_generate_refuses_what_it_once_accepted_silently(case, model):
    kwargs, expected = SILENT_BEFORE[case]
    with pytest.raises(ValueError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        model.generate(**{"max_new_tokens": 2, **kwargs}, generator=torch.Generator().manual_seed(0))


def test_generate_warns_about_rows_without_a_prompt(model, caplog):
    from transformers.utils import logging

    logging.enable_propagation()
    try:
        model.generate(torch.tensor([[5, 9], [5, 9]]), attention_mask=torch.tensor([[1, 1], [0, 0]]), max_new_tokens=2,
                       generator=torch.Generator().manual_seed(0))
    finally:
        logging.disable_propagation()
    assert "rows [1] of attention_mask are all 0" in caplog.text


def test_a_config_that_does_not_match_the_weights_is_refused(tmp_path):
    import json

    from transformers import AutoModel

    folder = tmp_path / "five_layers"
    shutil.copytree(pretrained_path("shakespeare-mdm"), folder)
    config = json.loads((folder / "config.json").read_text())
    config["num_hidden_layers"] = 5  # the weights have 6 blocks
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"num_hidden_layers=5\): weights for layers \[5\] the config does not have"):
        AutoModel.from_pretrained(folder)
    config["num_hidden_layers"] = 7  # one block would be left at random
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"num_hidden_layers=7\): no weights for layers \[6\]"):
        AutoModel.from_pretrained(folder)


def test_a_tokenizer_smaller_than_asked_for_warns(tmp_path):
    from hf_mdm.training.tokenizer import train_bpe_tokenizer

    text = tmp_path / "tiny.txt"
    text.write_text("to be or not to be\n" * 50)
    with pytest.warns(UserWarning, match=r"--train-tokenizer 512: the training text yields only \d+ tokens"):
        tokenizer = train_bpe_tokenizer([str(text)], vocab_size=512)
    assert len(tokenizer) < 512
