"""hf_mdm.rl: the log-probability estimators against exact values on the oracle, the coupled pair's coverage, the
GRPO loss's gradient against a hand-computed one, masks that old, reference and current policies share, bad input
refused before any rollout, and a tiny model that learns from a verifiable reward."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast
from transformers.modeling_outputs import MaskedLMOutput

from conftest import tiny_config, tiny_gpt2_model, tiny_llama_model, tiny_model
from hf_mdm import MDMForMaskedDiffusion
from hf_mdm.modeling_mdm_common import MASK_LOGIT
from hf_mdm.rl import CoupledEstimator, build_estimator, completion_logps
from oracle import LENGTH, MASK
from rl_exact import exact_elbo, exact_logp, expected_coupled, expected_diffu_grpo, oracle

trl = pytest.importorskip("trl", reason="the trainer needs TRL (pip install 'hf_mdm[rl]'); CI installs it")
from datasets import Dataset  # noqa: E402

from hf_mdm.rl import MDMGRPOConfig, MDMGRPOTrainer  # noqa: E402

SCRIPTS = Path(__file__).parent / "training_scripts"
SEQUENCE = [0, 1, 1, 2]  # the oracle's joint favours equal neighbours: a likely but not the likeliest sequence
ROWS = 6000


def estimates(name: str, prompt_length: int, **settings) -> torch.Tensor:
    """ROWS independent sequence estimates (one seed per row) of log p(SEQUENCE[prompt_length:] | prompt)."""
    model, estimator = oracle(), build_estimator(name, **settings)
    ids = torch.tensor(SEQUENCE).repeat(ROWS, 1)
    logps, _, _ = completion_logps(model, estimator, ids, None, LENGTH - prompt_length, torch.arange(ROWS))
    return logps.double().sum(1)


@pytest.mark.parametrize("name, prompt_length, settings, expected", [
    ("diffu_grpo", 2, {"p_mask_prompt": 0.3}, lambda m: expected_diffu_grpo(m, SEQUENCE, 2, 0.3)),
    ("coupled", 1, {}, lambda m: expected_coupled(m, SEQUENCE, 1)),
    ("elbo", 1, {"elbo_samples": 3}, lambda m: exact_elbo(m, SEQUENCE, 1)),
])
def test_each_estimator_has_the_expectation_computed_by_enumeration(name, prompt_length, settings, expected):
    # z-test of the mean of ROWS draws against the exact expectation: |z| < 4 (two-sided p > 6e-5).
    values = estimates(name, prompt_length, **settings)
    stderr = float(values.std()) / math.sqrt(ROWS)
    assert stderr > 0
    z = (float(values.mean()) - expected(oracle())) / stderr
    assert abs(z) < 4, (name, float(values.mean()), expected(oracle()), stderr)


def test_the_elbo_is_the_exact_log_probability_for_the_exact_denoiser_and_the_others_are_biased():
    model = oracle()
    for prompt_length in (1, 2):
        exact = exact_logp(model, SEQUENCE, prompt_length)
        assert exact_elbo(model, SEQUENCE, prompt_length) == pytest.approx(exact, abs=1e-9)
    # The other two estimate something else (what the docs state): their bias here is far beyond rounding.
    assert abs(expected_coupled(model, SEQUENCE, 1) - exact_logp(model, SEQUENCE, 1)) > 0.05
    assert abs(expected_diffu_grpo(model, SEQUENCE, 2, 0.0) - exact_logp(model, SEQUENCE, 2)) > 0.01


class RecordingOracle(torch.nn.Module):
    """The oracle, recording every input it is given."""

    def __init__(self):
        super().__init__()
        self.model, self.inputs = oracle(), []
        self.config = self.model.config

    def forward(self, input_ids, **kwargs):
        self.inputs.append(input_ids.clone())
        return self.model(input_ids, **{k: v for k, v in kwargs.items() if k == "output_positions"})


def test_the_coupled_pair_scores_every_completion_token_exactly_once():
    batch = 64
    ids = torch.tensor([[0, 1, 2, 2]]).repeat(batch, 1)
    attention = torch.ones_like(ids)
    attention[::2, -1] = 0  # a shorter completion: its padding is never masked nor scored
    model = RecordingOracle()
    logps, _, _ = completion_logps(model, CoupledEstimator(), ids, attention, 3, torch.arange(batch))
    (noisy,) = model.inputs
    full, first, second = (noisy[k * batch : (k + 1) * batch] == MASK for k in range(3))
    scored = attention.bool() & (torch.arange(LENGTH) >= 1)
    assert torch.equal(full, scored)  # DiffuCoder's fully masked copy
    assert torch.equal(first.int() + second.int(), scored.int())  # each token masked in exactly one of the pair
    assert bool(first.any()) and bool(second.any())
    assert torch.all(logps[::2, -1] == 0) and torch.all(logps[1::2, -1] != 0)


def test_the_same_seeds_give_the_same_copies_and_another_pass_new_ones():
    model, estimator = oracle(), build_estimator("elbo", elbo_samples=2)
    ids = torch.tensor([SEQUENCE] * 32)
    first, _, _ = completion_logps(model, estimator, ids, None, 3, torch.arange(32))
    again, _, _ = completion_logps(model, estimator, ids, None, 3, torch.arange(32))
    other_pass, _, _ = completion_logps(model, estimator, ids, None, 3, torch.arange(32), iteration=1)
    assert torch.equal(first, again)
    assert not torch.equal(first, other_pass)


def test_unknown_estimators_and_settings_are_refused():
    with pytest.raises(ValueError, match="estimator='exact'.*allowed"):
        build_estimator("exact")
    with pytest.raises(ValueError, match="p_mask_prompt"):
        build_estimator("diffu_grpo", p_mask_prompt=1.0)
    with pytest.raises(ValueError, match="coupled_time_range"):
        build_estimator("coupled", coupled_time_range=(0.0, 0.5))
    with pytest.raises(ValueError, match="elbo_samples"):
        build_estimator("elbo", elbo_samples=0)


# The trainer.

@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Each trainer builds its own Accelerator, while Accelerate keeps process-wide singletons: reset them."""
    from accelerate.state import AcceleratorState, GradientState

    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def word_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    vocab = {f"w{i}": i for i in range(vocab_size)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    from tokenizers import pre_tokenizers

    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="w0", pad_token="w0", eos_token="w1",
                                   mask_token=f"w{vocab_size - 1}")


