"""Faults a careless or hostile user meets: every write is atomic and one process owns a folder (converters and
training), and nothing in a checkpoint folder runs code."""

import json
import os
import shutil

import pytest
import torch

from hf_mdm import files
from hf_mdm.convert import ConversionError, convert_mdlm
from hf_mdm.files import FolderLock, recover_folder, replace_folder, staged_folder, write_atomically
from hf_mdm.training import train
from hf_mdm.training.checkpointing import latest_checkpoint
from hf_mdm.training.loop import InputError

from mdlm_reference import random_reference, save_hub_layout
from training_scripts.common import one_thread_and_fresh_accelerate_state  # noqa: F401 (autouse fixture)
from training_scripts.common import tiny_run, write_corpus


# ---------------------------------------------------------------------------------------------------- files


def test_a_failed_write_leaves_the_old_file_whole(tmp_path, monkeypatch):
    path = tmp_path / "run_config.json"
    write_atomically(path, '{"old": 1}')
    monkeypatch.setattr(files.os, "replace", lambda *a: (_ for _ in ()).throw(OSError("killed")))
    with pytest.raises(OSError, match="killed"):
        write_atomically(path, '{"new": 2}')
    assert json.loads(path.read_text()) == {"old": 1} and sorted(p.name for p in tmp_path.iterdir()) == [path.name]


@pytest.mark.parametrize("exchange", [True, False], ids=["atomic exchange", "two renames"])
def test_replacing_a_folder_never_leaves_it_absent(tmp_path, monkeypatch, exchange):
    dst, new = tmp_path / "dst", tmp_path / ".dst.partial-x"
    dst.mkdir(), new.mkdir()
    (dst / "a").write_text("old"), (new / "a").write_text("new")
    if not exchange:
        monkeypatch.setattr(files, "_exchange", lambda first, second: False)
    replace_folder(new, dst)
    assert (dst / "a").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["dst"]

    # Killed between the two renames of the fallback: the old folder was set aside; recovery puts it back.
    new.mkdir()
    monkeypatch.setattr(files, "_exchange", lambda first, second: False)
    original_rename = type(dst).rename

    def rename(self, target):
        if self == new:
            raise KeyboardInterrupt("killed between the renames")
        return original_rename(self, target)

    monkeypatch.setattr(type(dst), "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        replace_folder(new, dst)
    monkeypatch.undo()
    assert not dst.exists()
    recover_folder(dst)
    assert (dst / "a").read_text() == "new"


def test_a_folder_lock_is_exclusive_and_released_when_its_holder_ends(tmp_path):
    with FolderLock(tmp_path / "dst", "conversion"):
        with pytest.raises(ValueError, match=r"dst is in use by .*\"pid\": " + str(os.getpid())):
            with FolderLock(tmp_path / "dst", "conversion"):
                pass
    with FolderLock(tmp_path / "dst"):
        pass
    assert not list(tmp_path.iterdir())  # the lock file goes with the lock


def test_staged_folder_clears_what_killed_writers_left_and_refuses_a_full_destination(tmp_path):
    dst = tmp_path / "dst"
    stale = tmp_path / ".dst.partial-killed"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\0" * 1000)
    with staged_folder(dst, overwrite=False) as staging:
        (staging / "config.json").write_text("{}")
    assert not stale.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["dst"]
    with pytest.raises(ValueError, match="exists and is not empty"):
        with staged_folder(dst, overwrite=False):
            pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst"]


# ---------------------------------------------------------------------------------------------------- converters


def hub_folder(tmp_path):
    """A tiny MDLM checkpoint in its Hub layout."""
    return save_hub_layout(random_reference(seed=8, vocab_size=52), tmp_path / "src")


def test_convert_mdlm_stages_and_never_writes_through_symlinks(tmp_path):
    source = hub_folder(tmp_path)
    dst = tmp_path / "dst"
    outside = tmp_path / "outside.json"
    outside.write_text("precious")
    dst.mkdir()
    (dst / "config.json").symlink_to(outside)  # an --overwrite must replace the folder, not write through its links
    convert_mdlm(source, dst, overwrite=True)
    assert outside.read_text() == "precious"
    assert not (dst / "config.json").is_symlink() and json.loads((dst / "config.json").read_text())["model_type"] == "mdm"

    # A failure while writing leaves the old destination whole and no staging folder.
    before = {p.name: p.read_bytes() for p in dst.iterdir() if p.is_file()}
    from hf_mdm.convert import mdlm

    original = mdlm.write_card
    mdlm.write_card = lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt("killed"))
    try:
        with pytest.raises(KeyboardInterrupt):
            convert_mdlm(source, dst, overwrite=True)
    finally:
        mdlm.write_card = original
    assert {p.name: p.read_bytes() for p in dst.iterdir() if p.is_file()} == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".dst.")]


def test_one_conversion_at_a_time_and_no_silent_replacement(tmp_path):
    source = hub_folder(tmp_path)
    dst = tmp_path / "dst"
    with FolderLock(dst, "conversion"):
        with pytest.raises(ConversionError, match="in use by"):
            convert_mdlm(source, dst)
    convert_mdlm(source, dst)
    with pytest.raises(ConversionError, match="exists and is not empty"):
        convert_mdlm(source, dst)


