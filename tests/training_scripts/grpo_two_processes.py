"""One GRPO run of a tiny MDM in each process of a torchrun launch (tests/test_rl.py): writes, per rank, the
rewards it computed, its first step's completions, its final parameters' sum and the log. Usage: script.py OUT_DIR."""

import json
import sys
from pathlib import Path

import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from hf_mdm import MDMConfig, MDMForMaskedDiffusion
from hf_mdm.rl import MDMGRPOConfig, MDMGRPOTrainer

out = Path(sys.argv[1])
torch.set_num_threads(1)
torch.manual_seed(0)
model = MDMForMaskedDiffusion(MDMConfig(vocab_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                        cond_dim=16, max_position_embeddings=16, dropout=0.0, pad_token_id=0,
                                        mask_token_id=7))
backend = Tokenizer(models.WordLevel({f"w{i}": i for i in range(8)}, unk_token="w0"))
backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="w0", pad_token="w0", eos_token="w1",
                                    mask_token="w7")
rewards = []


def share_of_w3(completion_ids, **kwargs):
    values = [sum(t == 3 for t in ids) / max(len(ids), 1) for ids in completion_ids]
    if any(completion_ids):  # not the constructor's check on empty completions
        rewards.append(values)
    return values


args = MDMGRPOConfig(output_dir=str(out / "run"), per_device_train_batch_size=4, num_generations=4,
                     max_completion_length=6, max_steps=2, logging_steps=1, bf16=False, gradient_checkpointing=False,
                     report_to=[], use_cpu=True, save_strategy="no", disable_dropout=True, seed=0, beta=0.05,
                     estimator="coupled", learning_rate=1e-2, disable_tqdm=True)
dataset = Dataset.from_dict({"prompt": [f"w{2 + i % 5} w{3 + i % 4}" for i in range(32)]})
trainer = MDMGRPOTrainer(model, share_of_w3, args, train_dataset=dataset, processing_class=tokenizer)
trainer.train()
rank = trainer.accelerator.process_index
(out / f"rank{rank}.json").write_text(json.dumps({
    "world": trainer.accelerator.num_processes, "rewards": rewards,
    "parameter_sum": sum(float(p.double().sum()) for p in trainer.model.parameters()),
    "log": trainer.state.log_history}))
