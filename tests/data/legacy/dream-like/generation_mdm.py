"""Generation for masked diffusion models: `MDMGenerationConfig` and the `generate()` mixin.

This module composes the model (through its `forward` only) with the strategies in `sampling_mdm.py`; the
model never imports a sampler and a sampler never imports the model.

This file travels with every saved checkpoint as remote code: it imports only torch/transformers and
same-folder modules, never `hf_mdm`.
"""

import copy
from dataclasses import dataclass

import torch
from transformers import GenerationConfig
from transformers.utils import logging
from transformers.generation.streamers import BaseStreamer
from transformers.utils import ModelOutput

from .sampling_mdm import (
    DEFAULT_REMASKING_ETA,
    NOISE_REMOVAL_MODES,
    REMASKING_SCHEDULES,
    SAMPLERS,
    SAMPLING_DTYPES,
    UNMASKING_ORDERS,
    CategoricalSampler,
    DiffusionState,
    build_sampler,
    get_noise_schedule,
)


CACHE_MODES = ("prefix", "dual")
# Per sampler, the fields it does not read, with their neutral values (reset when generate() switches to it).
_FIRST_HITTING_ONLY = {"unmasking": "random", "confidence_threshold": None, "tokens_per_step": None}
FIELDS_NOT_READ_BY = {
    "first_hitting": {"remasking": None, "noise_removal": False},
    "ancestral": _FIRST_HITTING_ONLY,
    "ancestral_cache": {**_FIRST_HITTING_ONLY, "block_length": None, "use_cache": False},
}

logger = logging.get_logger(__name__)


# GenerationConfig fields that mean nothing to a masked diffusion model: a value other than the neutral one
# raises instead of being silently ignored.
UNSUPPORTED_GENERATION_FIELDS = {
    "num_beams": (None, 1),
    "num_beam_groups": (None, 1),
    "penalty_alpha": (None,),
    "diversity_penalty": (None, 0.0),
    "repetition_penalty": (None, 1.0),
    "encoder_repetition_penalty": (None, 1.0),
    "length_penalty": (None, 1.0),
    "no_repeat_ngram_size": (None, 0),
    "encoder_no_repeat_ngram_size": (None, 0),
    "min_length": (None, 0),
    "min_new_tokens": (None, 0),
    "min_p": (None,),
    "top_h": (None,),
    "typical_p": (None, 1.0),
    "epsilon_cutoff": (None, 0.0),
    "eta_cutoff": (None, 0.0),
    "bad_words_ids": (None,),
    "force_words_ids": (None,),
    "constraints": (None,),
    "sequence_bias": (None,),
    "suppress_tokens": (None,),
    "begin_suppress_tokens": (None,),
    "forced_bos_token_id": (None,),
    "forced_eos_token_id": (None,),
    "exponential_decay_length_penalty": (None,),
    "guidance_scale": (None, 1.0),
    "watermarking_config": (None,),
    "stop_strings": (None,),
    "dola_layers": (None,),
    "prompt_lookup_num_tokens": (None,),
    "assistant_early_exit": (None,),
    "output_scores": (None, False),
    "output_logits": (None, False),
    "output_attentions": (None, False),
    "output_hidden_states": (None, False),
}
# GenerationConfig fields that are harmless to an MDM (caching, timing, metadata) and accepted as they come.
IGNORED_GENERATION_FIELDS = {
    "cache_implementation", "cache_config", "max_cache_len", "max_time", "early_stopping",
    "renormalize_logits", "remove_invalid_values", "token_healing", "low_memory", "compile_config",
    "disable_compile", "is_assistant", "num_assistant_tokens", "num_assistant_tokens_schedule",
    "assistant_confidence_threshold", "max_matching_ngram_size", "assistant_lookbehind", "target_lookbehind",
    "assistant_ensemble_weight", "speculation_type", "continuous_batching_config", "prefill_chunk_size",
    "decoder_start_token_id", "use_mtp", "generation_kwargs", "transformers_version", "_from_model_config",
    "_commit_hash", "prefix",
}


