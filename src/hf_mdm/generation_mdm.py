"""Generation for masked diffusion models: `MDMGenerationConfig`, the `generate()` mixin, and the `Denoiser` that
stands between the decoding strategies and the model.

This module composes the model (through its `forward` only) with the strategies in `sampling_mdm.py`; the
model never imports a sampler and a sampler never imports the model. A strategy is chosen by name (`sampler`) and
configured by its own settings dataclass (`sampler_config`); `generate()` has no per-strategy code.

This file travels with every saved checkpoint as remote code: it imports only torch/transformers and
same-folder modules, never `hf_mdm`.
"""

import copy
from dataclasses import dataclass, fields, replace

import torch
from transformers import GenerationConfig
from transformers.generation.streamers import BaseStreamer
from transformers.utils import ModelOutput, logging

from .cache_mdm import MDMCanvasCache
from .modeling_mdm_common import values_checked
from .sampling_mdm import (
    CONFIDENCE_ORDERS,
    SAMPLING_DTYPES,
    STRATEGIES,
    CategoricalSampler,
    DiffusionState,
    StrategySettings,
    build_strategy,
    enter_blocks,
    get_noise_schedule,
    get_strategy,
)


CACHE_MODES = ("prefix", "dual")

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


# ----------------------------------------------------------------------------------------------------------------
# Which strategy, with which settings: the registry's settings fields, and the flat fields of earlier releases.
# ----------------------------------------------------------------------------------------------------------------

_MISSING = object()


def strategy_fields() -> dict[str, list[str]]:
    """Every settings field of the registered strategies -> the strategies that have it."""
    owners: dict[str, list[str]] = {}
    for name, strategy in STRATEGIES.items():
        for field in fields(strategy.Settings):
            owners.setdefault(field.name, []).append(name)
    return owners


def _neutral(key: str):
    """A settings field's default (the same in every strategy that has it): the value of "not set"."""
    for strategy in STRATEGIES.values():
        for field in fields(strategy.Settings):
            if field.name == key:
                return field.default
    return None


# Flat generation fields of earlier releases that chose the strategy, not one of its settings.
LEGACY_STRATEGY_FIELDS = ("unmasking", "remasking")


def _translate_legacy(name: str, given: dict) -> str:
    """Maps the flat fields by which earlier releases chose a strategy onto today's names (warning once):
    `sampler="first_hitting", unmasking=ORDER` is `sampler="confidence", order=ORDER`; `remasking="remdm"` on an
    ancestral sampler is `sampler="remdm"` (with `reuse_outputs=True` for ancestral_cache). Pops those fields."""
    unmasking = given.pop("unmasking", None)
    remasking = given.pop("remasking", _MISSING)
    before = name
    if unmasking is not None:
        if unmasking not in ("random",) + CONFIDENCE_ORDERS:
            raise ValueError(f"unmasking must be one of {('random',) + CONFIDENCE_ORDERS}, got {unmasking!r}.")
        if unmasking != "random":
            if name not in ("first_hitting", "confidence"):
                raise ValueError(f"unmasking={unmasking!r} orders the positions of sampler='first_hitting' (now "
                                 f"sampler='confidence'); got sampler={name!r}.")
            name = "confidence"
            given["order"] = unmasking
        elif name == "confidence":
            name = "first_hitting"
    if remasking is not _MISSING and remasking is not None:
        if remasking != "remdm":
            raise ValueError(f"remasking must be None or 'remdm', got {remasking!r}.")
        if name not in ("ancestral", "ancestral_cache", "remdm"):
            raise ValueError("remasking='remdm' runs on a time grid: use sampler='ancestral' (or 'ancestral_cache'); "
                             "today's spelling is sampler='remdm'.")
        if name == "ancestral_cache":
            given.setdefault("reuse_outputs", True)
        name = "remdm"
    elif remasking is None and name == "remdm":
        name = "ancestral"  # remasking=None turns ReMDM off
    if name != before:
        logger.warning_once(
            f"sampler={before!r} with unmasking/remasking is spelled sampler={name!r} since hf_mdm 0.2 (one class per "
            "decoding strategy, its settings in sampler_config): mapped onto it; generation_config.json is saved in "
            "the new form."
        )
    return name


