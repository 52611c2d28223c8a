"""Fine-tuning: chat data, the SFT objective against a hand computation, --init-from, LoRA through peft, gradient
checkpointing, and FSDP on two CPU processes (against one, and killed then resumed)."""

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel, AutoTokenizer

from hf_mdm.pretrained import pretrained_path
from hf_mdm.training import TrainConfig, train
from hf_mdm.training.loop import default_lora_targets, enable_gradient_checkpointing
from hf_mdm.training.chat_data import chat_examples, read_conversations
from hf_mdm.training.checkpointing import latest_checkpoint
from hf_mdm.training.objectives import T_MIN, Noise, get_objective

from conftest import tiny_gpt2_model, tiny_llama_model, tiny_model
from training_scripts.common import one_thread_and_fresh_accelerate_state, read_log, subprocess_env  # noqa: F401

SCRIPTS = Path(__file__).parent / "training_scripts"
SPEECHES = [
    ("Speak of the king.", "He is gone to France, and all his lords with him."),
    ("What news from the field?", "The day is ours, my lord; the French are fled."),
    ("Who comes here?", "A messenger, my lord, with letters from the queen."),
    ("How fares the prince?", "Well, and he bids you come to him at once."),
    ("Where is the duke?", "Within, my lord, and he will see no one."),
    ("Shall we to the wars?", "Ay, and we shall win; the heavens are with us."),
]


def write_chat_data(folder: Path, copies: int = 6) -> Path:
    path = folder / "chat.jsonl"
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            for _ in range(copies) for q, a in SPEECHES]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture
def tokenizer():
    return AutoTokenizer.from_pretrained(pretrained_path("shakespeare-mdm"))  # it ships with a chat template


# ---------------------------------------------------------------------------------------------------------------
# Chat data.
# ---------------------------------------------------------------------------------------------------------------


def test_chat_examples_are_prompt_then_response_then_eos(tmp_path, tokenizer):
    data = write_chat_data(tmp_path, copies=1)
    examples = chat_examples(read_conversations([data]), tokenizer, block_size=48)
    question, answer = SPEECHES[0]
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                           tokenize=False)
    assert prompt == f"ASK.\n{question}\n\nANSWER.\n"
    row, prompt_length = examples[0]["input_ids"].tolist(), int(examples[0]["prompt_length"])
    assert tokenizer.decode(row[:prompt_length]) == prompt
    response = tokenizer.decode(row[prompt_length:])
    assert response.startswith(answer + tokenizer.eos_token) and set(response[len(answer):].split(tokenizer.eos_token)) == {""}
    assert len(row) == 48 and row[-1] == tokenizer.eos_token_id  # padded with EOS, which is trained on
    # prompt/response fields render the same conversation.
    fields = tmp_path / "fields.jsonl"
    fields.write_text(json.dumps({"q": question, "a": answer}) + "\n")
    same = chat_examples(read_conversations([fields], prompt_field="q", response_field="a"), tokenizer, 48)
    assert same[0]["input_ids"].tolist() == row and int(same[0]["prompt_length"]) == prompt_length


def test_chat_data_errors_name_the_field_and_line(tmp_path, tokenizer):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
                   + "\n" + json.dumps({"text": "no messages"}) + "\n")
    with pytest.raises(ValueError, match=r"line 2: expected a field 'messages'"):
        read_conversations([bad])
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(ValueError, match="last message must be the assistant's"):
        read_conversations([bad])
    with pytest.raises(ValueError, match="expected string fields 'prompt' and 'response'"):
        read_conversations([bad], prompt_field="prompt", response_field="response")
    conversations = read_conversations([write_chat_data(tmp_path, 1)])
    with pytest.raises(ValueError, match="do not fit --block-size 8"):
        chat_examples(conversations, tokenizer, block_size=8)
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        chat_examples(conversations, tokenizer, block_size=48)


# ---------------------------------------------------------------------------------------------------------------
# The SFT objective.
# ---------------------------------------------------------------------------------------------------------------


