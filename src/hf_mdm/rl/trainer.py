"""GRPO for masked diffusion models: TRL's `GRPOTrainer` with diffusion rollouts and estimated log-probabilities.

TRL's trainer is kept whole (its config, reward-function conventions, advantages, clipped loss, KL term, PEFT,
Accelerate and logging); three hooks change, because a diffusion LM is neither sampled nor scored left to right:

- `_generate_single_turn`: rollouts are `model.generate()` with any registered strategy and its settings
  (`generation_kwargs`), the completion cut after its first end-of-sequence token as TRL cuts it.
- `_get_per_token_logps_and_entropies`: the completion's log-probability is estimated (`hf_mdm.rl.estimators`:
  `diffu_grpo`, `coupled`, `elbo`) on noisy copies drawn from per-row seeds, so that the old policy, the reference
  model and the current policy score the same masks. TRL's own version scores hidden state i - 1 against token i
  (an autoregressive head), which is wrong for an MDM.
- `_generate_and_score_completions` and `_compute_loss`: each rollout row gets a mask seed; with
  `num_iterations` > 1 and `resample_masks`, each pass over the rollout draws new copies (d1's random masking) and
  scores the old and reference policies on that pass's copies.

Bad input (an unknown estimator, a decoding setting the model refuses, a reward function that returns the wrong
number of values or a non-finite one) is refused in the constructor, before any rollout: the reward functions are
called once on two dataset rows with empty completions.
"""

import asyncio
import contextlib
import copy
import functools
import inspect
import itertools
import math
from dataclasses import dataclass, field

import torch
from transformers import AutoModel, PreTrainedModel, TrainerState
from trl import GRPOConfig, GRPOTrainer
from trl.models import unwrap_model_for_generation
from trl.trainer import grpo_trainer as trl_grpo_trainer
from trl.trainer.utils import pad, use_adapter

from .estimators import ESTIMATORS, build_estimator, completion_logps


@dataclass
class MDMGRPOConfig(GRPOConfig):
    """`GRPOConfig` plus the log-probability estimator. Rollouts take `max_completion_length`, `temperature`,
    `top_p`, `top_k` as TRL's do, and every other `generate()` setting from `generation_kwargs` (`sampler`,
    `steps`, `block_length`, `use_cache`, ...)."""

    estimator: str = field(default="diffu_grpo", metadata={
        "help": f"the sequence log-probability estimator: one of {sorted(ESTIMATORS)} (hf_mdm.rl.estimators)."})
    p_mask_prompt: float = field(default=0.15, metadata={
        "help": "diffu_grpo: probability of masking each prompt token (d1's recipe: 0.15)."})
    coupled_time_range: list[float] = field(default_factory=lambda: [0.2, 0.8], metadata={
        "help": "coupled: the masking rate t is drawn uniformly from this range (DiffuCoder's: [0.2, 0.8])."})
    elbo_samples: int = field(default=8, metadata={
        "help": "elbo: Monte-Carlo draws per completion (each is one masked copy in the forward pass)."})
    resample_masks: bool = field(default=True, metadata={
        "help": "with num_iterations > 1, draw new noisy copies on each pass over a rollout (d1's random masking); "
                "otherwise every pass scores the same copies."})

    def __post_init__(self):
        super().__post_init__()
        self.log_prob_estimator()  # an unknown estimator or a bad setting fails here, with the field's name

    def log_prob_estimator(self):
        return build_estimator(self.estimator, p_mask_prompt=self.p_mask_prompt,
                               coupled_time_range=tuple(self.coupled_time_range), elbo_samples=self.elbo_samples)