def resolve_strategy(current: str, settings: StrategySettings | None, given: dict) -> tuple[str, StrategySettings]:
    """The strategy name and its validated settings after `given` (generate() kwargs or generation_config.json
    fields: `sampler`, `sampler_config`, settings fields, and the flat fields of earlier releases).

    Switching to another strategy keeps the settings of the same name (a budget of `steps` stays a budget of
    steps) and drops the others. A field that belongs to other strategies only is refused unless it holds its
    default (earlier releases wrote every field of every strategy into generation_config.json).
    """
    given = dict(given)
    name = given.pop("sampler", current)
    if not isinstance(name, str):
        raise ValueError(f"sampler must be one of {tuple(STRATEGIES)}, got {name!r}.")
    explicit = given.pop("sampler_config", None)
    name = _translate_legacy(name, given)
    if name not in STRATEGIES:
        raise ValueError(f"sampler must be one of {tuple(STRATEGIES)} (registered decoding strategies), got {name!r}.")
    settings_class = get_strategy(name).Settings
    own = [field.name for field in fields(settings_class)]
    if explicit is None:
        base = {key: value for key, value in (settings.to_dict() if settings is not None else {}).items() if key in own}
    elif isinstance(explicit, dict):
        base = {key: value for key, value in explicit.items() if key != "_cls_name"}
    elif isinstance(explicit, settings_class):
        base = explicit.to_dict()
    else:
        raise ValueError(f"sampler_config must be a {settings_class.__name__} (the settings of sampler={name!r}) or a "
                         f"dict of its fields, got {type(explicit).__name__}.")
    owners = strategy_fields()
    for key, value in given.items():
        if key in own:
            base[key] = value
        elif value is not _neutral(key) and value != _neutral(key):
            raise ValueError(f"{key}={value!r} is not a setting of sampler={name!r} (its settings: {own or 'none'}); "
                             f"it is one of {owners.get(key, [])}.")
    unknown = sorted(set(base) - set(own))
    if unknown:
        raise ValueError(f"sampler_config has fields that sampler={name!r} does not have: {unknown} (its settings: "
                         f"{own or 'none'}).")
    return name, settings_class(**base)


