"""Decoding strategies against exact FHS on the shipped Shakespeare MDM: quality against network calls, and the cache.

    python benchmarks/decoding_strategies.py                         # about 90 minutes on 2 CPU cores
    python benchmarks/decoding_strategies.py --num-samples 16 --quick  # a few minutes, for a look

1. The sweep (`hf-mdm evaluate` under the hood): unconditional samples of the full context (256 tokens) from
   `shakespeare-mdm`, judged by `shakespeare-ar` (generative perplexity) beside token entropy, for exact
   random-order FHS, parallel FHS, confidence / margin / entropy ordering at several budgets, the threshold rule at
   three values, each with and without blocks of 32 and the prefix cache, FHS in blocks, MDLM's ancestral sampler
   and ReMDM. Written to results/decoding/ (results.json, results.md) with plot.png: gen PPL and entropy against
   network calls per generated token, one curve per strategy.
2. The cache, measured in one run: wall time of block decoding with and without the prefix (and dual) cache at the
   same number of network calls, interleaved, median of `--repeats`; and how far it moves the output: the share of
   identical tokens between cached and uncached greedy decoding. Written to results/decoding/cache.json.

Gen PPL alone rewards low-entropy text (arXiv:2409.02908, section 5): read the two panels together.
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
OUTPUT = REPO / "results" / "decoding"
LENGTH = 256


def settings(quick: bool) -> list[str]:
    """`--setting` strings of the sweep: (strategy, budget) points; budgets in network calls for 256 tokens."""
    budgets = [64] if quick else [128, 64, 32]
    blocks = "block_length=32"
    out = ["sampler=first_hitting"]  # exact, 256 calls
    out += [f"tokens_per_step={k}" for k in ([4] if quick else [2, 4, 8])]
    out += [f"sampler=confidence,order=confidence,steps={LENGTH}"] if not quick else []
    for order in ("confidence", "margin", "entropy"):
        out += [f"sampler=confidence,order={order},steps={n}" for n in budgets]
        out += [f"sampler=confidence,order={order},steps={n},{blocks}" for n in (budgets if order == "confidence" else [64])]
    out += [f"sampler=confidence,order=confidence,steps={n},{blocks},use_cache=true" for n in budgets]
    for threshold in ([0.7] if quick else [0.9, 0.7, 0.5]):
        out += [f"sampler=confidence,order=confidence,confidence_threshold={threshold}",
                f"sampler=confidence,order=confidence,confidence_threshold={threshold},{blocks}",
                f"sampler=confidence,order=confidence,confidence_threshold={threshold},{blocks},use_cache=true"]
    out += [f"{blocks}", f"{blocks},use_cache=true"]  # FHS k=1 within blocks: exact for the block-factorised process
    out += [f"sampler=ancestral,steps={LENGTH}"]
    out += [f"sampler=remdm,steps={n}" for n in ([LENGTH] if quick else [LENGTH, 2 * LENGTH])]
    return out


def strategy(row: dict) -> str:
    """The curve a result row belongs to (its label without the budget)."""
    s = row["setting"]
    tail = (" blocks" if s.get("block_length") else "") + (" + cache" if s.get("use_cache") else "")
    sampler = s.get("sampler", "first_hitting")
    order = s.get("order", s.get("unmasking", "random"))  # results written before hf_mdm 0.2 use the flat unmasking
    if sampler == "remdm" or s.get("remasking"):
        return "ReMDM-cap" + tail
    if sampler == "ancestral":
        return "ancestral (MDLM)" + tail
    if sampler == "confidence" or order != "random":
        if s.get("confidence_threshold") is not None:
            return "threshold" + tail
        return order + tail
    if (s.get("tokens_per_step") or 1) > 1:
        return "parallel FHS" + tail
    return ("FHS (exact" + (", block-factorised)" if s.get("block_length") else ")")) + (" + cache" if s.get("use_cache") else "")


def run_sweep(args) -> dict:
    from hf_mdm.evaluation.cli import main as evaluate

    argv = ["shakespeare-mdm", "--judge", "shakespeare-ar", "--num-samples", str(args.num_samples), "--batch-size",
            str(args.batch_size), "--length", str(LENGTH), "--seed", "0", "--output-dir", str(args.output_dir)]
    for text in settings(args.quick):
        argv += ["--setting", text]
    return evaluate(argv)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves: dict[str, list] = {}
    for row in results["rows"]:
        if row["kind"] != "mdm":
            continue
        curves.setdefault(strategy(row), []).append((row["nfe_per_sample"] / LENGTH, row["generative_perplexity"],
                                                     row["token_entropy"]))
    figure, (ppl_axis, entropy_axis) = plt.subplots(1, 2, figsize=(13, 5.2))
    colours = plt.get_cmap("tab20").colors
    for i, (name, points) in enumerate(sorted(curves.items())):
        points.sort()
        x = [p[0] for p in points]
        style = dict(marker="o" if "cache" not in name else "s", linestyle="-" if len(points) > 1 else "none",
                     color=colours[i % len(colours)], label=name)
        ppl_axis.plot(x, [p[1] for p in points], **style)
        entropy_axis.plot(x, [p[2] for p in points], **style)
    for axis, title in ((ppl_axis, "generative perplexity (shakespeare-ar judge), lower is likelier"),
                        (entropy_axis, "token entropy (nats), real text is about the reference")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("network calls per generated token")
        axis.set_title(title, fontsize=10)
        axis.grid(alpha=0.3)
    ppl_axis.set_yscale("log")
    entropy_axis.legend(fontsize=7, loc="lower right")
    figure.suptitle(f"shakespeare-mdm, {results['num_samples']} unconditional samples of {LENGTH} tokens per point")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def measure_cache(args) -> dict:
    """Cached vs uncached block decoding at the same number of network calls, in one run."""
    from transformers import AutoModel

    from hf_mdm.pretrained import pretrained_path

    model = AutoModel.from_pretrained(pretrained_path("shakespeare-mdm")).eval()
    base = dict(max_new_tokens=LENGTH, num_return_sequences=args.batch_size, sampler="confidence", steps=64,
                block_length=32)
    variants = {"no cache": {}, "prefix cache": dict(use_cache=True), "dual cache": dict(use_cache=True, cache_mode="dual")}
    times = {name: [] for name in variants}
    outputs = {}
    for repeat in range(args.repeats + 1):  # the first round warms up and is not timed
        for name, extra in variants.items():
            start = time.perf_counter()
            out = model.generate(generator=torch.Generator().manual_seed(repeat), return_dict_in_generate=True,
                                 **base, **extra)
            if repeat:
                times[name].append(time.perf_counter() - start)
            assert out.nfe == 64
    greedy = {name: model.generate(**base, **extra, temperature=0) for name, extra in variants.items()}
    report = {"setting": {k: v for k, v in base.items()}, "threads": torch.get_num_threads(), "repeats": args.repeats,
              "network_calls": 64}
    for name in variants:
        report[name] = {"median_seconds": statistics.median(times[name]), "seconds": times[name]}
    for name in ("prefix cache", "dual cache"):
        report[name]["speed_up"] = report["no cache"]["median_seconds"] / report[name]["median_seconds"]
        report[name]["greedy_agreement"] = (greedy[name] == greedy["no cache"]).double().mean().item()
    return report


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-samples", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds of the cache measurement")
    parser.add_argument("--quick", action="store_true", help="one budget per strategy")
    parser.add_argument("--output-dir", type=Path, default=OUTPUT)
    parser.add_argument("--skip-sweep", action="store_true", help="reuse results.json; redo the plot and the cache")
    args = parser.parse_args()
    args.output_dir.mkdir(parents=True, exist_ok=True)
    if args.skip_sweep:
        results = json.loads((args.output_dir / "results.json").read_text())
    else:
        results = run_sweep(args)
    plot(results, args.output_dir / "plot.png")
    cache = measure_cache(args)
    (args.output_dir / "cache.json").write_text(json.dumps(cache, indent=2) + "\n")
    exact = next(r for r in results["rows"] if r["kind"] == "mdm" and strategy(r) == "FHS (exact)")
    print(f"\nexact FHS: gen PPL {exact['generative_perplexity']:.1f}, entropy {exact['token_entropy']:.3f}, "
          f"{exact['nfe_per_sample'] / LENGTH:.2f} calls per token")
    for name in ("prefix cache", "dual cache"):
        print(f"{name}: {cache[name]['speed_up']:.2f}x the speed of uncached block decoding at 64 calls, "
              f"greedy agreement {100 * cache[name]['greedy_agreement']:.1f}%")
    print(f"wrote {args.output_dir}/results.md, plot.png and cache.json")


if __name__ == "__main__":
    main()