def grpo_config(tmp_path, **overrides) -> MDMGRPOConfig:
    fields = dict(output_dir=str(tmp_path), per_device_train_batch_size=8, num_generations=4, max_completion_length=6,
                  max_steps=1, logging_steps=1, bf16=False, gradient_checkpointing=False, report_to=[],
                  use_cpu=True, save_strategy="no", disable_dropout=True, seed=0)
    fields.update(overrides)
    return MDMGRPOConfig(**fields)


def prompts_dataset(count: int = 64) -> Dataset:
    return Dataset.from_dict({"prompt": [f"w{2 + i % 5} w{3 + i % 7}" for i in range(count)]})


def share_of(token: int):
    def reward(completion_ids, **kwargs):
        return [sum(t == token for t in ids) / max(len(ids), 1) for ids in completion_ids]

    reward.__name__ = f"share_of_w{token}"
    return reward


class TableDenoiser(MDMForMaskedDiffusion):
    """Logits that are a free table per position, whatever the input: their gradient has a closed form."""

    def __init__(self, config):
        super().__init__(config)
        generator = torch.Generator().manual_seed(3)
        self.table = torch.nn.Parameter(torch.randn(config.max_position_embeddings, config.vocab_size,
                                                    generator=generator))

    def forward(self, input_ids, attention_mask=None, timesteps=None, output_positions=None, **kwargs):
        logits = self.table[: input_ids.shape[1]][None].expand(len(input_ids), -1, -1)
        mask_column = torch.arange(self.config.vocab_size) == self.config.mask_token_id
        logits = logits.masked_fill(mask_column, MASK_LOGIT)
        if output_positions is not None:
            logits = logits.gather(1, output_positions[..., None].expand(-1, -1, logits.shape[-1]))
        return MaskedLMOutput(logits=logits)