class MDMGenerationConfig(GenerationConfig):
    # no-format
    r"""
    Generation settings for [`MDMGenerationMixin.generate`], saved as `generation_config.json`.

    Args:
        > Decoding strategy

        sampler (`str`, defaults to `"first_hitting"`): the registered decoding strategy (`hf_mdm.STRATEGIES`):
            `"first_hitting"` (exact FHS, one network call per token; parallel with `tokens_per_step` > 1),
            `"confidence"` (LLaDA's / Dream's confidence-ordered unmasking, Fast-dLLM's threshold), `"ancestral"`
            (MDLM's "ddpm" on a uniform time grid), `"ancestral_cache"` (MDLM's "ddpm_cache": rows that did not
            change reuse their last network output), `"remdm"` (ReMDM's remasking), and any strategy registered
            with `hf_mdm.register_strategy`.
        sampler_config (`StrategySettings`, *optional*): the strategy's settings dataclass (its defaults when
            None), saved as a dict. Its fields are also accepted as keywords: `generate(sampler="confidence",
            order="margin", steps=64)`. Each strategy's class documents them (`first_hitting`: tokens_per_step,
            steps; `confidence`: order, tokens_per_step, steps, confidence_threshold; `ancestral` and
            `ancestral_cache`: steps, noise_removal; `remdm`: those and remasking_schedule, remasking_eta,
            reuse_outputs). Earlier releases' flat fields (`unmasking`, `remasking`) are mapped onto these, with
            a warning.
        sampling_dtype (`str`, defaults to `"float64"`): dtype of the categorical draws, one of
            "float64", "float32", "bfloat16", "float16". float32 truncates the Gumbel noise and lowers the
            effective temperature (arXiv:2409.02908, section 5).

        > Blocks and the block cache (every strategy that decodes in blocks)

        block_length (`int`, *optional*): semi-autoregressive decoding (LLaDA): the generated region is cut into
            blocks of this many positions, decoded left to right, each with its share of `steps`.
        use_cache (`bool`, defaults to `False`): with `block_length`, reuse the keys and values of positions outside
            the active block, refreshed once per block (Fast-dLLM's cache); without blocks it has no effect (a
            warning says so). An APPROXIMATION for a bidirectional network: in a block's later steps, positions
            outside it do not see what the block decoded.
        cache_mode (`str`, defaults to `"prefix"`): `"prefix"` recomputes the active block and everything after it
            each call, reusing the prompt and finished blocks; `"dual"` recomputes the active block only.
        cache_refresh_steps (`int`, *optional*): also refresh the cache every this many calls within a block
            (1: every call, the exact computation).

        > Block diffusion (a model with `config.diffusion_block_size`)

        The model's blocks are decoded one after the other (`block_length` defaults to the model's block size and
        must divide it: Fast-dLLM v2's sub-blocks), every strategy inside the active block. With `use_cache` the
        prompt and every finished block are run once and their keys and values cached: EXACT, since a finished
        block never sees a later one. Prompts are laid out so that every row's blocks start together; a prompt
        that ends inside a block shares it with the first generated tokens, as BD3-LM, SDAR and Fast-dLLM v2 do.
        stop_at_eos (`bool`, *optional*): stop a row at the end of the block where it generated `eos_token_id`,
            filling the rest with `pad_token_id` (BD3-LM's and SDAR's variable length). Default: True for a
            block-diffusion model, False otherwise (a bidirectional model fills its whole canvas jointly).

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

    The strategy's settings read as attributes too (`config.steps`, `config.order`).
    """

    def __init__(self, **kwargs):
        # We deliberately do not call GenerationConfig.__init__: most of its fields mean nothing to an MDM, and
        # its validation forbids max_new_tokens = 0, which infilling needs.
        strategy = {key: kwargs.pop(key) for key in list(kwargs) if key in self.strategy_keys()}
        self.sampler, self.sampler_config = resolve_strategy("first_hitting", None, strategy)
        self.sampling_dtype: str = kwargs.pop("sampling_dtype", "float64")

        self.block_length: int | None = kwargs.pop("block_length", None)
        self.use_cache: bool = kwargs.pop("use_cache", False)
        self.cache_mode: str = kwargs.pop("cache_mode", "prefix")
        self.cache_refresh_steps: int | None = kwargs.pop("cache_refresh_steps", None)
        self.stop_at_eos: bool | None = kwargs.pop("stop_at_eos", None)

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

    @staticmethod
    def strategy_keys() -> set[str]:
        return {"sampler", "sampler_config", *LEGACY_STRATEGY_FIELDS, *strategy_fields()}

    def __getattr__(self, name: str):
        # Only called when normal lookup fails: the strategy's settings read as attributes (config.steps), and the
        # flat `unmasking` of earlier releases.
        settings = self.__dict__.get("sampler_config")
        if settings is not None and name in {field.name for field in fields(settings)}:
            return getattr(settings, name)
        if name == "unmasking" and settings is not None:
            return getattr(settings, "order", "random")
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}.")

    def __setattr__(self, name: str, value):
        settings = self.__dict__.get("sampler_config")
        if name in self.strategy_keys() and name not in ("sampler", "sampler_config") and settings is not None:
            self.sampler, self.sampler_config = resolve_strategy(self.sampler, settings, {name: value})
            return
        super().__setattr__(name, value)

    def validate(self, strict=False, **unused):
        """Raises ValueError naming the field and the allowed values."""
        strategy = get_strategy(self.sampler)
        if not isinstance(self.sampler_config, strategy.Settings):
            raise ValueError(f"sampler_config must be a {strategy.Settings.__name__} for sampler={self.sampler!r}, "
                             f"got {type(self.sampler_config).__name__}.")
        self.sampler_config.validate()
        if self.sampling_dtype not in SAMPLING_DTYPES:
            raise ValueError(
                f"sampling_dtype must be a floating type, one of {tuple(SAMPLING_DTYPES)}, got {self.sampling_dtype!r}."
            )
        value = self.block_length
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"block_length must be an integer >= 1 (or None), got {value!r}.")
        if value is not None and not strategy.supports_blocks:
            with_blocks = tuple(name for name, cls in STRATEGIES.items() if cls.supports_blocks)
            raise ValueError(f"block_length: sampler={self.sampler!r} does not decode in blocks; strategies that do: "
                             f"{with_blocks}.")
        if self.stop_at_eos not in (None, True, False):
            raise ValueError(f"stop_at_eos must be True, False or None (True for block diffusion), got "
                             f"{self.stop_at_eos!r}.")
        if not isinstance(self.use_cache, bool):
            raise ValueError(f"use_cache must be True or False, got {self.use_cache!r}.")
        if self.cache_mode not in CACHE_MODES:
            raise ValueError(f"cache_mode must be one of {CACHE_MODES}, got {self.cache_mode!r}.")
        value = self.cache_refresh_steps
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"cache_refresh_steps must be an integer >= 1 (or None), got {value!r}.")
        if not isinstance(self.temperature, (int, float)) or isinstance(self.temperature, bool) or \
                not 0 <= self.temperature < float("inf"):
            raise ValueError(f"temperature must be a finite number >= 0 (0 means greedy), got {self.temperature!r}.")
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
        if not isinstance(self.num_return_sequences, int) or self.num_return_sequences < 1:
            raise ValueError(f"num_return_sequences must be an integer >= 1, got {self.num_return_sequences!r}.")

    def to_dict(self) -> dict:
        output = super().to_dict()
        output["sampler_config"] = self.sampler_config.to_dict()
        return output

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

        `sampler` and the strategy's settings resolve together (`resolve_strategy`): choosing another strategy
        keeps the settings it shares with the previous one. A strategy that does not decode in blocks drops the
        block settings, unless they are given too: a folder whose default is confidence decoding in blocks can be
        sampled with a strategy of yours that decodes whole canvases.
        """
        strategy = {k: v for k, v in kwargs.items() if k in self.strategy_keys()}
        known = {k: v for k, v in kwargs.items() if k not in strategy and (
            k in self.__dict__ or k in UNSUPPORTED_GENERATION_FIELDS or k in IGNORED_GENERATION_FIELDS)}
        rest = {k: v for k, v in kwargs.items() if k not in strategy and k not in known}
        _reject_unsupported(known)
        if strategy:
            sampler, settings = resolve_strategy(self.sampler, self.sampler_config, strategy)
            if sampler != self.sampler and not get_strategy(sampler).supports_blocks:
                known.setdefault("block_length", None)
                known.setdefault("use_cache", False)
            self.__dict__.update(sampler=sampler, sampler_config=settings)
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
        tokens_per_forward (`torch.FloatTensor` of shape `(batch * num_return_sequences,)`): generated tokens
            (padding after a stop left out) per network evaluation of each sequence (DiffusionGemma's measure).
        history (`list[torch.LongTensor]`, *optional*): with `output_history`, the draft after each step.
    """

    sequences: torch.LongTensor | None = None
    nfe: int | None = None
    nfe_per_sequence: torch.LongTensor | None = None
    tokens_per_forward: torch.FloatTensor | None = None
    history: list[torch.LongTensor] | None = None


