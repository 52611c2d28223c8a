"""examples/reproduce_paper.py without running it: merging parts into one table, seed parts, and the part locks.

The parts used here are copies of the committed ones under results/paper/parts/, so the merge sees real rows.
"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]
COMMITTED_PARTS = ROOT / "results" / "paper" / "parts"


@pytest.fixture(scope="module")
def reproduce_paper():
    spec = importlib.util.spec_from_file_location("reproduce_paper", ROOT / "examples" / "reproduce_paper.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def copy_part(name: str, output: Path, as_name: str | None = None, seed: int | None = None) -> None:
    target = output / "parts" / (as_name or name)
    shutil.copytree(COMMITTED_PARTS / name, target)
    if seed is not None:
        results = json.loads((target / "results.json").read_text())
        results["seed"] = seed
        (target / "results.json").write_text(json.dumps(results))


def test_merge_orders_rows_marks_seed_parts_and_names_missing_parts(reproduce_paper, tmp_path):
    output = tmp_path / "paper"
    copy_part("fhs", output)
    copy_part("ancestral-L-float64", output)
    copy_part("fhs", output, as_name="fhs-float64-seed1", seed=1)

    missing = reproduce_paper.merge(output)

    assert set(missing) == {part.name for part in reproduce_paper.PARTS} - {"fhs", "ancestral-L-float64"}
    rows = json.loads((output / "results.json").read_text())["rows"]
    labels = [row["label"] for row in rows]
    assert labels[:2] == ["reference texts", "ancestral_cache 256 steps float64"]  # one reference row, then ancestral
    assert labels.count("reference texts") == 1
    assert {"FHS k=1 float64", "FHS k=1 float64 seed 1", "FHS k=1 float32 seed 1"} <= set(labels)
    table = (output / "results.md").read_text()
    assert "NOT RUN (yet): ancestral-16L-float64" in table
    assert "Rows marked 'seed N' were drawn again with seed N" in table and "all others with seed 0" in table
    samples = [json.loads(line) for line in (output / "samples.jsonl").read_text().splitlines()]
    sample_labels = {sample["label"] for sample in samples}
    assert sample_labels == set(labels) - {"reference texts"}  # samples and rows still match by label
    assert sum(sample["label"] == "FHS k=1 float64 seed 1" for sample in samples) == 32
    assert (output / "plot.png").stat().st_size > 10_000


def test_the_committed_table_is_the_merge_of_the_committed_parts(reproduce_paper, tmp_path):
    """results/paper/results.md is exactly what merge() makes of results/paper/parts/: nothing was edited by hand."""
    output = tmp_path / "paper"
    shutil.copytree(COMMITTED_PARTS, output / "parts", ignore=shutil.ignore_patterns("*.log", "*.lock"))
    assert reproduce_paper.merge(output) == []
    assert (output / "results.md").read_text() == (ROOT / "results" / "paper" / "results.md").read_text()
    assert (output / "samples.jsonl").read_text() == (ROOT / "results" / "paper" / "samples.jsonl").read_text()


def test_a_part_lock_is_taken_over_only_from_a_dead_process(reproduce_paper, tmp_path):
    lock = tmp_path / "part.lock"
    assert reproduce_paper.claim(lock) and lock.read_text() == str(os.getpid())
    assert not reproduce_paper.claim(lock)  # held by a live process (this one)
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock.write_text(finished.stdout.strip())  # the PID of a process that has exited
    assert reproduce_paper.claim(lock) and lock.read_text() == str(os.getpid())


def test_fhs_seed_parts_are_found_by_folder_name(reproduce_paper, tmp_path):
    (tmp_path / "parts" / "fhs-float64-seed7").mkdir(parents=True)
    (tmp_path / "parts" / "fhs-float64-seedling").mkdir()  # not a seed part
    (tmp_path / "parts" / "fhs-float64-seed3.log").write_text("")
    parts = reproduce_paper.finished_seed_parts(tmp_path)
    assert [(part.name, part.seed) for part in parts] == [("fhs-float64-seed7", 7)]
    assert parts[0].settings == ("sampler=first_hitting,sampling_dtype=float64",)