def test_the_loss_gradient_equals_the_hand_computed_one(tmp_path):
    """bnpo loss, clipping and the k3 KL (use_bias_correction_kl off), temperature 0.7, old log-probabilities that
    put some ratios outside the clip range, padded completions. With logits a free table, d log softmax(z/T)[y] / dz
    = (onehot(y) - softmax(z/T)) / T, so the gradient is written out by hand."""
    config = tiny_config(vocab_size=8, mask_token_id=7, max_position_embeddings=8)
    model = TableDenoiser(config)
    temperature, beta, epsilon = 0.7, 0.1, 0.2
    args = grpo_config(tmp_path, temperature=temperature, beta=beta, epsilon=epsilon, loss_type="bnpo",
                       use_bias_correction_kl=False, estimator="diffu_grpo", p_mask_prompt=0.5)
    trainer = MDMGRPOTrainer(model, share_of(3), args, train_dataset=prompts_dataset(), processing_class=word_tokenizer(8))
    with torch.no_grad():
        model.table.add_(0.3 * torch.randn(model.table.shape, generator=torch.Generator().manual_seed(4)))
    model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by train(); one micro-batch per step here
    prompt_ids = torch.tensor([[2, 4], [5, 6], [3, 3]])
    completion_ids = torch.tensor([[2, 3, 1], [4, 1, 0], [1, 0, 0]])
    completion_mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0]])
    advantages = torch.tensor([1.0, -0.5, 0.25])
    with torch.no_grad():
        logits = model.table.detach().clone()
        logits[:, 7] = MASK_LOGIT  # [MASK] is never predicted
        logp_now = torch.log_softmax(logits[2:5] / temperature, -1)  # completion positions 2..4
        now = logp_now[torch.arange(3), completion_ids]  # (rows, 3) by position
        old = now + torch.tensor([[0.0, 0.4, -0.4], [0.1, -0.5, 0.0], [0.3, 0.0, 0.0]])
        reference = now + torch.tensor([[0.2, -0.1, 0.05], [-0.3, 0.1, 0.0], [0.15, 0.0, 0.0]])
    inputs = {"prompt_ids": prompt_ids, "prompt_mask": torch.ones_like(prompt_ids), "completion_ids": completion_ids,
              "completion_mask": completion_mask, "advantages": advantages, "old_per_token_logps": old,
              "ref_per_token_logps": reference, "num_items_in_batch": completion_mask.sum(),
              "mask_seeds": torch.arange(3)}
    model.zero_grad()
    trainer._compute_loss(model, inputs).backward()

    ratio = torch.exp(now - old)
    clipped = ratio.clamp(1 - epsilon, 1 + epsilon)
    unclipped_branch = ratio * advantages[:, None] <= clipped * advantages[:, None]
    coefficient = -advantages[:, None] * ratio * unclipped_branch + beta * (1 - torch.exp(reference - now))
    coefficient = coefficient * completion_mask / completion_mask.sum()
    expected = torch.zeros_like(model.table)
    for row in range(3):
        for j in range(3):
            position = 2 + j
            probabilities = torch.softmax(logits[position] / temperature, -1)
            onehot = torch.nn.functional.one_hot(completion_ids[row, j], 8).float()
            expected[position] += coefficient[row, j] * (onehot - probabilities) / temperature
    expected[:, 7] = 0  # the [MASK] column is overwritten by a constant
    assert bool((unclipped_branch == 0).any()), "the case must exercise the clip"
    torch.testing.assert_close(model.table.grad, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("lora", [False, True])
def test_each_pass_scores_the_old_and_reference_policies_on_its_own_copies(tmp_path, lora):
    """num_iterations = 3 with new copies on each pass and lr 0: the policy never changes, so on every pass the
    current log-probabilities equal the old and reference ones exactly; scored on another pass's copies they would
    not (the test checks the passes' copies differ). With LoRA the reference is the model with its adapter off
    (equal to the policy: a new adapter's B matrices are zero)."""
    seen = []

    class Recording(MDMGRPOTrainer):
        def _compute_loss(self, model, inputs):
            seen.append({key: inputs[key].clone() for key in ("old_per_token_logps_by_pass",
                                                               "ref_per_token_logps_by_pass", "mask_seeds")})
            return super()._compute_loss(model, inputs)

    model = tiny_model(vocab_size=8, max_position_embeddings=16)
    args = grpo_config(tmp_path, estimator="elbo", elbo_samples=2, num_iterations=3, learning_rate=0.0, beta=0.05,
                       max_steps=3, epsilon=1e-4)
    peft_config = pytest.importorskip("peft").LoraConfig(r=4, lora_alpha=8) if lora else None
    trainer = Recording(model, share_of(3), args, train_dataset=prompts_dataset(), processing_class=word_tokenizer(8),
                        peft_config=peft_config)
    assert (trainer.ref_model is None) == lora
    trainer.train()
    assert len(seen) == 3
    old = seen[0]["old_per_token_logps_by_pass"]
    assert not torch.allclose(old[:, 0], old[:, 1])  # the copies differ between passes
    clip = [entry["clip_ratio/region_mean"] for entry in trainer.state.log_history if "clip_ratio/region_mean" in entry]
    kl = [entry["kl"] for entry in trainer.state.log_history if "kl" in entry]
    assert clip == [0.0, 0.0, 0.0] and max(kl) < 1e-6, (clip, kl)


def test_bad_input_is_refused_before_any_rollout(tmp_path, monkeypatch):
    def no_rollout(*args, **kwargs):
        raise AssertionError("a rollout started")

    monkeypatch.setattr(MDMForMaskedDiffusion, "generate", no_rollout)
    tokenizer, data = word_tokenizer(8), prompts_dataset()

    def make(reward=share_of(3), model=None, **overrides):
        model = model or tiny_model(vocab_size=8, max_position_embeddings=16)
        return MDMGRPOTrainer(model, reward, grpo_config(tmp_path, **overrides), train_dataset=data,
                              processing_class=tokenizer)

    with pytest.raises(ValueError, match="estimator='exact' is not"):
        make(estimator="exact")
    with pytest.raises(ValueError, match="elbo_samples must be an integer >= 1"):
        make(estimator="elbo", elbo_samples=0)
    with pytest.raises(ValueError, match="returned 1 values for 2 completions"):
        make(reward=lambda completions, **kwargs: [0.0])
    with pytest.raises(ValueError, match=r"returned nan for completion 0"):
        make(reward=lambda completions, **kwargs: [float("nan")] * len(completions))
    with pytest.raises(ValueError, match="returned inf"):
        make(reward=lambda completions, **kwargs: [math.inf] * len(completions))
    with pytest.raises(ValueError, match="must return a list"):
        make(reward=lambda completions, **kwargs: 1.0)
    with pytest.raises(ValueError, match="sampler must be one of .*got 'nonsense'"):
        make(generation_kwargs={"sampler": "nonsense"})
    with pytest.raises(ValueError, match="not generate\\(\\) settings"):
        make(generation_kwargs={"beam_width": 3})
    time_conditioned = tiny_model(vocab_size=8, max_position_embeddings=16, time_conditioning=True)
    with pytest.raises(ValueError, match="time_conditioning=True"):
        make(model=time_conditioned, generation_kwargs={"sampler": "ancestral_cache"})
    block_model = tiny_llama_model(vocab_size=8, mask_token_id=7, diffusion_block_size=4)
    with pytest.raises(ValueError, match="must divide the model's diffusion_block_size"):
        make(model=block_model, generation_kwargs={"sampler": "confidence", "block_length": 3})
    with pytest.raises(ValueError, match="use_vllm"):
        make(use_vllm=True)


@pytest.mark.parametrize("estimator, lora", [("diffu_grpo", False), ("coupled", True), ("elbo", False)])
def test_a_tiny_model_learns_a_verifiable_reward(tmp_path, estimator, lora):
    """Reward: the share of completion tokens that are w3. Its held-out share (256 completions, fixed seed) must
    rise by a factor of 2 in 12 steps; with LoRA only the adapters train."""
    model = tiny_model(vocab_size=8, max_position_embeddings=16)
    tokenizer = word_tokenizer(8)

    def held_out_share(model) -> float:
        prompts = tokenizer(["w2 w5"] * 256, return_tensors="pt")
        out = model.generate(prompts.input_ids, max_new_tokens=6, generator=torch.Generator().manual_seed(9))
        return float((out[:, 2:] == 3).float().mean())

    before = held_out_share(model)
    peft_config = None
    if lora:
        peft = pytest.importorskip("peft")
        peft_config = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0)
    args = grpo_config(tmp_path, estimator=estimator, learning_rate=3e-2 if lora else 1e-2, max_steps=12,
                       elbo_samples=2, per_device_train_batch_size=16, num_generations=8)
    trainer = MDMGRPOTrainer(model, share_of(3), args, train_dataset=prompts_dataset(), processing_class=tokenizer,
                             peft_config=peft_config)
    trainer.train()
    trained = trainer.model.eval()
    if lora:
        assert {n for n, p in trained.named_parameters() if p.requires_grad} and all(
            "lora_" in n for n, p in trained.named_parameters() if p.requires_grad)
    after = held_out_share(trained)
    assert after > 2 * before, (estimator, before, after)


