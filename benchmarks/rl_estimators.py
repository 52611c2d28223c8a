"""Bias and variance of the RL log-probability estimators (hf_mdm.rl.estimators) on the exact oracle denoiser.

The oracle (tests/oracle.py) is a perfect denoiser for a known joint over sequences of 4 tokens from 3, so every
quantity is exact: for each completion y of a prompt c, log p(y | c), the ELBO (equal to it for this denoiser) and
each estimator's expectation over its own masks are enumerated (tests/rl_exact.py); the per-draw standard deviation
is measured from `--rows` seeded draws. Reported over all completions of every prompt: the mean and largest |bias|
(expectation - log p), the mean standard deviation of one estimate, the correlation across completions between the
expectation and log p (what ranks completions, which is what a policy gradient with group baselines reads), and the
network passes per estimate.

    python benchmarks/rl_estimators.py --output results/rl/estimators.json
"""

import argparse
import itertools
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from oracle import LENGTH, TOKENS  # noqa: E402
from rl_exact import exact_elbo, exact_logp, expected_coupled, expected_diffu_grpo, oracle  # noqa: E402

from hf_mdm.rl import build_estimator, completion_logps  # noqa: E402

ESTIMATORS = [
    ("diffu_grpo p_mask_prompt=0", "diffu_grpo", {"p_mask_prompt": 0.0}),
    ("diffu_grpo p_mask_prompt=0.15 (d1)", "diffu_grpo", {"p_mask_prompt": 0.15}),
    ("coupled t~U[0.2,0.8] (DiffuCoder)", "coupled", {}),
    ("elbo 1 draw", "elbo", {"elbo_samples": 1}),
    ("elbo 4 draws", "elbo", {"elbo_samples": 4}),
    ("elbo 16 draws", "elbo", {"elbo_samples": 16}),
]


def expectation(model, name, settings, sequence, prompt_length) -> float:
    if name == "diffu_grpo":
        return expected_diffu_grpo(model, sequence, prompt_length, settings["p_mask_prompt"])
    if name == "coupled":
        return expected_coupled(model, sequence, prompt_length)
    return exact_elbo(model, sequence, prompt_length)


def pearson(a: list[float], b: list[float]) -> float:
    x, y = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    x, y = x - x.mean(), y - y.mean()
    return float((x * y).sum() / (x.norm() * y.norm()))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2000, help="seeded draws per completion for the variance")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    model = oracle()
    results = []
    for label, name, settings in ESTIMATORS:
        estimator = build_estimator(name, **settings)
        for prompt_length in (1, 2):
            biases, stds, expected, exact = [], [], [], []
            for sequence in itertools.product(range(TOKENS), repeat=LENGTH):
                if prompt_length == 2 and sequence[0] != 0:  # 27 completions of each length: prompts 0, 1, 2; 00..02
                    continue
                sequence = list(sequence)
                truth = exact_logp(model, sequence, prompt_length)
                mean = expectation(model, name, settings, sequence, prompt_length)
                ids = torch.tensor(sequence).repeat(args.rows, 1)
                seeds = torch.arange(args.rows) + 1_000_000 * len(results)
                draws = completion_logps(model, estimator, ids, None, LENGTH - prompt_length, seeds)[0].double().sum(1)
                biases.append(mean - truth)
                stds.append(float(draws.std()))
                expected.append(mean)
                exact.append(truth)
            results.append({
                "estimator": label, "prompt_length": prompt_length, "completions": len(biases),
                "mean_abs_bias": sum(abs(b) for b in biases) / len(biases), "max_abs_bias": max(abs(b) for b in biases),
                "mean_bias": sum(biases) / len(biases), "mean_std": sum(stds) / len(stds),
                "correlation_with_logp": pearson(expected, exact),
                "passes_per_estimate": estimator.copies_per_row,
            })
    header = f"{'estimator':36} {'prompt':>6} {'mean |bias|':>11} {'max |bias|':>10} {'std':>7} {'corr':>6} {'passes':>6}"
    print(header)
    for r in results:
        print(f"{r['estimator']:36} {r['prompt_length']:>6} {r['mean_abs_bias']:>11.4f} {r['max_abs_bias']:>10.4f} "
              f"{r['mean_std']:>7.4f} {r['correlation_with_logp']:>6.3f} {r['passes_per_estimate']:>6}")
    print("bias = E[estimate] - log p(completion | prompt), nats per completion, exact (enumerated); std of one "
          f"estimate from {args.rows} draws; corr: Pearson over completions of E[estimate] and log p.")
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps({"rows": args.rows, "results": results}, indent=1))
        print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