class MDMGRPOTrainer(GRPOTrainer):
    """`trl.GRPOTrainer` for every hf_mdm model (see the module docstring). Arguments are GRPOTrainer's, with `args`
    an `MDMGRPOConfig` and `model` an hf_mdm model or its folder; LoRA comes through `peft_config` (its target
    modules default to the family's attention and MLP projections). With `beta` > 0 and no PEFT adapter the
    reference model is a frozen copy of the policy at the start (TRL would reload it from the Hub by name)."""

    def __init__(self, model, reward_funcs=None, args: MDMGRPOConfig | None = None, train_dataset=None,
                 eval_dataset=None, processing_class=None, reward_processing_classes=None, callbacks=None,
                 optimizers=(None, None), peft_config=None, **kwargs):
        if args is None:
            args = MDMGRPOConfig("mdm-grpo")
        elif not isinstance(args, MDMGRPOConfig):
            raise ValueError(f"args must be an hf_mdm.rl.MDMGRPOConfig (a GRPOConfig with the estimator's settings), "
                             f"got {type(args).__name__}.")
        for unsupported in ("tools", "rollout_func", "environment_factory"):
            if kwargs.get(unsupported) is not None:
                raise ValueError(f"{unsupported}: multi-turn and custom rollouts are not supported for diffusion "
                                 "models yet; rollouts are model.generate().")
        if args.use_vllm or args.use_transformers_continuous_batching:
            raise ValueError("use_vllm and use_transformers_continuous_batching generate autoregressively; a masked "
                             "diffusion model is sampled by its own generate(): leave them False.")
        self.estimator = args.log_prob_estimator()
        if isinstance(model, str):
            model = AutoModel.from_pretrained(model, **(args.model_init_kwargs or {}))
        policy = model.get_base_model() if hasattr(model, "get_base_model") else model
        if not isinstance(policy, PreTrainedModel) or not hasattr(policy, "_build_strategy"):
            raise ValueError(f"model must be an hf_mdm masked diffusion model (or its folder), got "
                             f"{type(policy).__name__}.")
        self.rollout_settings = rollout_settings(args)
        check_rollout_settings(policy, self.rollout_settings)
        if peft_config is not None and getattr(peft_config, "target_modules", None) is None:
            from ..training.loop import default_lora_targets

            peft_config.target_modules = default_lora_targets(policy)
        if reward_funcs is not None:
            reward_funcs = [checked_reward_function(f) if is_plain_function(f) else f
                            for f in (reward_funcs if isinstance(reward_funcs, list) else [reward_funcs])]
        if train_dataset is not None and reward_funcs is not None:
            probe_reward_functions(reward_funcs, train_dataset)

        copies_policy = args.beta != 0.0 and peft_config is None and policy is model
        with reference_as_copy(policy if copies_policy else None):
            super().__init__(model, reward_funcs, args, train_dataset, eval_dataset, processing_class,
                             reward_processing_classes, callbacks, optimizers, peft_config=peft_config, **kwargs)
        # Each process its own rollouts and masks, repeatable from `seed` (distinct multipliers: distinct streams).
        process = self.accelerator.process_index
        self._seed_generator = torch.Generator().manual_seed(args.seed * 1_000_003 + process)
        self._rollout_generator = torch.Generator(self.accelerator.device).manual_seed(args.seed * 7_919 + process)
        self._mask_seeds, self._mask_pass = None, 0

    # Rollouts.
    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, *args, **kwargs):
        device = self.accelerator.device
        prompts = [torch.tensor(ids, dtype=torch.long) for ids in prompt_ids]
        input_ids = pad(prompts, padding_value=self._tokenizer.pad_token_id, padding_side="left")
        attention_mask = pad([torch.ones_like(ids) for ids in prompts], padding_value=0, padding_side="left")
        width = input_ids.shape[1]
        summon = getattr(getattr(self, "_dist", None), "summon_full_params", None)
        with (unwrap_model_for_generation(self.model_wrapped, self.accelerator,
                                          gather_deepspeed3_params=self.args.ds3_gather_for_generation) as unwrapped,
              torch.no_grad(),
              summon(self.model_wrapped, recurse=False) if summon else contextlib.nullcontext()):
            sequences = unwrapped.generate(input_ids.to(device), attention_mask=attention_mask.to(device),
                                           generator=self._rollout_generator, **self.rollout_settings)
        completions = []
        for row in sequences[:, width:].tolist():
            end = next((i + 1 for i, token in enumerate(row) if token in self.eos_token_ids), len(row))
            completions.append(row[:end])
        return completions, None

    # Scoring.
    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, compute_aux_loss=False, **multimodal):
        seeds = self._mask_seeds
        if seeds is None or len(seeds) != len(input_ids):
            raise RuntimeError("the rows to score have no mask seeds: MDMGRPOTrainer scores rollouts it made itself.")
        with self.accelerator.autocast():
            return completion_logps(model, self.estimator, input_ids, attention_mask, logits_to_keep, seeds,
                                    config=self.model.config, iteration=self._mask_pass, temperature=self.temperature,
                                    batch_size=batch_size, compute_entropy=compute_entropy,
                                    compute_aux_loss=compute_aux_loss)

    def _generate_and_score_completions(self, inputs):
        seeds = torch.randint(0, 2**31 - 1, (len(inputs),), generator=self._seed_generator)
        self._mask_seeds, self._mask_pass = seeds, 0
        output = super()._generate_and_score_completions(inputs)
        output["mask_seeds"] = seeds.to(self.accelerator.device)
        passes = self.mask_passes if self.model.training else 1
        if passes > 1:
            ids = torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1)
            mask = torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1)
            length = output["completion_ids"].shape[1]
            models = {"old_per_token_logps": self.model, "ref_per_token_logps": self.ref_model}
            for key, scorer in models.items():
                if output.get(key) is None:
                    continue
                by_pass = [output[key]]  # pass 0: what TRL just computed
                for later_pass in range(1, passes):
                    self._mask_pass = later_pass
                    with torch.no_grad(), self.reference_adapter(scorer, key):
                        by_pass.append(self._get_per_token_logps_and_entropies(
                            scorer if scorer is not None else self.model, ids, mask, length,
                            self.args.per_device_train_batch_size)[0])
                output[f"{key}_by_pass"] = torch.stack(by_pass, dim=1)  # (rows, passes, completion length)
            self._mask_pass = 0
        return output

    def reference_adapter(self, scorer, key):
        """With PEFT and no reference model, the reference is the policy with its adapter off, or the initial copy of
        an adapter being trained again (named "ref"), as TRL scores it."""
        if key == "ref_per_token_logps" and scorer is None:
            model = self.accelerator.unwrap_model(self.model)
            return use_adapter(model, adapter_name="ref" if "ref" in model.peft_config else None)
        return contextlib.nullcontext()

    @property
    def mask_passes(self) -> int:
        """How many sets of noisy copies a rollout is scored on: one per pass over it with `resample_masks`."""
        return self.num_iterations if self.args.resample_masks else 1

    def _compute_loss(self, model, inputs):
        generate_every = self.args.steps_per_generation * self.num_iterations
        self._mask_pass = (self._step % generate_every) // self.args.steps_per_generation % self.mask_passes \
            if self.model.training else 0
        self._mask_seeds = inputs["mask_seeds"]
        inputs = dict(inputs)
        for key in ("old_per_token_logps", "ref_per_token_logps"):
            if f"{key}_by_pass" in inputs:
                inputs[key] = inputs[f"{key}_by_pass"][:, self._mask_pass]
        try:
            return super()._compute_loss(model, inputs)
        finally:
            self._mask_pass = 0


