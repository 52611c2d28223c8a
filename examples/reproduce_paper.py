"""The paper's precision table at small scale: one command, on the shipped Shakespeare MDM and AR judge.

    python examples/reproduce_paper.py               # 3 seeds x 32 samples a setting: ~2 hours on a 2-core CPU
    python examples/reproduce_paper.py --seeds 1     # one seed: ~40 minutes (76 core-minutes, see README)

It runs `hf-mdm evaluate` with every setting of arXiv:2409.02908's precision experiment, scaled to a model of
context L = 256:
  - ancestral sampling with L, 4L and 16L steps, in float32 and in float64 (MDLM's cached variant: a row that
    did not change reuses its network output, exact for a time-agnostic network: it lowers the NFE only, not
    the samples' distribution);
  - the exact first-hitting sampler (FHS) in float32 and float64: L network calls per sample;
  - parallel FHS unmasking k = 2, 4, 8 tokens per call (an approximation; float64);
  - the AR judge itself sampled at temperatures 0.7, 0.8, 0.9 and 1.0: the baseline.
Every setting draws --num-samples unconditional samples of L tokens with each of --seeds seeds, scored by
generative perplexity under the AR judge, unigram token entropy (the paper's diversity check) and MAUVE against
blocks of the validation plays (features from the judge).

The table gives each setting's mean over seeds and the standard deviation between seeds, and two tests computed
from each sample's own figures (token entropy, log gen PPL): Welch's t-test of float32 against float64 at the
same sampler and steps (pooled over seeds), and a one-way ANOVA across the seeds (a p-value far below 0.05 in many
rows would say that something other than chance differs between runs).

The settings are split into parts, one `hf-mdm evaluate` run per part and seed, run by --workers processes of one
thread each (on 2 cores this beats one process of two threads: the random-number generation and the per-step
Python work are single-threaded). Each part has its own folder under OUTPUT/parts/ (the main seed's under the
plain name, seed N's as NAME-seedN), so a killed run resumes where it stopped: finished parts are kept. At the end
the parts are merged into OUTPUT/results.json (the rows, and every run's own row under "runs"), results.md (the
table), plot.png (gen PPL against entropy), samples.jsonl (every sample with its seed and figures), and
timing.json (the wall time of every run, appended).
"""

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from hf_mdm.evaluation.report import markdown_table, plot_results
from hf_mdm.constants import DEFAULT_MDM, SHIPPED_JUDGE
from hf_mdm.pretrained import pretrained_path


ROOT = Path(__file__).resolve().parents[1]
LENGTH = 256


def ancestral(multiple: int, dtype: str) -> str:
    return f"sampler=ancestral_cache,steps={multiple * LENGTH},sampling_dtype={dtype}"


@dataclass(frozen=True)
class Part:
    """One `hf-mdm evaluate` run: its folder name, MDM settings, AR temperatures and seed (None: --seed)."""

    name: str
    settings: tuple[str, ...]
    ar_temperatures: tuple[str, ...] = ()
    seed: int | None = None


# Longest first (on one core: ~21, 15, 9, 9, 8, 6, 4.5 and 4 minutes), so that the workers finish close together.
PARTS = [
    Part("ancestral-16L-float64", (ancestral(16, "float64"),)),
    Part("ancestral-16L-float32", (ancestral(16, "float32"),)),
    Part("fhs", tuple(f"sampler=first_hitting,sampling_dtype={dtype}" for dtype in ("float32", "float64"))),
    Part("ancestral-4L-float64", (ancestral(4, "float64"),)),
    Part("ancestral-4L-float32", (ancestral(4, "float32"),)),
    Part("parallel-fhs-and-ar", tuple(f"sampler=first_hitting,tokens_per_step={k},sampling_dtype=float64"
                                      for k in (2, 4, 8)), ("0.7", "0.8", "0.9", "1.0")),
    Part("ancestral-L-float64", (ancestral(1, "float64"),)),
    Part("ancestral-L-float32", (ancestral(1, "float32"),)),
]


def seeded(part: Part, seed: int, main_seed: int) -> Part:
    """The part drawn with another seed: the main seed keeps the plain name (and the folders of earlier runs)."""
    if seed == main_seed:
        return part
    return Part(f"{part.name}-seed{seed}", part.settings, part.ar_temperatures, seed=seed)


def finished(folder: Path) -> bool:
    """Whether a part's run got to the end: `hf-mdm evaluate` writes results.json last."""
    return (folder / "results.json").is_file()


def read_samples(folder: Path) -> list[dict]:
    """A part's saved samples (none where it was run without them)."""
    path = folder / "samples.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def write_samples(path: Path, samples: list[dict]) -> None:
    path.write_text("".join(json.dumps(sample) + "\n" for sample in samples))


