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


def test_merge_pools_seeds_into_one_row_per_setting_and_names_missing_parts(reproduce_paper, tmp_path):
    output = tmp_path / "paper"
    copy_part("fhs", output)
    copy_part("ancestral-L-float64", output)
    copy_part("fhs", output, as_name="fhs-seed1", seed=1)  # the same samples again, as if drawn with seed 1

    missing = reproduce_paper.merge(output, seeds=3, main_seed=0)

    all_names = {part.name for part in reproduce_paper.all_parts(3, 0)}
    assert set(missing) == all_names - {"fhs", "ancestral-L-float64", "fhs-seed1"}
    results = json.loads((output / "results.json").read_text())
    rows = {row["label"]: row for row in results["rows"]}
    assert list(rows)[:2] == ["reference texts", "ancestral_cache 256 steps float64"]  # one reference row, then ancestral
    fhs = rows["FHS k=1 float64"]
    assert fhs["seeds"] == [0, 1] and fhs["num_samples"] == 64
    assert fhs["token_entropy_spread"] == 0  # two copies of one run: no spread, and the ANOVA sees no difference
    assert fhs["seeds_anova_p"]["text_entropy"] == pytest.approx(1.0)
    assert rows["ancestral_cache 256 steps float64"]["seeds"] == [0]
    assert rows["ancestral_cache 256 steps float64"]["token_entropy_spread"] is None
    assert rows["FHS k=1 float32"]["float64_partner"] == "FHS k=1 float64"
    assert 0 < rows["FHS k=1 float32"]["welch_p_vs_float64"]["text_entropy"] < 1
    assert len(results["runs"]) == 1 + 2 * 2 + 1  # reference, FHS float32 and float64 twice, ancestral once
    table = (output / "results.md").read_text()
    assert "NOT RUN (yet): ancestral-16L-float64" in table
    assert "| FHS k=1 float64 | 2 × 32 |" in table and "seeds 0..2" in table
    samples = [json.loads(line) for line in (output / "samples.jsonl").read_text().splitlines()]
    assert {sample["label"] for sample in samples} == set(rows) - {"reference texts"}  # samples and rows match
    assert sum(sample["label"] == "FHS k=1 float64" and sample["seed"] == 1 for sample in samples) == 32
    assert (output / "plot.png").stat().st_size > 10_000


def test_precision_tests_tell_a_shift_from_noise(reproduce_paper):
    """Welch p is small for float32 entropies shifted by 0.1 nats (7 standard errors at 96 samples a side), not for unshifted ones."""
    import random

    random.seed(0)
    def row(dtype, label):
        return dict(kind="mdm", label=label, seeds=[0], setting=dict(sampler="ancestral", steps=256, sampling_dtype=dtype))

    def draws(shift):
        return [dict(text_entropy=random.gauss(4.5 + shift, 0.1), gen_ppl=50.0) for _ in range(96)]

    for shift, small in ((0.1, True), (0.0, False)):
        rows = [row("float32", "a32"), row("float64", "a64")]
        samples = {("mdm", "a32", 0): draws(shift), ("mdm", "a64", 0): draws(0.0)}
        reproduce_paper.add_precision_tests(rows, samples)
        p = rows[0]["welch_p_vs_float64"]["text_entropy"]
        assert (p < 1e-6) if small else (p > 0.05), (shift, p)
        assert "welch_p_vs_float64" not in rows[1]  # the float64 row is the reference, not tested against itself


def test_the_committed_table_is_the_merge_of_the_committed_parts(reproduce_paper, tmp_path):
    """results/paper/results.md is exactly what merge() makes of results/paper/parts/: nothing was edited by hand."""
    output = tmp_path / "paper"
    shutil.copytree(COMMITTED_PARTS, output / "parts", ignore=shutil.ignore_patterns("*.log", "*.lock"))
    reproduce_paper.merge(output)
    assert (output / "results.md").read_text() == (ROOT / "results" / "paper" / "results.md").read_text()
    assert (output / "samples.jsonl").read_text() == (ROOT / "results" / "paper" / "samples.jsonl").read_text()


def test_a_part_lock_is_taken_over_only_from_a_dead_process(reproduce_paper, tmp_path):
    lock = tmp_path / "part.lock"
    assert reproduce_paper.claim(lock) and lock.read_text() == str(os.getpid())
    assert not reproduce_paper.claim(lock)  # held by a live process (this one)
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock.write_text(finished.stdout.strip())  # the PID of a process that has exited
    assert reproduce_paper.claim(lock) and lock.read_text() == str(os.getpid())


def test_the_main_seed_keeps_the_plain_part_names_and_seeds_run_longest_first(reproduce_paper):
    parts = reproduce_paper.all_parts(3, 0)
    assert [(part.name, part.seed) for part in parts[:3]] == [
        ("ancestral-16L-float64", None), ("ancestral-16L-float64-seed1", 1), ("ancestral-16L-float64-seed2", 2)]
    assert len(parts) == 3 * len(reproduce_paper.PARTS)
    assert parts[1].settings == parts[0].settings
    assert [part.name for part in reproduce_paper.all_parts(2, 5)][:2] == ["ancestral-16L-float64",
                                                                        "ancestral-16L-float64-seed6"]