def rollout_settings(args: MDMGRPOConfig) -> dict:
    """The `generate()` keyword arguments of a rollout: TRL's sampling fields, then `generation_kwargs`."""
    settings = {"max_new_tokens": args.max_completion_length, "temperature": args.temperature, "top_p": args.top_p,
                "top_k": args.top_k or 0}
    if args.min_p is not None:
        settings["min_p"] = args.min_p
    if args.repetition_penalty != 1.0:
        settings["repetition_penalty"] = args.repetition_penalty
    generation_kwargs = args.generation_kwargs or {}
    if not isinstance(generation_kwargs, dict):
        raise ValueError(f"generation_kwargs must be a dict of generate() settings, got {generation_kwargs!r}.")
    settings.update(generation_kwargs)
    settings["num_return_sequences"] = 1  # TRL repeats each prompt num_generations times itself
    return settings


def check_rollout_settings(model, settings: dict) -> None:
    """Raises ValueError, before any rollout, on a generate() setting this model refuses (an unknown field, a
    strategy setting out of range, a strategy the model's family cannot run)."""
    config, rest = model._resolve_generation_config(None, dict(settings))
    if rest:
        raise ValueError(f"generation_kwargs: {sorted(rest)} are not generate() settings (MDMGenerationConfig fields "
                         f"and the settings of sampler={config.sampler!r}).")
    model._build_strategy(config)


