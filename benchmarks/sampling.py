"""Sampling speed: first-hitting vs ancestral, float64 vs float32, and FHS against bare forward passes.

Every figure is a ratio of timings taken in this one run (the machines are noisy; absolute seconds are printed
for reference only). Random weights: speed does not depend on what the model has learned.

    python benchmarks/sampling.py                  # all of (a)-(d); a few minutes on 2 CPU cores
    python benchmarks/sampling.py --skip-paper     # (a)-(c) only
    python benchmarks/sampling.py --device cuda    # on a GPU

(a) FHS generate time / (NFE x bare forward time at the same batch): goal <= 1.0, since FHS computes logits only
    at the positions it unmasks.
(b) FHS vs ancestral with steps = L and 4L, float64.
(c) FHS float64 vs float32: goal <= 3% overhead.
(d) The paper's shapes (V = 50258, L = 1024, batch 1) with a narrow network: ancestral at 1000 steps vs FHS.

An FHS step costs the same all run long (one forward over all L positions, logits and one draw over V at one
position). An ancestral step is one forward plus a (V + 1)-way draw at every still-masked position, so its cost
falls as the run unmasks; its mean over a run of uniform time steps is the cost at half the positions masked
(alpha_t ~ 1 - t). So (a) and (c) time generate() end to end on `--new-tokens` positions after a prompt, and (b)
and (d) time `--sample-steps` steps of each strategy from a state with a random half of the positions masked and
multiply by the number of steps of a whole run. This keeps the benchmark to minutes on a CPU.
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from hf_mdm import MDMConfig, MDMForMaskedDiffusion
from hf_mdm.sampling_mdm import CategoricalSampler, DiffusionState, build_strategy, get_noise_schedule, get_strategy


def timed(fn, repeats: int, device: str, warmups: int = 1) -> float:
    """Median wall time of `fn()` over `repeats` runs, after `warmups` unmeasured runs."""
    for _ in range(warmups):
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


def time_sampler_steps(model, name, length, batch, count, sampler_steps, device, dtype=torch.float64):
    """Median time of one step of strategy `name` on a batch with a random half of its positions masked: the
    mean cost of a step over a whole run (see the module docstring)."""
    mask_id = model.config.mask_token_id
    generator = torch.Generator().manual_seed(0)
    half_masked = torch.rand(batch, length, generator=generator).argsort(dim=1) < length // 2
    start_tokens = torch.randint(0, mask_id, (batch, length), generator=generator).masked_fill(half_masked, mask_id)
    schedule = get_noise_schedule(model.config.noise_schedule, model.config.noise_eps)

    def denoise(rows, tokens, positions, times, window=None):
        return model(tokens, output_positions=positions).logits

    def run():
        categorical = CategoricalSampler(dtype, generator=torch.Generator(device).manual_seed(0))
        settings = get_strategy(name).Settings(steps=sampler_steps) if sampler_steps is not None else None
        sampler = build_strategy(name, settings, schedule=schedule, categorical=categorical, mask_token_id=mask_id)
        tokens = start_tokens.to(device)
        state = DiffusionState.start(tokens, tokens == mask_id)
        if sampler_steps is not None:  # ancestral: at mid-run time, where half the positions are masked
            state.step = sampler_steps // 2
            state.time.fill_(1.0 - state.step / sampler_steps)
        with torch.no_grad():
            for _ in range(count):
                state = sampler.step(state, denoise)

    return timed(run, 2, device) / count


def small_model_ratios(args):
    vocab, length, batch, new_tokens = 4096, 256, 8, args.new_tokens
    model = make_model(vocab, length, layers=4, width=256, heads=4, device=args.device)
    ids = torch.full((batch, length), model.config.mask_token_id, device=args.device)
    # A prompt of L - new_tokens random tokens: every FHS step still runs the network on all L positions, so the
    # time per generated token is that of a full unconditional run, in new_tokens / L of the time.
    prompt = torch.randint(0, vocab - 1, (batch, length - new_tokens), generator=torch.Generator().manual_seed(0))

    def generate(**kwargs):
        generator = torch.Generator(args.device).manual_seed(0)
        return model.generate(prompt.to(args.device), max_new_tokens=new_tokens, generator=generator,
                              return_dict_in_generate=True, **kwargs)

    with torch.no_grad():
        forward = timed(lambda: model(ids), args.repeats * 3, args.device)
    # float64 and float32 alternate, so that a load change on a shared machine hits both alike.
    pairs = [(timed(lambda: generate(sampling_dtype="float64"), 1, args.device),
              timed(lambda: generate(sampling_dtype="float32"), 1, args.device)) for _ in range(args.repeats)]
    fhs64, fhs32 = (statistics.median(p[i] for p in pairs) for i in (0, 1))
    dtype_ratio = statistics.median(p[0] / p[1] for p in pairs)
    nfe = generate().nfe
    # The only work sampling_dtype changes: one categorical over V per row and step.
    step_logits = torch.randn(batch, 1, vocab, device=args.device)
    draw = {dtype: timed(lambda: CategoricalSampler(dtype, generator=torch.Generator(args.device).manual_seed(0))(step_logits),
                         200, args.device) for dtype in (torch.float64, torch.float32)}
    step_fhs = time_sampler_steps(model, "first_hitting", length, batch, args.sample_steps, None, args.device)
    step_anc = time_sampler_steps(model, "ancestral", length, batch, args.sample_steps, 4 * length, args.device)

    print(f"\nSmall model: 4 layers, d = 256, V = {vocab}, L = {length}, batch {batch}, device {args.device}")
    print(f"  bare forward (batch {batch} x {length} positions): {forward * 1e3:.0f} ms; generate() of {new_tokens} "
          f"tokens after a {length - new_tokens}-token prompt: NFE = {nfe}")
    print(f"  one step: FHS {step_fhs * 1e3:.0f} ms, ancestral {step_anc * 1e3:.0f} ms ({args.sample_steps} steps timed)")
    print("| measure | ratio | seconds |")
    print("|---|---|---|")
    print(f"| (a) FHS generate / (NFE x bare forward) | {fhs64 / (nfe * forward):.3f} | {fhs64:.2f} / {nfe * forward:.2f} |")
    for steps in (length, 4 * length):
        print(f"| (b) ancestral steps={steps} / FHS ({length} calls), float64 | {steps * step_anc / (length * step_fhs):.2f} "
              f"| {steps * step_anc:.1f} / {length * step_fhs:.1f} (per-step x steps) |")
    print(f"| (c) FHS float64 / FHS float32 (median of {args.repeats} paired runs) | {dtype_ratio:.3f} "
          f"| {fhs64:.2f} / {fhs32:.2f} |")
    step = fhs32 / nfe
    print(f"| (c) one float64 draw minus one float32 draw, as a share of a step | {(draw[torch.float64] - draw[torch.float32]) / step:.4f} "
          f"| ({draw[torch.float64] * 1e3:.2f} - {draw[torch.float32] * 1e3:.2f} ms) / {step * 1e3:.0f} ms |")
    return {"(a) FHS generate / (NFE x bare forward)": fhs64 / (nfe * forward),
            f"(b) ancestral {length} steps / FHS": length * step_anc / (length * step_fhs),
            f"(b) ancestral {4 * length} steps / FHS": 4 * length * step_anc / (length * step_fhs),
            "(c) FHS float64 / FHS float32": dtype_ratio}


def paper_shape_ratio(args):
    vocab, length, steps = 50258, 1024, 1000
    model = make_model(vocab, length, layers=2, width=128, heads=2, device=args.device)
    fhs_step = time_sampler_steps(model, "first_hitting", length, 1, args.sample_steps, None, args.device)
    anc_step = time_sampler_steps(model, "ancestral", length, 1, args.sample_steps, steps, args.device)
    fhs_total, anc_total = fhs_step * length, anc_step * steps
    print(f"\nPaper shapes: V = {vocab}, L = {length}, batch 1, 2 layers of width 128, device {args.device}")
    print(f"  one step: FHS {fhs_step * 1e3:.1f} ms, ancestral {anc_step * 1e3:.1f} ms ({args.sample_steps} steps timed)")
    print("| measure | ratio | seconds (per-step x steps) |")
    print("|---|---|---|")
    print(f"| (d) ancestral 1000 steps / FHS {length} steps | {anc_total / fhs_total:.1f} | {anc_total:.1f} / {fhs_total:.1f} |")
    return {f"(d) paper shapes: ancestral 1000 steps / FHS {length}": anc_total / fhs_total}


def plot(ratios: dict, path: Path, title: str) -> None:
    """The ratios as bars on a log scale, 1 marked: what each sampler costs against exact first hitting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(ratios)[::-1]
    figure, axis = plt.subplots(figsize=(7, 0.5 * len(names) + 1.2))
    axis.barh(names, [ratios[name] for name in names], color="tab:blue")
    axis.axvline(1.0, color="black", linewidth=0.8)
    axis.set_xscale("log")
    for y, name in enumerate(names):
        axis.text(ratios[name], y, f" {ratios[name]:.2f}", va="center", fontsize=8)
    axis.set_xlabel("time ratio (same run)")
    axis.set_title(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-paper", action="store_true")
    parser.add_argument("--sample-steps", type=int, default=8, help="steps timed per strategy for (b) and (d)")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated after a prompt for (a), (c)")
    parser.add_argument("--output", type=Path, default=None, help="a folder for results.json and plot.png")
    args = parser.parse_args()
    ratios = small_model_ratios(args)
    if not args.skip_paper:
        ratios.update(paper_shape_ratio(args))
    if args.output:
        args.output.mkdir(parents=True, exist_ok=True)
        (args.output / "results.json").write_text(json.dumps({"device": args.device, "repeats": args.repeats,
                                                                "threads": torch.get_num_threads(),
                                                                "ratios": ratios}, indent=1))
        plot(ratios, args.output / "plot.png", f"sampling speed ratios, {args.device}, {torch.get_num_threads()} thread(s)")
        print(f"wrote {args.output}/results.json and plot.png")


if __name__ == "__main__":
    main()