@pytest.mark.slow
def test_two_processes_train_one_model_on_their_own_rollouts(tmp_path):
    """torchrun with 2 CPU processes (gloo): each rolls out its own completions, the logged reward is the mean over
    both processes' completions (TRL gathers), and both end with the same parameters (DDP)."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result = subprocess.run([*torchrun, str(SCRIPTS / "grpo_two_processes.py"), str(tmp_path)], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    assert ranks[0]["parameter_sum"] == ranks[1]["parameter_sum"]
    assert ranks[0]["rewards"][0] != ranks[1]["rewards"][0]  # each process its own rollouts
    first = ranks[0]["rewards"][0] + ranks[1]["rewards"][0]
    logged = next(entry["reward"] for entry in ranks[0]["log"] if "reward" in entry)
    assert logged == pytest.approx(sum(first) / len(first), abs=1e-6)


@pytest.mark.parametrize("family", ["dit", "llada", "dream", "gpt2", "block"])
def test_the_estimate_reads_each_familys_own_conditionals(family):
    """diffu_grpo with no prompt masking scores each completion token with the completion masked: the model's own
    log-probabilities on that input (left padding included), and for a block-diffusion model those of each block
    given the clean earlier blocks, as the model decodes it."""
    model = {"dit": lambda: tiny_model(), "llada": lambda: tiny_llama_model(), "dream": lambda: tiny_llama_model(dream=True),
             "gpt2": lambda: tiny_gpt2_model(), "block": lambda: tiny_llama_model(diffusion_block_size=2)}[family]()
    mask_id = model.config.mask_token_id
    ids = torch.randint(2, 40, (2, 10), generator=torch.Generator().manual_seed(0))
    attention = torch.ones_like(ids)
    if family != "block":
        attention[1, 0] = 0  # a padded prompt
    logps, _, _ = completion_logps(model, build_estimator("diffu_grpo", p_mask_prompt=0.0), ids, attention, 6,
                                   torch.arange(2), temperature=0.5)
    expected = torch.zeros(2, 6)
    with torch.no_grad():
        if family == "block":
            for start in (4, 6, 8):  # each block of 2 after the 4-token prompt, given the clean blocks before it
                noisy = ids[:, : start + 2].clone()
                noisy[:, start:] = mask_id
                block_logits = model(noisy).logits[:, start:] / 0.5
                expected[:, start - 4 : start - 2] = block_logits.log_softmax(-1).gather(
                    -1, ids[:, start : start + 2, None])[..., 0]
        else:
            noisy = ids.clone()
            noisy[:, 4:] = mask_id
            logits = model(noisy, attention_mask=attention).logits[:, 4:] / 0.5
            expected = logits.log_softmax(-1).gather(-1, ids[:, 4:, None])[..., 0]
    torch.testing.assert_close(logps, expected, rtol=1e-5, atol=1e-5)


def test_rollouts_use_the_strategy_and_settings_given(tmp_path):
    """generation_kwargs reach model.generate() with TRL's sampling fields, on a block-diffusion model decoded by
    SDAR's rule; completions end after their first EOS, as TRL cuts them."""
    model = tiny_llama_model(vocab_size=8, mask_token_id=7, diffusion_block_size=2, eos_token_id=1)
    calls = []
    generate = model.generate

    def recording_generate(*args, **kwargs):
        calls.append(kwargs)
        return generate(*args, **kwargs)

    model.generate = recording_generate
    completions = []

    def reward(completion_ids, **kwargs):
        completions.extend(completion_ids)
        return [0.0] * len(completion_ids)

    args = grpo_config(tmp_path, generation_kwargs={"sampler": "sdar", "confidence_threshold": 0.5}, temperature=0.8,
                       top_k=5)
    MDMGRPOTrainer(model, reward, args, train_dataset=prompts_dataset(), processing_class=word_tokenizer(8)).train()
    assert calls and all(call["sampler"] == "sdar" and call["confidence_threshold"] == 0.5 and call["temperature"] == 0.8
                         and call["top_k"] == 5 and call["max_new_tokens"] == 6 for call in calls)
    rollouts = [ids for ids in completions if ids]
    assert rollouts and all(1 not in ids[:-1] and len(ids) <= 6 for ids in rollouts)
