"""The paper's precision table at small scale: one command, on the shipped Shakespeare MDM and AR judge.

    python examples/reproduce_paper.py                    # 56.5 minutes on a 2-core CPU (see README)
    python examples/reproduce_paper.py --num-samples 64   # less noise, twice the time

It runs `hf-mdm evaluate` with every setting of arXiv:2409.02908's precision experiment, scaled to a model of
context L = 256:
  - ancestral sampling with L, 4L and 16L steps, in float32 and in float64 (MDLM's cached variant: a row that
    did not change reuses its network output, exact for a time-agnostic network: it lowers the NFE only, not
    the samples' distribution);
  - the exact first-hitting sampler (FHS) in float32 and float64: L network calls per sample;
  - parallel FHS unmasking k = 2, 4, 8 tokens per call (an approximation; float64);
  - the AR judge itself sampled at temperatures 0.7, 0.8, 0.9 and 1.0: the baseline.
Every setting draws --num-samples unconditional samples of L tokens, scored by generative perplexity under the
AR judge, unigram token entropy (the paper's diversity check) and MAUVE against blocks of the validation plays
(features from the judge).

The settings are split into parts, run by --workers processes of one thread each (on 2 cores this beats one
process of two threads: the random-number generation and the per-step Python work are single-threaded). Each
part is one `hf-mdm evaluate` run with its own folder under OUTPUT/parts/, so a killed run resumes where it
stopped: finished parts are kept. At the end the parts are merged into OUTPUT/results.json, results.md (the
table), plot.png (gen PPL against entropy), samples.jsonl, and timing.json (the wall time of every run, appended).

    python examples/reproduce_paper.py --fhs-seeds 1 2      # also exact FHS in float64 with seeds 1 and 2

adds one part per seed (about 9 minutes each on one core) whose rows are marked "seed N": the spread between seeds
shows how far 32-sample figures move by chance alone.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from hf_mdm.evaluation.report import markdown_table, plot_results
from hf_mdm.pretrained import DEFAULT_JUDGE, DEFAULT_MDM, pretrained_path


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


# Longest first (on one core: ~24, 20, 16, 13, 12, 9, 9 and 8 minutes), so that the workers finish close together.
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
SEED_PART_PREFIX = "fhs-float64-seed"


def fhs_seed_part(seed: int) -> Part:
    """Exact FHS in float64 drawn again with another seed: how much the figures move by chance."""
    return Part(f"{SEED_PART_PREFIX}{seed}", ("sampler=first_hitting,sampling_dtype=float64",), seed=seed)


def finished_seed_parts(output: Path) -> list[Part]:
    """The seed parts a run (this one or an earlier one, with --fhs-seeds) left under OUTPUT/parts/."""
    names = (folder.name for folder in (output / "parts").glob(f"{SEED_PART_PREFIX}*") if folder.is_dir())
    return [fhs_seed_part(int(name.removeprefix(SEED_PART_PREFIX))) for name in sorted(names)
            if name.removeprefix(SEED_PART_PREFIX).isdigit()]


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
    if (folder / "results.json").is_file():
        print(f"[{name}] done before, kept", flush=True)
        return None
    if not claim(output / "parts" / f"{name}.lock"):
        print(f"[{name}] being run by another process, skipped", flush=True)
        return None
    command = [sys.executable, "-m", "hf_mdm.cli", "evaluate", DEFAULT_MDM, "--judge", DEFAULT_JUDGE,
               "--reference-files", str(data / "validation.jsonl"), "--num-references", str(args.num_references),
               "--length", str(LENGTH), "--num-samples", str(args.num_samples), "--batch-size", str(args.batch_size),
               "--judge-batch-size", "32", "--seed", str(args.seed if part.seed is None else part.seed),
               "--save-samples", "--output-dir", str(folder)]
    for setting in part.settings:
        command += ["--setting", setting]
    if part.ar_temperatures:
        command += ["--ar-model", DEFAULT_JUDGE, "--ar-temperatures", *part.ar_temperatures]
    environment = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
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
    judge = load_judge(str(pretrained_path(DEFAULT_JUDGE)), "cpu")
    tokenizer = AutoTokenizer.from_pretrained(pretrained_path(DEFAULT_MDM))
    # The references exactly as `hf-mdm evaluate` built them for the parts (see run_part's command).
    references = tokenizer.batch_decode(load_text_blocks([data / "validation.jsonl"], tokenizer, LENGTH,
                                                         args.num_references).tolist())
    reference_features = judge_features(references, judge, 32)[0]
    gen_ppl, mauve = load_metric("generative_perplexity", keep_in_memory=True), load_metric("mauve", keep_in_memory=True)
    for name in names:
        folder = output / "parts" / name
        results = json.loads((folder / "results.json").read_text())
        samples = [json.loads(line) for line in (folder / "samples.jsonl").read_text().splitlines()]
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


def merge(output: Path) -> list[str]:
    """One table, plot and samples file from the parts that exist; returns the names of missing parts."""
    rows, samples, missing, judge, footnote, main_seed = [], [], [], "", "", None
    seed_parts = finished_seed_parts(output)
    for part in PARTS + seed_parts:
        folder = output / "parts" / part.name
        if not (folder / "results.json").is_file():
            missing.append(part.name)
            continue
        results = json.loads((folder / "results.json").read_text())
        judge = judge or Path(results.get("judge", DEFAULT_JUDGE)).name
        if part.seed is None:
            main_seed = results["seed"]
        for row in results["rows"]:
            if part.seed is not None:
                row["label"] += f" seed {part.seed}"
            if row["kind"] != "reference" or not any(r["kind"] == "reference" for r in rows):
                rows.append(row)
        if (folder / "samples.jsonl").is_file():
            lines = (folder / "samples.jsonl").read_text().splitlines()
            if part.seed is not None:  # the same mark as the rows, so that samples and rows still match by label
                lines = [json.dumps(dict(sample, label=f"{sample['label']} seed {part.seed}"))
                         for sample in map(json.loads, lines)]
            samples.append("".join(line + "\n" for line in lines))
        footnote = footnote or next((line for line in (folder / "results.md").read_text().splitlines()
                                     if line.startswith(f"{LENGTH} tokens per sample")), "")
    rows.sort(key=table_order)
    footnotes = [footnote] if footnote else []
    if seed_parts:
        footnotes.append(f"Rows marked 'seed N' were drawn again with seed N (--fhs-seeds), to show the spread "
                         f"between seeds; all others with seed {main_seed}.")
    if missing:
        footnotes.append(f"NOT RUN (yet): {', '.join(missing)}; rerun the script to finish them.")
    (output / "results.json").write_text(json.dumps({"judge": judge, "rows": rows}, indent=2) + "\n")
    (output / "results.md").write_text(markdown_table(rows, judge, footnotes))
    plot_results(rows, output / "plot.png", judge, title=f"shakespeare-mdm, {LENGTH}-token samples")
    (output / "samples.jsonl").write_text("".join(samples))
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
    parser.add_argument("--fhs-seeds", nargs="+", type=int, default=[], metavar="SEED",
                        help="also exact FHS in float64 drawn with each of these seeds (one part each)")
    parser.add_argument("--rejudge", nargs="+", default=[], metavar="PART",
                        help="only recompute the judge's figures of these finished parts, then merge")
    args = parser.parse_args()
    for name in ("num_samples", "batch_size", "num_references", "workers", "threads"):
        if getattr(args, name) < 1:
            raise SystemExit(f"reproduce_paper: --{name.replace('_', '-')} must be at least 1.")

    data, output = Path(args.data), Path(args.output_dir)
    if not (data / "validation.jsonl").is_file():  # the MAUVE and entropy references: the validation plays
        subprocess.run([sys.executable, str(ROOT / "examples/shakespeare/prepare.py"), "--out", str(data)], check=True)
    (output / "parts").mkdir(parents=True, exist_ok=True)
    if args.rejudge:
        rejudge(output, args.rejudge, args, data)
        print("missing parts:", merge(output))
        return
    parts = PARTS + [fhs_seed_part(seed) for seed in dict.fromkeys(args.fhs_seeds) if seed != args.seed]
    started = time.perf_counter()
    with ThreadPoolExecutor(args.workers) as pool:
        minutes = list(pool.map(lambda part: run_part(part, args, data, output), parts))
    wall = (time.perf_counter() - started) / 60
    missing = merge(output)
    ran = {part.name: round(m, 1) for part, m in zip(parts, minutes) if m is not None}
    if ran:  # one entry per run that did any work, appended: a resumed run keeps the record of earlier ones
        timing = dict(wall_minutes=round(wall, 1), part_minutes=ran, kept_from_earlier_runs=len(parts) - len(ran),
                      num_samples=args.num_samples, workers=args.workers, threads_per_worker=args.threads,
                      cpus=os.cpu_count(), command=" ".join(["python", "examples/reproduce_paper.py", *sys.argv[1:]]))
        timing_file = output / "timing.json"
        runs = json.loads(timing_file.read_text()) if timing_file.is_file() else []
        runs = [runs] if isinstance(runs, dict) else runs
        timing_file.write_text(json.dumps(runs + [timing], indent=2) + "\n")
    print(f"reproduce_paper: {wall:.1f} minutes; results in {output}/" + (f"; missing {missing}" if missing else ""))


if __name__ == "__main__":
    main()
