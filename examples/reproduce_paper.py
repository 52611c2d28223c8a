"""The paper's precision table at small scale: one command, on the shipped Shakespeare MDM and AR judge.

    python examples/reproduce_paper.py                    # about an hour on a 2-core CPU (see README)
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
table), plot.png (gen PPL against entropy), samples.jsonl, and timing.json (wall time of the whole run).
"""

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from hf_mdm.evaluation.report import markdown_table, plot_results
from hf_mdm.pretrained import DEFAULT_JUDGE, DEFAULT_MDM, pretrained_path


ROOT = Path(__file__).resolve().parents[1]
LENGTH = 256


def ancestral(multiple: int, dtype: str) -> str:
    return f"sampler=ancestral_cache,steps={multiple * LENGTH},sampling_dtype={dtype}"


# (name, MDM settings, AR temperatures), longest first (on one core: ~27, 25, 19, 12, 12, 11, 8 and 7 minutes), so
# that the workers finish close together.
PARTS = [
    ("ancestral-16L-float64", [ancestral(16, "float64")], []),
    ("ancestral-16L-float32", [ancestral(16, "float32")], []),
    ("fhs", [f"sampler=first_hitting,sampling_dtype={dtype}" for dtype in ("float32", "float64")], []),
    ("ancestral-4L-float64", [ancestral(4, "float64")], []),
    ("ancestral-4L-float32", [ancestral(4, "float32")], []),
    ("parallel-fhs-and-ar", [f"sampler=first_hitting,tokens_per_step={k},sampling_dtype=float64" for k in (2, 4, 8)],
     ["0.7", "0.8", "0.9", "1.0"]),
    ("ancestral-L-float64", [ancestral(1, "float64")], []),
    ("ancestral-L-float32", [ancestral(1, "float32")], []),
]


def table_order(row: dict) -> tuple:
    """References, then ancestral by dtype and steps, then FHS by tokens per step and dtype, then AR."""
    setting = row.get("setting") or {}
    if row["kind"] != "mdm":
        return ({"reference": 0, "ar": 3}[row["kind"]], row["label"])
    if setting.get("sampler", "").startswith("ancestral"):
        return (1, setting.get("sampling_dtype", ""), setting.get("steps") or 0)
    return (2, setting.get("tokens_per_step") or 1, setting.get("sampling_dtype", ""))


def run_part(name, settings, ar_temperatures, args, data: Path, output: Path) -> float | None:
    """One `hf-mdm evaluate` run; skipped when its results.json exists (a resumed run). Returns its minutes."""
    folder = output / "parts" / name
    if (folder / "results.json").is_file():
        print(f"[{name}] done before, kept", flush=True)
        return None
    if not claim(output / "parts" / f"{name}.lock"):
        print(f"[{name}] being run by another process, skipped", flush=True)
        return None
    command = [sys.executable, "-m", "hf_mdm.cli", "evaluate", str(pretrained_path(DEFAULT_MDM)),
               "--judge", str(pretrained_path(DEFAULT_JUDGE)), "--reference-files", str(data / "validation.jsonl"),
               "--num-references", str(args.num_references), "--length", str(LENGTH),
               "--num-samples", str(args.num_samples), "--batch-size", str(args.batch_size),
               "--judge-batch-size", "32", "--seed", str(args.seed), "--save-samples", "--output-dir", str(folder)]
    for setting in settings:
        command += ["--setting", setting]
    if ar_temperatures:
        command += ["--ar-model", str(pretrained_path(DEFAULT_JUDGE)), "--ar-temperatures", *ar_temperatures]
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
    rows, samples, missing, judge, footnote = [], [], [], "", ""
    for name, _, _ in PARTS:
        folder = output / "parts" / name
        if not (folder / "results.json").is_file():
            missing.append(name)
            continue
        results = json.loads((folder / "results.json").read_text())
        judge = judge or Path(results.get("judge", DEFAULT_JUDGE)).name
        for row in results["rows"]:
            if row["kind"] != "reference" or not any(r["kind"] == "reference" for r in rows):
                rows.append(row)
        if (folder / "samples.jsonl").is_file():
            samples.append((folder / "samples.jsonl").read_text())
        footnote = footnote or next((line for line in (folder / "results.md").read_text().splitlines()
                                     if line.startswith(f"{LENGTH} tokens per sample")), "")
    rows.sort(key=table_order)
    footnotes = [footnote] if footnote else []
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
    started = time.perf_counter()
    with ThreadPoolExecutor(args.workers) as pool:
        minutes = list(pool.map(lambda part: run_part(*part, args, data, output), PARTS))
    wall = (time.perf_counter() - started) / 60
    missing = merge(output)
    timing = dict(wall_minutes=round(wall, 1), part_minutes={name: None if m is None else round(m, 1)
                                                              for (name, _, _), m in zip(PARTS, minutes)},
                  resumed=any(m is None for m in minutes), num_samples=args.num_samples,
                  workers=args.workers, threads_per_worker=args.threads, cpus=os.cpu_count(),
                  command=" ".join(["python", "examples/reproduce_paper.py", *sys.argv[1:]]))
    (output / "timing.json").write_text(json.dumps(timing, indent=2) + "\n")
    print(f"reproduce_paper: {wall:.1f} minutes; results in {output}/" + (f"; missing {missing}" if missing else ""))


if __name__ == "__main__":
    main()