def check_finite(logits: torch.Tensor, rows: torch.LongTensor) -> None:
    """Raises ValueError naming the batch rows whose logits (R, ..., V) hold a NaN or an infinite maximum (+inf
    somewhere, or -inf everywhere): sampling from them would silently give token 0 or a row's NaN would reach the
    others through shared random draws. One reduction over the logits, one host read."""
    best = logits.amax(dim=-1).reshape(len(rows), -1)
    finite = torch.isfinite(best).all(dim=1)
    if not bool(finite.all()):
        bad = rows[~finite].tolist()
        raise ValueError(f"the network returned non-finite logits (NaN, +inf, or -inf for every token) for batch rows "
                         f"{bad}: generation stops. Check the model's weights (a diverged training run?) and inputs.")


class Denoiser:
    """The model as the strategies see it, `denoise(rows, tokens, positions, times) -> logits` (`bind`), and what
    they never see: the padding mask, the time input of a time-conditioned network, the count of network calls,
    and the block cache.

    With `use_cache` and blocks, a call runs the network on each row's window only (its active block, and for the
    prefix cache everything after it), rows with equal windows in one forward pass, reading the other positions'
    keys and values from the row's entries of an `MDMCanvasCache`. A row's first call in a block (or one due a
    refresh, every `cache_refresh_steps` calls) runs on its whole canvas and writes all of them. Rows are
    independent: each keeps what its own last whole-canvas call saw (Fast-dLLM's prefix and dual caches).
    """

    def __init__(self, model, attention_mask, schedule, config: MDMGenerationConfig, tokens: torch.LongTensor):
        self.model, self.attention_mask, self.schedule = model, attention_mask, schedule
        batch_size, canvas_length = tokens.shape
        self.nfe = 0  # forward passes (with the cache, rows in different blocks run in separate passes)
        self.nfe_per_sequence = torch.zeros(batch_size, dtype=torch.long, device=tokens.device)
        self.cache = None
        if config.use_cache and config.block_length is None:
            # transformers users pass use_cache=True out of habit (an autoregressive KV cache): nothing to reuse here.
            logger.warning_once("use_cache=True caches keys and values between the blocks of block decoding; without "
                                "block_length there is nothing to reuse, so no cache is used.")
        elif config.use_cache:
            self.cache = MDMCanvasCache(model.config.num_hidden_layers, batch_size, canvas_length)
            self.cache_mode, self.refresh_steps = config.cache_mode, config.cache_refresh_steps
            self.block_size = getattr(model.config, "diffusion_block_size", None)
            # Block diffusion: per row, the canvas columns [0, committed) whose final keys and values the cache holds.
            self.committed = torch.zeros(batch_size, dtype=torch.long, device=tokens.device)
            self.recorded_block = torch.full((batch_size,), -1, dtype=torch.long, device=tokens.device)
            self.recorded_window = torch.zeros(batch_size, 2, dtype=torch.long, device=tokens.device)
            self.calls_since_refresh = torch.zeros(batch_size, dtype=torch.long, device=tokens.device)

    def bind(self, state: DiffusionState):
        """The `denoise` callable of one step, on `state`'s layout (the rows' active blocks)."""

        def denoise(rows, tokens, positions, times):
            self.nfe_per_sequence[rows] += 1
            if self.cache is None or positions is None or state.block_length is None:
                return self.network(rows, tokens, positions, times)
            if self.block_size is not None:
                return self.cached_blocks(state, rows, tokens, positions, times)
            return self.cached(state, rows, tokens, positions, times)

        return denoise

    def network(self, rows, tokens, positions, times, cache=None) -> torch.Tensor:
        self.nfe += 1
        timesteps = self.schedule.total_noise(times).float() if self.model.config.time_conditioning else None
        mask = self.attention_mask[rows] if self.attention_mask is not None else None
        logits = self.model(tokens, attention_mask=mask, timesteps=timesteps, output_positions=positions,
                            cache=cache).logits
        check_finite(logits, rows)
        return logits

    def cached(self, state, rows, tokens, positions, times) -> torch.Tensor:
        due = self.calls_since_refresh[rows] + 1 == (self.refresh_steps or 0)
        entered = self.recorded_block[rows] != state.active_block[rows]
        refresh = entered | due
        any_refresh = bool(refresh.any())
        if bool(entered.any()):  # a row's window changes only when it enters a block
            self.recorded_window[rows[entered]] = state.windows(rows[entered])
        windows = self.recorded_window[rows]
        if self.cache_mode != "dual":  # the prefix cache recomputes everything from the active block on
            windows = torch.stack([windows[:, 0], torch.full_like(windows[:, 1], tokens.shape[1])], dim=1)
        if not any_refresh and bool((windows == windows[:1]).all()):  # the usual call: one window for all rows
            return self.read(rows, tokens, positions, times, *windows[0].tolist())
        def refreshed(index):  # the whole canvas, written into the cache
            batch_rows = rows[index]
            view_rows = None if len(batch_rows) == self.cache.num_rows else batch_rows
            part = self.network(batch_rows, tokens[index], positions[index], times[index],
                                self.cache.segment(view_rows, 0))
            self.calls_since_refresh[batch_rows] = 0
            self.recorded_block[batch_rows] = state.active_block[batch_rows]
            return part

        groups = [(refresh.nonzero().squeeze(1), refreshed)] if any_refresh else []
        groups += self.by_window(rows, tokens, positions, times, windows, ~refresh, self.read)
        return stitched(len(rows), groups)

    def cached_blocks(self, state, rows, tokens, positions, times) -> torch.Tensor:
        """Block diffusion: each row runs from the first column the cache lacks (the prompt on its first call, the
        block it finished since, else nothing) to the end of the model block it decodes in. Finished blocks are run
        once, on their final tokens, and never see a later block: the cache is exact."""
        starts = state.windows(rows)[:, 0]
        block_starts = torch.div(starts, self.block_size, rounding_mode="floor") * self.block_size
        spans = torch.stack([self.committed[rows], (block_starts + self.block_size).clamp(max=tokens.shape[1])], dim=1)
        self.committed[rows] = block_starts
        if bool((spans == spans[:1]).all()):  # the usual call: every row at the same place
            return self.segment(rows, tokens, positions, times, *spans[0].tolist())
        everyone = torch.ones_like(rows, dtype=torch.bool)
        return stitched(len(rows), self.by_window(rows, tokens, positions, times, spans, everyone, self.segment))

    @staticmethod
    def by_window(rows, tokens, positions, times, windows, members, run) -> list:
        """(index, call) per distinct [start, end) window of the `members` rows: `run(rows, tokens, positions, times,
        start, end)` on those rows."""
        groups = []
        for start, end in torch.unique(windows[members], dim=0).tolist():
            index = ((windows[:, 0] == start) & (windows[:, 1] == end) & members).nonzero().squeeze(1)
            groups.append((index, lambda index, start=start, end=end: run(
                rows[index], tokens[index], positions[index], times[index], start, end)))
        return groups

    def read(self, rows, tokens, positions, times, start: int, end: int) -> torch.Tensor:
        """One forward pass on the rows' window [start, end), reading the rest of each row's canvas from the cache."""
        logits = self.segment(rows, tokens, positions, times, start, end)
        self.calls_since_refresh[rows] += 1
        return logits

    def segment(self, rows, tokens, positions, times, start: int, end: int) -> torch.Tensor:
        """The network on columns [start, end) of the rows, writing their keys and values into the cache and reading
        the rest of each row's canvas from it."""
        view_rows = None if len(rows) == self.cache.num_rows else rows
        # Entries of `positions` past a row's count are padding (their logits are never read).
        segment_positions = (positions - start).clamp(0, end - start - 1)
        return self.network(rows, tokens[:, start:end], segment_positions, times, self.cache.segment(view_rows, start))


