"""Peak memory of converting and loading a LLaDA checkpoint: LLaDA-8B's exact layer shapes, with fewer layers.

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


BUILD = textwrap.dedent(
    """
    import json, sys, torch
    from pathlib import Path
    from safetensors.torch import save_file
    sys.path.insert(0, sys.argv[3])
    from llada_dream_reference import llada_config, llada_weight_shapes
    folder, layers = Path(sys.argv[1]), int(sys.argv[2])
    folder.mkdir(parents=True, exist_ok=True)
    config = llada_config(d_model=4096, n_heads=32, n_kv_heads=32, mlp_hidden_size=12288, embedding_size=126464,
                          vocab_size=126464, n_layers=layers, max_sequence_length=4096, mask_token_id=126336,
                          eos_token_id=126081, pad_token_id=126081)
    shapes = llada_weight_shapes(config)
    groups = [["model.transformer.wte.weight"], ["model.transformer.ff_out.weight"],
              [n for n in shapes if n not in ("model.transformer.wte.weight", "model.transformer.ff_out.weight")]]
    weight_map, total = {}, 0
    generator = torch.Generator().manual_seed(0)
    for number, names in enumerate(groups, start=1):
        file = f"model-{number:05d}-of-00003.safetensors"
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
    ids[0, :4] = torch.tensor([126080, 10, 11, 12])
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
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="llada-memory-"))
    source, converted = work / "llada-src", work / "llada-hf"
    tests = Path(__file__).resolve().parents[1] / "tests"
    try:
        subprocess.run([sys.executable, "-c", BUILD, str(source), str(args.layers), str(tests)], check=True)
        shard_sizes = sorted((p.stat().st_size for p in source.glob("*.safetensors")), reverse=True)
        weights = sum(shard_sizes)
        baseline = peak_gb(BASELINE)
        no_verify = peak_gb(CONVERT, "convert", "llada", str(source), str(converted), "--no-verify")
        shutil.rmtree(converted)
        verified = peak_gb(CONVERT, "convert", "llada", str(source), str(converted))
        loaded = peak_gb(LOAD, str(converted))
        output = sum(p.stat().st_size for p in converted.glob("*.safetensors"))
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)

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


if __name__ == "__main__":
    main()