def all_parts(seeds: int, main_seed: int) -> list[Part]:
    """Every part with seeds main_seed .. main_seed + seeds - 1, longest first across seeds (see PARTS)."""
    return [seeded(part, main_seed + i, main_seed) for part in PARTS for i in range(seeds)]


def table_order(row: dict) -> tuple:
    """References, then ancestral by dtype and steps, then FHS by tokens per step and dtype, then AR."""
    setting = row.get("setting") or {}
    if row["kind"] != "mdm":
        return ({"reference": 0, "ar": 3}[row["kind"]], row["label"])
    if setting.get("sampler", "").startswith("ancestral"):
        return (1, setting.get("sampling_dtype", ""), setting.get("steps") or 0)
    return (2, setting.get("tokens_per_step") or 1, setting.get("sampling_dtype", ""))


def run_part(part: Part, args, data: Path, output: Path) -> float | None:
    """One `hf-mdm evaluate` run; skipped when its results.json exists (a resumed run). Returns its minutes."""
    name = part.name
    folder = output / "parts" / name
    if finished(folder):
        print(f"[{name}] done before, kept", flush=True)
        return None
    if not claim(output / "parts" / f"{name}.lock"):
        print(f"[{name}] being run by another process, skipped", flush=True)
        return None
    command = [sys.executable, "-m", "hf_mdm_cli", "evaluate", DEFAULT_MDM, "--judge", SHIPPED_JUDGE,
               "--reference-files", str(data / "validation.jsonl"), "--num-references", str(args.num_references),
               "--length", str(LENGTH), "--num-samples", str(args.num_samples), "--batch-size", str(args.batch_size),
               "--judge-batch-size", "32", "--seed", str(args.seed if part.seed is None else part.seed),
               "--save-samples", "--output-dir", str(folder)]
    for setting in part.settings:
        command += ["--setting", setting]
    if part.ar_temperatures:
        command += ["--ar-model", SHIPPED_JUDGE, "--ar-temperatures", *part.ar_temperatures]
    # glibc hands every buffer over 32 MB back to the kernel when freed, so the ancestral sampler's per-step
    # (samples x masked positions x V) draws page-fault in afresh at every step: keeping them in the heap made a
    # draw of that size 1.75x faster on this 2-core machine. It changes no number, only the time.
    environment = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
                       MALLOC_MMAP_THRESHOLD_="4294967296", MALLOC_TRIM_THRESHOLD_="8589934592")
    started = time.perf_counter()
    print(f"[{name}] started", flush=True)
    with open(output / "parts" / f"{name}.log", "w") as log:
        subprocess.run(command, check=True, env=environment, stdout=log, stderr=subprocess.STDOUT)
    minutes = (time.perf_counter() - started) / 60
    (output / "parts" / f"{name}.lock").unlink()
    print(f"[{name}] finished in {minutes:.1f} min", flush=True)
    return minutes


def claim(lock: Path) -> bool:
    """Takes a part for this process: creates its lock file holding our PID, or takes over the lock of a process
    that died (a killed run). False when a live process holds it (two copies of this script share the work)."""
    while True:
        try:
            handle = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                holder = int(lock.read_text() or 0)
                os.kill(holder, 0)  # raises if no such process
                return False
            except (ProcessLookupError, ValueError, FileNotFoundError):
                lock.unlink(missing_ok=True)  # a dead holder: take the part over
                continue
        os.write(handle, str(os.getpid()).encode())
        os.close(handle)
        return True