def stitched(num_rows: int, groups) -> torch.Tensor:
    """Runs each group's call on its rows (`index`) and lays the logits out in row order."""
    logits = None
    for index, call in groups:
        part = call(index)
        if logits is None:
            logits = part.new_empty((num_rows,) + tuple(part.shape[1:]))
        logits[index] = part
    return logits


def block_diffusion_block_length(config: MDMGenerationConfig, strategy, block_size: int) -> int:
    """The decoding block of a block-diffusion model (`diffusion_block_size`): its own blocks, or sub-blocks of
    them (`block_length` dividing the block size, Fast-dLLM v2's); refuses settings that mean nothing there."""
    if not strategy.supports_blocks:
        raise ValueError(f"sampler={config.sampler!r} does not decode in blocks, and this model is a block-diffusion "
                         f"model (diffusion_block_size={block_size}), decoded block by block.")
    length = config.block_length or block_size
    if block_size % length:
        raise ValueError(f"block_length={length} must divide the model's diffusion_block_size={block_size} "
                         "(sub-blocks of its blocks, decoded left to right).")
    if config.use_cache and (config.cache_mode != "prefix" or config.cache_refresh_steps is not None):
        raise ValueError("cache_mode='dual' and cache_refresh_steps mean nothing for a block-diffusion model: its "
                         "cache is exact (a finished block never changes). Leave them unset.")
    return length