@contextlib.contextmanager
def reference_as_copy(policy):
    """While TRL builds its reference model, make it a frozen copy of `policy` instead of a reload by name (which
    would go to the Hub, or load a local folder with the wrong Auto class)."""
    if policy is None:
        yield
        return
    original = trl_grpo_trainer.create_model_from_path
    policy_id = trl_grpo_trainer.get_config_model_id(policy.config)

    def create(model_id, architecture=None, **kwargs):
        if model_id != policy_id or architecture is not None:
            return original(model_id, architecture, **kwargs)
        reference = copy.deepcopy(policy).eval()
        return reference.requires_grad_(False)

    trl_grpo_trainer.create_model_from_path = create
    try:
        yield
    finally:
        trl_grpo_trainer.create_model_from_path = original


def is_plain_function(reward_func) -> bool:
    return callable(reward_func) and not isinstance(reward_func, (str, torch.nn.Module))


def check_rewards(name: str, rewards, count: int) -> None:
    """A reward function returns one float (or None: 'does not apply', as TRL reads it) per completion."""
    if not isinstance(rewards, (list, tuple)) and not (isinstance(rewards, torch.Tensor) and rewards.dim() == 1):
        raise ValueError(f"reward function {name!r} must return a list of {count} floats (one per completion), got "
                         f"{type(rewards).__name__}.")
    if len(rewards) != count:
        raise ValueError(f"reward function {name!r} returned {len(rewards)} values for {count} completions: it must "
                         "return one per completion.")
    for index, value in enumerate(rewards.tolist() if isinstance(rewards, torch.Tensor) else rewards):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"reward function {name!r} returned {value!r} for completion {index}: rewards must be "
                             "finite numbers (or None where the function does not apply).")


def checked_reward_function(reward_func):
    """`reward_func`, checking every call's result (`check_rewards`); keeps its name (TRL logs by it)."""
    name = getattr(reward_func, "__name__", type(reward_func).__name__)
    if inspect.iscoroutinefunction(reward_func):
        @functools.wraps(reward_func)
        async def checked_async(*args, **kwargs):
            rewards = await reward_func(*args, **kwargs)
            check_rewards(name, rewards, len(kwargs.get("completions", args[1] if len(args) > 1 else [])))
            return rewards

        return checked_async

    @functools.wraps(reward_func)
    def checked(*args, **kwargs):
        rewards = reward_func(*args, **kwargs)
        check_rewards(name, rewards, len(kwargs.get("completions", args[1] if len(args) > 1 else [])))
        return rewards

    return checked


def probe_reward_functions(reward_funcs, dataset, rows: int = 2) -> None:
    """Calls each reward function as TRL will (keywords `prompts`, `completions`, `completion_ids`, the dataset's
    other columns, `trainer_state`, `log_extra`, `log_metric`) on the first `rows` dataset rows with empty
    completions, so a function that returns the wrong shape or a non-finite value fails before any rollout."""
    examples = list(itertools.islice(iter(dataset), rows))
    if not examples:
        raise ValueError("train_dataset is empty.")
    if any("prompt" not in example for example in examples):
        raise ValueError(f"train_dataset needs a 'prompt' column (TRL's convention), got columns {sorted(examples[0])}.")
    prompts = [example["prompt"] for example in examples]
    conversational = isinstance(prompts[0], list)
    completions = [[{"role": "assistant", "content": ""}] if conversational else "" for _ in examples]
    columns = {key: [example[key] for example in examples] for key in examples[0]
               if key not in ("prompt", "completion", "completion_ids")}
    for reward_func in reward_funcs:
        if not is_plain_function(reward_func):
            continue
        try:
            result = reward_func(prompts=prompts, completions=completions, completion_ids=[[] for _ in examples],
                                 trainer_state=TrainerState(), log_extra=lambda *a, **k: None,
                                 log_metric=lambda *a, **k: None, **columns)
            if inspect.iscoroutine(result):
                asyncio.run(result)
        except Exception as error:
            error.add_note(f"(hf_mdm called the reward function {getattr(reward_func, '__name__', reward_func)!r} on "
                           f"{len(examples)} dataset rows with empty completions, to check it before any rollout.)")
            raise


__all__ = ["MDMGRPOConfig", "MDMGRPOTrainer", "check_rewards", "rollout_settings"]
