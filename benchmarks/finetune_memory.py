"""Peak memory of fine-tuning: full fine-tuning vs LoRA vs LoRA + gradient checkpointing, LLaDA-8B's block shapes
(or, with `--family llada2`, LLaDA2.0-mini's MoE layers).

    python benchmarks/finetune_memory.py                 # about 10 minutes on 2 CPU cores, up to ~12 GB of memory
    python benchmarks/finetune_memory.py --family llada2 # about 5 minutes, up to ~9 GB

LLaDA2.0-mini's layers (`--family llada2`): width 2048, 16 query and 4 key/value heads of 128 (half-rotary, QK-norm),
every layer an MoE of `--experts` routed experts of width 512 (LLaDA2.0-mini has 256: 32 by default, so that two
layers fit this machine in float32 with AdamW), top 8 in 8 groups of which 4 are kept, one shared expert; the
vocabulary 32768. LoRA (rank 16) adapts the attention and shared-expert projections and every expert (peft's
parameter LoRA). The implied figure for LLaDA2.0-mini (16.3 B parameters: 20 layers of 256 experts, the first one
dense, and its 157184-row embedding and head) scales the measured cost of a layer per parameter:

    implied = peak(2 layers) + (peak(2) - peak(1)) / parameters of a layer x (16.3 B - parameters of 2 layers)

which holds while the weights and their optimizer states dominate (one sequence of `--seq-len` tokens).

A Llama-family hf_mdm model with LLaDA-8B's block shapes (width 4096, 32 heads, SwiGLU MLP 12288) and 1 or 2 blocks,
a vocabulary of 32768 (LLaDA's is 126464: its embedding and head alone, trained in float32 with AdamW, would not fit
this 24 GB machine beside the blocks). Each setting runs in a fresh process: float32 weights, AdamW (two float32
states per trained weight), two SFT steps on one sequence of `--seq-len` tokens (a quarter of it prompt), and its peak
resident memory (ru_maxrss) is read. The 1- and 2-block runs give the cost of one block; the full size adds 30 more
blocks and LLaDA's embedding and head (their weights, and for full fine-tuning their gradients and AdamW states):

    implied = peak(2 blocks) + 30 x (peak(2) - peak(1)) + (126464 - 32768) x 4096 x 2 x bytes per embedding weight

with 4 bytes per weight when they are frozen (LoRA) and 16 when trained (weight, gradient, two AdamW states).
"""

import argparse
import json
import resource
import subprocess
import sys
import textwrap

GB = 1e9

RUN = textwrap.dedent(
    """
    import json, resource, sys, torch
    from hf_mdm import MDMLlamaConfig, MDMLlamaForMaskedDiffusion
    from hf_mdm.training.objectives import Noise, get_objective
    layers, mode, seq_len, family, experts = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
    torch.manual_seed(0)
    shapes = dict(hidden_size=4096, intermediate_size=12288, num_attention_heads=32) if family == "llada" else dict(
        hidden_size=2048, intermediate_size=5120, num_attention_heads=16, num_key_value_heads=4, head_dim=128,
        qk_norm=True, rope_parameters={"rope_type": "default", "rope_theta": 600000.0, "partial_rotary_factor": 0.5},
        num_experts=experts, num_experts_per_tok=8, moe_intermediate_size=512, num_shared_experts=1, n_group=8,
        topk_group=4, router_score_function="sigmoid", norm_topk_prob=True, routed_scaling_factor=2.5,
        router_expert_bias=True)
    config = MDMLlamaConfig(vocab_size=32768, num_hidden_layers=layers, max_position_embeddings=4096,
                            mask_token_id=32767, pad_token_id=0, **shapes)
    model = MDMLlamaForMaskedDiffusion(config).train()
    if mode != "full":
        from peft import LoraConfig, get_peft_model
        from hf_mdm.training.loop import default_lora_parameters, default_lora_targets
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=default_lora_targets(model),
                                                 target_parameters=default_lora_parameters(model) or None))
    if mode == "lora+gc":
        from hf_mdm.training.loop import enable_gradient_checkpointing
        enable_gradient_checkpointing(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)
    objective = get_objective("sft", config)
    generator = torch.Generator().manual_seed(0)
    for step in range(2):
        ids = torch.randint(1, 32767, (1, seq_len), generator=generator)
        noise = Noise(torch.rand(1, generator=generator, dtype=torch.float64), torch.rand(1, seq_len, generator=generator))
        loss = objective.sequence_losses(model, ids, noise, torch.tensor([seq_len // 4])).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    print(json.dumps(dict(peak_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,
                          trainable=sum(p.numel() for p in trainable),
                          parameters=sum(p.numel() for p in model.parameters()))))
    """
)


