"""Checkpoints that survive a kill at any moment, and the guard against mixing two runs in one directory.

Layout of an output directory:

    run_config.json              the settings of the run (written once, checked on every start)
    log.jsonl                    one JSON line per logged step
    tokenizer/                   the tokenizer the run uses
    checkpoints/step_00000100/   Accelerate `save_state` folders, plus training_state.json
    model/                       the final hub-ready `save_pretrained` folder, with the tokenizer

A checkpoint is written into `checkpoints/.tmp-step_XXXXXXXX`, and only when every process has finished writing is
it renamed to `step_XXXXXXXX` (an atomic rename; a checkpoint of the same step saved again after a resume is
swapped in, `files.replace_folder`). Older checkpoints are deleted only after that, so a kill in the middle of a write
leaves the previous checkpoint in place; a leftover temp folder is ignored and later removed. Every file outside
Accelerate's folders is written to a temporary name and renamed.

Loading runs no code from the folder: every pickled piece of state (optimizer, scheduler, random states, the EMA) is
read with `torch.load(weights_only=True)`, Accelerate's custom-state loader included, and a file that needs more is
refused with one line naming it.
"""

import contextlib
import json
import pickle
import re
import shutil
from pathlib import Path

import torch

from ..convert.safe_load import check_memory_bounds
from ..files import recover_folder, replace_folder, write_atomically


