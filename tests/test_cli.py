import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from hf_mdm.cli import main

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
    assert "\0337" in out and "NFE = " in out  # TextDiffusionStreamer drew drafts


def test_generate_command_rejects_bad_settings_before_loading(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", str(tmp_path / "missing"), "--sampler", "dpm"])
    assert exit_info.value.code == 2
    assert "sampler must be one of" in capsys.readouterr().err
