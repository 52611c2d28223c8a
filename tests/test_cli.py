import argparse
import io
import re

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from hf_mdm.cli import DEMO_PROMPT, DraftPrinter
from hf_mdm_cli import main
from hf_mdm.evaluation.cli import add_evaluate_parser, check_arguments
from hf_mdm.pretrained import pretrained_path

from conftest import tiny_model


def char_tokenizer():
    vocab = {"[PAD]": 0, " ": 27, **{chr(97 + i): i + 1 for i in range(26)}, **{f"x{i}": i for i in range(28, 50)}}
    vocab["[MASK]"] = 50
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[PAD]"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", mask_token="[MASK]")


@pytest.fixture
def checkpoint(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    char_tokenizer().save_pretrained(tmp_path)
    return tmp_path


def test_generate_command_prints_samples_and_nfe(checkpoint, capsys):
    main(["generate", str(checkpoint), "--prompt", "abc", "--max-new-tokens", "5", "--num-samples", "2"])
    out = capsys.readouterr().out
    samples = [line for line in out.splitlines() if line and not line.startswith(("---", "NFE"))]
    assert len(samples) == 2 and all(s.replace(" ", "").startswith("abc") for s in samples)
    assert "NFE = 5 network calls for 5 tokens x 2 sample(s)" in out
    # The same seed gives the same samples.
    main(["generate", str(checkpoint), "--prompt", "abc", "--max-new-tokens", "5", "--num-samples", "2"])
    assert capsys.readouterr().out.splitlines()[:4] == out.splitlines()[:4]


def test_generate_command_streams_one_sample(checkpoint, capsys):
    main(["generate", str(checkpoint), "--max-new-tokens", "4", "--sampler", "ancestral", "--steps", "8"])
    out = capsys.readouterr().out
    # Not a terminal: one snapshot of the draft instead of redraws, then the sample.
    assert "[draft: 2 of 4 tokens unmasked]" in out and "--- sample 0" in out and "NFE = " in out
    assert "\033" not in out and "\r" not in out


def test_generate_command_passes_the_decoding_strategy_flags(checkpoint, capsys, monkeypatch):
    seen = {}
    original = type(tiny_model()).generate

    def recording_generate(self, *args, **kwargs):
        seen.update(kwargs)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(tiny_model()), "generate", recording_generate)
    main(["generate", str(checkpoint), "--prompt", "abc", "--max-new-tokens", "8", "--no-stream", "--steps", "4",
          "--unmasking", "margin", "--block-length", "4", "--use-cache", "--cache-mode", "dual", "--temperature", "0"])
    assert {k: seen[k] for k in ("unmasking", "block_length", "use_cache", "cache_mode", "steps")} == dict(
        unmasking="margin", block_length=4, use_cache=True, cache_mode="dual", steps=4)
    assert "NFE = 4 network calls for 8 tokens" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", str(checkpoint), "--unmasking", "lowest"])
    assert exit_info.value.code == 2 and "unmasking must be one of" in capsys.readouterr().err


def test_generate_command_defaults_to_the_shipped_mdm(capsys):
    main(["generate", "--prompt", "KING HENRY.", "--max-new-tokens", "6", "--no-stream"])
    out = capsys.readouterr().out
    assert "--- sample 0\nKING HENRY." in out and "[MASK]" not in out
    assert "NFE = 6 network calls for 6 tokens x 1 sample(s)" in out


