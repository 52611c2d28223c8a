"""Model cards and `publish`: the card's metadata and usage code, the exact set of files a push uploads (through a
recording stand-in for HfApi, never the Hub), the checks that run before any network call, and the packaging that
ships model_cards/ inside hf_mdm."""

import argparse
import json
import os
import re
from importlib import resources
from pathlib import Path

import huggingface_hub
import pytest
from huggingface_hub import ModelCard

from hf_mdm import hub
from hf_mdm.constants import travelling_files
from hf_mdm.hub import checkpoint_files, publish, write_model_card
from hf_mdm.remote_code import PACKAGE

from conftest import tiny_model


REPO_ROOT = Path(__file__).resolve().parents[1]
TOKENIZER_FILES = {"tokenizer.json", "tokenizer_config.json"}
MDM_FILES = {"config.json", "generation_config.json", "model.safetensors", "README.md",
             *travelling_files("mdm")} | TOKENIZER_FILES
AR_FILES = {"config.json", "generation_config.json", "model.safetensors", "README.md"} | TOKENIZER_FILES
TRAINING = {"command": "hf-mdm train --config run.yaml", "steps": 2000, "tokens_seen": 4_096_000,
            "hardware": "1x H100, 20 min", "validation_data": "5% of the documents, held out",
            "validation_nats_per_token": 3.25}
EVAL_ROW = {"dataset_name": "WikiText-103", "dataset_type": "Salesforce/wikitext", "dataset_config": "wikitext-103-raw-v1",
            "dataset_split": "test", "metric_type": "perplexity", "metric_name": "Perplexity bound", "metric_value": 31.25}