def rejudge(output: Path, names: list[str], args, data: Path) -> None:
    """Recomputes the judge's figures (gen PPL, MAUVE) of finished parts from their saved samples, with the judge
    that `hf-mdm evaluate` loads now: for parts judged by an older version (see README). Entropy is the MDM's own
    token statistic and is kept."""
    import torch
    from transformers import AutoTokenizer

    from hf_mdm.evaluation import judge_features, load_judge, load_metric, load_text_blocks

    torch.set_num_threads(args.threads)
    judge = load_judge(str(pretrained_path(SHIPPED_JUDGE)), "cpu")
    tokenizer = AutoTokenizer.from_pretrained(pretrained_path(DEFAULT_MDM))
    # The references exactly as `hf-mdm evaluate` built them for the parts (see run_part's command).
    references = tokenizer.batch_decode(load_text_blocks([data / "validation.jsonl"], tokenizer, LENGTH,
                                                         args.num_references).tolist())
    reference_features = judge_features(references, judge, 32)[0]
    gen_ppl, mauve = load_metric("generative_perplexity", keep_in_memory=True), load_metric("mauve", keep_in_memory=True)
    for name in names:
        folder = output / "parts" / name
        results = json.loads((folder / "results.json").read_text())
        samples = read_samples(folder)
        for row in results["rows"]:
            texts = references if row["kind"] == "reference" else \
                [s["text"] for s in samples if (s["kind"], s["label"]) == (row["kind"], row["label"])]
            scored = gen_ppl.compute(predictions=texts, judge=judge, batch_size=32)
            row.update(generative_perplexity=scored["generative_perplexity"], gen_ppl_excluded=len(scored["excluded"]))
            if row["kind"] != "reference":
                row["mauve"] = mauve.compute(predictions=texts, reference_features=reference_features, judge=judge,
                                             batch_size=32, seed=args.seed)["mauve"]
        results["rejudged"] = f"gen PPL and MAUVE recomputed with a {judge.model.dtype} judge"
        (folder / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        print(f"[{name}] rejudged", flush=True)


def add_per_sample_figures(output: Path, names: list[str], args) -> None:
    """Gives every sample of these parts the two figures the tests compare, computed the same way for all parts:
    `text_entropy`, the token entropy of its text re-tokenized by the model that drew it (parts written by an
    older `hf-mdm evaluate` saved only the text, not the drawn ids), and `gen_ppl` by the judge from the text
    (what evaluate scores too; computed here only where evaluate did not save it)."""
    import torch
    from transformers import AutoTokenizer

    from hf_mdm.evaluation import load_judge, load_metric

    torch.set_num_threads(args.threads)
    judge = None
    tokenizers = {"mdm": AutoTokenizer.from_pretrained(pretrained_path(DEFAULT_MDM)),
                  "ar": AutoTokenizer.from_pretrained(pretrained_path(SHIPPED_JUDGE))}
    gen_ppl = load_metric("generative_perplexity", keep_in_memory=True)
    entropy = load_metric("token_entropy", keep_in_memory=True)
    for name in names:
        folder = output / "parts" / name
        samples = read_samples(folder)
        rejudged = False
        for kind, label in dict.fromkeys((sample["kind"], sample["label"]) for sample in samples):
            chosen = [sample for sample in samples if (sample["kind"], sample["label"]) == (kind, label)]
            texts = [sample["text"] for sample in chosen]
            ids = [tokenizers[kind](text, add_special_tokens=False)["input_ids"] for text in texts]
            for sample, value in zip(chosen, entropy.compute(predictions=ids)["per_sample"]):
                sample["text_entropy"] = value
            if any("gen_ppl" not in sample for sample in chosen):
                judge = judge or load_judge(str(pretrained_path(SHIPPED_JUDGE)), "cpu")
                scored = gen_ppl.compute(predictions=texts, judge=judge, batch_size=32)["per_sample"]
                for sample, value in zip(chosen, scored):
                    sample["gen_ppl"] = value
                rejudged = True
        write_samples(folder / "samples.jsonl", samples)
        if rejudged:
            results = json.loads((folder / "results.json").read_text())
            results["per_sample_gen_ppl"] = "recomputed from the saved texts (evaluate did not save it then)"
            (folder / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        print(f"[{name}] per-sample figures added", flush=True)


def parts_without_per_sample_figures(output: Path, parts: list[Part]) -> list[str]:
    """The finished parts whose samples lack the per-sample figures of `add_per_sample_figures`."""
    folders = [output / "parts" / part.name for part in parts]
    return [folder.name for folder in folders
            if finished(folder) and any("text_entropy" not in sample for sample in read_samples(folder))]


def welch_p(a: list[float], b: list[float]) -> float | None:
    """Two-sided Welch t-test p-value of equal means (None with fewer than two values a side)."""
    from scipy import stats

    if len(a) < 2 or len(b) < 2:
        return None
    return float(stats.ttest_ind(a, b, equal_var=False).pvalue)


def anova_p(groups: list[list[float]]) -> float | None:
    """One-way ANOVA p-value of equal means across groups (here: seeds); None with fewer than two groups."""
    from scipy import stats

    groups = [group for group in groups if len(group) >= 2]
    if len(groups) < 2:
        return None
    return float(stats.f_oneway(*groups).pvalue)


def mean_and_spread(values: list[float | None]) -> tuple[float | None, float | None]:
    """The mean over seeds and the standard deviation between seeds (None for one seed)."""
    values = [value for value in values if value is not None]
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) >= 2 else None


# The per-sample figures the tests compare: see per_sample.
FIGURES = ("text_entropy", "log_gen_ppl")


def per_sample(samples: list[dict], figure: str) -> list[float]:
    """One figure of each sample: the token entropy of its text, or its mean judge NLL (log gen PPL, closer to
    normal than gen PPL)."""
    if figure == "text_entropy":
        return [sample["text_entropy"] for sample in samples if "text_entropy" in sample]
    return [math.log(sample["gen_ppl"]) for sample in samples if sample.get("gen_ppl")]


def summarize(runs: list[dict], samples: dict[tuple, list[dict]]) -> dict:
    """One table row from a setting's runs (one per seed): means, spreads between seeds, and the seeds' ANOVA."""
    first = runs[0]
    row = dict(kind=first["kind"], label=first["label"], setting=first.get("setting"),
               seeds=[run["seed"] for run in runs], num_samples=sum(run["num_samples"] for run in runs))
    for field in ("nfe_per_sample", "seconds", "generative_perplexity", "token_entropy", "mauve"):
        row[field], row[f"{field}_spread"] = mean_and_spread([run.get(field) for run in runs])
    row["gen_ppl_excluded"] = sum(run.get("gen_ppl_excluded") or 0 for run in runs)
    groups = [samples.get((first["kind"], first["label"], run["seed"]), []) for run in runs]
    row["seeds_anova_p"] = {figure: anova_p([per_sample(group, figure) for group in groups])
                            for figure in FIGURES}
    return row


def add_precision_tests(rows: list[dict], samples: dict[tuple, list[dict]]) -> None:
    """On each float32 MDM row: Welch p-values against the float64 row of the same sampler and steps, on the
    per-sample figures pooled over seeds."""
    def pooled(row, figure):
        return [value for seed in row["seeds"] for value in per_sample(samples.get((row["kind"], row["label"], seed),
                                                                                    []), figure)]

    def without_dtype(row):
        return {key: value for key, value in (row["setting"] or {}).items() if key != "sampling_dtype"}

    for row in rows:
        if row["kind"] != "mdm" or (row["setting"] or {}).get("sampling_dtype") != "float32":
            continue
        partner = next((other for other in rows if other["kind"] == "mdm" and other is not row
                        and (other["setting"] or {}).get("sampling_dtype") == "float64"
                        and without_dtype(other) == without_dtype(row)), None)
        if partner is not None:
            row["float64_partner"] = partner["label"]
            row["welch_p_vs_float64"] = {figure: welch_p(pooled(row, figure), pooled(partner, figure))
                                         for figure in FIGURES}


def text_entropy_gap(runs: dict, samples: dict) -> float:
    """The largest difference, over runs, between the entropy of the drawn ids and that of the re-tokenized texts."""
    gaps = [0.0]
    for (kind, label), setting_runs in runs.items():
        for run in setting_runs:
            values = per_sample(samples.get((kind, label, run["seed"]), []), "text_entropy")
            if values and run.get("token_entropy") is not None:
                gaps.append(abs(sum(values) / len(values) - run["token_entropy"]))
    return max(gaps)


def _p_pair(pair):
    if not pair or all(value is None for value in pair.values()):
        return "–"
    return " / ".join("–" if pair[key] is None else f"{pair[key]:.2g}" for key in FIGURES)


# The two columns of tests beside report.markdown_table's figures.
TEST_COLUMNS = (("fp32 vs fp64: Welch p (entropy / gen PPL)", lambda row: _p_pair(row.get("welch_p_vs_float64"))),
                ("between seeds: ANOVA p (entropy / gen PPL)", lambda row: _p_pair(row.get("seeds_anova_p"))))


def merge(output: Path, seeds: int = 3, main_seed: int = 0) -> list[str]:
    """One table, plot and samples file from the parts that exist; returns the names of missing parts."""
    runs, samples, missing, judge, recomputed = {}, {}, [], "", []
    for part in all_parts(seeds, main_seed):
        folder = output / "parts" / part.name
        if not finished(folder):
            missing.append(part.name)
            continue
        results = json.loads((folder / "results.json").read_text())
        judge = judge or Path(results.get("judge", SHIPPED_JUDGE)).name
        if "per_sample_gen_ppl" in results:
            recomputed.append(part.name)
        for row in results["rows"]:
            if row["kind"] == "reference" and runs.get(("reference", row["label"])):
                continue  # the same validation blocks in every part
            runs.setdefault((row["kind"], row["label"]), []).append(dict(row, seed=results["seed"]))
        for sample in read_samples(folder):
            samples.setdefault((sample["kind"], sample["label"], results["seed"]), []).append(
                dict(sample, seed=results["seed"]))
    rows = sorted((summarize(setting_runs, samples) for setting_runs in runs.values()), key=table_order)
    add_precision_tests(rows, samples)
    footnotes = [f"{LENGTH} tokens per sample; each setting drawn with seeds {main_seed}..{main_seed + seeds - 1} "
                 f"(one `hf-mdm evaluate` run each); figures are the mean over seeds ± the standard deviation between "
                 f"seeds (time: seconds per run); entropy in each model's own tokens (nats).",
                 "Welch p: float32 against float64 at the same sampler and steps, on each sample's own token "
                 "entropy / log gen PPL, pooled over seeds; ANOVA p: equal means across the seeds, same figures. "
                 "Both use the entropy of each text re-tokenized (the same for every part: the earliest parts did "
                 f"not save the drawn ids; a row's mean differs from its drawn ids' entropy by "
                 f"{text_entropy_gap(runs, samples):.4f} nats at most)."]
    if recomputed:
        footnotes.append(f"Per-sample gen PPL of {', '.join(recomputed)} recomputed from the saved texts "
                         f"(written before evaluate saved it).")
    if missing:
        footnotes.append(f"NOT RUN (yet): {', '.join(missing)}; rerun the script to finish them.")
    per_seed = [run for setting_runs in runs.values() for run in setting_runs]
    (output / "results.json").write_text(json.dumps({"judge": judge, "rows": rows, "runs": per_seed}, indent=2) + "\n")
    (output / "results.md").write_text(markdown_table(rows, judge, footnotes, TEST_COLUMNS))
    plot_results(rows, output / "plot.png", judge, title=f"shakespeare-mdm, {LENGTH}-token samples, "
                                                          f"mean over {seeds} seeds")
    write_samples(output / "samples.jsonl", [sample for group in samples.values() for sample in group])
    return missing


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-samples", type=int, default=32, help="samples per setting (at least 32)")
    parser.add_argument("--batch-size", type=int, default=32, help="samples per generate() call")
    parser.add_argument("--num-references", type=int, default=256, help="validation blocks for MAUVE and entropy")
    parser.add_argument("--workers", type=int, default=2, help="parts run at once")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--data", default="data/shakespeare", help="prepare.py's output (run if missing)")
    parser.add_argument("--output-dir", default="results/paper")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seeds", type=int, default=3,
                        help="every setting drawn with seeds SEED, SEED + 1, ...: this many (one part each)")
    parser.add_argument("--rejudge", nargs="+", default=[], metavar="PART",
                        help="only recompute the judge's figures of these finished parts, then merge")
    args = parser.parse_args()
    for name in ("num_samples", "batch_size", "num_references", "workers", "threads", "seeds"):
        if getattr(args, name) < 1:
            raise SystemExit(f"reproduce_paper: --{name.replace('_', '-')} must be at least 1.")

    data, output = Path(args.data), Path(args.output_dir)
    if not (data / "validation.jsonl").is_file():  # the MAUVE and entropy references: the validation plays
        subprocess.run([sys.executable, str(ROOT / "examples/shakespeare/prepare.py"), "--out", str(data)], check=True)
    (output / "parts").mkdir(parents=True, exist_ok=True)
    if args.rejudge:
        rejudge(output, args.rejudge, args, data)
        print("missing parts:", merge(output, args.seeds, args.seed))
        return
    parts = all_parts(args.seeds, args.seed)
    started = time.perf_counter()
    with ThreadPoolExecutor(args.workers) as pool:
        minutes = list(pool.map(lambda part: run_part(part, args, data, output), parts))
    wall = (time.perf_counter() - started) / 60
    ran = {part.name: round(m, 1) for part, m in zip(parts, minutes) if m is not None}
    if ran:  # one entry per run that did any work, appended: a resumed run keeps the record of earlier ones
        timing = dict(wall_minutes=round(wall, 1), part_minutes=ran, kept_from_earlier_runs=len(parts) - len(ran),
                      num_samples=args.num_samples, workers=args.workers, threads_per_worker=args.threads,
                      cpus=os.cpu_count(), command=" ".join(["python", "examples/reproduce_paper.py", *sys.argv[1:]]))
        timing_file = output / "timing.json"
        runs = json.loads(timing_file.read_text()) if timing_file.is_file() else []
        runs = [runs] if isinstance(runs, dict) else runs
        timing_file.write_text(json.dumps(runs + [timing], indent=2) + "\n")
    older = parts_without_per_sample_figures(output, parts)
    if older:
        add_per_sample_figures(output, older, args)
    missing = merge(output, args.seeds, args.seed)
    print(f"reproduce_paper: {wall:.1f} minutes; results in {output}/" + (f"; missing {missing}" if missing else ""))


if __name__ == "__main__":
    main()