def test_demo_samples_the_shipped_mdm(capsys, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    threads = torch.get_num_threads()
    main(["demo", "--no-stream", "--max-new-tokens", "12", "--seed", "1"])
    assert torch.get_num_threads() == threads  # the demo's single thread does not leak into the caller
    out = capsys.readouterr().out
    header = out.splitlines()[0]
    assert "shakespeare-mdm" in header and "sampler=first_hitting" in header and "sampling_dtype=float64" in header
    assert "[unconditional, 12 new tokens]" in out and f"[from the prompt {DEMO_PROMPT!r} (11 tokens), 12 new" in out
    assert DEMO_PROMPT in out and "[MASK]" not in out and "[draft:" not in out
    assert len(re.findall(r"\[NFE = 12 network calls for 12 new tokens; wall time \d+\.\d s on 1 CPU thread", out)) == 2
    text = out.split(f"{DEMO_PROMPT!r}")[1]
    assert len(re.findall(r"[A-Za-z]{2,}", text)) >= 4  # decoded words after the prompt


def test_demo_streams_a_snapshot_to_a_log(capsys):
    main(["demo", "--max-new-tokens", "6", "--prompt", "KING."])
    out = capsys.readouterr().out
    assert out.count("[draft: 3 of 6 tokens unmasked]") == 2 and "\033" not in out and "\r" not in out


@pytest.mark.parametrize("flags, message", [
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1, got 0."),
    (["--max-new-tokens", "300"], "--max-new-tokens must be <= the model's context (256), got 300."),
    (["--max-new-tokens", "250"], "--prompt is 11 tokens; with 250 new tokens that exceeds the model's context (256)."),
    (["--prompt", ""], "--prompt must not be empty."),
])
def test_demo_bad_flag_is_one_line(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", *flags])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("hf-mdm demo: error: ") and err.count("\n") == 1
    assert message in err


class Letters:
    """Decodes 0 as a newline and i as the i-th letter (1 -> "a")."""

    def decode(self, ids):
        return "".join("\n" if i == 0 else chr(96 + i) for i in ids)


def test_draft_printer_redraws_in_place_on_a_terminal(monkeypatch):
    """Live mode: each draft erases the previous one (cursor up over its rows, clear to the end of the screen), a
    draft taller than the screen shows its last rows, and end() leaves nothing behind for the final print."""
    monkeypatch.setattr("shutil.get_terminal_size", lambda: (4, 4))  # 4 columns, 4 rows: 3 for the draft
    screen = io.StringIO()
    printer = DraftPrinter(Letters(), mask_token_id=50, file=screen, live=True, interval=0.0)
    printer.put(torch.tensor([[1, 2]]))  # the prompt "ab"
    printer.put_draft(torch.tensor([[50, 3, 50, 4, 5, 6, 7, 8]]))  # "ab_c_defgh": 10 characters, 3 rows
    dim_mask = DraftPrinter.MASK
    assert screen.getvalue() == f"ab{dim_mask}c{dim_mask}defgh" and printer.rows == 3
    printer.put_draft(torch.tensor([[1, 0, 2, 0, 3, 0, 4, 5, 6, 7, 8]]))  # "aba|b|c|defgh": 5 rows, the last 3 fit
    assert screen.getvalue().endswith(f"{dim_mask}defgh\r\033[2A\033[Jc\ndefgh") and printer.rows == 3
    printer.put_draft(torch.tensor([[3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 50, 14]]))  # one line of 14: its last 12 fit
    assert screen.getvalue().endswith(f"defgh\r\033[2A\033[Jcdefghijkl{dim_mask}n") and printer.rows == 3
    printer.put(torch.tensor([[3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14]]))  # the result: drawn by the caller
    printer.end()
    assert screen.getvalue().endswith(f"{dim_mask}n\r\033[2A\033[J") and printer.rows == 0


def test_evaluate_resolves_shipped_names():
    parser = argparse.ArgumentParser()
    add_evaluate_parser(parser.add_subparsers())
    args = parser.parse_args(["evaluate", "shakespeare-mdm", "--judge", "shakespeare-ar",
                              "--ar-model", "shakespeare-ar"])
    check_arguments(args)
    assert args.checkpoint == str(pretrained_path("shakespeare-mdm"))
    assert args.judge == args.ar_model == str(pretrained_path("shakespeare-ar"))


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for command in ("demo", "generate", "train", "evaluate", "convert", "publish"):
        assert re.search(rf"^    {command}\s", out, re.MULTILINE), command


@pytest.mark.parametrize("command", [["demo"], ["generate"], ["train"], ["evaluate"], ["convert"], ["publish"],
                                     ["convert", "sdar"], ["convert", "fast-dllm-v2"], ["convert", "mdlm"],
                                     ["convert", "bd3lm"], ["convert", "llada-moe"], ["convert", "rnd1"], ["convert", "llada2"]])
def test_every_commands_help_prints(command, capsys):
    """argparse formats help strings with %: a literal one in a flag's help (train's "~30% more compute") once
    crashed `hf-mdm train --help`."""
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0 and "usage: hf-mdm" in capsys.readouterr().out


def test_generate_command_rejects_bad_settings_before_loading(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", str(tmp_path / "missing"), "--sampler", "dpm"])
    assert exit_info.value.code == 2
    assert "sampler must be one of" in capsys.readouterr().err


def test_the_help_cache_is_what_the_parsers_print():
    """hf_mdm/command_help.json, which `hf-mdm COMMAND --help` prints without importing torch, is exactly what the
    full parsers print (at HELP_COLUMNS columns). After changing a flag: python -c "import hf_mdm_cli, hf_mdm.cli as c;
    c.write_help_cache(hf_mdm_cli.top_level_parser)"."""
    import json

    from hf_mdm.cli import HELP_CACHE, command_help_texts
    from hf_mdm_cli import top_level_parser

    fresh = command_help_texts(top_level_parser)
    assert json.loads(HELP_CACHE.read_text()) == fresh
    assert {"train", "generate", "evaluate", "convert", "convert llada", "convert dream", "publish", "demo"} <= set(fresh)


@pytest.mark.parametrize("command", ["train", "convert llada", "evaluate", "lm-eval"])
def test_the_console_prints_a_commands_help_from_the_cache(command, capsys):
    import json

    import hf_mdm_cli
    from hf_mdm.cli import HELP_CACHE

    with pytest.raises(SystemExit) as exit_info:
        hf_mdm_cli.main([*command.split(), "--help"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == json.loads(HELP_CACHE.read_text())[command]
