"""Training speed: tokens per second of hf_mdm's Accelerate loop against a bare PyTorch loop, in one run.

Both loops train the same MDM (same config, batch, block size and autocast dtype) with the same objective
(`MaskedDiffusionObjective.sequence_losses`) and AdamW; the bare loop has no Accelerate, no data pipeline (one fixed
batch already on the device), no scheduler, logging or sampler. So the ratio is the cost of the loop's machinery.
Each measurement runs in its own fresh process (so peak memory is its own), alternating bare / loop `--repeats`
times; the table gives medians. Goal: loop / bare >= 0.95.

    OMP_NUM_THREADS=1 python benchmarks/training.py --clock cpu     # CPU, the "mini" preset (4 x 256), ~4 minutes
    python benchmarks/training.py --device cuda --mixed-precision bf16 --preset mdlm-owt --block-size 1024 --batch-size 32

Peak memory: CUDA's max_memory_allocated on a GPU, the process's peak RSS on a CPU.
"""

import argparse
import json
import multiprocessing
import random
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch


WORDS = ("the of and to in is that for it as with was on be by at this from or an are which not have but all one "
         "were their been has when who will more no if out so said what up its about into than them can only other").split()


def peak_memory_mb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def bare_loop(args, folder: Path) -> dict:
    """The baseline: a fixed batch, forward, objective, backward, clip, AdamW step."""
    from transformers import AutoTokenizer

    from hf_mdm.training.models import build_model, build_model_config
    from hf_mdm.training.objectives import get_objective

    tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer")
    config = build_model_config(args.preset, False, tokenizer, args.block_size)
    torch.manual_seed(0)
    model = build_model(config).to(args.device).train()
    objective = get_objective("mdm", config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
    input_ids = torch.randint(0, config.mask_token_id, (args.batch_size, args.block_size), device=args.device)
    dtype = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.mixed_precision]
    generator = torch.Generator().manual_seed(0)

    def step():
        noise = objective.draw_noise(generator, args.batch_size, args.block_size).to(args.device)
        with torch.autocast(args.device, dtype=dtype, enabled=dtype is not None):
            loss = objective.sequence_losses(model, input_ids, noise).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(args.warmup_steps):
        step()
    if args.device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    if args.device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {"tokens_per_s": args.steps * args.batch_size * args.block_size / seconds, "peak_mb": peak_memory_mb(args.device)}


def accelerate_loop(args, folder: Path) -> dict:
    """hf_mdm's loop; tokens/s from its own log, over the steps after the warm-up (no validation in between)."""
    from hf_mdm.training import TrainConfig, train

    output_dir = Path(tempfile.mkdtemp(dir=folder))
    train(TrainConfig(train_files=[str(folder / "corpus.txt")], tokenizer=str(folder / "tokenizer"),
                      model_config=args.preset, block_size=args.block_size, batch_size=args.batch_size,
                      max_steps=args.warmup_steps + args.steps, warmup_steps=10, log_every=args.warmup_steps,
                      eval_every=10**9, eval_blocks=args.batch_size, save_every=0, output_dir=str(output_dir),
                      mixed_precision=args.mixed_precision))
    log = [json.loads(line) for line in (output_dir / "log.jsonl").read_text().splitlines()]
    # log_every = warmup_steps: the first interval is the warm-up (and the step-0 validation); the rest is measured.
    measured = [line["tokens_per_s"] for line in log if "tokens_per_s" in line][1:]
    return {"tokens_per_s": statistics.mean(measured), "peak_mb": peak_memory_mb(args.device)}


def child(kind, args, folder, queue):
    if args.device == "cpu":
        import os

        os.environ["ACCELERATE_USE_CPU"] = "1"
    if args.clock == "cpu":
        time.perf_counter = time.process_time  # both loops (and the loop's own tokens/s log) read this clock
    queue.put((bare_loop if kind == "bare" else accelerate_loop)(args, folder))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--preset", default="mini")
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--mixed-precision", default="no", choices=("no", "bf16", "fp16"))
    parser.add_argument("--warmup-steps", type=int, default=5)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--clock", default="wall", choices=("wall", "cpu"),
                        help="cpu: the process's CPU time instead of wall time. On a shared CPU machine, with "
                             "OMP_NUM_THREADS=1, it is immune to other jobs' load; meaningless on a GPU")
    args = parser.parse_args()

    from hf_mdm.training import train_bpe_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        rng = random.Random(0)
        words = [rng.choice(WORDS) for _ in range(args.batch_size * args.block_size * 40)]
        (folder / "corpus.txt").write_text("\n\n".join(" ".join(words[i : i + 200]) for i in range(0, len(words), 200)))
        train_bpe_tokenizer([folder / "corpus.txt"], vocab_size=4096, output_dir=folder / "tokenizer")

        context = multiprocessing.get_context("spawn")
        results = {"bare": [], "loop": []}
        for _ in range(args.repeats):
            for kind in ("bare", "loop"):
                queue = context.Queue()
                process = context.Process(target=child, args=(kind, args, folder, queue))
                process.start()
                results[kind].append(queue.get())
                process.join()
                print(kind, results[kind][-1], flush=True)

    median = {kind: {key: statistics.median(r[key] for r in runs) for key in ("tokens_per_s", "peak_mb")}
              for kind, runs in results.items()}
    ratios = [loop["tokens_per_s"] / bare["tokens_per_s"] for bare, loop in zip(results["bare"], results["loop"])]
    memory = "peak GPU memory (MiB)" if args.device == "cuda" else "peak RSS (MiB)"
    print(f"\n{args.device}, preset {args.preset}, batch {args.batch_size} x {args.block_size} tokens, "
          f"mixed precision {args.mixed_precision}, torch threads {torch.get_num_threads()}, {args.clock} clock, "
          f"{args.steps} timed steps after {args.warmup_steps}, {args.repeats} alternating repeats (medians)\n")
    print(f"| loop | tokens/s | {memory} |\n| --- | --- | --- |")
    for kind, label in (("bare", "bare PyTorch"), ("loop", "hf_mdm (Accelerate)")):
        print(f"| {label} | {median[kind]['tokens_per_s']:.0f} | {median[kind]['peak_mb']:.0f} |")
    print(f"\nloop / bare tokens/s: {statistics.median(ratios):.3f} (per repeat: {', '.join(f'{r:.3f}' for r in ratios)})")


if __name__ == "__main__":
    main()
