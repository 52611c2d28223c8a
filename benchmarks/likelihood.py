"""Speed of hf_mdm's lm-eval likelihoods: requests per second and network calls per request against mc_samples.

    python benchmarks/likelihood.py                    # the shipped shakespeare-mdm, a few minutes on 2 CPU cores

Requests are (context, continuation) pairs of random token ids (speed does not depend on the text): `--requests`
of them, contexts of `--context` tokens, continuations of `--continuation` tokens. Every request becomes
mc_samples masked copies, packed `--batch-size` per network call, with logits at the masked positions only, so
the cost model is

    network calls = ceil(requests x mc_samples / batch_size)   (+ one call per continuation token and batch of
                                                                 requests for the greedy check, is_greedy)

Each figure is measured in this one run; the ratio columns compare with mc_samples = 16.
"""

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import AutoModel

from hf_mdm.evaluation.likelihood import greedy_matches, mc_loglikelihood
from hf_mdm.pretrained import pretrained_path


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--context", type=int, default=48)
    parser.add_argument("--continuation", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--mc-samples", type=int, nargs="+", default=[16, 64, 128])
    parser.add_argument("--out", type=Path, default=None, help="write the table as JSON")
    args = parser.parse_args()
    model = AutoModel.from_pretrained(pretrained_path("shakespeare-mdm")).eval()
    generator = torch.Generator().manual_seed(0)
    requests = [(torch.randint(0, 4096, (args.context,), generator=generator).tolist(),
                 torch.randint(0, 4096, (args.continuation,), generator=generator).tolist())
                for _ in range(args.requests)]
    calls = []
    hook = model.model.register_forward_pre_hook(lambda module, inputs: calls.append(1))
    rows = []
    for mc in args.mc_samples:
        calls.clear()
        start = time.perf_counter()
        estimates = mc_loglikelihood(model, requests, mc_samples=mc, batch_size=args.batch_size)
        seconds = time.perf_counter() - start
        rows.append(dict(mc_samples=mc, seconds=seconds, requests_per_second=args.requests / seconds,
                         network_calls=len(calls), calls_per_request=len(calls) / args.requests,
                         mean_stderr=sum(e.stderr for e in estimates) / len(estimates)))
    calls.clear()
    start = time.perf_counter()
    greedy_matches(model, requests, batch_size=args.batch_size)
    greedy = dict(seconds=time.perf_counter() - start, network_calls=len(calls))
    hook.remove()
    print(f"{args.requests} requests, context {args.context}, continuation {args.continuation}, batch {args.batch_size}, "
          f"{torch.get_num_threads()} threads")
    print("| mc_samples | network calls | calls / request | requests / s | time vs 16 | mean stderr (nats) |")
    print("|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['mc_samples']} | {row['network_calls']} | {row['calls_per_request']:.2f} | "
              f"{row['requests_per_second']:.1f} | {row['seconds'] / rows[0]['seconds']:.2f}x | {row['mean_stderr']:.3f} |")
    print(f"greedy check (is_greedy): {greedy['network_calls']} calls, {greedy['seconds']:.1f} s")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(dict(arguments=vars(args) | {"out": str(args.out)}, rows=rows, greedy=greedy),
                                       indent=2) + "\n")


if __name__ == "__main__":
    main()