def align_blocks(tokens: torch.LongTensor, attention_mask: torch.Tensor | None, block_size: int, mask_token_id: int,
                 pad_token_id: int):
    """Lays a canvas out for block diffusion, so that every row decodes the same columns at the same time: each
    row's padding in front becomes a whole number of blocks (its blocks stay counted from its first real token),
    chosen so that every row's first block with a [MASK] starts at one column; shorter rows end with padding.

    Returns (tokens, attention_mask or None, region_start, output_index): region_start is that column, and
    output_index (batch, width of the input layout) gives each input column's column in the new canvas (-1 for
    padding), to lay results out as the input was."""
    batch, width = tokens.shape
    device = tokens.device
    real = attention_mask.bool() if attention_mask is not None else torch.ones_like(tokens, dtype=torch.bool)
    first = torch.where(real.any(dim=1), real.int().argmax(dim=1), width)  # real columns run from here to the end
    length = width - first
    masked = (tokens == mask_token_id) & real
    first_mask = torch.where(masked.any(dim=1), masked.int().argmax(dim=1) - first, length)
    blocks_before = torch.div(first_mask, block_size, rounding_mode="floor")
    pad = (blocks_before.max() - blocks_before) * block_size
    new_width = int((pad + length).max())
    columns = torch.arange(new_width, device=device)[None]
    inside = (columns >= pad[:, None]) & (columns < (pad + length)[:, None])
    source = (columns - pad[:, None] + first[:, None]).clamp(0, width - 1)
    aligned = tokens.gather(1, source).masked_fill(~inside, pad_token_id)
    old_columns = torch.arange(width, device=device)[None]
    output_index = torch.where(old_columns >= first[:, None], old_columns - first[:, None] + pad[:, None], -1)
    region_start = int(blocks_before.max()) * block_size
    return aligned, (None if bool(inside.all()) else inside.long()), region_start, output_index