class MDMGenerationConfig(GenerationConfig):
    # no-format
    r"""
    Generation settings for [`MDMGenerationMixin.generate`], saved as `generation_config.json`.

    Args:
        > Strategy

        sampler (`str`, defaults to `"first_hitting"`): `"first_hitting"` (exact FHS, one network call per
            token), `"ancestral"` (MDLM's "ddpm" on a uniform time grid) or `"ancestral_cache"` (MDLM's
            "ddpm_cache": rows that did not change reuse their last network output).
        tokens_per_step (`int`, *optional*): first_hitting only. Positions unmasked per network call; 1 (the
            default) is exact, larger values are an approximation (parallel decoding).
        steps (`int`, *optional*): ancestral: number of uniform time steps (default: one per generated token).
            first_hitting: a budget of network calls, an alternative to `tokens_per_step`.
        sampling_dtype (`str`, defaults to `"float64"`): dtype of the categorical draws, one of
            "float64", "float32", "bfloat16", "float16". float32 truncates the Gumbel noise and lowers the
            effective temperature (arXiv:2409.02908, section 5).
        noise_removal (`bool` or `str`, defaults to `False`): ancestral only. `True` or `"mdlm"`: MDLM's noise
            removal (its default `sampling.noise_removal`): the time grid ends at t = 1e-5 instead of 0, every step
            sampled, then one extra network call at t = 1e-5 whose argmax fills only the positions still masked.
            `"last_step_argmax"`: the grid ends at 0 and its last step takes the argmax at every position still
            masked instead of sampling (hf_mdm's earlier `noise_removal=True`; not MDLM's). Neither is exact.

        > Decoding strategies of instruct MDMs (approximations of the reverse process, except FHS in blocks)

        unmasking (`str`, defaults to `"random"`): first_hitting only. Which masked positions a call unmasks:
            `"random"` (uniformly chosen: FHS), or the most confident draws, scored by `"confidence"` (probability
            of the drawn token, LLaDA's low_confidence), `"margin"` (top-1 minus top-2 probability, Dream's
            topk_margin) or `"entropy"` (negative entropy, Dream's entropy). How many: `tokens_per_step`, `steps`,
            or `confidence_threshold`.
        confidence_threshold (`float`, *optional*): with a confidence order, unmask every draw whose score exceeds
            it, and at least the most confident one per row and call (Fast-dLLM's threshold decoding).
        block_length (`int`, *optional*): semi-autoregressive decoding (LLaDA): the generated region is cut into
            blocks of this many positions, decoded left to right, each with its share of `steps`.
        remasking (`str`, *optional*): `"remdm"`: ancestral only, ReMDM's remasking of decoded tokens
            (arXiv:2503.00307), with `remasking_schedule` (`"cap"`, `"rescale"` or `"conf"`) and `remasking_eta`
            (default: 0.008 for cap, 0.015 for rescale, ReMDM's; none for conf).
        use_cache (`bool`, defaults to `False`): with `block_length`, reuse the keys and values of positions outside
            the active block, refreshed once per block (Fast-dLLM's cache); without blocks it has no effect (a
            warning says so). An APPROXIMATION for a bidirectional network: in a block's later steps, positions
            outside it do not see what the block decoded.
        cache_mode (`str`, defaults to `"prefix"`): `"prefix"` recomputes the active block and everything after it
            each call, reusing the prompt and finished blocks; `"dual"` recomputes the active block only.
        cache_refresh_steps (`int`, *optional*): also refresh the cache every this many calls within a block
            (1: every call, the exact computation).

        > Token distribution

        temperature (`float`, defaults to 1.0): 0 means greedy (argmax at every unmasked position).
        top_k (`int`, defaults to 0): keep the k most likely tokens; 0 keeps all.
        top_p (`float`, defaults to 1.0): nucleus sampling; 1.0 keeps all.
        do_sample (`bool`, defaults to `True`): `False` is the same as `temperature=0`.

        > Length and batch

        max_new_tokens (`int`, *optional*): [MASK] positions appended after the prompt. 0 is allowed
            (infilling: every [MASK] already in `input_ids` is filled). Default: fill the context when there
            is no [MASK] in the input, else 0.
        max_length (`int`, *optional*): total length; used when `max_new_tokens` is not set.
        num_return_sequences (`int`, defaults to 1): samples per prompt (per call, without a prompt).

        > Output

        return_dict_in_generate (`bool`, defaults to `False`): return an `MDMGenerationOutput` with
            `sequences`, `nfe` and, with `output_history`, the draft after each step.
        output_history (`bool`, defaults to `False`): keep the draft after each step.
        pad_token_id, bos_token_id, eos_token_id (`int`, *optional*): special tokens.
    """

    def __init__(self, **kwargs):
        # We deliberately do not call GenerationConfig.__init__: most of its fields mean nothing to an MDM, and
        # its validation forbids max_new_tokens = 0, which infilling needs.
        self.sampler: str = kwargs.pop("sampler", "first_hitting")
        self.tokens_per_step: int | None = kwargs.pop("tokens_per_step", None)
        self.steps: int | None = kwargs.pop("steps", None)
        self.sampling_dtype: str = kwargs.pop("sampling_dtype", "float64")
        self.noise_removal: bool | str = kwargs.pop("noise_removal", False)

        self.unmasking: str = kwargs.pop("unmasking", "random")
        self.confidence_threshold: float | None = kwargs.pop("confidence_threshold", None)
        self.block_length: int | None = kwargs.pop("block_length", None)
        self.remasking: str | None = kwargs.pop("remasking", None)
        self.remasking_schedule: str = kwargs.pop("remasking_schedule", "cap")
        self.remasking_eta: float | None = kwargs.pop("remasking_eta", None)
        self.use_cache: bool = kwargs.pop("use_cache", False)
        self.cache_mode: str = kwargs.pop("cache_mode", "prefix")
        self.cache_refresh_steps: int | None = kwargs.pop("cache_refresh_steps", None)

        self.temperature: float = kwargs.pop("temperature", 1.0)
        self.top_k: int = kwargs.pop("top_k", 0)
        self.top_p: float = kwargs.pop("top_p", 1.0)
        self.do_sample: bool = kwargs.pop("do_sample", True)

        self.max_new_tokens: int | None = kwargs.pop("max_new_tokens", None)
        self.max_length: int | None = kwargs.pop("max_length", None)
        self.num_return_sequences: int = kwargs.pop("num_return_sequences", 1)

        self.return_dict_in_generate: bool = kwargs.pop("return_dict_in_generate", False)
        self.output_history: bool = kwargs.pop("output_history", False)

        self.pad_token_id: int | None = kwargs.pop("pad_token_id", None)
        self.bos_token_id: int | None = kwargs.pop("bos_token_id", None)
        self.eos_token_id: int | list[int] | None = kwargs.pop("eos_token_id", None)

        self._from_model_config: bool = kwargs.pop("_from_model_config", False)
        self.transformers_version: str | None = kwargs.pop("transformers_version", None)
        kwargs.pop("_commit_hash", None)

        unknown = _reject_unsupported(kwargs)
        for key in unknown:
            setattr(self, key, kwargs[key])  # kept, like GenerationConfig keeps custom entries
        self.validate()

    def validate(self, strict=False, **unused):
        """Raises ValueError naming the field and the allowed values."""
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {self.sampler!r}.")
        if self.sampling_dtype not in SAMPLING_DTYPES:
            raise ValueError(
                f"sampling_dtype must be a floating type, one of {tuple(SAMPLING_DTYPES)}, got {self.sampling_dtype!r}."
            )
        for name in ("tokens_per_step", "steps"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name} must be an integer >= 1 (or None), got {value!r}.")
        if self.sampler == "first_hitting" and self.tokens_per_step is not None and self.steps is not None:
            raise ValueError("first_hitting takes either tokens_per_step or steps (a budget of network calls), not both.")
        if self.sampler != "first_hitting" and self.tokens_per_step not in (None, 1):
            raise ValueError(f"tokens_per_step applies to sampler='first_hitting' only, got sampler={self.sampler!r}.")
        if self.noise_removal not in (False, True) + NOISE_REMOVAL_MODES or not isinstance(self.noise_removal, (bool, str)):
            raise ValueError(f"noise_removal must be one of {(False, True) + NOISE_REMOVAL_MODES}, got {self.noise_removal!r}.")
        if self.unmasking not in UNMASKING_ORDERS:
            raise ValueError(f"unmasking must be one of {UNMASKING_ORDERS}, got {self.unmasking!r}.")
        if self.unmasking != "random" and self.sampler != "first_hitting":
            raise ValueError(f"unmasking={self.unmasking!r} orders the positions of sampler='first_hitting'; "
                             f"got sampler={self.sampler!r}.")
        if self.confidence_threshold is not None:
            value = self.confidence_threshold
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < 1:
                raise ValueError(f"confidence_threshold must be a number in (0, 1) (or None), got {value!r}.")
            if self.unmasking == "random":
                raise ValueError("confidence_threshold needs a confidence order: unmasking must be one of "
                                 f"{UNMASKING_ORDERS[1:]}, got 'random'.")
            if self.tokens_per_step is not None or self.steps is not None:
                raise ValueError("confidence_threshold decides how many positions each call unmasks: do not also "
                                 "set tokens_per_step or steps.")
        value = self.block_length
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"block_length must be an integer >= 1 (or None), got {value!r}.")
        if value is not None and self.sampler == "ancestral_cache":
            raise ValueError("block_length works with sampler='first_hitting' or 'ancestral', not 'ancestral_cache' "
                             "(it reuses whole-sequence outputs).")
        if self.remasking not in (None, "remdm"):
            raise ValueError(f"remasking must be None or 'remdm', got {self.remasking!r}.")
        if self.remasking is not None and self.sampler == "first_hitting":
            raise ValueError("remasking='remdm' runs on a time grid: use sampler='ancestral' (or 'ancestral_cache').")
        if self.remasking_schedule not in REMASKING_SCHEDULES:
            raise ValueError(f"remasking_schedule must be one of {REMASKING_SCHEDULES}, got {self.remasking_schedule!r}.")
        if self.remasking_eta is not None:
            value = self.remasking_eta
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value <= 1:
                raise ValueError(f"remasking_eta must be a number in [0, 1] (or None), got {value!r}.")
            if DEFAULT_REMASKING_ETA[self.remasking_schedule] is None:
                raise ValueError(f"remasking_schedule={self.remasking_schedule!r} takes no remasking_eta.")
        if not isinstance(self.use_cache, bool):
            raise ValueError(f"use_cache must be True or False, got {self.use_cache!r}.")
        if self.cache_mode not in CACHE_MODES:
            raise ValueError(f"cache_mode must be one of {CACHE_MODES}, got {self.cache_mode!r}.")
        value = self.cache_refresh_steps
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"cache_refresh_steps must be an integer >= 1 (or None), got {value!r}.")
        if not isinstance(self.temperature, (int, float)) or self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 means greedy), got {self.temperature!r}.")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 keeps every token), got {self.top_k!r}.")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}.")
        for name in ("max_new_tokens", "max_length"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise ValueError(f"{name} must be an integer >= 0 (or None), got {value!r}.")
        for name in ("return_dict_in_generate", "output_history"):
            if not isinstance(getattr(self, name, False), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}.")
        if self.sampler == "first_hitting" and self.noise_removal:
            raise ValueError(f"noise_removal={self.noise_removal!r} is for the ancestral samplers (it replaces their "
                             "last step); first_hitting is exact and ends with every token drawn from the model, so "
                             "there is no noise to remove. Pass sampler='ancestral' or 'ancestral_cache' with it.")
        if not isinstance(self.num_return_sequences, int) or self.num_return_sequences < 1:
            raise ValueError(f"num_return_sequences must be an integer >= 1, got {self.num_return_sequences!r}.")

    @classmethod
    def from_generation_config(cls, config: GenerationConfig) -> "MDMGenerationConfig":
        """Maps a plain `GenerationConfig` (e.g. from a pipeline) onto an MDM one; raises on fields an MDM cannot honour."""
        if isinstance(config, MDMGenerationConfig):
            return copy.deepcopy(config)
        # A plain GenerationConfig's use_cache (True by default) is an autoregressive KV cache, not block caching.
        fields = {k: v for k, v in config.to_dict().items() if v is not None and k != "use_cache"}
        return cls(**fields)

    @classmethod
    def from_model_config(cls, model_config) -> "MDMGenerationConfig":
        return cls(
            pad_token_id=getattr(model_config, "pad_token_id", None),
            bos_token_id=getattr(model_config, "bos_token_id", None),
            eos_token_id=getattr(model_config, "eos_token_id", None),
            _from_model_config=True,
        )

    def update(self, **kwargs):
        """Sets the given fields, validates, and returns the kwargs that are not generation fields.

        Choosing another `sampler` resets the fields only the previous one reads, unless they are given too: a
        folder whose default is confidence-ordered first-hitting decoding can be sampled with `sampler="ancestral"`.
        """
        known = {k: v for k, v in kwargs.items() if k in self.__dict__ or k in UNSUPPORTED_GENERATION_FIELDS or k in IGNORED_GENERATION_FIELDS}
        rest = {k: v for k, v in kwargs.items() if k not in known}
        _reject_unsupported(known)
        new_sampler = known.get("sampler", self.sampler)
        if new_sampler != self.sampler:
            for key, default in FIELDS_NOT_READ_BY.get(new_sampler, {}).items():
                known.setdefault(key, default)
        for key, value in known.items():
            if key in self.__dict__:
                setattr(self, key, value)
        self.validate()
        return rest

    def get_generation_mode(self, *args, **kwargs):
        raise NotImplementedError("MDMGenerationConfig has no autoregressive generation mode.")


def _reject_unsupported(fields: dict) -> list[str]:
    """Raises on GenerationConfig fields set to values an MDM cannot honour; returns the unknown keys."""
    for name, neutral in UNSUPPORTED_GENERATION_FIELDS.items():
        if name in fields and fields[name] not in neutral:
            raise ValueError(
                f"{name}={fields[name]!r} has no meaning for a masked diffusion model; allowed: {neutral}. "
                "MDM generation is controlled by sampler, steps, tokens_per_step, sampling_dtype, temperature, "
                "top_k and top_p."
            )
    return [k for k in fields if k not in UNSUPPORTED_GENERATION_FIELDS and k not in IGNORED_GENERATION_FIELDS]


@dataclass
class MDMGenerationOutput(ModelOutput):
    """
    Args:
        sequences (`torch.LongTensor` of shape `(batch * num_return_sequences, seq_len)`): prompts (left-padded)
            followed by the generated tokens.
        nfe (`int`): number of network calls (forward passes over a batch) made by this call.
        nfe_per_sequence (`torch.LongTensor` of shape `(batch * num_return_sequences,)`): network evaluations
            each sequence took part in (ancestral_cache recomputes only the rows that changed).
        history (`list[torch.LongTensor]`, *optional*): with `output_history`, the draft after each step.
    """

    sequences: torch.LongTensor | None = None
    nfe: int | None = None
    nfe_per_sequence: torch.LongTensor | None = None
    history: list[torch.LongTensor] | None = None


class MDMGenerationMixin:
    """`generate()` for masked diffusion models: exact first-hitting sampling by default."""

    def adjust_generation_fn(self, generation_config, from_auto_class, from_pipeline, pretrained_model_name_or_path, **kwargs):
        """Called by `from_pretrained`: restores `generation_config.json` as an `MDMGenerationConfig`."""
        if generation_config is not None:
            self.generation_config = MDMGenerationConfig.from_generation_config(generation_config)
            return
        if pretrained_model_name_or_path is None:
            return
        load_kwargs = {k: kwargs[k] for k in ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder") if k in kwargs}
        try:
            self.generation_config = MDMGenerationConfig.from_pretrained(pretrained_model_name_or_path, **load_kwargs)
        except OSError:
            self.generation_config = MDMGenerationConfig.from_model_config(self.config)

    def _resolve_generation_config(self, generation_config, kwargs) -> tuple[MDMGenerationConfig, dict]:
        base = generation_config if generation_config is not None else getattr(self, "generation_config", None)
        config = MDMGenerationConfig.from_generation_config(base) if base is not None else MDMGenerationConfig()
        rest = config.update(**kwargs)
        if not config.do_sample:
            config.temperature = 0.0
        return config, rest

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        generation_config: GenerationConfig | None = None,
        generator: torch.Generator | None = None,
        streamer: BaseStreamer | None = None,
        **kwargs,
    ) -> torch.LongTensor | MDMGenerationOutput:
        r"""
        Samples from the masked diffusion model.

        The algorithm:
            1. Resolve the generation config: the model's `generation_config` (or the one passed), overridden by
               `kwargs`; a plain `GenerationConfig` is mapped onto `MDMGenerationConfig`, and fields an MDM cannot
               honour (`num_beams > 1`, ...) raise ValueError.
            2. Lay out the canvas: prompts are moved to the left-padded layout, `max_new_tokens` [MASK] positions are
               appended, and every row is repeated `num_return_sequences` times. Every [MASK] of the canvas is
               generated; every other token is kept.
            3. Build the strategy (`sampling_mdm.build_sampler`) with the model's noise schedule and one
               `CategoricalSampler` in `sampling_dtype`.
            4. Step until nothing is masked: `state = sampler.step(state, denoise)`, where `denoise` calls the
               model's `forward` (with `output_positions` when only some positions are needed, and the time input
               when the model is time-conditioned). With `use_cache`, a call that names decoding windows (one per
               row: rows of a batch may be in different blocks) runs the network on each row's window only (its
               active block, and everything after it for the prefix cache), rows with equal windows in one call,
               reading the other positions' keys and values from that row's cache entry, which every call without
               windows (one per block) records. The streamer receives the draft after each step.
            5. Return the sequences, or an `MDMGenerationOutput` with the number of network calls (and the history).

        Args:
            input_ids (`torch.LongTensor` of shape `(batch, prompt_len)`, *optional*): prompts, or sequences with
                [MASK] tokens to infill. Without it, `num_return_sequences` unconditional samples are drawn.
            attention_mask (`torch.Tensor` of shape `(batch, prompt_len)`, *optional*): 0 marks padding (left or right).
            generation_config (`GenerationConfig`, *optional*): replaces the model's generation config.
            generator (`torch.Generator`, *optional*): source of every random draw, for reproducible samples.
            streamer (`BaseStreamer`, *optional*): receives the prompt with `put`; a streamer with `put_draft`
                (`TextDiffusionStreamer`) then the draft of the generated region after each step; every streamer
                the final generated region with `put`, then `end()`. So a plain `TextStreamer` prints the prompt
                and the answer once.
            kwargs: any `MDMGenerationConfig` field, e.g. `sampler`, `steps`, `sampling_dtype`, `max_new_tokens`.
        """
        # 1. Resolve the generation config.
        config, rest = self._resolve_generation_config(generation_config, kwargs)
        rest.pop("tokenizer", None)
        if rest:
            raise ValueError(f"generate() got arguments it does not know: {sorted(rest)}. Allowed: MDMGenerationConfig fields.")
        mask_id = self.config.mask_token_id
        if config.sampler == "ancestral_cache" and self.config.time_conditioning:
            raise ValueError(
                "sampler='ancestral_cache' reuses network outputs across time steps, which is only valid for a "
                "time-agnostic model; this model has time_conditioning=True. Use 'first_hitting' or 'ancestral'."
            )

        # 2. Lay out the canvas.
        tokens, attention_mask, prompt_length, region_start = self._prepare_canvas(input_ids, attention_mask, config)
        masked = tokens == mask_id
        if attention_mask is not None:
            masked &= attention_mask.bool()
            if bool(attention_mask.all()):
                attention_mask = None  # decided once per call: the network then runs unmasked (SDPA's fastest kernel)

        # 3. Build the strategy.
        schedule = get_noise_schedule(self.config.noise_schedule, self.config.noise_eps)
        categorical = CategoricalSampler(
            SAMPLING_DTYPES[config.sampling_dtype], config.temperature, config.top_k, config.top_p, generator,
            mask_token_id=mask_id,
        )
        steps = config.steps
        if config.sampler != "first_hitting" and steps is None:
            steps = max(int(masked.sum(dim=1).max()), 1)
        sampler = build_sampler(
            config.sampler, schedule, categorical, mask_id, config.tokens_per_step, steps, config.noise_removal,
            unmasking=config.unmasking, confidence_threshold=config.confidence_threshold, remasking=config.remasking,
            remasking_schedule=config.remasking_schedule, remasking_eta=config.remasking_eta,
        )

        nfe_per_sequence = torch.zeros(tokens.shape[0], dtype=torch.long, device=tokens.device)
        nfe = 0  # forward passes (with the cache, rows in different blocks run in separate passes)
        if config.use_cache and config.block_length is None:
            # transformers users pass use_cache=True out of habit (an autoregressive KV cache): nothing to reuse here.
            logger.warning_once("use_cache=True caches keys and values between the blocks of block decoding; without "
                                "block_length there is nothing to reuse, so no cache is used.")
        cache = self.make_kv_cache(tokens.shape[0]) if config.use_cache and config.block_length is not None else None
        calls_since_refresh = torch.zeros(tokens.shape[0], dtype=torch.long, device=tokens.device)

        def network(rows, row_tokens, positions, times, kv_cache=None):
            nonlocal nfe
            nfe += 1
            timesteps = schedule.total_noise(times).float() if self.config.time_conditioning else None
            row_mask = attention_mask[rows] if attention_mask is not None else None
            return self(row_tokens, attention_mask=row_mask, timesteps=timesteps, output_positions=positions,
                        kv_cache=kv_cache).logits

        def denoise(rows, row_tokens, positions, times, windows=None):
            nfe_per_sequence[rows] += 1
            if cache is None or windows is None:
                return network(rows, row_tokens, positions, times)
            # Rows that entered a block (or are due a refresh) run whole and are recorded; the others run only their
            # window (the block, and for the prefix cache everything after it), grouped by window, reading the rest
            # of their canvas from the cache.
            due = calls_since_refresh[rows] + 1 == (config.cache_refresh_steps or 0)
            refresh = (windows[:, 0] < 0) | due
            logits = None
            groups = [(refresh, None)] if bool(refresh.any()) else []
            for start, end in torch.unique(windows[~refresh], dim=0).tolist():
                groups.append(((windows[:, 0] == start) & (windows[:, 1] == end) & ~refresh, (start, end)))
            for members, window in groups:
                index = members.nonzero().squeeze(1)
                if window is None:
                    cache.record(rows[index])
                    part = network(rows[index], row_tokens[index], positions[index], times[index], cache)
                    calls_since_refresh[rows[index]] = 0
                else:
                    start, end = window[0], window[1] if config.cache_mode == "dual" else row_tokens.shape[1]
                    cache.read(rows[index], start, end)
                    # Entries of `positions` past a row's count are padding (their logits are never read).
                    part = network(rows[index], row_tokens[index, start:end], (positions[index] - start).clamp(0, end - start - 1),
                                   times[index], cache)
                    calls_since_refresh[rows[index]] += 1
                if logits is None:
                    logits = part.new_empty((len(rows),) + tuple(part.shape[1:]))
                logits[index] = part
            return logits

        # 4. Step until nothing is masked.
        stream_from = 0 if prompt_length is None else prompt_length
        put_draft = getattr(streamer, "put_draft", None) if streamer is not None else None
        if streamer is not None:
            streamer.put(tokens[:, :stream_from].cpu())
        state = DiffusionState.start(tokens, masked, config.block_length, region_start)
        history = [] if config.output_history else None
        max_steps = sampler.step_limit(state)
        while not state.done:
            if state.step >= max_steps:
                raise RuntimeError(f"{config.sampler} left [MASK] tokens after {state.step} steps; please report this.")
            state = sampler.step(state, denoise)
            if history is not None:
                history.append(state.tokens.clone())
            if put_draft is not None:
                put_draft(state.tokens[:, stream_from:].cpu())
        if streamer is not None:
            # A plain streamer (TextStreamer, TextIteratorStreamer) appends whatever it is given: it gets the final
            # text once. A diffusion streamer (put_draft: TextDiffusionStreamer) also got every draft above.
            streamer.put(state.tokens[:, stream_from:].cpu())
            streamer.end()

        # 5. Return.
        if not config.return_dict_in_generate:
            return state.tokens
        return MDMGenerationOutput(sequences=state.tokens, nfe=nfe, nfe_per_sequence=nfe_per_sequence, history=history)

    def _prepare_canvas(self, input_ids, attention_mask, config):
        """Returns (tokens, attention_mask or None, prompt_length or None, region_start); checks ids and lengths
        first. region_start is where the appended positions begin (0 when nothing is appended: infilling)."""
        mask_id = self.config.mask_token_id
        device = self.device
        shifted = getattr(self.config, "shift_logits", False)
        if input_ids is None and shifted:
            # A network that predicts token i from position i - 1 needs a first token: BOS, as Dream's prompts start.
            if self.config.bos_token_id is None:
                raise ValueError("this model predicts token i from position i - 1 (config.shift_logits), so it needs a "
                                 "prompt: pass input_ids (at least one token), or set config.bos_token_id.")
            input_ids = torch.full((1, 1), self.config.bos_token_id, dtype=torch.long, device=device)
        if input_ids is None:
            input_ids = torch.empty(1, 0, dtype=torch.long, device=device)
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError(f"input_ids must be a LongTensor of shape (batch, prompt_len), got {getattr(input_ids, 'shape', input_ids)}.")
        if input_ids.dtype == torch.bool or input_ids.is_floating_point() or input_ids.is_complex():
            raise ValueError(f"input_ids must hold integer token ids (a LongTensor), got dtype {input_ids.dtype}.")
        input_ids = input_ids.to(device).long()
        if input_ids.numel():
            low, high = int(input_ids.min()), int(input_ids.max())
            if low < 0 or high >= self.config.vocab_size:
                raise ValueError(f"input_ids must lie in [0, vocab_size={self.config.vocab_size}), got values in [{low}, {high}].")
        if attention_mask is not None:
            attention_mask = attention_mask.to(device).long()
            if attention_mask.shape != input_ids.shape:
                raise ValueError(f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, got {tuple(attention_mask.shape)}.")
            empty = (attention_mask.sum(dim=1) == 0).nonzero().flatten().tolist()
            if empty and input_ids.shape[1]:
                logger.warning(f"rows {empty} of attention_mask are all 0: those rows have no prompt (every position "
                               "is padding) and are generated unconditionally.")
            # Left-pad every row (real tokens at the end of the prompt area), whatever side the tokenizer padded.
            order = torch.sort(attention_mask, dim=1, stable=True).indices
            input_ids, attention_mask = input_ids.gather(1, order), attention_mask.gather(1, order)
            pad_id = self.config.pad_token_id if self.config.pad_token_id is not None else 0
            input_ids = input_ids.masked_fill(attention_mask == 0, pad_id)

        prompt_length = input_ids.shape[1]
        has_masks = bool((input_ids == mask_id).any())
        max_context = self.config.max_position_embeddings
        if config.max_new_tokens is not None:
            new_tokens = config.max_new_tokens
        elif config.max_length is not None:
            if prompt_length > config.max_length:
                raise ValueError(f"the prompt ({prompt_length} tokens) is longer than max_length ({config.max_length}).")
            new_tokens = config.max_length - prompt_length
        else:
            new_tokens = 0 if has_masks else max_context - prompt_length
            if new_tokens < 0:
                raise ValueError(
                    f"the prompt ({prompt_length} tokens) is longer than the model's context (max_position_embeddings "
                    f"= {max_context}), so there is no room to generate: shorten the prompt (or pass max_new_tokens "
                    "to a model with length_extrapolation=True)."
                )
        if new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {new_tokens}.")
        if config.max_length is not None and prompt_length + new_tokens > config.max_length:
            raise ValueError(
                f"the prompt ({prompt_length} tokens) plus max_new_tokens ({new_tokens}) exceeds max_length ({config.max_length})."
            )
        if prompt_length + new_tokens > max_context:
            if not getattr(self.config, "length_extrapolation", False):
                raise ValueError(
                    f"the prompt ({prompt_length} tokens) plus {new_tokens} new tokens exceeds the model's "
                    f"max_position_embeddings ({max_context})."
                )
            logger.warning_once(
                f"the prompt ({prompt_length} tokens) plus {new_tokens} new tokens exceeds max_position_embeddings "
                f"({max_context}): generating anyway (config.length_extrapolation), past the trained length."
            )
        if prompt_length + new_tokens == 0:
            raise ValueError("nothing to generate: no input_ids and max_new_tokens = 0.")

        if shifted and prompt_length:
            if attention_mask is not None and not bool(attention_mask.any(dim=1).all()):
                raise ValueError("a row of attention_mask is all zeros, but this model predicts token i from position "
                                 "i - 1 (config.shift_logits): every row needs a real first token (e.g. BOS).")
            first_real = attention_mask.argmax(dim=1) if attention_mask is not None else torch.zeros_like(input_ids[:, 0])
            if bool((input_ids.gather(1, first_real[:, None]) == mask_id).any()):
                raise ValueError("the first real token of a row is [MASK], but this model predicts token i from "
                                 "position i - 1 (config.shift_logits), so the first position has no prediction: start "
                                 "every row with a real token (e.g. BOS).")
        elif shifted:
            raise ValueError("this model predicts token i from position i - 1 (config.shift_logits), so it needs a "
                             "prompt of at least one token (e.g. BOS).")

        batch_size = input_ids.shape[0]
        canvas = torch.cat([input_ids, torch.full((batch_size, new_tokens), mask_id, dtype=torch.long, device=device)], dim=1)
        if attention_mask is not None:
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(batch_size, new_tokens)], dim=1)
        if config.num_return_sequences > 1:
            canvas = canvas.repeat_interleave(config.num_return_sequences, dim=0)
            if attention_mask is not None:
                attention_mask = attention_mask.repeat_interleave(config.num_return_sequences, dim=0)
        region_start = prompt_length if new_tokens else 0  # where semi-autoregressive blocks start
        return canvas, attention_mask, (None if has_masks else prompt_length), region_start


def cut_at_eos(sequences: torch.LongTensor, eos_token_id: int | list[int] | None, start: int = 0) -> list[list[int]]:
    """Per row, the ids from `start` up to (not including) the first end-of-sequence id at or after `start`.

    Instruct MDMs are trained to fill the tail of a fixed-length answer with EOS (LLaDA's SFT pads answers with
    EOS), so what follows the first one is not part of the answer. sequences: (batch, seq_len).
    """
    stops = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
    rows = []
    for row in sequences[:, start:].tolist():
        end = next((i for i, token in enumerate(row) if token in stops), len(row))
        rows.append(row[:end])
    return rows


__all__ = ["MDMGenerationConfig", "MDMGenerationMixin", "MDMGenerationOutput", "cut_at_eos"]
