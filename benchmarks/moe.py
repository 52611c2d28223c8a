"""Mixture-of-experts forward speed: an MoE network against a dense one of equal ACTIVE parameters, and
transformers' expert kernels against the plain path.

    python benchmarks/moe.py                       # about 2 minutes on 2 CPU cores
    python benchmarks/moe.py --device cuda         # on a GPU (the default when there is one)

One LLaDA 2.x-shaped network in miniature (`--layers` 4 of `--hidden` 256, 4 query and 2 key/value heads of 64, a
dense first layer, then MoE layers of `--experts` 32 routed experts of width `--expert-width` 128, `--top-k` 4 of
them per token, sigmoid routing over 8 groups of which 4 are kept, one shared expert), random weights, and a dense
network with the same attention whose SwiGLU MLP has the width of the experts a token uses
(top-k x width + shared width: equal active parameters per token). Timed: one bidirectional forward pass over
`--batch` x `--length` tokens, float32 (`--dtype`), under torch.no_grad:

  dense                 the dense network
  moe eager             the MoE network, experts on the plain path (one expert at a time)
  moe batched_mm        transformers' batched-matmul expert kernel
  moe grouped_mm        transformers' grouped-matmul expert kernel (torch's grouped_mm)

Measured in one run: a warm-up pass per setting, then `--repeats` rounds, each running every setting once in an
order rotated from round to round; reported: the median time per token, and ratios of medians (moe / dense for each
kernel, eager / grouped_mm). The three MoE settings give the same logits (checked: within float32 rounding).
`--output-dir` (default results/moe) gets results.json, results.md and plot.png.
"""

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from hf_mdm import MDMLlamaConfig, MDMLlamaForMaskedDiffusion


def build(args, moe: bool) -> MDMLlamaForMaskedDiffusion:
    fields = dict(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=args.hidden // 4, max_position_embeddings=max(args.length, 64),
                  qk_norm=True, rope_parameters={"rope_type": "default", "rope_theta": 600000.0,
                                                 "partial_rotary_factor": 0.5})
    active_width = args.top_k * args.expert_width + args.expert_width  # routed experts used + the shared one
    if moe:
        fields.update(intermediate_size=active_width, num_experts=args.experts, num_experts_per_tok=args.top_k,
                      moe_intermediate_size=args.expert_width, num_shared_experts=1, first_k_dense_replace=1,
                      router_score_function="sigmoid", norm_topk_prob=True, routed_scaling_factor=2.5, n_group=8,
                      topk_group=4, router_expert_bias=True)
    else:
        fields.update(intermediate_size=active_width)
    torch.manual_seed(0)
    return MDMLlamaForMaskedDiffusion(MDMLlamaConfig(**fields)).eval().to(args.device, args.dtype)


def timed(model, ids, device) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.no_grad():
        model(ids)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--expert-width", type=int, default=128)
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--output-dir", type=Path, default=Path("results/moe"))
    args = parser.parse_args()
    args.dtype = getattr(torch, args.dtype)
    torch.set_num_threads(args.threads)

    dense, moe = build(args, moe=False), build(args, moe=True)
    active = lambda model: sum(p.numel() for name, p in model.named_parameters()
                               if "experts." not in name or "shared" in name)
    routed = sum(p.numel() for name, p in moe.named_parameters() if ".experts." in name and "shared" not in name)
    ids = torch.randint(0, args.vocab - 1, (args.batch, args.length), generator=torch.Generator().manual_seed(1))
    ids = ids.to(args.device)
    settings = {"dense": (dense, None), "moe eager": (moe, "eager"), "moe batched_mm": (moe, "batched_mm"),
                "moe grouped_mm": (moe, "grouped_mm")}

    def run(name):
        model, kernel = settings[name]
        if kernel is not None:
            model.set_experts_implementation(kernel)
        return timed(model, ids, args.device)

    logits = {}
    for name in settings:  # warm-up, and the kernels agree
        run(name)
        if name != "dense":
            with torch.no_grad():
                logits[name] = moe(ids).logits.float()
    agreement = max((logits[name] - logits["moe eager"]).abs().max().item() for name in logits)
    times = {name: [] for name in settings}
    order = list(settings)
    load_start = os.getloadavg()
    for round_index in range(args.repeats):
        for name in order[round_index % len(order):] + order[: round_index % len(order)]:
            times[name].append(run(name))
    tokens = args.batch * args.length
    per_token = {name: statistics.median(values) / tokens for name, values in times.items()}
    ratios = {f"{name} / dense": per_token[name] / per_token["dense"] for name in settings if name != "dense"}
    ratios["moe eager / moe grouped_mm"] = per_token["moe eager"] / per_token["moe grouped_mm"]
    ratios["moe batched_mm / moe grouped_mm"] = per_token["moe batched_mm"] / per_token["moe grouped_mm"]
    result = dict(arguments={k: str(v) for k, v in vars(args).items()}, device=args.device,
                  parameters={"dense": sum(p.numel() for p in dense.parameters()),
                              "moe total": sum(p.numel() for p in moe.parameters()),
                              "moe active per token (approx.)": active(moe) + routed * args.top_k // args.experts},
                  per_token_seconds=per_token, ratios=ratios, kernel_max_logit_difference=agreement,
                  load_average=[load_start, os.getloadavg()])
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["| setting | us / token |", "| --- | ---: |"] + [f"| {name} | {1e6 * value:.1f} |"
                                                         for name, value in per_token.items()]
    lines += ["", "| ratio | value |", "| --- | ---: |"] + [f"| {name} | {value:.2f} |" for name, value in ratios.items()]
    lines += ["", f"{args.batch} x {args.length} tokens per forward, {args.dtype}, {args.device}, {args.threads} "
              f"thread(s), median of {args.repeats}; parameters {result['parameters']}; the three kernels' logits agree "
              f"within {agreement:.1e}."]
    (args.output_dir / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 3))
    axis.barh(list(per_token), [1e6 * value for value in per_token.values()], color=["gray", "C0", "C1", "C2"])
    axis.set_xlabel("microseconds per token (one forward pass)")
    axis.set_title(f"MoE vs dense of equal active parameters ({args.device})")
    figure.tight_layout()
    figure.savefig(args.output_dir / "plot.png", dpi=120)


if __name__ == "__main__":
    main()
