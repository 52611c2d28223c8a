"""hf_mdm's samplers against MDLM's own ddpm_cache sampler, on the same network.

    OMP_NUM_THREADS=1 python benchmarks/mdlm_sampler.py --mdlm-path path/to/kuleshov-group/mdlm

MDLM's sampler is MDLM's code itself: `diffusion.Diffusion._sample` with `sampling.predictor = ddpm_cache`,
`sampling.steps = 128` and `sampling.noise_removal = True` (MDLM's configs/config.yaml defaults), its
`_ddpm_caching_update`, `_sample_categorical`, `forward` and `_subs_parameterization`, and its `LogLinearNoise`,
called on a stand-in for the LightningModule whose `backbone` is the hf_mdm network below. So both sides run the
same network; what differs is the sampler. MDLM's code runs only where it can be imported (a clone of
kuleshov-group/mdlm on `--mdlm-path` or on PYTHONPATH, with its Python requirements: lightning, torchmetrics,
hydra-core, omegaconf, datasets, einops). Its GPU-only kernels (flash_attn, mamba_ssm, causal_conv1d) and timm are
imported by its model files but never called here: where they are missing they are replaced by placeholders that
raise if used. Without MDLM's code the script says so and measures hf_mdm alone.

The setting (the defaults): V = 50258 (GPT-2 + [MASK]), L = 128, batch 4, 128 steps, a random 2-layer DiT of width
128 (the network is not what is measured), one CPU thread (`torch.set_num_threads(1)`), unconditional samples.
Measured, each once by default (`--repeats` for medians):
- MDLM ddpm_cache + noise removal: its draws are float32 over all L x (V + 1) classes of every row each step, and
  its cache is batch-wide (reused only when no row of the batch changed);
- hf_mdm `ancestral_cache` with `noise_removal="mdlm"` (the same procedure and law): per-row cache, draws only at
  masked positions, float64 (and, for comparison, float32);
- hf_mdm `first_hitting` (exact, one call per token, L calls), float64.
Printed: seconds, network calls, and MDLM's time over each hf_mdm time.
"""

import argparse
import os
import statistics
import sys
import time
import types

import torch

from peer_code import install_placeholders

from hf_mdm import MDMConfig, MDMForMaskedDiffusion


# Imported by MDLM's modules but never called by its sampler: the GPU kernels, and timm (whose LR scheduler only
# MDLM's training uses; timm itself needs torchvision).
UNCALLED_PACKAGES = ("flash_attn", "mamba_ssm", "causal_conv1d", "timm")


def import_mdlm(path: str | None):
    """MDLM's `diffusion` and `noise_schedule` modules, or (None, why not)."""
    if path:
        sys.path.insert(0, os.path.abspath(path))
    missing = install_placeholders(UNCALLED_PACKAGES)
    try:
        import diffusion
        import noise_schedule
    except Exception as error:  # noqa: BLE001  (any import failure means: MDLM's code is not usable here)
        return None, f"{type(error).__name__}: {error}"
    if not hasattr(diffusion, "Diffusion") or not hasattr(diffusion.Diffusion, "_ddpm_caching_update"):
        return None, f"the `diffusion` module at {diffusion.__file__} is not MDLM's"
    return (diffusion, noise_schedule, missing), None