LLADA2_MINI_PARAMETERS = 16.26e9  # 20 layers (1 dense, 19 of 256 experts + a shared one), embedding and head


def measure(layers: int, mode: str, seq_len: int, family: str = "llada", experts: int = 32) -> dict:
    result = subprocess.run([sys.executable, "-c", RUN, str(layers), mode, str(seq_len), family, str(experts)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{mode}, {layers} block(s) failed:\\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--out", default=None, help="write the figures as JSON")
    parser.add_argument("--family", default="llada", choices=("llada", "llada2"))
    parser.add_argument("--experts", type=int, default=32, help="routed experts per layer (llada2)")
    args = parser.parse_args()
    llada = args.family == "llada"
    unit, title, target = ("block", "LLaDA-8B block shapes", "llada_8b") if llada else (
        "layer", f"LLaDA2.0-mini's MoE layers with {args.experts} of its 256 experts", "llada2_mini")
    rows = []
    for mode in ("full", "lora", "lora+gc"):
        one = measure(1, mode, args.seq_len, args.family, args.experts)
        two = measure(2, mode, args.seq_len, args.family, args.experts)
        per_unit = two["peak_gb"] - one["peak_gb"]
        if llada:  # 30 more blocks, and LLaDA's embedding and head rows beyond this vocabulary
            extra_rows = (126464 - 32768) * 4096 * 2
            implied = two["peak_gb"] + 30 * per_unit + extra_rows * (16 if mode == "full" else 4) / GB
        else:  # the measured cost of a layer, per parameter
            implied = two["peak_gb"] + per_unit / (two["parameters"] - one["parameters"]) * (
                LLADA2_MINI_PARAMETERS - two["parameters"])
        rows.append({"mode": mode, f"peak_1_{unit}_gb": one["peak_gb"], f"peak_2_{unit}s_gb": two["peak_gb"],
                     f"per_{unit}_gb": per_unit, f"trainable_2_{unit}s": two["trainable"],
                     f"parameters_2_{unit}s": two["parameters"], f"implied_{target}_gb": implied})
    print(f"{title}, vocabulary 32768, float32 weights, AdamW, 1 sequence of {args.seq_len} tokens")
    print(f"| setting | trainable (2 {unit}s) | peak, 1 {unit} | peak, 2 {unit}s | per {unit} | implied "
          f"{'LLaDA-8B' if llada else 'LLaDA2.0-mini'} |")
    print("|---|---:|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['mode']} | {row[f'trainable_2_{unit}s'] / 1e6:.1f} M of {row[f'parameters_2_{unit}s'] / 1e6:.0f} M "
              f"| {row[f'peak_1_{unit}_gb']:.2f} GB | {row[f'peak_2_{unit}s_gb']:.2f} GB | {row[f'per_{unit}_gb']:.2f} GB | "
              f"{row[f'implied_{target}_gb']:.0f} GB |")
    if args.out:
        summary = dict(seq_len=args.seq_len, rows=rows) if llada else dict(family="llada2", experts=args.experts,
                                                                           seq_len=args.seq_len, rows=rows)
        with open(args.out, "w") as handle:
            json.dump(summary, handle, indent=2)


if __name__ == "__main__":
    main()
