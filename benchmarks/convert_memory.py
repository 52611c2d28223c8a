"""Peak memory of converting and loading a LLaDA checkpoint: LLaDA-8B's exact layer shapes, with fewer layers (or,
with `--family llada2`, LLaDA2.0-mini's: a mixture of experts whose experts are one tensor each on disk).

Builds a bf16 checkpoint in LLaDA's Hub layout with the 8B model's shapes (d_model 4096, 32 heads, MLP 12288,
embedding 126464 rows, untied head) but `--layers` blocks (default 2: 2.95 GB of weights), in three shards (the
embedding, the head, the blocks: each about one real LLaDA-8B shard, 2.1-3.0 GB). Then, each in a fresh process
whose own peak resident memory (ru_maxrss) is read:

    (a) python + torch + transformers + hf_mdm imported: the baseline
    (b) hf-mdm convert llada --no-verify: streaming, shard by shard, bytes copied a chunk at a time
    (c) hf-mdm convert llada (with the verification: byte comparison, reload, one forward pass)
    (d) AutoModel.from_pretrained(dtype=torch.bfloat16) and one forward pass of 16 tokens

and states what they imply for the full 8B model (32 blocks, 16.0 GB of bf16 weights in 6 shards of at most 3.0 GB).

    python benchmarks/convert_memory.py                   # about 3 minutes and 9 GB of disk on this machine
    python benchmarks/convert_memory.py --layers 4 --workdir /big/disk
    python benchmarks/convert_memory.py --family llada2   # LLaDA2.0-mini's shapes: a dense layer and an MoE layer

For LLaDA2.0-mini (hidden 2048, 16 query and 4 key/value heads of 128, a dense first layer of 5120, then MoE layers of
256 experts of 512 and a shared one, vocabulary 157184, untied head): `--layers` 2 is the dense layer and one MoE
layer (1.6 GB of experts in 768 tensors), in shards of one layer each (the embedding, the head, each layer), and the
implied figures are for its 20 layers (about 32 GB of bf16 weights). Streaming copies each expert tensor alone; the
load stacks a layer's experts into two tensors (transformers' MoE conversion), which the figures show.
"""

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

LLADA_8B = dict(d_model=4096, n_heads=32, mlp_hidden_size=12288, embedding_size=126464, n_layers=32)
GB = 1e9


LLADA2_MINI = dict(hidden_size=2048, num_attention_heads=16, num_key_value_heads=4, head_dim=128,
                   intermediate_size=5120, num_experts=256, num_experts_per_tok=8, moe_intermediate_size=512,
                   num_shared_experts=1, n_group=8, topk_group=4, vocab_size=157184, num_hidden_layers=20)

BUILD = textwrap.dedent(
    """
    import json, re, sys, torch
    from pathlib import Path
    from safetensors.torch import save_file
    sys.path.insert(0, sys.argv[3])
    folder, layers, family = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[4]
    folder.mkdir(parents=True, exist_ok=True)
    if family == "llada":
        from llada_dream_reference import llada_config, llada_weight_shapes
        config = llada_config(d_model=4096, n_heads=32, n_kv_heads=32, mlp_hidden_size=12288, embedding_size=126464,
                              vocab_size=126464, n_layers=layers, max_sequence_length=4096, mask_token_id=126336,
                              eos_token_id=126081, pad_token_id=126081)
        shapes = llada_weight_shapes(config)
        top = ("model.transformer.wte.weight", "model.transformer.ff_out.weight")
        groups = [[top[0]], [top[1]], [n for n in shapes if n not in top]]
    else:
        from moe_reference import llada2_config, llada2_weight_shapes
        config = llada2_config(**json.loads(sys.argv[5]), num_hidden_layers=layers, max_position_embeddings=4096,
                               pad_token_id=156892, eos_token_id=156892, mask_token_id=156895)
        shapes = llada2_weight_shapes(config)
        top = ("model.word_embeddings.weight", "lm_head.weight", "model.norm.weight")
        layer_of = lambda name: int(re.search(r"layers\\.(\\d+)\\.", name).group(1))
        groups = [[top[0]], list(top[1:])] + [[n for n in shapes if n not in top and layer_of(n) == i]
                                              for i in range(layers)]
    weight_map, total = {}, 0
    generator = torch.Generator().manual_seed(0)
    for number, names in enumerate(groups, start=1):
        file = f"model-{number:05d}-of-{len(groups):05d}.safetensors"
        tensors = {n: (torch.randn(shapes[n], generator=generator) * 0.02).to(torch.bfloat16) for n in names}
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        for n, t in tensors.items():
            weight_map[n] = file
            total += t.numel() * 2
        del tensors
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                    "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(config))
    """
)

