"""Block diffusion decoding speed: exact first-hitting sampling with the block cache, against the same sampler
without the cache, full-sequence FHS on the bidirectional network, and autoregressive decoding with a KV cache.

    python benchmarks/block_diffusion.py                                  # L = 1024; about 15 minutes on 2 CPU cores
    python benchmarks/block_diffusion.py --length 128 --repeats 2         # a quick look, under a minute
    python benchmarks/block_diffusion.py --device cuda                     # on a GPU (the default when there is one)

One network size (`--layers` 4 of `--hidden` 256, `--heads` 4, SwiGLU MLP of `--intermediate` 1024, V = `--vocab`
4096 with [MASK] = V - 1), random weights (speed does not depend on what a network has learned), batch 1, a
`--prompt-length` 16 random prompt and L - 16 new tokens (L = `--length`, default 1024), sampled at temperature 1
(full vocabulary, no top-k / top-p), never stopping at EOS. The same weights go into every model:

  (1) cached:     `MDMLlamaConfig(diffusion_block_size=B)`, `generate(sampler="first_hitting", use_cache=True)`: exact
                  FHS (one token per network call) block by block; the prompt and each finished block are run once
                  and their keys and values cached (exact: a block never sees a later one). B in `--block-sizes`.
  (a) uncached:   the same with `use_cache=False`: each call runs the whole canvas (L positions) under the
                  block-causal mask. B in `--uncached-block-sizes` (4 only by default: the uncached call costs the
                  same whatever B, one pass over the whole canvas, and each of these runs takes minutes on a CPU).
  (b) full FHS:   the bidirectional model (`diffusion_block_size=None`), `generate(sampler="first_hitting")`: one
                  call per token over the whole canvas, no cache (there is nothing exact to cache).
  (c) AR:         transformers' `LlamaForCausalLM` of the same shapes and weights, `generate(do_sample=True,
                  max_new_tokens=min_new_tokens=L-16, use_cache=True)`: one call per token with a KV cache.
  (2) threshold:  confidence-ordered decoding inside each block with `confidence_threshold` (`--thresholds`, 0.9 and
                  0.7), with the cache, B in `--block-sizes`: every draw whose confidence reaches the threshold is
                  kept, at least one per call. On random weights the softmax over V = 4096 is nearly flat, no draw
                  reaches the threshold and this is one token per call (calls per token 1.0: a LOWER BOUND on the
                  speed-up a trained, confident model gets); it is run at `--random-head-thresholds` (0.9 only by
                  default: it is the same one call per token at any threshold). Every threshold is also run on a copy
                  whose output projection is multiplied by `--logit-scale` (100): peaked predictions that make the
                  threshold fire; its calls per token illustrate the mechanism and are not those of any trained
                  model.

Measured in one run: one short warm-up generation per setting on the full canvas shape (a prompt of L - 32 tokens,
32 new ones), then `--repeats` rounds; each round runs every setting once, in an order rotated from round to round,
so that a change in the machine's load hits every setting. The settings over the whole canvas ((a) and (b), minutes
each on a CPU) run in the first `--slow-repeats` rounds only (1 by default). Every timing is a WHOLE generation of
L - 16 tokens (nothing is extrapolated). Reported per setting: the median time per generated token (wall clock;
CUDA synchronised), tokens/s, the process's CPU time per token beside it (on a CPU), network calls (`nfe`) per
generated token, and ratios of the medians: cached / AR (goal at B = 4: <= 5), full FHS / cached (goal at B = 4 and
L = 1024: >= 10), uncached / cached, and threshold / cached FHS. Checks: the exact samplers make exactly one call per
generated token (nfe = L - 16), and cached and uncached FHS give the same tokens from the same seed (the cache is
exact; on CPU bit for bit).

`--output-dir` (default results/block_diffusion) gets results.json, results.md and plot.png (time per token of each
setting). `--threads` (default: every core this process may use) sets `torch.set_num_threads`. These machines are
noisy: the load average at the start and the end is printed and saved; compare ratios, not seconds, and only
within one run.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from hf_mdm import MDMLlamaConfig, MDMLlamaForMaskedDiffusion

REPO = Path(__file__).resolve().parents[1]
OUTPUT = REPO / "results" / "block_diffusion"
WARMUP_TOKENS = 32
GOAL_AR_RATIO = 5.0  # cached exact FHS at B = 4: at most this many times AR's time per token
GOAL_FULL_RATIO = 10.0  # ... and at least this many times faster than full-sequence FHS at L = 1024


def default_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def mdm_config(args, block_size: int | None) -> MDMLlamaConfig:
    return MDMLlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
        max_position_embeddings=args.length, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        diffusion_block_size=block_size,
    )


def build_models(args, device):
    """{None: bidirectional, B: block-diffusion with block B, ("peaked", B): the same with a scaled head} and the AR
    model, all holding one set of random weights (the parameter names of hf_mdm's Llama family are Llama's)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(args.seed)
    base = MDMLlamaForMaskedDiffusion(mdm_config(args, None)).eval()
    state = base.state_dict()
    models = {None: base}
    for block in sorted(set(args.block_sizes) | set(args.uncached_block_sizes)):
        model = MDMLlamaForMaskedDiffusion(mdm_config(args, block)).eval()
        model.load_state_dict(state)
        models[block] = model
        if args.thresholds and args.logit_scale != 1.0:
            peaked = MDMLlamaForMaskedDiffusion(mdm_config(args, block)).eval()
            peaked.load_state_dict(state)
            with torch.no_grad():
                peaked.lm_head.weight.mul_(args.logit_scale)
            models[("peaked", block)] = peaked
    c = base.config
    ar = LlamaForCausalLM(LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim,
        max_position_embeddings=c.max_position_embeddings,
        rms_norm_eps=c.rms_norm_eps, rope_parameters=dict(c.rope_parameters), tie_word_embeddings=False,
        attention_bias=False, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )).eval()
    missing, unexpected = ar.load_state_dict(state, strict=False)
    if missing or unexpected:
        sys.exit(f"block_diffusion.py: the weights do not map onto LlamaForCausalLM: missing {missing}, unexpected "
                 f"{unexpected}.")
    models["ar"] = ar
    return {key: model.to(device) for key, model in models.items()}