class Recording(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model, self.inputs = model, []

    def forward(self, input_ids, timesteps=None):
        self.inputs.append(input_ids.clone())
        return self.model(input_ids, timesteps=timesteps)


def test_sft_loss_is_the_bound_per_response_token_by_hand():
    model = tiny_model(noise_schedule="linear").eval()
    config = model.config
    objective = get_objective("sft", config)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1, config.mask_token_id, (6, 20), generator=generator)
    prompt_lengths = torch.tensor([3, 7, 12, 1, 19, 5])
    noise = Noise(torch.tensor([0.05, 0.2, 0.4, 0.6, 0.8, 0.95], dtype=torch.float64), torch.rand(6, 20, generator=generator))
    recording = Recording(model)
    with torch.no_grad():
        losses = objective.sequence_losses(recording, ids, noise, prompt_lengths)
        noisy = recording.inputs[0]
        log_probs = torch.log_softmax(model(noisy).logits.double(), -1)
    for row in range(6):
        t = T_MIN + (1 - T_MIN) * noise.times[row].item()
        positions = torch.arange(20)
        masked = (positions >= prompt_lengths[row]) & (noise.uniforms[row] < t)  # linear: 1 - alpha_t = t
        assert torch.equal(noisy[row] == config.mask_token_id, masked)  # the prompt is never masked
        nll = -log_probs[row, masked, ids[row, masked]].sum().item()
        expected = (1 - T_MIN) * (1 / t) * nll / (20 - prompt_lengths[row].item())  # weight 1/t, per response token
        assert losses[row].item() == pytest.approx(expected, rel=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Runs: --init-from, LoRA, gradient checkpointing.
# ---------------------------------------------------------------------------------------------------------------


def sft_run(tmp_path, name, **overrides) -> TrainConfig:
    settings = dict(train_files=[str(write_chat_data(tmp_path))], objective="sft", init_from="shakespeare-mdm",
                    block_size=48, batch_size=4, lr=1e-3, min_lr=1e-4, warmup_steps=1, max_steps=3, eval_every=3,
                    eval_blocks=4, log_every=1, save_every=0, output_dir=str(tmp_path / name), seed=0,
                    validation_fraction=0.2)
    settings.update(overrides)
    return TrainConfig(**settings)


def test_sft_from_the_shipped_model(tmp_path):
    result = train(sft_run(tmp_path, "full"))
    assert result["step"] == 3 and math.isfinite(result["val/nats_per_token"])
    model = AutoModel.from_pretrained(tmp_path / "full" / "model")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "full" / "model")
    assert tokenizer.chat_template and model.config.vocab_size == len(tokenizer)
    with pytest.raises(ValueError, match="drop --model-config"):
        train(sft_run(tmp_path, "bad", model_config="tiny"))


def test_lora_adapter_loads_with_peft_and_merges_to_identical_logits(tmp_path):
    from peft import PeftModel

    train(sft_run(tmp_path, "lora", lora_r=4, lr=5e-2))
    base = AutoModel.from_pretrained(pretrained_path("shakespeare-mdm"))
    adapted = PeftModel.from_pretrained(base, tmp_path / "lora" / "adapter").eval()
    merged = AutoModel.from_pretrained(tmp_path / "lora" / "model").eval()
    ids = torch.randint(0, 4096, (2, 24), generator=torch.Generator().manual_seed(0))
    ids[:, ::3] = merged.config.mask_token_id
    with torch.no_grad():
        original = AutoModel.from_pretrained(pretrained_path("shakespeare-mdm"))(ids).logits
        adapter_logits, merged_logits = adapted(ids).logits, merged(ids).logits
    torch.testing.assert_close(merged_logits, adapter_logits, rtol=1e-4, atol=1e-4)
    assert (merged_logits - original).abs().max() > 1e-3  # the adapter learned something
    prompt = torch.tensor([[5, 6, 7]])
    every_sampler = (dict(), dict(tokens_per_step=2), dict(unmasking="confidence", block_length=4, steps=4),
                     dict(unmasking="entropy", confidence_threshold=0.5, block_length=4, use_cache=True),
                     dict(sampler="ancestral", steps=8), dict(sampler="ancestral_cache", steps=8),
                     dict(sampler="ancestral", steps=8, remasking="remdm"))
    for settings in every_sampler:
        out = adapted.generate(prompt, max_new_tokens=8, generator=torch.Generator().manual_seed(0), **settings)
        assert out.shape == (1, 11) and not (out == merged.config.mask_token_id).any()
    with pytest.raises(ValueError, match="'attn' matches no module"):
        train(sft_run(tmp_path, "bad", lora_r=4, lora_target_modules=["attn"]))
    assert not (tmp_path / "bad").exists()  # refused before anything is written