PEAK = "import resource; print('PEAK_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
BASELINE = "import torch, transformers, hf_mdm, hf_mdm.convert\n" + PEAK
CONVERT = "import sys\nfrom hf_mdm_cli import main\nmain(sys.argv[1:])\n" + PEAK
LOAD = textwrap.dedent(
    """
    import sys, torch
    from transformers import AutoModel
    import hf_mdm
    model = AutoModel.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
    ids = torch.full((1, 16), model.config.mask_token_id)
    ids[0, :4] = torch.tensor([10, 11, 12, 13])
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
    """
) + PEAK


def peak_gb(script: str, *args: str) -> float:
    result = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"step failed:\n{result.stderr[-3000:]}")
    line = next(line for line in result.stdout.splitlines() if line.startswith("PEAK_KB"))
    return int(line.split()[1]) * 1024 / GB


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--workdir", default=None, help="where the checkpoints go (default: a temporary folder)")
    parser.add_argument("--family", default="llada", choices=("llada", "llada2"))
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="llada-memory-"))
    source, converted = work / f"{args.family}-src", work / f"{args.family}-hf"
    tests = Path(__file__).resolve().parents[1] / "tests"
    try:
        subprocess.run([sys.executable, "-c", BUILD, str(source), str(args.layers), str(tests), args.family,
                        json.dumps({k: v for k, v in LLADA2_MINI.items() if k != "num_hidden_layers"})], check=True)
        shard_sizes = sorted((p.stat().st_size for p in source.glob("*.safetensors")), reverse=True)
        weights = sum(shard_sizes)
        baseline = peak_gb(BASELINE)
        no_verify = peak_gb(CONVERT, "convert", args.family, str(source), str(converted), "--no-verify")
        shutil.rmtree(converted)
        verified = peak_gb(CONVERT, "convert", args.family, str(source), str(converted))
        loaded = peak_gb(LOAD, str(converted))
        output = sum(p.stat().st_size for p in converted.glob("*.safetensors"))
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    if args.family == "llada2":
        report_llada2(args, weights, shard_sizes, output, baseline, no_verify, verified, loaded)
        return

    d, mlp, vocab = LLADA_8B["d_model"], LLADA_8B["mlp_hidden_size"], LLADA_8B["embedding_size"]
    per_block = (4 * d * d + 3 * d * mlp + 2 * d) * 2
    full = per_block * 32 + 2 * vocab * d * 2 + d * 2
    report = {
        "layers": args.layers, "weights_gb": weights / GB, "largest_shard_gb": shard_sizes[0] / GB,
        "output_gb": output / GB, "baseline_gb": baseline, "convert_no_verify_peak_gb": no_verify,
        "convert_verified_peak_gb": verified, "load_and_forward_peak_gb": loaded,
    }
    print(json.dumps(report, indent=2))
    print(f"\nLLaDA-8B's layer shapes, {args.layers} layers: {weights / GB:.2f} GB of bf16 weights in 3 shards "
          f"(largest {shard_sizes[0] / GB:.2f} GB)")
    print(f"  baseline (imports)                 {baseline:6.2f} GB")
    print(f"  convert, streaming (--no-verify)   {no_verify:6.2f} GB  = baseline + {no_verify - baseline:.2f} GB "
          f"({(no_verify - baseline) / (shard_sizes[0] / GB):.2f} x the largest shard)")
    print(f"  convert and verify                 {verified:6.2f} GB  = baseline + {verified - baseline:.2f} GB "
          f"({(verified - baseline) / (weights / GB):.2f} x the weights)")
    print(f"  load in bf16 + forward             {loaded:6.2f} GB  = baseline + {loaded - baseline:.2f} GB "
          f"({(loaded - baseline) / (weights / GB):.2f} x the weights)")
    # What a process touches: the streaming copy holds a chunk; a loaded model pages in (mmap) the weights a forward
    # pass reads, i.e. every block and the head but only the embedding rows of its tokens.
    block_bytes_measured = per_block * args.layers
    head = vocab * d * 2
    load_overhead = (loaded - baseline) - (block_bytes_measured + head) / GB
    verify_overhead = (verified - baseline) - (block_bytes_measured + head) / GB
    print(f"\nImplied for LLaDA-8B ({full / GB:.1f} GB of bf16 weights in 6 shards of at most 3.0 GB):")
    print(f"  convert, streaming  ~ {no_verify:.1f} GB (flat: bytes are copied a chunk at a time, whatever the size)")
    print(f"  convert and verify  ~ {baseline + (per_block * 32 + head) / GB + verify_overhead:.1f} GB "
          "(the reload's forward pass pages in every block and the head)")
    print(f"  load in bf16        ~ {baseline + (per_block * 32 + head) / GB + load_overhead:.1f} GB "
          f"(+ up to {vocab * d * 2 / GB:.1f} GB if every embedding row is read)")


