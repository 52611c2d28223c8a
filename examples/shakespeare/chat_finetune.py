"""Fine-tune the shipped Shakespeare MDM on chat data made from the plays: "continue this speech".

    python examples/shakespeare/prepare.py --out data/shakespeare
    python examples/shakespeare/chat_finetune.py --data data/shakespeare --out runs/shakespeare-chat
    hf-mdm generate runs/shakespeare-chat/run/model --chat "But soft, what light through yonder window breaks?" \
        --sampler confidence --block-length 8 --temperature 0 --max-new-tokens 48

1. Chat data: every speech of at least four lines becomes a conversation, its first two lines the user's turn,
   its next two lines the answer (kept when the rendered conversation fits --block-size): training conversations
   from the training plays, validation ones from the validation plays (never trained on). Written to
   OUT/data/{train,validation}.jsonl.
2. `hf-mdm train --objective sft --init-from shakespeare-mdm`: full fine-tuning of the shipped model with its chat
   template (a speech per turn, `ASK.` / `ANSWER.`); the prompt is never masked, the answer and its EOS padding are.
3. The validation bound per response token (nats; the training objective: answer and EOS padding masked) on the
   held-out conversations, before (step 0) and after, from the run's log; the bound per answer token with the
   padding left visible (`answer_bound`), before and after; and the answers of the model before and after to four
   held-out prompts (greedy, greedy in blocks of 8, sampled): OUT/results.json.
"""

import argparse
import json
from pathlib import Path

import torch


def speeches(text: str):
    """(speaker, lines) of every speech: a short line ending with '.' that names the speaker, then its lines."""
    blocks = [block.strip().split("\n") for block in text.split("\n\n")]
    for block in blocks:
        # A speaker ("Ham.", "KING RICHARD.") has no comma; "Claudius, King of Denmark." opens a list of characters.
        if (len(block) >= 5 and block[0].endswith(".") and block[0][:1].isupper() and len(block[0]) < 30
                and "," not in block[0]):
            yield block[0], [line.strip() for line in block[1:]]


def conversations(jsonl: Path, tokenizer, block_size: int, limit: int | None = None) -> list[dict]:
    """The chat rows of one split: speeches of four lines or more whose rendered conversation fits the block."""
    from hf_mdm.training.chat_data import render

    rows = []
    for line in jsonl.read_text().splitlines():
        work = json.loads(line)
        for _, lines in speeches(work["text"]):
            # Lists of characters and stage directions are not speeches: a line that starts with a name in capitals.
            if len(lines) >= 4 and all(lines[:4]) and not any(
                    line.split()[0].isupper() and len(line.split()[0].strip(",.")) >= 4 for line in lines[:4]):
                messages = [{"role": "user", "content": "\n".join(lines[:2])},
                            {"role": "assistant", "content": "\n".join(lines[2:4])}]
                if sum(map(len, render(tokenizer, messages))) <= block_size:
                    rows.append({"messages": messages})
    return rows[:limit] if limit else rows