def stop_after_eos(state: DiffusionState, eos_ids: torch.Tensor, pad_token_id: int):
    """Rows that generated an end-of-sequence token in a finished block stop at that block's end: their later
    positions become `pad_token_id`, no longer masked (BD3-LM's and SDAR's variable length). Returns the state and
    the positions so filled."""
    finished = (state.block < state.active_block[:, None]) | ~state.masked.any(dim=1, keepdim=True)
    hits = state.generated & ~state.masked & finished & torch.isin(state.tokens, eos_ids)
    if not bool(hits.any()):
        return state, None
    far = torch.iinfo(torch.long).max
    stop_block = torch.where(hits, state.block, far).amin(dim=1)
    cut = state.masked & (state.block > stop_block[:, None])
    if not bool(cut.any()):
        return state, None
    return replace(state, tokens=state.tokens.masked_fill(cut, pad_token_id), masked=state.masked & ~cut), cut


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
               honour (`num_beams > 1`, ...) raise ValueError. Build the strategy registered as `sampler`, with its
               settings, the model's noise schedule and one `CategoricalSampler` in `sampling_dtype`.
            2. Lay out the canvas: prompts are moved to the left-padded layout, `max_new_tokens` [MASK] positions are
               appended, and every row is repeated `num_return_sequences` times. Every [MASK] of the canvas is
               generated; every other token is kept.
            3. Wrap the model in a `Denoiser`: `denoise(rows, tokens, positions, times)` calls the model's `forward`
               (with `output_positions` when only some positions are needed, the time input when the model is
               time-conditioned, and the block cache with `use_cache`).
            4. Step until nothing is masked: `state = strategy.step(state, denoise)`, then each row whose block is
               done moves to its next block. The streamer receives the draft after each step.
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
            kwargs: any `MDMGenerationConfig` field or setting of the strategy, e.g. `sampler`, `steps`,
                `sampling_dtype`, `max_new_tokens`.
        """
        # 1. Resolve the generation config and build the strategy.
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(f"generator must be a torch.Generator (e.g. torch.Generator().manual_seed(0)), got "
                             f"{type(generator).__name__}.")
        config, rest = self._resolve_generation_config(generation_config, kwargs)
        rest.pop("tokenizer", None)
        if rest:
            raise ValueError(f"generate() got arguments it does not know: {sorted(rest)}. Allowed: MDMGenerationConfig "
                             f"fields and the settings of sampler={config.sampler!r}.")
        mask_id = self.config.mask_token_id
        strategy, schedule = self._build_strategy(config, generator)
        block_size = getattr(self.config, "diffusion_block_size", None)
        stop_at_eos = config.stop_at_eos if config.stop_at_eos is not None else block_size is not None
        eos_ids = config.eos_token_id if config.eos_token_id is not None else self.config.eos_token_id
        pad_id = next((i for i in (config.pad_token_id, self.config.pad_token_id, eos_ids) if isinstance(i, int)), 0)

        # 2. Lay out the canvas (block diffusion: every row's blocks start at the same columns).
        tokens, attention_mask, prompt_length, region_start = self._prepare_canvas(input_ids, attention_mask, config)
        output_index = None
        if block_size is not None:
            tokens, attention_mask, region_start, output_index = align_blocks(tokens, attention_mask, block_size,
                                                                               mask_id, pad_id)

        def as_input_laid_out(canvas):
            if output_index is None:
                return canvas
            return canvas.gather(1, output_index.clamp(min=0)).masked_fill(output_index < 0, pad_id)

        masked = tokens == mask_id
        if attention_mask is not None:
            masked &= attention_mask.bool()
            if bool(attention_mask.all()):
                attention_mask = None  # decided once per call: the network then runs unmasked (SDPA's fastest kernel)

        # 3. The network behind `denoise`.
        denoiser = Denoiser(self, attention_mask, schedule, config, tokens)

        # 4. Step until nothing is masked (or every row stopped at its end-of-sequence token).
        stream_from = 0 if prompt_length is None else prompt_length
        put_draft = getattr(streamer, "put_draft", None) if streamer is not None else None
        if streamer is not None:
            streamer.put(as_input_laid_out(tokens)[:, :stream_from].cpu())
        state = DiffusionState.start(tokens, masked, config.block_length, region_start, block_size)
        if stop_at_eos and eos_ids is not None:
            eos_ids = torch.as_tensor(eos_ids, device=tokens.device).flatten()
        else:
            stop_at_eos = False
        stopped = torch.zeros_like(masked)
        history = [] if config.output_history else None
        max_steps = strategy.step_limit(state)
        with values_checked():  # the ids were checked above; the denoiser asks only for positions strategies chose
            while not state.done:
                if state.step >= max_steps:
                    raise RuntimeError(f"{config.sampler} left [MASK] tokens after {state.step} steps; please report "
                                       "this.")
                state = strategy.step(state, denoiser.bind(state))
                state = enter_blocks(state, strategy.holds_block(state))
                if stop_at_eos:
                    state, cut = stop_after_eos(state, eos_ids, pad_id)
                    if cut is not None:
                        stopped |= cut
                if history is not None:
                    history.append(as_input_laid_out(state.tokens).clone())
                if put_draft is not None:
                    put_draft(as_input_laid_out(state.tokens)[:, stream_from:].cpu())
        sequences = as_input_laid_out(state.tokens)
        if streamer is not None:
            # A plain streamer (TextStreamer, TextIteratorStreamer) appends whatever it is given: it gets the final
            # text once. A diffusion streamer (put_draft: TextDiffusionStreamer) also got every draft above.
            streamer.put(sequences[:, stream_from:].cpu())
            streamer.end()

        # 5. Return.
        if not config.return_dict_in_generate:
            return sequences
        generated = (state.generated & ~stopped).sum(dim=1)
        tokens_per_forward = generated / denoiser.nfe_per_sequence.clamp(min=1)
        return MDMGenerationOutput(sequences=sequences, nfe=denoiser.nfe, nfe_per_sequence=denoiser.nfe_per_sequence,
                                   tokens_per_forward=tokens_per_forward, history=history)

    def _build_strategy(self, config: MDMGenerationConfig, generator: torch.Generator | None = None):
        """(strategy, noise schedule) for a resolved config, after the checks that depend on this model: its time
        input and its blocks (a block-diffusion model's `block_length` is set here). Builds no canvas and runs no
        network, so callers (the RL trainer) use it to refuse a setting before any expensive work."""
        mask_id = self.config.mask_token_id
        schedule = get_noise_schedule(self.config.noise_schedule, self.config.noise_eps)
        categorical = CategoricalSampler(
            SAMPLING_DTYPES[config.sampling_dtype], config.temperature, config.top_k, config.top_p, generator,
            mask_token_id=mask_id,
        )
        strategy = build_strategy(config.sampler, config.sampler_config, schedule=schedule, categorical=categorical,
                                  mask_token_id=mask_id, time_conditioned=self.config.time_conditioning)
        if strategy.time_agnostic_only and self.config.time_conditioning:
            raise ValueError(
                f"sampler={config.sampler!r} reuses network outputs across time steps, which is only valid for a "
                "time-agnostic model; this model has time_conditioning=True. Use 'first_hitting' or 'ancestral'."
            )
        block_size = getattr(self.config, "diffusion_block_size", None)
        if block_size is not None:
            config.block_length = block_diffusion_block_length(config, strategy, block_size)
        elif config.block_length is not None and not strategy.supports_blocks:
            raise ValueError(f"block_length: sampler={config.sampler!r} with these settings does not decode in blocks.")
        return strategy, schedule

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
            if attention_mask.shape != input_ids.shape:
                raise ValueError(f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, got {tuple(attention_mask.shape)}.")
            if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
                raise ValueError("attention_mask must hold only 0 (padding) and 1 (a real token).")
            attention_mask = attention_mask.to(device).long()
            runs = attention_mask[:, :1] + (attention_mask[:, 1:] > attention_mask[:, :-1]).sum(dim=1, keepdim=True)
            holes = (runs > 1).flatten().nonzero().flatten().tolist()
            if holes:
                raise ValueError(f"attention_mask rows {holes} have padding between real tokens; padding goes on the "
                                 "left or the right of a prompt (to infill, put [MASK] tokens in input_ids).")
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
            rope = getattr(self.config, "rope_parameters", None)
            if rope is None:
                raise ValueError(
                    f"the prompt ({prompt_length} tokens) plus {new_tokens} new tokens exceeds the model's "
                    f"max_position_embeddings ({max_context}), where its learned positions end."
                )
            if rope["rope_type"] == "default" and not getattr(self.config, "length_extrapolation", False):
                raise ValueError(
                    f"the prompt ({prompt_length} tokens) plus {new_tokens} new tokens exceeds the model's "
                    f"max_position_embeddings ({max_context}); a rotary DiT can run past it (MDLM's does): set "
                    "config.length_extrapolation = True, or use a scaled rope type."
                )
            if rope["rope_type"] == "default":
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
        check_memory(self, batch_size * config.num_return_sequences, prompt_length + new_tokens)
        canvas = torch.cat([input_ids, torch.full((batch_size, new_tokens), mask_id, dtype=torch.long, device=device)], dim=1)
        if attention_mask is not None:
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(batch_size, new_tokens)], dim=1)
        if config.num_return_sequences > 1:
            canvas = canvas.repeat_interleave(config.num_return_sequences, dim=0)
            if attention_mask is not None:
                attention_mask = attention_mask.repeat_interleave(config.num_return_sequences, dim=0)
        region_start = prompt_length if new_tokens else 0  # where semi-autoregressive blocks start
        return canvas, attention_mask, (None if has_masks else prompt_length), region_start


def available_memory(device: torch.device) -> int | None:
    """Bytes that can still be allocated on `device` (CUDA: free plus cached by torch; CPU: the kernel's
    MemAvailable), or None where it cannot be read."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as meminfo:
                for line in meminfo:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


def check_memory(model, rows: int, length: int) -> None:
    """Refuses, before anything is allocated, a call whose network activations alone cannot fit: a lower bound
    (the residual stream, its normalised copy, the attention output and the MLP's hidden layer, for every position
    of every row, in the model's dtype), so it never refuses what would run."""
    config = model.config
    hidden = config.hidden_size
    intermediate = getattr(config, "intermediate_size", 4 * hidden)
    needed = rows * length * (3 * hidden + intermediate) * model.dtype.itemsize
    available = available_memory(model.device)
    if available is not None and needed > available:
        fits = max(1, rows * available // needed)
        raise ValueError(
            f"generate() needs at least {needed / 2**30:,.1f} GiB for {rows:,} rows x {length:,} positions (the "
            f"network's activations alone, in {model.dtype}), and {model.device} has {available / 2**30:,.1f} GiB "
            f"available: generate at most about {fits:,} rows per call (batch size x num_return_sequences)."
        )


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


__all__ = ["Denoiser", "MDMGenerationConfig", "MDMGenerationMixin", "MDMGenerationOutput", "cut_at_eos"]