class RecordingApi:
    """Stands in for huggingface_hub.HfApi: records the calls publish makes and touches no network."""

    def __init__(self, existing=()):
        self.calls, self.existing = [], set(existing)

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))
        return f"https://huggingface.co/{repo_id}"

    def create_branch(self, repo_id, **kwargs):
        self.calls.append(("create_branch", repo_id, kwargs))

    def create_commit(self, repo_id, operations, **kwargs):
        self.calls.append(("create_commit", repo_id, {"operations": list(operations), **kwargs}))

    def repo_exists(self, repo_id, **kwargs):
        self.calls.append(("repo_exists", repo_id, kwargs))
        return repo_id in self.existing


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """A call that escapes the stand-in fails instead of reaching the Hub."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def word_tokenizer():
    """A 51-token word-level tokenizer matching conftest's tiny_config: [PAD] = 0, [MASK] = 50."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[PAD]", "<|endoftext|>", "[UNK]", "Once", "upon", "a", "time"] + [f"w{i}" for i in range(43)] + ["[MASK]"]
    backend = Tokenizer(models.WordLevel({word: i for i, word in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", eos_token="<|endoftext|>",
                                   unk_token="[UNK]", mask_token="[MASK]")


@pytest.fixture
def mdm_folder(tmp_path):
    folder = tmp_path / "tiny-mdm"
    tiny_model().save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture
def ar_folder(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path / "tiny-gpt2"
    config = GPT2Config(vocab_size=51, n_positions=64, n_embd=32, n_layer=1, n_head=2, bos_token_id=1, eos_token_id=1)
    GPT2LMHeadModel(config).save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    return folder


def write_card(folder, **overrides):
    fields = dict(title="Tiny MDM", summary="A test model.", datasets=["roneneldan/TinyStories"], training=TRAINING,
                  eval_results=[EVAL_ROW], tags=["tiny"], repo_id="someone/tiny")
    return write_model_card(folder, **{**fields, **overrides})


def uploaded(api: RecordingApi) -> dict[str, str]:
    """path_in_repo -> local file of the one commit publish made."""
    (commit,) = [call for call in api.calls if call[0] == "create_commit"]
    return {op.path_in_repo: op.path_or_fileobj for op in commit[2]["operations"]}


def test_mdm_publish_uploads_exactly_the_checkpoint(mdm_folder):
    write_card(mdm_folder)
    # junk that must stay home: caches, a stray temp file, training state
    (mdm_folder / "__pycache__").mkdir()
    (mdm_folder / "__pycache__" / "modeling_mdm.cpython-311.pyc").write_bytes(b"\0")
    (mdm_folder / ".README.md.abc.tmp").write_text("half a card")
    (mdm_folder / "checkpoints" / "step_00000010").mkdir(parents=True)
    (mdm_folder / "checkpoints" / "step_00000010" / "model.safetensors").write_bytes(b"\0")

    api = RecordingApi()
    files = publish(mdm_folder, "someone/tiny-mdm", api=api, private=False)

    assert set(files) == MDM_FILES
    assert [call[0] for call in api.calls] == ["create_repo", "create_commit"]
    assert api.calls[0] == ("create_repo", "someone/tiny-mdm", {"private": False, "exist_ok": True, "repo_type": "model"})
    commit = api.calls[1][2]
    assert commit["revision"] is None and commit["commit_message"]
    sources = uploaded(api)
    code = set(travelling_files("mdm"))
    # The remote code is the package's own files; config.json is the folder's, with today's auto_map.
    assert {name: sources[name] for name in code} == {name: str(PACKAGE / name) for name in code}
    assert json.loads(sources["config.json"]) == json.loads((mdm_folder / "config.json").read_text())
    assert {name: sources[name] for name in MDM_FILES - code - {"config.json"}} == \
        {name: str(mdm_folder / name) for name in MDM_FILES - code - {"config.json"}}
    auto_map = json.loads(sources["config.json"])["auto_map"]
    assert {ref.split(".")[0] + ".py" for ref in auto_map.values()} <= set(files)


def test_publish_writes_todays_remote_code_into_a_folder_without_it_or_with_an_older_copy(tmp_path):
    """The shipped folder holds no code (one copy, the package's); a folder saved by an earlier release holds its
    own copies under other names and an auto_map naming them. Either way the upload carries the package's remote
    code for its model type and a config.json whose auto_map names it."""
    import shutil

    from hf_mdm import pretrained_path

    legacy = REPO_ROOT / "tests" / "data" / "legacy" / "dream-like"
    for source, model_type in ((pretrained_path(), "mdm"), (legacy, "mdm_llama")):
        folder = tmp_path / source.name
        shutil.copytree(source, folder)
        if model_type == "mdm_llama":
            word_tokenizer().save_pretrained(folder)
            write_card(folder)
        api = RecordingApi()
        files = publish(folder, "someone/model", api=api, private=False)
        sources = uploaded(api)
        code = set(travelling_files(model_type))
        assert code <= set(files) and all(sources[name] == str(PACKAGE / name) for name in code)
        stale = {path.name for path in folder.glob("*.py")} - code  # an earlier release's file names, uploaded as
        assert stale <= set(files)                                  # they are: harmless, nothing names them
        auto_map = json.loads(sources["config.json"])["auto_map"]
        assert {ref.split(".")[0] + ".py" for ref in auto_map.values()} <= code


def test_mdm_card_metadata_and_body(mdm_folder):
    readme = write_card(mdm_folder)
    data = ModelCard.load(readme).data
    assert data.library_name == "transformers"
    assert data.pipeline_tag == "text-generation"
    assert data.license == "apache-2.0"
    assert data.datasets == ["roneneldan/TinyStories"]
    assert data.tags == ["hf_mdm", "masked-diffusion", "diffusion-lm", "tiny"]
    (result,) = data.eval_results
    assert result.metric_value == EVAL_ROW["metric_value"]
    assert (result.task_type, result.dataset_type, result.dataset_split) == ("text-generation", "Salesforce/wikitext", "test")
    assert data.to_dict()["model-index"][0]["name"] == "Tiny MDM"

    text = readme.read_text()
    assert 'AutoModel.from_pretrained("someone/tiny", trust_remote_code=True)' in text
    assert "AutoModelForCausalLM" not in text
    assert "NELBO on 5% of the documents, held out: 3.2500 nats/token, perplexity bound exp(NELBO) = 25.79" in text
    assert "- Tokens seen: 4,096,000" in text and "hf-mdm train --config run.yaml" in text
    assert "| WikiText-103 (wikitext-103-raw-v1) | test | Perplexity bound | 31.25 |" in text
    assert "arXiv:2409.02908" in text and "$" not in text  # every placeholder was filled


def test_ar_publish_and_card(ar_folder):
    write_card(ar_folder, title="Tiny GPT-2", training={"validation_nats_per_token": 2.0}, eval_results=[])
    api = RecordingApi()
    assert set(publish(ar_folder, "someone/tiny-gpt2", api=api, revision="v1", private=False)) == AR_FILES
    assert [call[0] for call in api.calls] == ["create_repo", "create_branch", "create_commit"]
    assert api.calls[2][2]["revision"] == "v1"

    card = ModelCard.load(ar_folder / "README.md")
    assert card.data.tags == ["hf_mdm", "tiny"] and card.data.eval_results is None
    assert 'AutoModelForCausalLM.from_pretrained("someone/tiny")' in card.text
    assert "trust_remote_code" not in card.text and "GPT2LMHeadModel" in card.text
    assert "Validation loss: 2.0000 nats/token, perplexity 7.39" in card.text
    assert "No evaluation results are reported" in card.text


@pytest.mark.parametrize("kind", ["mdm", "causal_lm"])
def test_card_usage_code_runs(kind, mdm_folder, ar_folder):
    """The card's Python block, pointed at the local folder, loads the model and samples: the usage code is right."""
    folder = mdm_folder if kind == "mdm" else ar_folder
    text = write_card(folder, repo_id=None).read_text()
    (code,) = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    exec(code.replace("path/to/this/folder", str(folder)), {"print": lambda *args: None})


def test_missing_readme_fails_before_any_call(mdm_folder):
    api = RecordingApi()
    with pytest.raises(ValueError, match=r"README\.md \(write it with hf_mdm\.hub\.write_model_card\)"):
        publish(mdm_folder, "someone/tiny-mdm", api=api, private=False)
    assert api.calls == []


@pytest.mark.parametrize("remove, message", [
    ("generation_config.json", r"generation_config\.json"),
    ("model.safetensors", r"weights \(\*\.safetensors\)"),
    ("tokenizer_files", r"tokenizer \(tokenizer\.json or tokenizer_config\.json"),
])
def test_incomplete_mdm_fails_before_any_call(mdm_folder, remove, message):
    write_card(mdm_folder)
    for name in TOKENIZER_FILES if remove == "tokenizer_files" else [remove]:
        (mdm_folder / name).unlink()
    api = RecordingApi()
    with pytest.raises(ValueError, match=message):
        publish(mdm_folder, "someone/tiny-mdm", api=api, private=False)
    assert api.calls == []


def test_card_without_metadata_fails_and_a_missing_auto_map_is_written(mdm_folder):
    write_card(mdm_folder)
    config = json.loads((mdm_folder / "config.json").read_text())
    del config["auto_map"]
    (mdm_folder / "config.json").write_text(json.dumps(config))
    api = RecordingApi()
    publish(mdm_folder, "someone/tiny-mdm", api=api, private=False)
    assert json.loads(uploaded(api)["config.json"])["auto_map"]["AutoModel"] == "modeling_mdm.MDMForMaskedDiffusion"
    (mdm_folder / "README.md").write_text("# A card without front matter\n")
    api = RecordingApi()
    with pytest.raises(ValueError, match=r"library_name, pipeline_tag, license in README"):
        publish(mdm_folder, "someone/tiny-mdm", api=api, private=False)
    assert api.calls == []


@pytest.mark.parametrize("repo_id", ["tiny-mdm", "a/b/c", "someone/", "/tiny", "someone/tiny mdm", "someone/a--b"])
def test_bad_repo_id_fails_before_any_call(mdm_folder, repo_id):
    write_card(mdm_folder)
    api = RecordingApi()
    with pytest.raises(ValueError, match="repo_id"):
        publish(mdm_folder, repo_id, api=api, private=False)
    assert api.calls == []


def test_run_folder_points_to_its_model(tmp_path, mdm_folder):
    (tmp_path / "run").mkdir()
    mdm_folder.rename(tmp_path / "run" / "model")
    with pytest.raises(ValueError, match=r"has no config\.json \(training writes the final checkpoint to .*model\)"):
        publish(tmp_path / "run", "someone/tiny-mdm", api=RecordingApi(), private=False)


def test_card_write_is_atomic(mdm_folder, monkeypatch):
    before = set(os.listdir(mdm_folder))
    readme = write_card(mdm_folder)
    write_card(mdm_folder, title="Tiny MDM, again")  # replaces the card
    assert set(os.listdir(mdm_folder)) == before | {"README.md"}
    assert "# Tiny MDM, again" in readme.read_text()

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(hub.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        write_card(mdm_folder, title="Never written")
    assert set(os.listdir(mdm_folder)) == before | {"README.md"}  # no temp file left behind
    assert "# Tiny MDM, again" in readme.read_text()  # the old card, whole


@pytest.mark.parametrize("overrides, field", [
    (dict(training={"steps": -1}), r"training\['steps'\]"),
    (dict(training={"steps": "2000"}), r"training\['steps'\]"),
    (dict(training={"tokens_seen": True}), r"training\['tokens_seen'\]"),
    (dict(training={"validation_nats_per_token": float("nan")}), r"training\['validation_nats_per_token'\]"),
    (dict(training={"lr": 1e-3}), r"unknown fields \['lr'\]"),
    (dict(eval_results=[{"dataset_name": "x", "dataset_type": "x", "metric_type": "x"}]), r"missing \['metric_value'\]"),
    (dict(eval_results=[{**EVAL_ROW, "metric_value": "31"}]), r"eval_results\[0\]\['metric_value'\]"),
    (dict(title=""), "title"),
    (dict(license=None), "license"),
    (dict(datasets=["ok", 3]), r"datasets\[1\]"),
])
def test_bad_card_input_names_the_field(mdm_folder, overrides, field):
    with pytest.raises(ValueError, match=field):
        write_card(mdm_folder, **overrides)
    assert not (mdm_folder / "README.md").exists()


def test_publish_command(mdm_folder, monkeypatch, capsys):
    from hf_mdm.cli import add_publish_parser
    from hf_mdm.console import run_command

    parser = argparse.ArgumentParser(prog="hf-mdm")
    add_publish_parser(parser.add_subparsers(dest="command", required=True))

    with pytest.raises(SystemExit) as exit_info:
        args = parser.parse_args(["publish", str(mdm_folder), "someone/tiny-mdm"])
        run_command("publish", args.func, args, debug=False)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert re.match(r"^hf-mdm publish: error: .*README\.md \(write it with", error) and error.count("\n") == 1

    write_card(mdm_folder)
    api = RecordingApi()
    monkeypatch.setattr(hub, "HfApi", lambda token=None: api)
    args = parser.parse_args(["publish", str(mdm_folder), "someone/tiny-mdm", "--private", "--commit-message", "v0"])
    args.func(args)
    assert api.calls[0][2]["private"] is True and api.calls[1][2]["commit_message"] == "v0"
    assert capsys.readouterr().out.endswith(f"uploaded {len(MDM_FILES)} files to https://huggingface.co/someone/tiny-mdm\n")

    args = parser.parse_args(["publish", str(mdm_folder), "someone/tiny-mdm", "--dry-run"])
    args.func(args)
    assert len(api.calls) == 2  # the dry run made no call
    assert "would upload" in capsys.readouterr().out


def test_publish_never_makes_a_repo_public_unasked(mdm_folder, monkeypatch, capsys):
    from hf_mdm.cli import add_publish_parser

    write_card(mdm_folder)
    api = RecordingApi()
    with pytest.raises(ValueError, match=r"someone/tiny-mdm does not exist on the Hub: say whether .*--private or --public"):
        publish(mdm_folder, "someone/tiny-mdm", api=api)
    assert [call[0] for call in api.calls] == ["repo_exists"]  # nothing created, nothing uploaded

    api = RecordingApi(existing={"someone/tiny-mdm"})  # an existing repo keeps its visibility: no flag needed
    publish(mdm_folder, "someone/tiny-mdm", api=api)
    assert [call[0] for call in api.calls] == ["repo_exists", "create_commit"]

    parser = argparse.ArgumentParser(prog="hf-mdm")
    add_publish_parser(parser.add_subparsers(dest="command", required=True))
    for flags, private in (([], None), (["--public"], False), (["--private"], True)):
        assert parser.parse_args(["publish", str(mdm_folder), "someone/tiny-mdm", *flags]).private is private
    with pytest.raises(SystemExit):
        parser.parse_args(["publish", str(mdm_folder), "someone/tiny-mdm", "--public", "--private"])
    assert "not allowed with argument" in capsys.readouterr().err
    api = RecordingApi()
    monkeypatch.setattr(hub, "HfApi", lambda token=None: api)
    args = parser.parse_args(["publish", str(mdm_folder), "someone/tiny-mdm", "--public"])
    args.func(args)
    assert api.calls[0] == ("create_repo", "someone/tiny-mdm", {"private": False, "exist_ok": True, "repo_type": "model"})


def test_publish_refuses_links_out_of_the_folder(mdm_folder, tmp_path):
    write_card(mdm_folder)
    secret = tmp_path / "secret.txt"
    secret.write_text("a token")
    (mdm_folder / "notes.txt").symlink_to(secret)
    api = RecordingApi()
    with pytest.raises(ValueError, match=r"notes\.txt is a symbolic link to .*secret\.txt, outside"):
        publish(mdm_folder, "someone/tiny-mdm", api=api, private=False)
    assert api.calls == []
    (mdm_folder / "notes.txt").unlink()
    (mdm_folder / "elsewhere").symlink_to(tmp_path, target_is_directory=True)  # a folder outside: refused too
    with pytest.raises(ValueError, match=r"elsewhere is a symbolic link"):
        checkpoint_files(mdm_folder)
    (mdm_folder / "elsewhere").unlink()
    (mdm_folder / "card.md").symlink_to(mdm_folder / "README.md")  # a link inside the folder is its file
    assert "card.md" in checkpoint_files(mdm_folder)


def test_a_dry_run_touches_no_network(mdm_folder, monkeypatch, capsys):
    import socket

    import hf_mdm.cli
    import hf_mdm_cli

    write_card(mdm_folder)
    touched = []
    monkeypatch.setattr(socket, "create_connection", lambda *args, **kwargs: touched.append(args))
    monkeypatch.setattr(socket, "getaddrinfo", lambda *args, **kwargs: touched.append(args))
    monkeypatch.setattr(hub, "HfApi", lambda token=None: touched.append("HfApi"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hf_mdm.cli, "main", lambda argv, parser: hf_mdm.cli.run_publish(
        argparse.Namespace(path=argv[1], repo_id=argv[2], dry_run=True, revision=None)))
    hf_mdm_cli.main(["publish", str(mdm_folder), "someone/tiny-mdm", "--dry-run"])
    assert touched == [] and os.environ["HF_HUB_OFFLINE"] == "1"
    assert capsys.readouterr().out.endswith(f"would upload {len(MDM_FILES)} files to "
                                            "https://huggingface.co/someone/tiny-mdm\n")


def test_template_ships_inside_the_package():
    """model_cards/ is mapped onto hf_mdm.model_cards; setuptools cannot add a mapped package to packages.find, so
    pyproject.toml lists the packages, and this test catches a new package missing from that list."""
    tomllib = pytest.importorskip("tomllib")
    from setuptools import find_namespace_packages

    setuptools_table = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setuptools_table["package-dir"]["hf_mdm.model_cards"] == "model_cards"
    # Folders whose names are not identifiers (the shipped checkpoints, e.g. pretrained/shakespeare-mdm) are data.
    importable = {name for name in find_namespace_packages(REPO_ROOT / "src")
                  if all(part.isidentifier() for part in name.split("."))}
    assert set(setuptools_table["packages"]) == importable | {"hf_mdm.model_cards"}
    assert setuptools_table["package-data"]["hf_mdm.model_cards"] == ["*.md"]
    shipped = resources.files("hf_mdm.model_cards")
    for name in ("template.md", "usage_mdm.md", "usage_causal_lm.md", "limitations_mdm.md", "limitations_causal_lm.md"):
        assert shipped.joinpath(name).read_text() == (REPO_ROOT / "model_cards" / name).read_text()