def report_llada2(args, weights, shard_sizes, output, baseline, no_verify, verified, loaded):
    m = LLADA2_MINI
    d, heads, kv, head = m["hidden_size"], m["num_attention_heads"], m["num_key_value_heads"], m["head_dim"]
    attention = (d * (heads + 2 * kv) * head + heads * head * d + 2 * head + 2 * d) * 2
    dense_layer = attention + 3 * d * m["intermediate_size"] * 2
    moe_layer = attention + (m["num_experts"] + m["num_shared_experts"]) * 3 * d * m["moe_intermediate_size"] * 2 + \
        m["num_experts"] * d * 2 * 2
    head_bytes = m["vocab_size"] * d * 2
    full = dense_layer + (m["num_hidden_layers"] - 1) * moe_layer + 2 * head_bytes
    report = {"family": "llada2", "layers": args.layers, "weights_gb": weights / GB,
              "largest_shard_gb": shard_sizes[0] / GB, "output_gb": output / GB, "baseline_gb": baseline,
              "convert_no_verify_peak_gb": no_verify, "convert_verified_peak_gb": verified,
              "load_and_forward_peak_gb": loaded, "moe_layer_gb": moe_layer / GB, "full_model_gb": full / GB}
    print(json.dumps(report, indent=2))
    print(f"\nLLaDA2.0-mini's layer shapes, {args.layers} layers (the dense one and {args.layers - 1} MoE): "
          f"{weights / GB:.2f} GB of bf16 weights (an MoE layer {moe_layer / GB:.2f} GB, its experts in "
          f"{3 * m['num_experts']} tensors)")
    print(f"  baseline (imports)                 {baseline:6.2f} GB")
    print(f"  convert, streaming (--no-verify)   {no_verify:6.2f} GB  = baseline + {no_verify - baseline:.2f} GB "
          f"({(no_verify - baseline) / (moe_layer / GB):.2f} x an MoE layer)")
    print(f"  convert and verify                 {verified:6.2f} GB  = baseline + {verified - baseline:.2f} GB "
          f"({(verified - baseline) / (weights / GB):.2f} x the weights)")
    print(f"  load in bf16 + forward             {loaded:6.2f} GB  = baseline + {loaded - baseline:.2f} GB "
          f"({(loaded - baseline) / (weights / GB):.2f} x the weights)")
    print(f"\nImplied for LLaDA2.0-mini ({full / GB:.1f} GB of bf16 weights): streaming conversion ~ {no_verify:.1f} GB "
          "(flat); a loaded model holds its weights once (the experts stacked), plus what the load's stacking of "
          "one layer at a time adds above.")


if __name__ == "__main__":
    main()