CHECKPOINTS = "checkpoints"
TEMP_PREFIX = ".tmp-"
STATE_FILE = "training_state.json"
RUN_CONFIG_FILE = "run_config.json"
CHECKPOINT_NAME = re.compile(r"^step_(\d{8})$")


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Finished checkpoints, oldest first (a folder counts once renamed and holding its training_state.json)."""
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if CHECKPOINT_NAME.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(CHECKPOINT_NAME.match(p.name).group(1)))


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    checkpoints = complete_checkpoints(output_dir)
    return checkpoints[-1] if checkpoints else None


def write_training_state(folder: Path, step: int) -> None:
    write_atomically(folder / STATE_FILE, json.dumps({"step": step}))


def save_checkpoint(accelerator, output_dir: str | Path, step: int, keep: int) -> Path:
    """Writes the full training state (model, optimizer, scheduler, RNGs, registered objects) of step `step`.

    Every process calls this. Returns the folder of the new checkpoint.
    """
    root = Path(output_dir) / CHECKPOINTS
    temp, final = root / f"{TEMP_PREFIX}{checkpoint_name(step)}", root / checkpoint_name(step)
    if accelerator.is_main_process:
        shutil.rmtree(temp, ignore_errors=True)
        temp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temp))
    accelerator.wait_for_everyone()  # every process has written its part (its RNG state, its shards)
    if accelerator.is_main_process:
        write_training_state(temp, step)
        replace_folder(temp, final)  # atomic: the checkpoint exists whole or not at all (or the old one, whole)
        for old in complete_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


class UnsafeStateError(ValueError):
    """A checkpoint file that loading with weights_only=True refuses (it would run code, or is not plain data)."""


def _state_globals() -> list:
    """What Accelerate's random states need beyond plain tensors (numpy arrays, their dtypes), with numpy's array
    constructor bounded: numpy pickles an array as an empty one (shape (0,)) that its state then fills, so any
    other shape would be a file asking for memory."""
    import codecs

    import numpy

    core = getattr(numpy, "_core", None) or numpy.core
    reconstruct = core.multiarray._reconstruct

    def empty_array_only(cls, shape, dtype):
        if cls is not numpy.ndarray or shape != (0,):
            raise pickle.UnpicklingError(f"a numpy array made with shape {shape!r}; numpy pickles arrays with shape "
                                         "(0,), filled by their state")
        return reconstruct(cls, shape, dtype)

    allowed = [(empty_array_only, f"{module}.multiarray._reconstruct") for module in ("numpy._core", "numpy.core")]
    allowed += [numpy.ndarray, numpy.dtype, codecs.encode]
    return allowed + [type(numpy.dtype(name)) for name in ("uint32", "int64", "float64", "uint8")]


@contextlib.contextmanager
def weights_only_state_loading():
    """Within it, every file Accelerate's load_state reads goes through torch.load(weights_only=True) after
    `check_memory_bounds`, its custom state loader too (which asks for weights_only=False); a refused file raises
    UnsafeStateError naming it when the block ends (Accelerate itself swallows errors while reading random
    states)."""
    import accelerate.checkpointing as accelerate_checkpointing

    original, refused, allowed = accelerate_checkpointing.load, [], _state_globals()

    def load(f, map_location=None, **unused):
        try:
            check_memory_bounds(f, allowed)
            with torch.serialization.safe_globals(allowed):
                return torch.load(f, map_location=map_location, weights_only=True)
        except (pickle.UnpicklingError, ValueError) as error:
            refused.append(UnsafeStateError(
                f"{f} is not plain tensor data ({str(error).splitlines()[0]}): the checkpoint is refused, nothing in "
                "it was run."))
            raise refused[-1] from None

    accelerate_checkpointing.load = load
    try:
        yield
    except UnsafeStateError:
        raise
    finally:
        accelerate_checkpointing.load = original
    if refused:
        raise refused[0]


def load_checkpoint(accelerator, folder: Path) -> int:
    """Restores the state saved in `folder` (see `save_checkpoint`) and returns its step. Runs no code from it."""
    registered = len(accelerator._custom_objects)
    custom = sorted(folder.glob("custom_checkpoint_*.pkl"))
    if len(custom) != registered:
        raise UnsafeStateError(f"{custom[-1] if custom else folder} does not belong to this run's state (it saves "
                               f"{registered} custom state file(s), the folder holds {len(custom)}): refused.")
    with weights_only_state_loading():
        accelerator.load_state(str(folder))
    return json.loads((folder / STATE_FILE).read_text())["step"]


def remove_temp_checkpoints(output_dir: str | Path) -> None:
    """Repairs what interrupted checkpoint writes left behind (main process only): a checkpoint set aside by a swap
    goes back in place, temp folders are deleted."""
    root = Path(output_dir) / CHECKPOINTS
    if root.is_dir():
        for aside in root.glob(".step_*.old"):
            recover_folder(root / aside.name[1 : -len(".old")])
        for temp in root.glob(f"{TEMP_PREFIX}*"):
            shutil.rmtree(temp, ignore_errors=True)


def check_output_dir(output_dir: str | Path, run_config: dict, may_change: set[str], resume: bool) -> None:
    """Raises ValueError if `output_dir` holds something other than this run, or this run without `resume`.

    `run_config` is the JSON-ready settings of the run; the keys in `may_change` (how long to train, how often to
    log and save) may differ from the run that made the directory.
    """
    output_dir = Path(output_dir)
    if not output_dir.exists() or not any(output_dir.iterdir()):
        return
    saved_file = output_dir / RUN_CONFIG_FILE
    if not saved_file.is_file():
        raise ValueError(
            f"--output-dir {str(output_dir)!r} is not empty and holds no {RUN_CONFIG_FILE}: it is not an hf_mdm "
            "training run. Choose an empty or new directory."
        )
    try:
        saved = json.loads(saved_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{saved_file} is not valid JSON ({error}): restore it, or choose another directory.") from None
    differing = sorted(k for k in set(saved) | set(run_config) if k not in may_change and saved.get(k) != run_config.get(k))
    if differing:
        details = ", ".join(f"{k}: {saved.get(k)!r} there, {run_config.get(k)!r} now" for k in differing)
        raise ValueError(f"--output-dir {str(output_dir)!r} holds a different run ({details}). Choose another directory.")
    if not resume and (complete_checkpoints(output_dir) or (output_dir / "model").exists()):
        raise ValueError(
            f"--output-dir {str(output_dir)!r} already holds this run's checkpoints. Pass --resume to continue it, "
            "or choose another directory."
        )


def write_run_config(output_dir: str | Path, run_config: dict) -> None:
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    write_atomically(output_dir / RUN_CONFIG_FILE, json.dumps(run_config, indent=2, sort_keys=True))