def settings(args) -> list[dict]:
    """Every measured setting: name, group, model key, block size, generate() kwargs, whether it runs over the whole
    canvas each call (slow)."""
    out = []
    for block in args.block_sizes:
        out.append(dict(name=f"cached FHS, B={block}", group="cached", block=block, model=block, slow=False,
                        kwargs=dict(sampler="first_hitting", use_cache=True)))
    for block in args.uncached_block_sizes:
        out.append(dict(name=f"uncached FHS, B={block}", group="uncached", block=block, model=block, slow=True,
                        kwargs=dict(sampler="first_hitting", use_cache=False)))
    out.append(dict(name="full-sequence FHS (bidirectional)", group="full", block=None, model=None, slow=True,
                    kwargs=dict(sampler="first_hitting")))
    out.append(dict(name="AR (LlamaForCausalLM, KV cache)", group="ar", block=None, model="ar", slow=False, kwargs={}))
    for block in args.block_sizes:
        for threshold in args.thresholds:
            kwargs = dict(sampler="confidence", order="confidence", confidence_threshold=threshold, use_cache=True)
            if threshold in args.random_head_thresholds:
                out.append(dict(name=f"threshold {threshold:g}, B={block}, random head", group="threshold",
                                block=block, model=block, slow=False, threshold=threshold, head="random",
                                kwargs=kwargs))
            if args.logit_scale != 1.0:
                out.append(dict(name=f"threshold {threshold:g}, B={block}, head x{args.logit_scale:g}",
                                group="threshold", block=block, model=("peaked", block), slow=False,
                                threshold=threshold, head=f"x{args.logit_scale:g}", kwargs=kwargs))
    return out


def make_runner(setting, models, device, seed):
    """A function (prompt, new_tokens) -> (sequences, network calls) for one setting."""
    model = models[setting["model"]]
    if setting["group"] == "ar":
        def run_ar(prompt, new_tokens):
            torch.manual_seed(seed)  # transformers samples from the global generator
            out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=True, temperature=1.0,
                                 top_k=0, top_p=1.0, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                 use_cache=True, pad_token_id=0)
            return out, new_tokens  # one call per token (the prefill is one call on the prompt, and the last token
            # needs none: the count is the same)
        return run_ar

    def run_mdm(prompt, new_tokens):
        out = model.generate(prompt, max_new_tokens=new_tokens, temperature=1.0, stop_at_eos=False,
                             return_dict_in_generate=True, generator=torch.Generator(device).manual_seed(seed),
                             **setting["kwargs"])
        return out.sequences, int(out.nfe)
    return run_mdm


