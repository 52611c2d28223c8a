"""Sampling speed: first-hitting vs ancestral, float64 vs float32, and FHS against bare forward passes.

Every figure is a ratio of timings taken in this one run (the machines are noisy; absolute seconds are printed
for reference only). Random weights: speed does not depend on what the model has learned.

    python benchmarks/sampling.py                  # all of (a)-(d); about 10 minutes on 2 CPU cores
    python benchmarks/sampling.py --skip-paper     # (a)-(c) only
    python benchmarks/sampling.py --device cuda    # on a GPU

(a) FHS generate time / (NFE x bare forward time at the same batch): goal <= 1.0, since FHS computes logits only
    at the positions it unmasks.
(b) FHS vs ancestral with steps = L and 4L, float64.
(c) FHS float64 vs float32: goal <= 3% overhead.
(d) The paper's shapes (V = 50258, L = 1024, batch 1) with a narrow network: FHS / ancestral at 1000 steps. Both
    samplers cost the same at every step, so this one times a sample of steps of each and multiplies by the
    number of steps (FHS: 1024 calls; ancestral: 1000), which keeps it to minutes on a CPU.
"""

import argparse
import statistics
import time

import torch

from hf_mdm import MDMConfig, MDMForMaskedDiffusion
from hf_mdm.sampling_mdm import CategoricalSampler, DiffusionState, build_sampler, get_noise_schedule


def timed(fn, repeats: int, device: str) -> float:
    """Median wall time of `fn()` over `repeats` runs, after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def make_model(vocab, length, layers, width, heads, device):
    config = MDMConfig(vocab_size=vocab, hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads,
                       cond_dim=64, max_position_embeddings=length, dropout=0.0)
    torch.manual_seed(0)
    model = MDMForMaskedDiffusion(config)
    with torch.no_grad():  # adaLN-zero init gives all-zero logits; random weights give realistic softmax work
        for param in model.parameters():
            param.normal_(0, 0.02)
    return model.eval().to(device)


def small_model_ratios(args):
    vocab, length, batch = 4096, 256, 8
    model = make_model(vocab, length, layers=4, width=256, heads=4, device=args.device)
    ids = torch.full((batch, length), model.config.mask_token_id, device=args.device)

    def generate(**kwargs):
        generator = torch.Generator(device="cpu").manual_seed(0)
        return model.generate(max_new_tokens=length, num_return_sequences=batch, generator=generator,
                              return_dict_in_generate=True, **kwargs)

    with torch.no_grad():
        forward = timed(lambda: model(ids), args.repeats * 5, args.device)
    fhs64 = timed(lambda: generate(sampling_dtype="float64"), args.repeats, args.device)
    fhs32 = timed(lambda: generate(sampling_dtype="float32"), args.repeats, args.device)
    nfe = generate().nfe
    anc_l = timed(lambda: generate(sampler="ancestral", steps=length), args.repeats, args.device)
    anc_4l = timed(lambda: generate(sampler="ancestral", steps=4 * length), max(args.repeats // 2, 1), args.device)

    print(f"\nSmall model: 4 layers, d = 256, V = {vocab}, L = {length}, batch {batch}, device {args.device}")
    print(f"  bare forward (batch {batch}, all {length} positions): {forward * 1e3:.1f} ms;  FHS NFE = {nfe}")
    print("| measure | ratio | seconds |")
    print("|---|---|---|")
    print(f"| (a) FHS generate / (NFE x bare forward) | {fhs64 / (nfe * forward):.3f} | {fhs64:.2f} / {nfe * forward:.2f} |")
    print(f"| (b) ancestral steps=L / FHS (float64) | {anc_l / fhs64:.2f} | {anc_l:.2f} / {fhs64:.2f} |")
    print(f"| (b) ancestral steps=4L / FHS (float64) | {anc_4l / fhs64:.2f} | {anc_4l:.2f} / {fhs64:.2f} |")
    print(f"| (c) FHS float64 / FHS float32 | {fhs64 / fhs32:.3f} | {fhs64:.2f} / {fhs32:.2f} |")


def paper_shape_ratio(args):
    vocab, length, steps = 50258, 1024, 1000
    model = make_model(vocab, length, layers=2, width=128, heads=2, device=args.device)
    mask_id = model.config.mask_token_id
    schedule = get_noise_schedule("loglinear")

    def denoise(rows, tokens, positions, times):
        return model(tokens, output_positions=positions).logits

    def run_steps(name, count, sampler_steps):
        categorical = CategoricalSampler(torch.float64, generator=torch.Generator().manual_seed(0))
        sampler = build_sampler(name, schedule, categorical, mask_id, steps=sampler_steps)
        tokens = torch.full((1, length), mask_id, device=args.device)
        state = DiffusionState.start(tokens, tokens == mask_id)
        with torch.no_grad():
            for _ in range(count):
                state = sampler.step(state, denoise)
        return state

    sample_steps = args.paper_sample_steps
    fhs_step = timed(lambda: run_steps("first_hitting", sample_steps, None), 2, args.device) / sample_steps
    anc_step = timed(lambda: run_steps("ancestral", sample_steps, steps), 2, args.device) / sample_steps
    fhs_total, anc_total = fhs_step * length, anc_step * steps
    print(f"\nPaper shapes: V = {vocab}, L = {length}, batch 1, 2 layers of width 128, device {args.device}")
    print(f"  per step: FHS {fhs_step * 1e3:.1f} ms, ancestral {anc_step * 1e3:.1f} ms ({sample_steps} steps timed each)")
    print("| measure | ratio | seconds (extrapolated) |")
    print("|---|---|---|")
    print(f"| (d) ancestral 1000 steps / FHS {length} steps | {anc_total / fhs_total:.1f} | {anc_total:.1f} / {fhs_total:.1f} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-paper", action="store_true")
    parser.add_argument("--paper-sample-steps", type=int, default=8)
    args = parser.parse_args()
    small_model_ratios(args)
    if not args.skip_paper:
        paper_shape_ratio(args)


if __name__ == "__main__":
    main()
