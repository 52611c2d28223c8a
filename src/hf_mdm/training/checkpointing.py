"""Checkpoints that survive a kill at any moment, and the guard against mixing two runs in one directory.

Layout of an output directory:

    run_config.json              the settings of the run (written once, checked on every start)
    log.jsonl                    one JSON line per logged step
    tokenizer/                   the tokenizer the run uses
    checkpoints/step_00000100/   Accelerate `save_state` folders, plus training_state.json
    model/                       the final hub-ready `save_pretrained` folder, with the tokenizer

A checkpoint is written into `checkpoints/.tmp-step_XXXXXXXX`, and only when every process has finished writing is
it renamed to `step_XXXXXXXX` (an atomic rename). Older checkpoints are deleted only after that, so a kill in the
middle of a write leaves the previous checkpoint in place; a leftover temp folder is ignored and later removed.
"""

import json
import re
import shutil
from pathlib import Path


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
    (folder / STATE_FILE).write_text(json.dumps({"step": step}))


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
        if final.exists():  # the same step saved again after a resume: the new write replaces it
            shutil.rmtree(final)
        temp.rename(final)  # atomic: the checkpoint exists whole or not at all
        for old in complete_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, folder: Path) -> int:
    """Restores the state saved in `folder` (see `save_checkpoint`) and returns its step."""
    accelerator.load_state(str(folder))
    return json.loads((folder / STATE_FILE).read_text())["step"]


def remove_temp_checkpoints(output_dir: str | Path) -> None:
    """Deletes what interrupted checkpoint writes left behind (main process only)."""
    root = Path(output_dir) / CHECKPOINTS
    if root.is_dir():
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
    saved = json.loads(saved_file.read_text())
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
    (output_dir / RUN_CONFIG_FILE).write_text(json.dumps(run_config, indent=2, sort_keys=True))