@pytest.mark.parametrize("family, targets", [
    (tiny_model, ["fc_in", "fc_out", "o_proj", "qkv_proj"]),  # the DiT's adaLN modulations are not adapted
    (tiny_llama_model, ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]),
    (tiny_gpt2_model, ["fc_in", "fc_out", "o_proj", "qkv_proj"]),
])
def test_lora_adapts_every_attention_and_mlp_projection_of_each_family(family, targets):
    assert default_lora_targets(family()) == targets


def saved_activation_bytes(model, ids, labels) -> int:
    total = 0

    def pack(tensor):
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(ids, labels=labels).loss.backward()
    return total


def test_gradient_checkpointing_saves_fewer_activations_and_the_same_run(tmp_path):
    ids = torch.randint(1, 50, (4, 32), generator=torch.Generator().manual_seed(0))
    masked = ids.masked_fill(torch.arange(32) % 2 == 0, 50)
    plain, checkpointed = tiny_model().train(), tiny_model().train()
    enable_gradient_checkpointing(checkpointed)
    assert saved_activation_bytes(checkpointed, masked, ids) < 0.6 * saved_activation_bytes(plain, masked, ids)
    for p, q in zip(plain.parameters(), checkpointed.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7)
    # The flag in a run: the same losses as without it.
    train(sft_run(tmp_path, "plain"))
    train(sft_run(tmp_path, "checkpointed", gradient_checkpointing=True))
    assert read_log(tmp_path / "checkpointed", "train/nats_per_token") == pytest.approx(
        read_log(tmp_path / "plain", "train/nats_per_token"), rel=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# FSDP on two CPU processes.
# ---------------------------------------------------------------------------------------------------------------


def cli(config: TrainConfig) -> list[str]:
    args = []
    for name, value in vars(config).items():
        if value is None or value is False or value == () or name == "report_to":
            continue
        flag = "--" + name.replace("_", "-")
        args += [flag] if value is True else [flag, *map(str, value)] if isinstance(value, list) else [flag, str(value)]
    return args


def run(command, timeout=300):
    result = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


@pytest.mark.slow
def test_fsdp_on_two_processes_follows_one_and_a_killed_run_resumes(tmp_path):
    """SFT of the shipped model, global batch 4: FSDP2 on 2 processes (each block sharded) gives the losses of one
    process; killed with SIGKILL after its first checkpoint, it resumes from the sharded checkpoint to the end
    weights of an uninterrupted FSDP run."""
    settings = dict(max_steps=6, eval_every=3, save_every=2)
    run([sys.executable, "-m", "hf_mdm.training.cli", *cli(sft_run(tmp_path, "one", **settings))])
    run([*TORCHRUN, SCRIPTS / "fsdp_cpu.py", *cli(sft_run(tmp_path, "fsdp", **settings))])
    assert (tmp_path / "fsdp" / "checkpoints").is_dir()
    assert any(p.name.startswith("pytorch_model_fsdp") for p in latest_checkpoint(tmp_path / "fsdp").iterdir())
    for key in ("train/nats_per_token", "val/nats_per_token"):
        one, two = read_log(tmp_path / "one", key), read_log(tmp_path / "fsdp", key)
        assert one.keys() == two.keys() and list(two.values()) == pytest.approx(list(one.values()), rel=1e-4), key
    assert {"configuration_mdm.py", "modeling_mdm.py"} <= {p.name for p in (tmp_path / "fsdp" / "model").iterdir()}

    killed = tmp_path / "killed"
    process = subprocess.Popen([*TORCHRUN, SCRIPTS / "fsdp_cpu.py", *cli(sft_run(tmp_path, "killed", **settings))],
                               env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    deadline = time.time() + 300
    while latest_checkpoint(killed) is None and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    import os

    os.killpg(process.pid, signal.SIGKILL)  # the launcher and both workers
    process.wait()
    assert latest_checkpoint(killed) is not None and not (killed / "model").exists()
    run([*TORCHRUN, SCRIPTS / "fsdp_cpu.py", *cli(sft_run(tmp_path, "killed", resume=True, **settings))])
    whole, resumed = load_file(tmp_path / "fsdp" / "model" / "model.safetensors"), load_file(killed / "model" / "model.safetensors")
    for name in whole:
        torch.testing.assert_close(resumed[name], whole[name], rtol=1e-5, atol=1e-6)
