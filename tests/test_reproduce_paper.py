"""examples/reproduce_paper.py without running it: parts per seed, merging them into one table with each row's mean
and spread over seeds and its tests (float32 against float64, between seeds), and the part locks.

The merge tests build small parts with known per-sample values; one test checks that the committed table is the
merge of the committed parts under results/paper/parts/.
"""

import importlib.util
import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from scipy import stats

from hf_mdm.evaluation.sweep import parse_setting


ROOT = Path(__file__).resolve().parents[1]
COMMITTED_PARTS = ROOT / "results" / "paper" / "parts"


@pytest.fixture(scope="module")
def reproduce_paper():
    spec = importlib.util.spec_from_file_location("reproduce_paper", ROOT / "examples" / "reproduce_paper.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_part(output: Path, part, samples_per_row: int = 8, shift: float = 0.0) -> dict:
    """A finished part as `hf-mdm evaluate --save-samples` leaves it, with random per-sample figures (float32 rows
    get entropy lower by `shift`). Returns {label: per-sample entropies}."""
    rng = random.Random(f"{part.name}")
    folder = output / "parts" / part.name
    folder.mkdir(parents=True)
    rows = [dict(kind="reference", label="reference texts", setting=None, num_samples=256, nfe_per_sample=None,
                 seconds=None, generative_perplexity=57.0, gen_ppl_excluded=0, token_entropy=4.5, mauve=None)]
    labelled = [("mdm", parse_setting(text).label, parse_setting(text).generation_kwargs()) for text in part.settings]
    labelled += [("ar", f"T={float(t):g}", {"temperature": float(t)}) for t in part.ar_temperatures]
    samples, entropies = [], {}
    for kind, label, setting in labelled:
        low = shift if setting.get("sampling_dtype") == "float32" else 0.0
        mine = [dict(kind=kind, label=label, text=f"{label} {i}", gen_ppl=math.exp(rng.gauss(4.0, 0.2)),
                     token_entropy=rng.gauss(4.5 - low, 0.1)) for i in range(samples_per_row)]
        samples += mine
        entropies[label] = [s["token_entropy"] for s in mine]
        rows.append(dict(kind=kind, label=label, setting=setting, num_samples=samples_per_row, nfe_per_sample=256.0,
                         seconds=10.0 + part.seed, generative_perplexity=math.exp(statistics.mean(
                             math.log(s["gen_ppl"]) for s in mine)), gen_ppl_excluded=0,
                         token_entropy=statistics.mean(entropies[label]), mauve=0.9))
    (folder / "results.json").write_text(json.dumps(dict(judge="x/shakespeare-ar", seed=part.seed, rows=rows)))
    (folder / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    return entropies


def test_parts_are_every_setting_group_for_every_seed(reproduce_paper):
    parts = reproduce_paper.parts([0, 1, 2])
    assert len(parts) == 3 * len(reproduce_paper.PARTS)
    assert [p.name for p in parts[:3]] == [f"ancestral-16L-float64-seed{s}" for s in range(3)]  # longest first
    assert {p.seed for p in parts} == {0, 1, 2} and len({p.name for p in parts}) == len(parts)


def test_merge_gives_means_spreads_and_both_tests_per_row(reproduce_paper, tmp_path):
    output = tmp_path / "paper"
    by_name = {part.name: part for part in reproduce_paper.parts([0, 1])}
    entropies = {}
    for name in ("ancestral-L-float64", "ancestral-L-float32"):
        for seed in (0, 1):
            for label, values in write_part(output, by_name[f"{name}-seed{seed}"], shift=0.3).items():
                entropies.setdefault(label, []).append(values)

    missing = reproduce_paper.merge(output)

    assert reproduce_paper.finished_seeds(output) == [0, 1]
    assert "ancestral-16L-float64-seed0" in missing and "ancestral-L-float32-seed1" not in missing
    rows = {row["label"]: row for row in json.loads((output / "results.json").read_text())["rows"]}
    assert list(rows) == ["reference texts", "ancestral_cache 256 steps float32", "ancestral_cache 256 steps float64"]
    f32, f64 = rows["ancestral_cache 256 steps float32"], rows["ancestral_cache 256 steps float64"]
    per_seed = [statistics.mean(values) for values in entropies[f32["label"]]]
    assert f32["seeds"] == [0, 1] and f32["num_samples"] == 16
    assert f32["token_entropy"] == pytest.approx(statistics.mean(per_seed))
    assert f32["token_entropy_spread"] == pytest.approx(statistics.stdev(per_seed))
    pooled32 = [v for values in entropies[f32["label"]] for v in values]
    pooled64 = [v for values in entropies[f64["label"]] for v in values]
    assert f32["float64_welch_p_token_entropy"] == pytest.approx(stats.ttest_ind(pooled32, pooled64, equal_var=False).pvalue)
    assert f32["float64_welch_p_token_entropy"] < 1e-6  # entropy 0.3 lower in float32, sd 0.1
    assert f32["float64_difference_token_entropy"] == pytest.approx(statistics.mean(pooled32) - statistics.mean(pooled64))
    assert f32["seed_anova_p_token_entropy"] == pytest.approx(stats.f_oneway(*entropies[f32["label"]]).pvalue)
    assert 0 < f32["seed_anova_p_log_gen_ppl"] <= 1 and "compared_with" not in f64
    table = (output / "results.md").read_text()
    assert "| MDM | ancestral_cache 256 steps float32 | 2 | 16 |" in table and " ± " in table
    assert "NOT RUN (yet): ancestral-16L-float64-seed0" in table
    samples = [json.loads(line) for line in (output / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2 * 2 * 8 and {s["seed"] for s in samples} == {0, 1}
    assert (output / "plot.png").stat().st_size > 10_000


def test_a_part_without_per_sample_figures_gets_no_p_values(reproduce_paper, tmp_path):
    output = tmp_path / "paper"
    for seed in (0, 1):
        part = {p.name: p for p in reproduce_paper.parts([seed])}[f"fhs-seed{seed}"]
        write_part(output, part)
        samples = output / "parts" / part.name / "samples.jsonl"
        samples.write_text("".join(json.dumps(dict(kind=s["kind"], label=s["label"], text=s["text"])) + "\n"
                                   for s in map(json.loads, samples.read_text().splitlines())))
    reproduce_paper.merge(output, seeds=[0, 1])
    rows = {row["label"]: row for row in json.loads((output / "results.json").read_text())["rows"]}
    assert rows["FHS k=1 float32"]["float64_welch_p_token_entropy"] is None
    assert rows["FHS k=1 float64"]["seed_anova_p_token_entropy"] is None


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


def test_seeds_are_found_by_folder_name(reproduce_paper, tmp_path):
    for name in ("fhs-seed7", "fhs-seedling", "unknown-part-seed3", "fhs-float64-seed1"):
        (tmp_path / "parts" / name).mkdir(parents=True)
    (tmp_path / "parts" / "fhs-seed4.log").write_text("")
    assert reproduce_paper.finished_seeds(tmp_path) == [7]
