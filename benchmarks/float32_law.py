"""Which law does our float32 categorical draw follow on this device: the uniform-grid law or Prop. 5.2's?

    OMP_NUM_THREADS=1 python benchmarks/float32_law.py --races 15000000     # 1.5e10 draws: ~10 min on one core

The race (hf_mdm.precision): `--tokens` categories of weight `--weight-cells` x 2^-24 against "stay masked" with
the rest of the mass, drawn by CategoricalSampler in float32, as one ancestral step draws a position whose tokens
have fallen to a few 2^-24 each. Every race in which a token wins is counted and compared with the grid law
(exact for torch's CPU uniforms: `race_win_probability`), with Prop. 5.2 (`truncated_gumbel_probabilities`) and
with the true probability, by two-sided Poisson p-values. Writes a JSON record (--output).

A token wins with probability about 2^-24 per draw whatever the design, so telling the laws apart takes about
1e10 draws: too many for the test suite, which makes the same comparison in float16 (grid 2^-11) instead.
"""

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from scipy import stats

from hf_mdm.precision import (UNIFORM_SPACING, TRUNCATION, grid_suppression, prop52_suppression, race_win_probability,
                              truncated_gumbel_probabilities, zero_probability)
from hf_mdm.sampling_mdm import CategoricalSampler


def poisson_p(observed: int, expected: float) -> float:
    """Two-sided Poisson p-value (twice the smaller tail, at most 1)."""
    return float(min(1.0, 2 * min(stats.poisson.cdf(observed, expected), stats.poisson.sf(observed - 1, expected))))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--races", type=int, default=15_000_000)
    parser.add_argument("--tokens", type=int, default=1000)
    parser.add_argument("--weight-cells", type=float, default=2.0, help="token weight in units of 2^-24")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16"))
    parser.add_argument("--chunk", type=int, default=20_000, help="races per draw call")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output", default="results/precision/float32_law.json")
    args = parser.parse_args()

    spacing = UNIFORM_SPACING[args.dtype]
    weight = args.weight_cells * UNIFORM_SPACING["float32"] if args.dtype == "float32" else args.weight_cells * spacing
    rest = 1.0 - args.tokens * weight
    dtype = getattr(torch, args.dtype)
    weights = torch.tensor([weight] * args.tokens + [rest], dtype=dtype, device=args.device)
    sampler = CategoricalSampler(dtype=dtype, generator=torch.Generator(args.device).manual_seed(args.seed))
    started, wins, done = time.perf_counter(), 0, 0
    while done < args.races:
        size = min(args.chunk, args.races - done)
        wins += int((sampler.draw(weights.expand(size, -1)) != args.tokens).sum())
        done += size
    seconds = time.perf_counter() - started

    pi = np.array([weight] * args.tokens + [rest])
    expected = {
        "grid (race_win_probability, exact on the CPU grid)":
            args.races * race_win_probability(weight, args.tokens, rest, spacing, zero_probability(args.dtype)),
        "grid closed form r / (e^r - 1)": args.races * args.tokens * weight * float(grid_suppression(weight, rest, spacing)),
        "Prop. 5.2 (truncated_gumbel_probabilities)":
            args.races * float(truncated_gumbel_probabilities(pi, TRUNCATION[args.dtype])[: args.tokens].sum()),
        "Prop. 5.2 small-weight form e^-r": args.races * args.tokens * weight * float(prop52_suppression(weight, rest, TRUNCATION[args.dtype])),
        "true probability": args.races * args.tokens * weight,
    }
    record = dict(dtype=args.dtype, device=args.device, torch=torch.__version__, races=args.races, tokens=args.tokens,
                  token_weight=weight, stay_masked_weight=rest, r=spacing * rest / weight, seed=args.seed,
                  draws=args.races * (args.tokens + 1), seconds=round(seconds, 1), token_wins=wins,
                  expected={name: round(value, 2) for name, value in expected.items()},
                  two_sided_poisson_p={name: poisson_p(wins, value) for name, value in expected.items()},
                  command=" ".join(["python", "benchmarks/float32_law.py"] + [f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()]))
    print(json.dumps(record, indent=2))
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
