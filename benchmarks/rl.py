"""Where a GRPO step's time and memory go for a diffusion LM (hf_mdm.rl.MDMGRPOTrainer): rollout (model.generate),
scoring (rewards, and the old and reference policies' log-probabilities), and the update (the estimator's forward and
backward passes, the optimizer), for full fine-tuning and LoRA, per estimator.

Each configuration runs in its own process (so that CPU peak memory, the process's high-water resident set, is its
own): one warm-up step, then `--steps` timed steps. Reported per step: the three times and the update's share, and
peak memory: on CUDA the peak allocated during each phase, on CPU the process's peak resident memory above what it
held after building the trainer (the model, its optimizer state not yet allocated).

    python benchmarks/rl.py --output results/rl/steps_cpu.json                      # shakespeare-mdm on CPU
    python benchmarks/rl.py --model llada-shaped --device cuda --output results/rl/steps_cuda.json
"""

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

CONFIGURATIONS = [(estimator, lora) for lora in (0, 16) for estimator in ("diffu_grpo", "coupled", "elbo")]


def build(model_name: str):
    from transformers import AutoModel, AutoTokenizer

    from hf_mdm import MDMLlamaConfig, MDMLlamaForMaskedDiffusion
    from hf_mdm.pretrained import pretrained_path

    folder = pretrained_path("shakespeare-mdm")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if model_name == "shakespeare-mdm":
        return AutoModel.from_pretrained(folder, dtype=torch.float32), tokenizer
    # LLaDA's layout (bidirectional Llama, no biases, SwiGLU, full heads) at a small size, random weights.
    config = MDMLlamaConfig(vocab_size=len(tokenizer), hidden_size=1024, intermediate_size=2816, num_hidden_layers=12,
                            num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=512,
                            mask_token_id=tokenizer.mask_token_id, pad_token_id=tokenizer.pad_token_id,
                            eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    return MDMLlamaForMaskedDiffusion(config), tokenizer


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_one(args) -> dict:
    from datasets import Dataset

    from hf_mdm.rl import MDMGRPOConfig, MDMGRPOTrainer

    model, tokenizer = build(args.model)
    cuda = args.device == "cuda"
    model.to(args.device)
    timings = {"rollout": [], "scoring": [], "update": []}
    peaks = {"rollout": 0, "scoring": 0, "update": 0}

    def mark(phase, start, memory_start):
        if cuda:
            torch.cuda.synchronize()
            peaks[phase] = max(peaks[phase], torch.cuda.max_memory_allocated() - memory_start)
        timings[phase].append(time.perf_counter() - start)

    class Timed(MDMGRPOTrainer):
        def _generate_single_turn(self, *a, **k):
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            memory, start = torch.cuda.memory_allocated() if cuda else 0, time.perf_counter()
            out = super()._generate_single_turn(*a, **k)
            mark("rollout", start, memory)
            self._after_rollout = time.perf_counter()
            return out

        def _generate_and_score_completions(self, inputs):
            start = time.perf_counter()
            out = super()._generate_and_score_completions(inputs)
            timings["scoring"].append(time.perf_counter() - self._after_rollout)
            self._scoring_total = time.perf_counter() - start
            return out

        def training_step(self, model, inputs, num_items_in_batch):
            self._scoring_total = 0.0
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            memory, start = torch.cuda.memory_allocated() if cuda else 0, time.perf_counter()
            out = super().training_step(model, inputs, num_items_in_batch)
            if cuda:
                torch.cuda.synchronize()
                peaks["update"] = max(peaks["update"], torch.cuda.max_memory_allocated() - memory)
            timings["update"].append(time.perf_counter() - start - self._scoring_total)
            return out

    peft_config = None
    if args.lora_r:
        from peft import LoraConfig

        peft_config = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0)
    with tempfile.TemporaryDirectory() as output_dir:
        config = MDMGRPOConfig(
            output_dir=output_dir, max_steps=args.steps + 1, learning_rate=1e-5, per_device_train_batch_size=16,
            num_generations=8, max_completion_length=args.completion_length, estimator=args.estimator,
            elbo_samples=4, beta=0.04, disable_dropout=True, bf16=cuda, gradient_checkpointing=False,
            logging_steps=1, save_strategy="no", report_to=[], use_cpu=not cuda, disable_tqdm=True,
            generation_kwargs={"steps": args.completion_length},
        )
        dataset = Dataset.from_dict({"prompt": ["ROMEO:\n", "JULIET:\n", "HAMLET:\n", "OPHELIA:\n"] * 64})
        trainer = Timed(model, lambda completions, **k: [float(len(c)) for c in completions], config,
                        train_dataset=dataset, processing_class=tokenizer, peft_config=peft_config)
        before = peak_rss_bytes()
        trainer.train()
    result = {"estimator": args.estimator, "lora_r": args.lora_r, "model": args.model, "device": args.device,
              "steps": args.steps, "completion_length": args.completion_length,
              "parameters": sum(p.numel() for p in model.parameters())}
    for phase, values in timings.items():
        result[f"{phase}_s"] = sum(values[1:]) / max(len(values) - 1, 1)  # the first step warms up
    if cuda:
        result.update({f"{phase}_peak_gib": peaks[phase] / 2**30 for phase in peaks})
        result["device_name"] = torch.cuda.get_device_name()
    else:
        result["peak_rss_above_start_gib"] = (peak_rss_bytes() - before) / 2**30
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="shakespeare-mdm", choices=["shakespeare-mdm", "llada-shaped"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--completion-length", type=int, default=32)
    parser.add_argument("--estimator", default=None, help=argparse.SUPPRESS)  # one configuration (a child process)
    parser.add_argument("--lora-r", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    if args.estimator is not None:
        print(json.dumps(run_one(args)))
        return
    results = []
    for estimator, lora in CONFIGURATIONS:
        command = [sys.executable, __file__, "--model", args.model, "--device", args.device, "--steps", str(args.steps),
                   "--completion-length", str(args.completion_length), "--estimator", estimator, "--lora-r", str(lora)]
        out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
        r = results[-1]
        memory = (f"peak rollout {r['rollout_peak_gib']:.2f} / update {r['update_peak_gib']:.2f} GiB" if "rollout_peak_gib"
                  in r else f"peak RSS +{r['peak_rss_above_start_gib']:.2f} GiB")
        step = r["rollout_s"] + r["scoring_s"] + r["update_s"]
        print(f"{estimator:10} {'LoRA r=' + str(lora) if lora else 'full':9} rollout {r['rollout_s']:6.2f} s  scoring "
              f"{r['scoring_s']:6.2f} s  update {r['update_s']:6.2f} s  (update {r['update_s'] / step:4.0%} of the step)"
              f"  {memory}", flush=True)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(results, indent=1))
        print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