def timed(fn, device) -> tuple[float, float, object]:
    """(wall seconds, CPU seconds of this process, fn's result)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - wall, time.process_time() - cpu, result


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def ratios(rows: list[dict], args) -> list[dict]:
    """Ratios of median times per token, all from this run."""
    by = {row["name"]: row for row in rows}
    ar = next(row for row in rows if row["group"] == "ar")
    full = next(row for row in rows if row["group"] == "full")
    out = []

    def add(what, numerator, denominator, goal=None, block=None):
        value = numerator["median_s_per_token"] / denominator["median_s_per_token"]
        entry = dict(ratio=what, block=block, value=value, numerator=numerator["name"], denominator=denominator["name"])
        if goal is not None:
            entry.update(goal=goal[0], met=goal[1](value))
        out.append(entry)

    for block in args.block_sizes:
        cached = by[f"cached FHS, B={block}"]
        four = block == 4
        add("cached / AR", cached, ar, (f"<= {GOAL_AR_RATIO:g}", lambda v: v <= GOAL_AR_RATIO) if four else None, block)
        full_goal = four and args.length == 1024
        add("full FHS / cached", full, cached,
            (f">= {GOAL_FULL_RATIO:g}", lambda v: v >= GOAL_FULL_RATIO) if full_goal else None, block)
        if f"uncached FHS, B={block}" in by:
            add("uncached / cached", by[f"uncached FHS, B={block}"], cached, None, block)
        for row in rows:
            if row["group"] == "threshold" and row["block"] == block:
                add(f"{row['name']} / cached FHS", row, cached, None, block)
    add("full FHS / AR", full, ar)
    return out


def markdown(report: dict) -> str:
    m, d = report["model"], report["decoding"]
    lines = [
        f"Block diffusion decoding speed, {report['device']} ({report['threads']} thread(s) on a CPU), torch "
        f"{report['torch']}, transformers {report['transformers']}. One network: {m['layers']} layers of width "
        f"{m['hidden']}, {m['heads']} heads, MLP {m['intermediate']}, V = {m['vocab']}, random weights (seed "
        f"{m['seed']}), the same in every model. Batch 1, prompt {d['prompt_length']} tokens, {d['new_tokens']} new "
        f"tokens (L = {d['length']}), temperature 1, no EOS stop. Median over {report['repeats']} interleaved rounds "
        f"({report['slow_repeats']} for the whole-canvas settings: uncached and full FHS); every timing is a whole "
        f"generation. Load average at start / end: {report['load_average_start']} / {report['load_average_end']}. "
        f"Wall time of the benchmark: {report['benchmark_wall_s']:.0f} s.",
        "",
        f"    {report.get('command', 'python benchmarks/block_diffusion.py')}",
        "",
        "| setting | ms / token | tokens / s | CPU ms / token | calls / token | runs | check |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for row in report["settings"]:
        cpu = f"{1000 * row['median_cpu_s_per_token']:.2f}" if row["median_cpu_s_per_token"] is not None else "-"
        lines.append(f"| {row['name']} | {1000 * row['median_s_per_token']:.2f} | {row['tokens_per_s']:.1f} | {cpu} | "
                     f"{row['calls_per_token']:.3f} | {len(row['s_per_token'])} | {row['check']} |")
    lines += ["", "| ratio (of median time per token) | B | value | goal | met |", "|---|---:|---:|---|---|"]
    for r in report["ratios"]:
        lines.append(f"| {r['ratio']} | {r['block'] if r['block'] is not None else '-'} | {r['value']:.2f} | "
                     f"{r.get('goal', '')} | {'' if 'met' not in r else ('yes' if r['met'] else 'NO')} |")
    lines += ["", "Threshold decoding on random weights (\"random head\") keeps one token per call: the softmax over "
              f"V = {m['vocab']} is nearly flat, so its calls per token are a lower bound on the speed-up a trained "
              f"model gets. \"head x{m['logit_scale']:g}\" multiplies the output projection by {m['logit_scale']:g} to "
              "make predictions peaked: its calls per token show the mechanism at work, not any trained model's rate."]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["settings"]
    colors = {"cached": "tab:green", "uncached": "tab:orange", "full": "tab:red", "ar": "tab:blue",
              "threshold": "tab:purple"}
    figure, axis = plt.subplots(figsize=(10, 0.45 * len(rows) + 1.5))
    values = [1000 * row["median_s_per_token"] for row in rows]
    axis.barh(range(len(rows)), values, color=[colors[row["group"]] for row in rows])
    axis.set_yticks(range(len(rows)), [f"{row['name']} ({row['calls_per_token']:.2f} calls/token)" for row in rows])
    axis.invert_yaxis()
    axis.set_xscale("log")
    axis.set_xlabel("median wall time per generated token (ms, log scale)")
    axis.set_xlim(right=max(values) * 1.8)  # room for the labels
    for i, value in enumerate(values):
        axis.text(value, i, f" {value:.1f}", va="center", fontsize=8)
    d = report["decoding"]
    axis.set_title(f"L = {d['length']} ({d['new_tokens']} new tokens), {report['device']}, "
                   f"{report['threads']} thread(s)", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--length", type=int, default=1024, help="L: prompt plus new tokens")
    parser.add_argument("--prompt-length", type=int, default=16)
    parser.add_argument("--block-sizes", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--uncached-block-sizes", type=int, nargs="*", default=[4],
                        help="block sizes also run without the cache (each run is one pass over L per token)")
    parser.add_argument("--thresholds", type=float, nargs="*", default=[0.9, 0.7])
    parser.add_argument("--random-head-thresholds", type=float, nargs="*", default=[0.9],
                        help="thresholds also run on the random-weight head (one token per call at any threshold "
                             "there, so one is enough by default)")
    parser.add_argument("--logit-scale", type=float, default=100.0,
                        help="factor on the output projection of the peaked copy for threshold decoding (1: none)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of the fast settings")
    parser.add_argument("--slow-repeats", type=int, default=1,
                        help="rounds of the whole-canvas settings (uncached, full FHS); at most --repeats")
    parser.add_argument("--threads", type=int, default=default_threads(),
                        help="torch.set_num_threads (default: every core this process may use)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--intermediate", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", type=Path, default=OUTPUT)
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args()
    new_tokens = args.length - args.prompt_length
    if new_tokens < WARMUP_TOKENS or args.prompt_length < 1:
        sys.exit(f"block_diffusion.py: need --prompt-length >= 1 and --length - --prompt-length >= {WARMUP_TOKENS}.")
    if args.slow_repeats < 1 or args.repeats < args.slow_repeats:
        sys.exit("block_diffusion.py: need 1 <= --slow-repeats <= --repeats.")
    if not set(args.uncached_block_sizes) <= set(args.block_sizes):
        sys.exit("block_diffusion.py: every --uncached-block-sizes must be among --block-sizes.")

    from transformers import __version__ as transformers_version
    from transformers.utils import logging as transformers_logging
    transformers_logging.set_verbosity_error()

    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    models = build_models(args, device)
    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
    else:
        where = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    load_start = load_average()
    print(f"{where}, {torch.get_num_threads()} thread(s), torch {torch.__version__}, transformers "
          f"{transformers_version}; load average {load_start}")
    if device.type == "cpu" and load_start is not None and load_start[0] > 0.5:
        print(f"WARNING: the machine is busy (1-minute load average {load_start[0]} before this run, "
              f"{os.cpu_count()} cores): other processes share the cores and every time below is inflated."
              + (" With more than one thread it is worse: every multi-threaded op waits for a descheduled thread, "
                 "and the small per-token calls (cached, AR) slow down several-fold, more than the large "
                 "whole-canvas ones. Prefer a quiet machine, or --threads 1, for ratios you mean to quote."
                 if torch.get_num_threads() > 1 else ""))
    print(f"network: {args.layers} layers of width {args.hidden}, {args.heads} heads, MLP {args.intermediate}, "
          f"V = {args.vocab}; L = {args.length}: prompt {args.prompt_length} + {new_tokens} new tokens")

    prompt = torch.randint(3, args.vocab - 1, (1, args.prompt_length),
                           generator=torch.Generator().manual_seed(args.seed)).to(device)
    # Warm-up on the full canvas shape at a fraction of the cost: a prompt of L - 32 tokens and 32 new ones.
    warm_prompt = torch.randint(3, args.vocab - 1, (1, args.length - WARMUP_TOKENS),
                                generator=torch.Generator().manual_seed(args.seed + 1)).to(device)
    plan = settings(args)
    runners = {s["name"]: make_runner(s, models, device, args.seed) for s in plan}
    runs = sum(args.slow_repeats if s["slow"] else args.repeats for s in plan)
    results = {s["name"]: dict(wall=[], cpu=[], calls=[], sequences=None) for s in plan}
    with torch.inference_mode(), tqdm(total=len(plan) + runs, desc="block diffusion", unit="run",
                                      dynamic_ncols=True) as bar:
        for s in plan:
            bar.set_postfix_str(f"warm-up: {s['name']}")
            runners[s["name"]](warm_prompt, WARMUP_TOKENS)
            bar.update()
        for round_index in range(args.repeats):
            shift = round_index % len(plan)
            for s in plan[shift:] + plan[:shift]:
                if s["slow"] and round_index >= args.slow_repeats:
                    continue
                bar.set_postfix_str(f"round {round_index + 1}: {s['name']}")
                wall, cpu, (sequences, calls) = timed(lambda: runners[s["name"]](prompt, new_tokens), device)
                entry = results[s["name"]]
                entry["wall"].append(wall)
                entry["cpu"].append(cpu)
                entry["calls"].append(calls)
                if entry["sequences"] is None:
                    entry["sequences"] = sequences.cpu()
                bar.write(f"  round {round_index + 1}  {s['name']:44s} {1000 * wall / new_tokens:9.2f} ms/token  "
                          f"{calls / new_tokens:.3f} calls/token")
                bar.update()
    load_end = load_average()

    rows = []
    for s in plan:
        entry = results[s["name"]]
        sequences = entry["sequences"]
        generated = sequences.shape[1] - args.prompt_length
        s_per_token = [w / new_tokens for w in entry["wall"]]
        cpu_per_token = [c / new_tokens for c in entry["cpu"]]
        calls = statistics.median(entry["calls"])
        checks = []
        if generated != new_tokens:
            checks.append(f"generated {generated} != {new_tokens}")
        if s["group"] in ("cached", "uncached", "full") and any(c != new_tokens for c in entry["calls"]):
            checks.append(f"nfe {entry['calls']} != {new_tokens}")
        if s["group"] == "uncached":
            cached = results[f"cached FHS, B={s['block']}"]["sequences"]
            same = bool(torch.equal(cached, sequences))
            checks.append("same tokens as cached" if same else
                          f"tokens differ from cached ({(cached != sequences).float().mean().item():.3f})")
        if not checks and s["group"] in ("cached", "uncached", "full"):
            checks.append("nfe = tokens")
        row = dict(
            name=s["name"], group=s["group"], block=s["block"], threshold=s.get("threshold"), head=s.get("head"),
            generate_kwargs=s["kwargs"], s_per_token=s_per_token, median_s_per_token=statistics.median(s_per_token),
            cpu_s_per_token=cpu_per_token,
            median_cpu_s_per_token=statistics.median(cpu_per_token) if device.type == "cpu" else None,
            network_calls=entry["calls"], calls_per_token=calls / new_tokens, check="; ".join(checks) or "-",
        )
        row["tokens_per_s"] = 1.0 / row["median_s_per_token"]
        rows.append(row)

    report = dict(
        device=where, threads=torch.get_num_threads(), torch=torch.__version__, transformers=transformers_version,
        python=platform.python_version(), command=" ".join(["python", "benchmarks/block_diffusion.py", *sys.argv[1:]]),
        repeats=args.repeats, slow_repeats=args.slow_repeats,
        load_average_start=load_start, load_average_end=load_end,
        model=dict(layers=args.layers, hidden=args.hidden, heads=args.heads, intermediate=args.intermediate,
                   vocab=args.vocab, seed=args.seed, logit_scale=args.logit_scale,
                   parameters=sum(p.numel() for p in models[None].parameters())),
        decoding=dict(length=args.length, prompt_length=args.prompt_length, new_tokens=new_tokens, batch=1,
                      temperature=1.0),
        settings=rows,
    )
    report["ratios"] = ratios(rows, args)
    report["benchmark_wall_s"] = time.perf_counter() - started

    text = markdown(report)
    print()
    print(text)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.output_dir / "results.md").write_text(text)
    written = ["results.json", "results.md"]
    if not args.no_plot:
        plot(report, args.output_dir / "plot.png")
        if (args.output_dir / "plot.png").exists():
            written.append("plot.png")
    print(f"wrote {', '.join(written)} to {args.output_dir}")


if __name__ == "__main__":
    main()