# ---------------------------------------------------------------------------------------------------- training


@pytest.fixture
def corpus(tmp_path):
    return write_corpus(tmp_path)


def test_one_run_owns_its_output_dir_and_a_failed_start_removes_only_its_own_files(corpus, tmp_path):
    run = tmp_path / "run"
    with FolderLock(run, "training run"):
        with pytest.raises(InputError, match="in use by"):
            train(tiny_run(corpus, run, max_steps=2))
    assert not run.exists()
    train(tiny_run(corpus, run, max_steps=2))
    before = sorted(str(p.relative_to(run)) for p in run.rglob("*"))
    with pytest.raises(InputError, match="eval-blocks"):  # a bad start on a run's folder removes nothing
        train(tiny_run(corpus, run, max_steps=4, resume=True, eval_blocks=0))
    assert sorted(str(p.relative_to(run)) for p in run.rglob("*")) == before


def test_a_resume_survives_a_kill_in_the_final_resave(corpus, tmp_path, monkeypatch):
    """A resumed run saves its final step again: killed while swapping the new copy in, the checkpoint is whole
    (EMA state included) and the run resumes."""
    run = tmp_path / "run"
    train(tiny_run(corpus, run, max_steps=4, save_every=2, ema_decay=0.9))
    monkeypatch.setattr(files, "_exchange", lambda first, second: False)
    original_rename = type(run).rename

    def rename(self, target):
        if self.name.startswith(".tmp-step_00000004"):
            raise KeyboardInterrupt("killed")
        return original_rename(self, target)

    monkeypatch.setattr(type(run), "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_run(corpus, run, max_steps=4, save_every=2, ema_decay=0.9, resume=True))
    monkeypatch.undo()
    result = train(tiny_run(corpus, run, max_steps=6, save_every=2, ema_decay=0.9, resume=True))
    assert result["step"] == 6 and (latest_checkpoint(run) / "custom_checkpoint_0.pkl").is_file()


class CodeRunningPayload:
    """Unpickling it runs a shell command (torch.load(weights_only=False) would)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("name", ["optimizer.bin", "scheduler.bin", "random_states_0.pkl", "custom_checkpoint_0.pkl"])
def test_a_planted_pickle_in_any_piece_of_state_is_refused_and_never_run(corpus, tmp_path, name, capsys):
    run = tmp_path / "run"
    train(tiny_run(corpus, run, max_steps=2, save_every=1, ema_decay=0.9))
    checkpoint = latest_checkpoint(run)
    marker = tmp_path / "pwned"
    torch.save(CodeRunningPayload(marker), checkpoint / name)
    with pytest.raises(ValueError, match=rf"{name}.*refused"):
        train(tiny_run(corpus, run, max_steps=4, save_every=1, ema_decay=0.9, resume=True))
    assert not marker.exists()


def test_a_custom_state_file_the_run_did_not_write_is_refused(corpus, tmp_path):
    run = tmp_path / "run"
    train(tiny_run(corpus, run, max_steps=2, save_every=1))  # no EMA: no custom state
    shutil.copy(__file__, latest_checkpoint(run) / "custom_checkpoint_0.pkl")
    with pytest.raises(ValueError, match=r"custom_checkpoint_0.pkl does not belong to this run's state"):
        train(tiny_run(corpus, run, max_steps=4, save_every=1, resume=True))


def _allocating_payload(path, pickled: bytes) -> None:
    """A torch.save archive at `path` whose pickle is `pickled`: a few bytes asking for gigabytes."""
    import zipfile

    torch.save({"x": torch.zeros(1)}, path)
    with zipfile.ZipFile(path) as archive:
        records = {record.filename: archive.read(record) for record in archive.infolist()}
    with zipfile.ZipFile(path, "w") as archive:
        for name, content in records.items():
            archive.writestr(name, pickled if name.endswith("data.pkl") else content)


@pytest.mark.parametrize("name, pickled, message", [
    ("optimizer.bin", b"\x80\x02cbuiltins\nbytearray\nJ\x00\x00\x00\x40\x85R.", r"calls builtins\.bytearray, which allocate"),
    ("random_states_0.pkl", b"\x80\x02cnumpy._core.multiarray\n_reconstruct\ncnumpy\nndarray\nJ\x00\x00\x00\x40\x85"
                            b"X\x01\x00\x00\x00b\x87R.", r"a numpy array made with shape \(1073741824,\)"),
])
def test_a_state_file_asking_for_gigabytes_is_refused(corpus, tmp_path, name, pickled, message):
    run = tmp_path / "run"
    train(tiny_run(corpus, run, max_steps=2, save_every=1))
    _allocating_payload(latest_checkpoint(run) / name, pickled)
    with pytest.raises(ValueError, match=rf"{name} is not plain tensor data \(.*{message}.*refused"):
        train(tiny_run(corpus, run, max_steps=4, save_every=1, resume=True))
