"""hf_mdm's block KV cache (Fast-dLLM's prefix and dual caches) against Fast-dLLM's own code, on the same network.

    OMP_NUM_THREADS=1 python benchmarks/fast_dllm_cache.py --fast-dllm-path path/to/NVlabs/Fast-dLLM --repeats 5 \
        --output-dir results/fast_dllm_cache

Fast-dLLM's side is Fast-dLLM's code itself: `llada/generate.py`'s `generate_with_prefix_cache` and
`generate_with_dual_cache` (low_confidence remasking, temperature 0, `threshold=None` with a step budget, or a
confidence threshold) on its own `llada/model/modeling_llada.py` `LLaDAModelLM` (its key/value cache through
`past_key_values`, `use_cache` and `replace_position`; its `torch.compile`d attention). hf_mdm's side is
`MDMLlamaForMaskedDiffusion.generate(sampler="confidence", order="confidence", temperature=0, block_length=B,
use_cache=True, cache_mode="prefix" | "dual", steps=S or confidence_threshold=c)`.

The network: a tiny random LLaDA (`--layers` 2 of `--width` 128, 4 heads, SwiGLU MLP of 3 x width as LLaDA-8B,
rotary base 500000, untied head, V = 1024 with [MASK] = 1023) built by Fast-dLLM's `LLaDAConfig` and
`LLaDAModelLM`; the same weights go into hf_mdm's model through the converter's own `llada_config` and
`llada_weight_name`, and the two must give the same logits (the largest difference is printed; 1e-4 at most). Two
things are set in the random weights so that the comparison means something:
  - the head is scaled (`--logit-scale`) so that the network is sure enough for a threshold of 0.9 to unmask several
    tokens in some calls (weights of std 0.02 give a nearly uniform softmax, and one token per call);
  - the [MASK] row of the head reads a constant dimension of the residual stream (0.1 in every embedding, written to
    by no block) with a large negative weight, so that [MASK] has probability 0 in float64: hf_mdm never predicts
    [MASK] (its logit is fixed at -1e4), while Fast-dLLM's argmax would pick it, and its softmax count it, if the
    network gave it weight.
The decoding: `--batch` random prompts of `--prompt-length` 64 tokens, `--gen-length` 128 new tokens in blocks of
`--block-length` 32, with step budgets `--steps` (128: one token per call; 32: four per call) and with `--threshold`
0.9. Fast-dLLM's functions take one prompt (they build a batch-1 canvas): with `--batch` > 1 they decode the prompts
one after another while hf_mdm decodes them in one call (rows are independent in both: the outputs still agree).

Measured, one CPU thread (`torch.set_num_threads(1)`), every setting in the same run: each side decodes once
(warm-up, unmeasured; it also compiles Fast-dLLM's attention) and the two greedy outputs are compared token for
token; then `--repeats` timed runs alternate between the sides (a change in the machine's load hits both), and the
medians are reported with their ratio (Fast-dLLM's time / hf_mdm's: above 1, hf_mdm is faster) and each side's
network calls: wall time, and the process's CPU time beside it (the steadier one when other work shares the cores).
`--output-dir` writes results.json and results.md. Fast-dLLM's attention is `torch.compile`d as shipped; on a CPU
that wrapper only adds the cost of its guards to every layer call, and `--eager-attention` removes it (the same
`F.scaled_dot_product_attention` call) for the stricter comparison.

Fast-dLLM pins transformers 4.49; under transformers 5 its config has no `use_cache` attribute, so this script sets
`model.config.use_cache = False` (its config's default, read only when a call passes no `use_cache`). Its `einops`
import is never called here: where einops is missing, a placeholder that raises if used stands in for it.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from peer_code import install_placeholders

from hf_mdm import MDMLlamaConfig, MDMLlamaForMaskedDiffusion
from hf_mdm.convert.llama_family import LLADA_FIELDS, llada_config, llada_weight_name


# Imported by Fast-dLLM's modeling_llada.py but never called by the LLaDA Llama block this benchmark builds.
UNCALLED_PACKAGES = ("einops",)
MAX_LOGIT_DIFFERENCE = 1e-4


def import_fast_dllm(path: str | None):
    """(Fast-dLLM's llada `generate` module, `LLaDAConfig`, `LLaDAModelLM`, the placeholders used, its llada folder),
    or None and why not. `path`: a clone of NVlabs/Fast-dLLM, or its llada/ folder."""
    if not path:
        return None, "no --fast-dllm-path given (nor $FAST_DLLM_PATH): pass a clone of NVlabs/Fast-dLLM"
    root = Path(path).expanduser().resolve()
    llada = root / "llada" if (root / "llada").is_dir() else root
    for needed in ("generate.py", "model/modeling_llada.py", "model/configuration_llada.py"):
        if not (llada / needed).is_file():
            return None, f"{llada / needed} does not exist: --fast-dllm-path must be a clone of NVlabs/Fast-dLLM"
    sys.path.insert(0, str(llada))  # generate.py imports `model.modeling_llada` from its own folder
    missing = install_placeholders(UNCALLED_PACKAGES)
    try:
        import generate
        from model.configuration_llada import LLaDAConfig
        from model.modeling_llada import LLaDAModelLM
    except Exception as error:  # noqa: BLE001  (any import failure means: Fast-dLLM's code is not usable here)
        return None, f"Fast-dLLM's code at {llada} does not import ({type(error).__name__}: {error})"
    for name in ("generate_with_prefix_cache", "generate_with_dual_cache", "get_transfer_index"):
        if not hasattr(generate, name):
            return None, f"{generate.__file__} has no {name}: it is not Fast-dLLM's llada/generate.py"
    return (generate, LLaDAConfig, LLaDAModelLM, missing, llada), None


def git_commit(folder: Path) -> str | None:
    """The commit of a git checkout at `folder` (not of a repository it merely lies inside), else None."""
    if not (folder / ".git").exists():
        return None
    try:
        out = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def llada_raw_config(args) -> dict:
    """A LLaDA config.json, tiny: the fields of GSAI-ML/LLaDA-8B-Instruct's that shape the network."""
    return dict(
        model_type="llada", block_type="llama", activation_type="silu", layer_norm_type="rms", rms_norm_eps=1e-5,
        d_model=args.width, n_heads=args.heads, n_kv_heads=args.heads, multi_query_attention=None,
        n_layers=args.layers, mlp_hidden_size=3 * args.width, vocab_size=args.vocab, embedding_size=args.vocab,
        mask_token_id=args.vocab - 1, eos_token_id=args.vocab - 2, pad_token_id=args.vocab - 2,
        max_sequence_length=args.prompt_length + args.gen_length, rope=True, rope_theta=500000.0,
        rope_full_precision=True, alibi=False, weight_tying=False, include_bias=False, include_qkv_bias=False,
        flash_attention=False, attention_layer_norm=False, scale_logits=False, input_emb_norm=False,
        block_group_size=1, layer_norm_with_affine=True, bias_for_layer_norm=False, init_device="cpu",
        init_fn="normal", init_std=0.02,
    )


def build_models(args, LLaDAConfig, LLaDAModelLM):
    """Fast-dLLM's LLaDAModelLM with random weights, hf_mdm's model holding the same weights, and the [MASK] id."""
    raw = llada_raw_config(args)
    mask_id = raw["mask_token_id"]
    torch.manual_seed(args.seed)
    fast = LLaDAModelLM(LLaDAConfig(**raw), init_params=True).eval()
    if not hasattr(fast.config, "use_cache"):  # transformers 5 drops it from the config; Fast-dLLM's default
        fast.config.use_cache = False
    transformer = fast.model.transformer
    with torch.no_grad():
        for parameter in fast.parameters():
            if parameter.dim() == 2:
                parameter.normal_(0, 0.02)
        # Dimension 0 of the residual stream is a constant 0.1 (no block writes to it), so after the final RMSNorm
        # it is positive at every position: the [MASK] row of the head reads it with a large negative weight.
        transformer.wte.weight[:, 0] = 0.1
        for block in transformer.blocks:
            block.attn_out.weight[0] = 0.0
            block.ff_out.weight[0] = 0.0
        transformer.ff_out.weight.mul_(args.logit_scale)  # a confident network: the threshold has work to do
        transformer.ff_out.weight[mask_id] = 0.0
        transformer.ff_out.weight[mask_id, 0] = -1000.0  # [MASK]'s logit far below every other: probability 0
    fields = {key: value for key, value in raw.items() if key in LLADA_FIELDS}
    config = MDMLlamaConfig(**llada_config(fields, Path("Fast-dLLM's LLaDAConfig"), []))
    ours = MDMLlamaForMaskedDiffusion(config).eval()
    state = {}
    for name, tensor in fast.state_dict().items():
        target = llada_weight_name(name)
        if target is None:
            sys.exit(f"fast_dllm_cache.py: Fast-dLLM's weight {name} has no hf_mdm name (llada_weight_name).")
        state[target] = tensor
    missing, unexpected = ours.load_state_dict(state, strict=False)
    if missing or unexpected:
        sys.exit(f"fast_dllm_cache.py: the weights do not map one to one: missing {missing}, unexpected {unexpected}.")
    return fast, ours, mask_id


def check_logits(fast, ours, prompts, mask_id, gen_length):
    """On the prompts followed by gen_length [MASK] positions: the largest |logit difference| over every token but
    [MASK] (whose logit hf_mdm fixes), and Fast-dLLM's largest P([MASK])."""
    canvas = torch.cat([prompts, torch.full((len(prompts), gen_length), mask_id, dtype=torch.long)], dim=1)
    with torch.no_grad():
        theirs = fast(canvas, use_cache=False).logits
        mine = ours(canvas).logits
    keep = torch.arange(theirs.shape[-1]) != mask_id
    difference = (theirs[..., keep] - mine[..., keep]).abs().max().item()
    return difference, torch.softmax(theirs.double(), dim=-1)[..., mask_id].max().item()


def timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one call: on a shared machine the CPU time is the steadier."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def settings(args) -> list[dict]:
    out = []
    for mode in ("prefix", "dual"):
        for steps in args.steps:
            out.append(dict(name=f"{mode} cache, {steps} steps", mode=mode, steps=steps, threshold=None))
        for threshold in args.threshold:
            out.append(dict(name=f"{mode} cache, threshold {threshold:g}", mode=mode, steps=None, threshold=threshold))
    return out


def markdown(report: dict) -> str:
    model, decoding = report["model"], report["decoding"]
    lines = [
        f"Fast-dLLM's own code (commit {report['fast_dllm']['commit'] or 'unknown'}) against hf_mdm on the same tiny "
        f"random LLaDA ({model['layers']} layers of width {model['width']}, {model['heads']} heads, V = "
        f"{model['vocab']}): batch {decoding['batch']}, prompt {decoding['prompt_length']} tokens, "
        f"{decoding['gen_length']} new tokens in blocks of {decoding['block_length']}, greedy, low-confidence "
        f"order. {report['threads']} CPU thread, torch {report['torch']}; median of {report['repeats']} alternating "
        f"runs. Fast-dLLM's attention: {report['fast_dllm']['attention']}. Ratio = Fast-dLLM's time / hf_mdm's "
        f"(above 1: hf_mdm is faster), of wall time and of the process's CPU time. Largest logit difference "
        f"between the two networks: {report['logits_max_difference']:.2e}.",
        "",
        "| setting | Fast-dLLM (s) | hf_mdm (s) | ratio | CPU-time ratio | network calls, Fast-dLLM / hf_mdm "
        "| same tokens |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in report["settings"]:
        lines.append(
            f"| {row['name']} | {row['fast_dllm']['median_seconds']:.4f} | {row['hf_mdm']['median_seconds']:.4f} | "
            f"{row['ratio']:.3f} | {row['cpu_ratio']:.3f} | {row['fast_dllm']['network_calls']} / "
            f"{row['hf_mdm']['network_calls']} | "
            f"{row['agreement']:.4f} |"
        )
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fast-dllm-path", default=os.environ.get("FAST_DLLM_PATH"),
                        help="a clone of NVlabs/Fast-dLLM, or its llada/ folder (default: $FAST_DLLM_PATH)")
    parser.add_argument("--extra-path", action="append", default=[],
                        help="a folder put first on sys.path (packages Fast-dLLM imports, installed with pip install "
                             "--target); repeatable")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt-length", type=int, default=64)
    parser.add_argument("--gen-length", type=int, default=128)
    parser.add_argument("--block-length", type=int, default=32)
    parser.add_argument("--steps", type=int, nargs="+", default=[128, 32])
    parser.add_argument("--threshold", type=float, nargs="*", default=[0.9])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--logit-scale", type=float, default=50.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eager-attention", action="store_true",
                        help="call Fast-dLLM's attention without its torch.compile wrapper (the same "
                             "F.scaled_dot_product_attention call; on a CPU the wrapper adds only its guards' cost)")
    parser.add_argument("--output-dir", type=Path, help="write results.json and results.md here")
    args = parser.parse_args()
    for folder in reversed(args.extra_path):
        sys.path.insert(0, os.path.abspath(folder))
    if args.gen_length % args.block_length:
        sys.exit(f"fast_dllm_cache.py: --gen-length {args.gen_length} must be a multiple of --block-length "
                 f"{args.block_length} (Fast-dLLM's generate functions assert it).")
    num_blocks = args.gen_length // args.block_length
    if any(steps % num_blocks for steps in args.steps):
        sys.exit(f"fast_dllm_cache.py: every --steps must be a multiple of the {num_blocks} blocks (Fast-dLLM's "
                 "generate functions assert it).")
    imported, why_not = import_fast_dllm(args.fast_dllm_path)
    if imported is None:
        sys.exit(f"fast_dllm_cache.py: Fast-dLLM's code is not available: {why_not}.")
    generate, LLaDAConfig, LLaDAModelLM, placeholders, llada = imported
    if args.eager_attention:
        modeling = sys.modules[LLaDAModelLM.__module__]
        compiled = modeling.scaled_dot_product_attention
        modeling.scaled_dot_product_attention = getattr(compiled, "_torchdynamo_orig_callable", compiled)

    from transformers.utils import logging as transformers_logging
    transformers_logging.set_verbosity_error()  # Fast-dLLM's calls trip transformers 5's deprecation notices
    torch.set_num_threads(args.threads)
    fast, ours, mask_id = build_models(args, LLaDAConfig, LLaDAModelLM)
    prompts = torch.randint(0, args.vocab - 2, (args.batch, args.prompt_length),
                            generator=torch.Generator().manual_seed(args.seed))
    difference, mask_probability = check_logits(fast, ours, prompts, mask_id, args.gen_length)
    commit = git_commit(llada.parent)
    print(f"Fast-dLLM's code from {llada}" + (f" (commit {commit})" if commit else "")
          + (f"; placeholders for its uncalled imports: {', '.join(placeholders)}" if placeholders else ""))
    if args.eager_attention:
        print("Fast-dLLM's attention runs without its torch.compile wrapper (--eager-attention)")
    print(f"model: {args.layers} layers of width {args.width}, {args.heads} heads, V = {args.vocab}, [MASK] = "
          f"{mask_id}; batch {args.batch}, prompt {args.prompt_length}, {args.gen_length} new tokens in blocks of "
          f"{args.block_length}; {torch.get_num_threads()} CPU thread(s), torch {torch.__version__}")
    print(f"logits, Fast-dLLM vs hf_mdm: max |difference| {difference:.3e} (every token but [MASK]); Fast-dLLM's "
          f"largest P([MASK]) {mask_probability:.1e}")
    if not difference < MAX_LOGIT_DIFFERENCE:
        sys.exit(f"fast_dllm_cache.py: the two networks differ (max logit difference {difference:.3e} >= "
                 f"{MAX_LOGIT_DIFFERENCE}): the weight mapping is wrong.")

    functions = {"prefix": generate.generate_with_prefix_cache, "dual": generate.generate_with_dual_cache}

    def run_fast_dllm(setting):
        steps = setting["steps"] or args.gen_length  # with a threshold, Fast-dLLM does not use the step budget
        outputs, calls = [], 0
        for row in range(args.batch):  # its functions build a batch-1 canvas
            x, nfe = functions[setting["mode"]](
                fast, prompts[row : row + 1], steps=steps, gen_length=args.gen_length, block_length=args.block_length,
                temperature=0.0, remasking="low_confidence", mask_id=mask_id, threshold=setting["threshold"])
            outputs.append(x)
            calls += nfe
        return torch.cat(outputs), calls

    def run_hf_mdm(setting):
        if setting["threshold"] is None:
            budget = {"steps": setting["steps"]}
        else:
            budget = {"confidence_threshold": setting["threshold"]}
        out = ours.generate(prompts, sampler="confidence", order="confidence", temperature=0.0,
                            block_length=args.block_length, use_cache=True, cache_mode=setting["mode"],
                            max_new_tokens=args.gen_length, return_dict_in_generate=True, **budget)
        return out.sequences, out.nfe

    rows = []
    print(f"{'setting':30s} {'Fast-dLLM s':>11s} {'hf_mdm s':>9s} {'ratio':>6s} {'CPU ratio':>9s} "
          f"{'calls FD/hf':>12s} {'same tokens':>11s}")
    with torch.no_grad():
        for setting in settings(args):
            theirs, their_calls = run_fast_dllm(setting)  # warm-up: compiles Fast-dLLM's attention, fills caches
            mine, my_calls = run_hf_mdm(setting)
            agreement = (theirs[:, args.prompt_length:] == mine[:, args.prompt_length:]).double().mean().item()
            times = {"fast_dllm": [], "hf_mdm": []}
            for _ in range(args.repeats):  # alternating, so that a change in the machine's load hits both sides
                times["fast_dllm"].append(timed(lambda: run_fast_dllm(setting)))
                times["hf_mdm"].append(timed(lambda: run_hf_mdm(setting)))
            sides = {}
            for side, calls in (("fast_dllm", their_calls), ("hf_mdm", my_calls)):
                wall, cpu = [t[0] for t in times[side]], [t[1] for t in times[side]]
                sides[side] = dict(median_seconds=statistics.median(wall), seconds=wall,
                                   median_cpu_seconds=statistics.median(cpu), cpu_seconds=cpu, network_calls=calls)
            fd, hf = sides["fast_dllm"], sides["hf_mdm"]
            row = dict(setting, **sides, ratio=fd["median_seconds"] / hf["median_seconds"],
                       cpu_ratio=fd["median_cpu_seconds"] / hf["median_cpu_seconds"], agreement=agreement,
                       identical=bool(torch.equal(theirs, mine)))
            rows.append(row)
            print(f"{setting['name']:30s} {fd['median_seconds']:11.4f} {hf['median_seconds']:9.4f} "
                  f"{row['ratio']:6.3f} {row['cpu_ratio']:9.3f} {f'{their_calls}/{my_calls}':>12s} "
                  f"{agreement:11.4f}", flush=True)

    report = dict(
        fast_dllm=dict(path=str(llada), commit=commit, placeholders=list(placeholders),
                       attention="eager (torch.compile wrapper removed)" if args.eager_attention
                       else "as shipped (torch.compile)"),
        torch=torch.__version__, python=platform.python_version(), threads=torch.get_num_threads(),
        repeats=args.repeats,
        model=dict(layers=args.layers, width=args.width, heads=args.heads, vocab=args.vocab, mask_token_id=mask_id,
                   logit_scale=args.logit_scale, seed=args.seed),
        decoding=dict(batch=args.batch, prompt_length=args.prompt_length, gen_length=args.gen_length,
                      block_length=args.block_length),
        logits_max_difference=difference, fast_dllm_max_mask_probability=mask_probability,
        settings=rows,
    )
    if args.output_dir is not None:
        args.output_dir.mkdir(parents=True, exist_ok=True)
        (args.output_dir / "results.json").write_text(json.dumps(report, indent=2) + "\n")
        (args.output_dir / "results.md").write_text(markdown(report))
        print(f"wrote {args.output_dir / 'results.json'} and {args.output_dir / 'results.md'}")


if __name__ == "__main__":
    main()
