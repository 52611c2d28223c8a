"""GRPO on the shipped Shakespeare MDM with a verifiable reward: say "thou".

The reward of a completion is how many times it addresses someone as thou, thee or thy (whole words). The shipped
`shakespeare-mdm` does so in about one completion in six; GRPO (hf_mdm.rl.MDMGRPOTrainer, TRL's GRPOTrainer with
diffusion rollouts) raises it within a few minutes on a CPU:

    python examples/rl/shakespeare_thou.py --estimator diffu_grpo --seeds 0 1 2 --output results/rl_thou
    python examples/rl/shakespeare_thou.py --estimator coupled --seeds 0 --lora-r 16 --output results/rl_thou

Rollouts are exact first-hitting samples (the model's default strategy) of 24 tokens after a speaker's name.
Before and after training it measures the mean reward of 128 held-out completions (other speakers, fixed seed),
and writes, per seed, the training log and the held-out figures (JSON) and one plot of every seed's reward curve.
"""

import argparse
import json
import re
import tempfile
import time
from pathlib import Path

import torch
from datasets import Dataset
from transformers import AutoModel, AutoTokenizer

from hf_mdm.pretrained import pretrained_path
from hf_mdm.rl import ESTIMATORS, MDMGRPOConfig, MDMGRPOTrainer

TRAIN_SPEAKERS = ["ROMEO", "JULIET", "HAMLET", "OPHELIA", "KING LEAR", "CORDELIA", "MACBETH", "LADY MACBETH",
                  "OTHELLO", "DESDEMONA", "PROSPERO", "MIRANDA", "BRUTUS", "PORTIA", "VIOLA", "ORSINO"]
HELD_OUT_SPEAKERS = ["FALSTAFF", "ROSALIND", "BENEDICK", "BEATRICE", "IAGO", "TITANIA", "OBERON", "PUCK"]
THOU = re.compile(r"\b(thou|thee|thy)\b", re.IGNORECASE)


def say_thou(completions, **kwargs) -> list[float]:
    """The reward: thou, thee and thy, counted as whole words."""
    return [float(len(THOU.findall(text))) for text in completions]


def prompts(speakers: list[str]) -> list[str]:
    return [f"{speaker}:\n" for speaker in speakers]


@torch.no_grad()
def held_out_reward(model, tokenizer, length: int, samples: int = 128, seed: int = 1234) -> tuple[float, list[str]]:
    """Mean reward of `samples` completions of the held-out speakers, drawn with a fixed generator, and the first
    few completions (to read what the reward did to the text)."""
    model.eval()
    texts = prompts(HELD_OUT_SPEAKERS) * (samples // len(HELD_OUT_SPEAKERS))
    encoded = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left")
    generator = torch.Generator().manual_seed(seed)
    out = model.generate(encoded.input_ids, attention_mask=encoded.attention_mask, max_new_tokens=length,
                         generator=generator)
    completions = tokenizer.batch_decode(out[:, encoded.input_ids.shape[1]:], skip_special_tokens=True)
    return sum(say_thou(completions)) / len(completions), [t + c for t, c in zip(texts[:4], completions[:4])]


def run(seed: int, args, output: Path) -> dict:
    folder = pretrained_path("shakespeare-mdm")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder, dtype=torch.float32)
    before, examples_before = held_out_reward(model, tokenizer, args.completion_length)
    config = MDMGRPOConfig(
        output_dir=tempfile.mkdtemp(), save_strategy="no",  # no TRL checkpoints: the figures are the output
        seed=seed, max_steps=args.steps, learning_rate=args.lr,
        lr_scheduler_type="constant", per_device_train_batch_size=args.generations * 2,
        num_generations=args.generations, max_completion_length=args.completion_length, beta=args.beta,
        num_iterations=args.num_iterations, estimator=args.estimator, disable_dropout=True, bf16=False,
        gradient_checkpointing=False, logging_steps=1, report_to=[], use_cpu=True,
        max_grad_norm=0.2,
    )
    peft_config = None
    if args.lora_r:
        from peft import LoraConfig

        peft_config = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0)
    dataset = Dataset.from_dict({"prompt": prompts(TRAIN_SPEAKERS) * args.steps})
    trainer = MDMGRPOTrainer(model, say_thou, config, train_dataset=dataset, processing_class=tokenizer,
                             peft_config=peft_config)
    start = time.perf_counter()
    trainer.train()
    minutes = (time.perf_counter() - start) / 60
    after, examples_after = held_out_reward(trainer.model, tokenizer, args.completion_length)
    curve = [entry["reward"] for entry in trainer.state.log_history if "reward" in entry]
    result = {"seed": seed, "estimator": args.estimator, "lora_r": args.lora_r, "steps": args.steps, "lr": args.lr,
              "beta": args.beta, "generations": args.generations, "completion_length": args.completion_length,
              "held_out_reward_before": before, "held_out_reward_after": after, "train_minutes": minutes,
              "reward_curve": curve, "examples_before": examples_before, "examples_after": examples_after}
    (output / f"run-{seed}.json").write_text(json.dumps(result, indent=1))
    print(f"seed {seed}: held-out reward {before:.3f} -> {after:.3f} ({minutes:.1f} min)")
    return result


def plot(results: list[dict], path: Path, window: int = 5) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 3.5))
    for result in results:
        curve = torch.tensor(result["reward_curve"])
        smooth = torch.nn.functional.avg_pool1d(curve[None, None], window, 1, window // 2,
                                                count_include_pad=False)[0, 0][: len(curve)]
        axis.plot(range(1, len(curve) + 1), smooth.tolist(),
                  label=f"seed {result['seed']}: held-out {result['held_out_reward_before']:.2f} -> "
                        f"{result['held_out_reward_after']:.2f}")
    axis.set_xlabel("GRPO step")
    axis.set_ylabel(f"mean reward (thou/thee/thy), {window}-step mean")
    lora = f", LoRA r={results[0]['lora_r']}" if results[0]["lora_r"] else ""
    axis.set_title(f"shakespeare-mdm, estimator {results[0]['estimator']}{lora}")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--estimator", default="diffu_grpo", choices=sorted(ESTIMATORS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--beta", type=float, default=0.0, help="KL coefficient against the starting model")
    parser.add_argument("--num-iterations", type=int, default=1)
    parser.add_argument("--generations", type=int, default=8, help="completions per prompt (GRPO's group)")
    parser.add_argument("--completion-length", type=int, default=24)
    parser.add_argument("--lora-r", type=int, default=0, help="LoRA rank (0: full fine-tuning)")
    parser.add_argument("--output", type=Path, default=Path("runs/rl_thou"))
    args = parser.parse_args()
    output = args.output / (args.estimator + (f"-lora{args.lora_r}" if args.lora_r else ""))
    output.mkdir(parents=True, exist_ok=True)
    results = [run(seed, args, output) for seed in args.seeds]
    plot(results, output / "reward_curve.png")
    print(f"wrote {output}/run-*.json and {output}/reward_curve.png")


if __name__ == "__main__":
    main()