class CountingBackbone(torch.nn.Module):
    """MDLM's `backbone(x, sigma) -> logits` contract, served by the hf_mdm network (time-agnostic)."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, 0

    def forward(self, x, sigma):
        self.calls += 1
        return self.model(x).logits


def mdlm_sampler(diffusion, noise_schedule, backbone, mask_id, length, batch, steps):
    """A stand-in for MDLM's `Diffusion` LightningModule carrying what `_sample` reads, with MDLM's own methods."""
    cls = diffusion.Diffusion
    namespace = types.SimpleNamespace
    stand_in = type("MDLMSamplerOnly", (), {name: getattr(cls, name) for name in (
        "_sample", "_ddpm_caching_update", "_ddpm_update", "_sample_prior", "forward", "_process_sigma",
        "_subs_parameterization")})()
    stand_in.config = namespace(loader=namespace(eval_batch_size=batch), model=namespace(length=length),
                                sampling=namespace(steps=steps, noise_removal=True, predictor="ddpm_cache"),
                                noise=namespace(type="loglinear"))
    stand_in.backbone, stand_in.noise = backbone, noise_schedule.LogLinearNoise()
    stand_in.mask_index, stand_in.neg_infinity = mask_id, -1000000.0
    stand_in.parameterization, stand_in.sampler, stand_in.time_conditioning = "subs", "ddpm_cache", False
    stand_in.device, stand_in.T = torch.device("cpu"), 0
    return stand_in


def timed(fn, repeats):
    seconds, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mdlm-path", default=os.environ.get("MDLM_PATH"),
                        help="a clone of kuleshov-group/mdlm (default: $MDLM_PATH, else PYTHONPATH)")
    parser.add_argument("--vocab", type=int, default=50258)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    config = MDMConfig(vocab_size=args.vocab, hidden_size=args.width, num_hidden_layers=args.layers,
                       num_attention_heads=4, cond_dim=64, max_position_embeddings=args.length, dropout=0.0)
    torch.manual_seed(0)
    model = MDMForMaskedDiffusion(config)
    with torch.no_grad():  # adaLN-zero init gives all-zero logits; random weights give a realistic softmax
        for parameter in model.parameters():
            parameter.normal_(0, 0.02)
    model.eval()
    mask_id = config.mask_token_id
    print(f"V = {args.vocab}, L = {args.length}, batch {args.batch}, {args.steps} steps, {args.layers} layers of width "
          f"{args.width}, {torch.get_num_threads()} CPU thread(s), torch {torch.__version__}")

    def hf_mdm(sampler, dtype="float64", **kwargs):
        def run():
            out = model.generate(max_new_tokens=args.length, num_return_sequences=args.batch, sampler=sampler,
                                 sampling_dtype=dtype, generator=torch.Generator().manual_seed(0),
                                 return_dict_in_generate=True, **kwargs)
            assert not (out.sequences == mask_id).any()
            return out.nfe
        return timed(run, args.repeats)

    results = {}
    with torch.no_grad():
        model.generate(max_new_tokens=8, num_return_sequences=args.batch, sampler="ancestral_cache", steps=4,
                       generator=torch.Generator().manual_seed(0))  # warm-up, unmeasured
        results["hf_mdm ancestral_cache, noise_removal='mdlm', float64"] = hf_mdm(
            "ancestral_cache", steps=args.steps, noise_removal="mdlm")
        results["hf_mdm ancestral_cache, noise_removal='mdlm', float32"] = hf_mdm(
            "ancestral_cache", "float32", steps=args.steps, noise_removal="mdlm")
        results["hf_mdm first_hitting, float64"] = hf_mdm("first_hitting")

        mdlm, why_not = import_mdlm(args.mdlm_path)
        if mdlm is None:
            print(f"MDLM's code is not importable here ({why_not}): measuring hf_mdm alone. Pass --mdlm-path (a "
                  "clone of kuleshov-group/mdlm, with its Python requirements installed) to compare.")
        else:
            diffusion, noise_schedule, placeholders = mdlm
            if placeholders:
                print(f"MDLM's code from {os.path.dirname(diffusion.__file__)}; placeholders for its uncalled GPU "
                      f"kernels: {', '.join(placeholders)}")
            backbone = CountingBackbone(model)
            sampler = mdlm_sampler(diffusion, noise_schedule, backbone, mask_id, args.length, args.batch, args.steps)

            def run_mdlm():
                backbone.calls = 0
                torch.manual_seed(0)
                x = sampler._sample(num_steps=args.steps, eps=1e-5)
                assert not (x == mask_id).any()
                return backbone.calls
            results["MDLM ddpm_cache + noise removal (its own _sample), float32"] = timed(run_mdlm, args.repeats)

    print(f"{'sampler':66s} {'seconds':>9s} {'network calls':>14s}")
    for name, (seconds, nfe) in results.items():
        print(f"{name:66s} {seconds:9.2f} {nfe:14d}")
    mdlm_name = "MDLM ddpm_cache + noise removal (its own _sample), float32"
    if mdlm_name in results:
        mdlm_seconds, mdlm_calls = results[mdlm_name]
        reused = args.steps + 1 - mdlm_calls
        print(f"MDLM's batch-wide cache was reused in {reused} of {args.steps + 1} network evaluations "
              f"({args.steps} steps + noise removal)")
        for name, (seconds, _) in results.items():
            if name != mdlm_name:
                print(f"MDLM's time / {name}: {mdlm_seconds / seconds:.2f}")


if __name__ == "__main__":
    main()