@torch.no_grad()
def answer_bound(model, examples, eos_token_id: int, passes: int = 8) -> float:
    """The MDM bound in nats per answer token of each held-out answer given its prompt AND its EOS padding (masked:
    the answer and its first EOS; visible: the prompt and the rest of the padding), averaged over answers.

    The training objective also masks and scores the padding, which a model never fine-tuned cannot predict (the
    base model puts ~15 nats on each padding EOS): this figure leaves the padding out, so that "before" and "after"
    compare how well the answers themselves are predicted. A bound on log p(answer | prompt, answer length).
    """
    from hf_mdm.training.objectives import T_MIN, draw_noise, get_objective, token_cross_entropy

    objective = get_objective("sft", model.config)
    ids, prompt_lengths = examples[:]["input_ids"], examples[:]["prompt_length"]
    positions = torch.arange(ids.shape[1])[None, :]
    response = positions >= prompt_lengths[:, None]
    padding = response & (ids == eos_token_id) & ((ids == eos_token_id) & response).cumsum(-1).gt(1)
    scored = response & ~padding
    total = 0.0
    for k in range(passes):
        noise = draw_noise(torch.Generator().manual_seed(k), *ids.shape)
        t = T_MIN + (1 - T_MIN) * noise.times
        masked = scored & (noise.uniforms < (1 - objective.schedule.alpha(t))[:, None])
        weight = (1 - T_MIN) * objective.schedule.loss_weight(t) / scored.sum(-1)
        logits = model(ids.masked_fill(masked, model.config.mask_token_id)).logits
        total += (weight * (token_cross_entropy(logits, ids) * masked).sum(-1)).mean().item()
    return total / passes


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("data/shakespeare"), help="prepare.py's output folder")
    parser.add_argument("--out", type=Path, default=Path("runs/shakespeare-chat"))
    parser.add_argument("--max-steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--block-size", type=int, default=128, help="longer conversations are left out")
    parser.add_argument("--validation", type=int, default=256, help="held-out conversations scored")
    args = parser.parse_args()
    from transformers import AutoModel, AutoTokenizer

    from hf_mdm.generation_mdm import cut_at_eos
    from hf_mdm.pretrained import pretrained_path
    from hf_mdm.training import TrainConfig, train
    from hf_mdm.training.chat_data import chat_examples

    data = args.out / "data"
    data.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(pretrained_path("shakespeare-mdm"))
    train_rows = conversations(args.data / "train.jsonl", tokenizer, args.block_size)
    validation_rows = conversations(args.data / "validation.jsonl", tokenizer, args.block_size, args.validation)
    for name, rows in (("train", train_rows), ("validation", validation_rows)):
        (data / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    print(f"{len(train_rows)} training and {len(validation_rows)} validation conversations")

    config = TrainConfig(train_files=[str(data / "train.jsonl")], validation_files=[str(data / "validation.jsonl")],
                         objective="sft", init_from="shakespeare-mdm", block_size=args.block_size,
                         batch_size=args.batch_size, lr=1e-4, min_lr=1e-5, warmup_steps=20, max_steps=args.max_steps,
                         eval_every=max(args.max_steps // 3, 1), eval_passes=4, log_every=10, save_every=100,
                         output_dir=str(args.out / "run"), seed=0, resume=(args.out / "run").exists())
    metrics = train(config)
    log = [json.loads(line) for line in (args.out / "run" / "log.jsonl").read_text().splitlines()]
    validation = {row["step"]: row["val/nats_per_token"] for row in log if "val/nats_per_token" in row}

    models = {"before": AutoModel.from_pretrained(pretrained_path("shakespeare-mdm")).eval(),
              "after": AutoModel.from_pretrained(args.out / "run" / "model").eval()}
    examples = chat_examples([row["messages"] for row in validation_rows], tokenizer, args.block_size)
    answers_only = {name: answer_bound(model, examples, tokenizer.eos_token_id) for name, model in models.items()}

    # Answers to held-out prompts before and after, three ways: greedy most-confident-first over the whole answer
    # (instruct MDMs fill their EOS padding first and can end up answering nothing), the same in blocks of 8 (LLaDA's
    # semi-autoregressive remedy), and the exact first-hitting sampler at temperature 1.
    decodings = {"greedy": dict(sampler="confidence", temperature=0.0),
                 "greedy, blocks of 8": dict(sampler="confidence", temperature=0.0, block_length=8),
                 "sampled (exact FHS)": dict(temperature=1.0)}
    samples = []
    for row in validation_rows[:4]:
        prompt = tokenizer.apply_chat_template(row["messages"][:1], add_generation_prompt=True, return_tensors="pt",
                                               return_dict=True)
        sample = {"prompt": row["messages"][0]["content"], "reference": row["messages"][1]["content"]}
        for name, model in models.items():
            for decoding, settings in decodings.items():
                out = model.generate(**prompt, max_new_tokens=48, generator=torch.Generator().manual_seed(0), **settings)
                answer = cut_at_eos(out, tokenizer.eos_token_id, start=prompt["input_ids"].shape[1])[0]
                sample[f"{name}, {decoding}"] = tokenizer.decode(answer)
        samples.append(sample)
    results = {"command": f"python examples/shakespeare/chat_finetune.py --max-steps {args.max_steps}",
               "train_conversations": len(train_rows), "validation_conversations": len(validation_rows),
               "validation_nats_per_response_token": validation, "final": metrics,
               "answer_bound_padding_visible": answers_only, "answers": samples}
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
