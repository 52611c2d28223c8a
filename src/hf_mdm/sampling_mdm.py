"""Sampling for masked diffusion models: noise schedules, one categorical sampler, and the decoding strategies.

Like diffusers' schedulers, nothing here knows the model. Every strategy is one registered class
(`@register_strategy(name)`) with its settings dataclass and one method,

    state = strategy.step(state, denoise)

with `state` a `DiffusionState` (tokens, which positions are still masked, per-row time and block) and
`denoise(rows, tokens, positions, times) -> logits` the network, so `generate()` has no per-strategy special cases:
it builds the strategy named by `sampler`, binds the network into `denoise` and steps until nothing is masked.
Equations cite Zheng et al., arXiv:2409.02908 ("FHS" = first-hitting sampler, section 4) and MDLM,
arXiv:2406.07524 (ancestral "ddpm" sampler). See hf_mdm's docs/concepts/time-agnostic.md, first-hitting.md and precision.md.

This file travels with every saved checkpoint as remote code: it imports only numpy, torch and transformers.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass, fields, is_dataclass, replace
from typing import NamedTuple

import numpy as np
import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)


SAMPLING_DTYPES = {
    "float64": torch.float64,
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


# ----------------------------------------------------------------------------------------------------------------
# Noise schedules: alpha_t is the probability that a token is still clean at time t (alpha_0 = 1, alpha_1 ~ 0).
# ----------------------------------------------------------------------------------------------------------------


class NoiseSchedule:
    """alpha_t, its derivative and inverse. Subclasses define `alpha`, `alpha_derivative` and `inverse`.

    All methods take and return tensors; callers use float64 where precision matters (FHS times).
    """

    name = ""

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def alpha_derivative(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def inverse(self, alpha: torch.Tensor) -> torch.Tensor:
        """t such that alpha_t = alpha."""
        raise NotImplementedError

    def total_noise(self, t: torch.Tensor) -> torch.Tensor:
        """sigma(t) = -log alpha_t: what MDLM feeds a time-conditioned network (clamped where alpha_t = 0)."""
        return -torch.log(self.alpha(t).clamp(min=1e-12))

    def loss_weight(self, t: torch.Tensor) -> torch.Tensor:
        """NELBO weight -alpha'_t / (1 - alpha_t) (docs/concepts/time-agnostic.md); 1/t for the linear and log-linear schedules."""
        return -self.alpha_derivative(t) / (1 - self.alpha(t))

    def first_hitting_time(self, t: torch.Tensor, num_masked: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """The time at which the next of `num_masked` positions unmasks, going down from time t (FHS, eq. 4.1):

        tau = alpha^{-1}(1 - u^(1/n) (1 - alpha_t)),  u ~ Uniform(0, 1).
        """
        return self.inverse(1 - u ** (1.0 / num_masked) * (1 - self.alpha(t))).clamp(0.0, 1.0)


class LinearSchedule(NoiseSchedule):
    name = "linear"

    def alpha(self, t):
        return 1 - t

    def alpha_derivative(self, t):
        return -torch.ones_like(t)

    def inverse(self, alpha):
        return 1 - alpha


class LogLinearSchedule(NoiseSchedule):
    """MDLM's default: alpha_t = 1 - (1 - eps) t, total noise sigma(t) = -log(1 - (1 - eps) t)."""

    name = "loglinear"

    def __init__(self, eps: float = 1e-3):
        self.eps = eps

    def alpha(self, t):
        return 1 - (1 - self.eps) * t

    def alpha_derivative(self, t):
        return torch.full_like(t, -(1 - self.eps))

    def inverse(self, alpha):
        return (1 - alpha) / (1 - self.eps)


class CosineSchedule(NoiseSchedule):
    """alpha_t = cos(pi t / 2): MDLM's cosine schedule (without its eps). md4's "cosine" is another schedule,
    alpha_t = 1 - sin(pi t / 2), which keeps far fewer tokens mid-way (0.29 against 0.71 at t = 0.5)."""

    name = "cosine"

    def alpha(self, t):
        return torch.cos(0.5 * math.pi * t)

    def alpha_derivative(self, t):
        return -0.5 * math.pi * torch.sin(0.5 * math.pi * t)

    def inverse(self, alpha):
        return torch.arccos(alpha.clamp(-1.0, 1.0)) * (2 / math.pi)


NOISE_SCHEDULE_CLASSES = {"linear": LinearSchedule, "loglinear": LogLinearSchedule, "cosine": CosineSchedule}


def get_noise_schedule(name: str, eps: float = 1e-3) -> NoiseSchedule:
    """The schedule named by `MDMConfig.noise_schedule` ("loglinear", "linear" or "cosine")."""
    if name not in NOISE_SCHEDULE_CLASSES:
        raise ValueError(f"noise_schedule must be one of {tuple(NOISE_SCHEDULE_CLASSES)}, got {name!r}.")
    return LogLinearSchedule(eps) if name == "loglinear" else NOISE_SCHEDULE_CLASSES[name]()


# ----------------------------------------------------------------------------------------------------------------
# One categorical sampler: the only place where `sampling_dtype` is applied.
# ----------------------------------------------------------------------------------------------------------------


def uniform(shape, dtype: torch.dtype, device, generator: torch.Generator | None) -> torch.Tensor:
    """U[0, 1) draws from `generator` (on the generator's device, so a CPU seed reproduces on any device)."""
    source = torch.device(generator.device if generator is not None else device)
    if source.type == "cpu" and dtype == torch.float64:
        # torch fills float64 on the CPU serially at ~10 ns a value, and ancestral sampling draws batch x L x V of
        # them per step. numpy's PCG64 gives the same 53-bit grid ~3x faster, seeded from `generator` (or torch's
        # global generator), so a torch seed still reproduces every draw.
        seed = int(torch.randint(2**63 - 1, (), generator=generator))
        return torch.from_numpy(np.random.default_rng(seed).random(tuple(shape))).to(device)
    return torch.rand(shape, dtype=dtype, device=source, generator=generator).to(device)


def skip_uniform(shape, dtype: torch.dtype, device, generator: torch.Generator | None) -> None:
    """Advances `generator` exactly as `uniform(shape, ...)` would, at the least cost (one draw for float64 on the
    CPU, whose values come from a numpy generator seeded by that draw)."""
    source = torch.device(generator.device if generator is not None else device)
    if source.type == "cpu" and dtype == torch.float64:
        torch.randint(2**63 - 1, (), generator=generator)
    else:
        uniform(shape, dtype, device, generator)


class CategoricalSampler:
    """Turns logits into probabilities and draws one category per row, all in `dtype`.

    Drawing is the exponential race argmax_i p_i / E_i with E_i = -log U_i (equivalent to Gumbel-max), as MDLM
    does. In float32 the largest uniform below 1 is 1 - 2^-24, which truncates the Gumbel noise at 16.64 and
    under-samples small probabilities (arXiv:2409.02908, Prop. 5.2); float64 pushes the truncation to 36.74.

    Args:
        dtype: the sampling dtype (`SAMPLING_DTYPES`); float64 by default because float32 lowers the effective
            temperature of the ancestral sampler.
        temperature: 0 means greedy (argmax); otherwise logits are divided by it.
        top_k, top_p: transformers' logits warpers (0 and 1.0 switch them off).
        generator: the `torch.Generator` every draw comes from.
        mask_token_id: the [MASK] id, whose probability is set to exactly zero here, whatever logit the network
            gave it: no strategy can ever draw [MASK] as a token.
    """

    def __init__(self, dtype=torch.float64, temperature=1.0, top_k=0, top_p=1.0, generator=None, mask_token_id=None):
        if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0 (0 means greedy), got {temperature!r}.")
        self.dtype = dtype
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.mask_token_id = mask_token_id
        self.greedy = temperature == 0
        self.generator = generator
        warpers = []
        if not self.greedy and temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(temperature))
        if top_k:
            warpers.append(TopKLogitsWarper(top_k))
        if top_p < 1.0:
            warpers.append(TopPLogitsWarper(top_p))
        self.warpers = LogitsProcessorList(warpers)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """(..., V) logits -> (..., V) probabilities in the sampling dtype (one-hot when greedy)."""
        # copy=True: the in-place edits below must never reach the caller's logits (a no-op cast would alias them).
        scores = logits.to(self.dtype, copy=True).reshape(-1, logits.shape[-1])
        if self.mask_token_id is not None:
            scores[:, self.mask_token_id] = float("-inf")
        if self.greedy:
            probs = torch.zeros_like(scores).scatter_(-1, scores.argmax(-1, keepdim=True), 1.0)
        else:
            probs = torch.softmax(self.warpers(None, scores), dim=-1)
            finite = torch.isfinite(probs).all(dim=-1)
            if not bool(finite.all()):
                raise ValueError(
                    f"{int((~finite).sum())} of {len(finite)} distributions are not finite in sampling_dtype={self.dtype} "
                    f"at temperature={self.temperature} (logits too large for the dtype once divided by the "
                    "temperature, or no token left): use float64 sampling or a larger temperature."
                )
        return probs.view(logits.shape)

    def draw(self, probs: torch.Tensor) -> torch.LongTensor:
        """(..., K) non-negative, possibly unnormalised weights -> (...) sampled indices (exponential race)."""
        exponential = uniform(probs.shape, probs.dtype, probs.device, self.generator).log_().neg_()  # E = -log U
        return torch.div(probs, exponential, out=exponential).argmax(dim=-1)  # in place: this is the hot loop

    def choose(self, probs: torch.Tensor) -> torch.LongTensor:
        """(..., V) output of `probabilities` -> (...) one token each: the exponential race, or when greedy the
        argmax of the one-hot rows, with the generator advanced as the race would advance it (so the step's other
        draws, and every sample, are the race's): greedy decoding skips the race's arithmetic only."""
        if not self.greedy:
            return self.draw(probs)
        skip_uniform(probs.shape, probs.dtype, probs.device, self.generator)
        return probs.argmax(dim=-1)

    def __call__(self, logits: torch.Tensor) -> torch.LongTensor:
        return self.choose(self.probabilities(logits))

    def confidence_probabilities(self, logits: torch.Tensor, tempered: bool = False) -> torch.Tensor:
        """The model's own distribution, which confidences are read from: the softmax of the logits at temperature
        1, without top-k / top-p, in the sampling dtype (LLaDA's low_confidence, Fast-dLLM); with `tempered`, at
        the sampling temperature (1 when greedy), still unfiltered (SDAR's evaluation decoder)."""
        scores = logits.to(self.dtype, copy=True)
        if tempered and not self.greedy and self.temperature != 1.0:
            scores = scores / self.temperature
        if self.mask_token_id is not None:
            scores[..., self.mask_token_id] = float("-inf")
        return torch.softmax(scores, dim=-1)


# ----------------------------------------------------------------------------------------------------------------
# The state every strategy reads and returns.
# ----------------------------------------------------------------------------------------------------------------

# denoise(rows, tokens, positions, times) -> logits: the network as a strategy sees it.
#   rows:      (R,) indices of the batch rows being denoised
#   tokens:    (R, L) their current tokens
#   positions: (R, k) positions whose logits are needed, or None for all L positions
#   times:     (R,) float64 diffusion times (the network reads them only if it is time-conditioned)
#   returns    (R, k, V) or (R, L, V) logits; the [MASK] logit is ignored (the categorical sampler zeroes it)
# What runs behind it (padding, a KV cache over decoded blocks, counting network calls) is generate()'s business.
Denoiser = Callable[..., torch.Tensor]


@dataclass
class DiffusionState:
    """Where a batch of sequences stands in the reverse process.

    Args:
        tokens (`torch.LongTensor` of shape `(batch, seq_len)`): the current draft; masked positions hold [MASK].
        masked (`torch.BoolTensor` of shape `(batch, seq_len)`): positions still to be generated.
        time (`torch.DoubleTensor` of shape `(batch,)`): each row's diffusion time, 1 = fully noised (with blocks:
            within its current block).
        step (`int`): number of steps taken so far.
        scratch (`dict`, *optional*): strategy-private memory carried from one step to the next.
        generated (`torch.BoolTensor` of shape `(batch, seq_len)`): the positions generate() fills (masked at the
            start): the only ones a remasking strategy may mask again. The prompt never is.
        block (`torch.LongTensor` of shape `(batch, seq_len)`): each position's block for semi-autoregressive
            decoding (all 0 without blocks).
        block_length (`int`, *optional*): the block size; None without blocks.
        model_block_length (`int`, *optional*): a block-diffusion model's own block (`diffusion_block_size`), of
            which decoding blocks are equal or sub-blocks; None for a bidirectional model.
        num_blocks (`int`): the number of blocks (1 without blocks).
        region_start (`int`): where block 0's generated region starts (the prompt length); earlier masked
            positions (infilling) belong to block 0.
        active_block (`torch.LongTensor` of shape `(batch,)`): the block each row decodes now (-1: nothing to do).
        block_step (`torch.LongTensor` of shape `(batch,)`): steps the row has taken in its active block.
        confidence (`torch.DoubleTensor` of shape `(batch, seq_len)`): each generated token's confidence when it was
            unmasked (the probability of the drawn token; NaN where none was recorded).
        pending (`torch.BoolTensor` of shape `(batch,)`): rows with steps left although nothing is masked (a
            remasking strategy runs its whole time grid, as it may still mask tokens again).
    """

    tokens: torch.LongTensor
    masked: torch.BoolTensor
    time: torch.Tensor
    step: int = 0
    scratch: dict | None = None
    generated: torch.BoolTensor | None = None
    block: torch.LongTensor | None = None
    block_length: int | None = None
    model_block_length: int | None = None
    num_blocks: int = 1
    region_start: int = 0
    active_block: torch.LongTensor | None = None
    block_step: torch.LongTensor | None = None
    confidence: torch.Tensor | None = None
    pending: torch.BoolTensor | None = None

    @classmethod
    def start(cls, tokens: torch.LongTensor, masked: torch.BoolTensor, block_length: int | None = None,
              region_start: int = 0, model_block_length: int | None = None) -> "DiffusionState":
        """The state before the first step: every row in the first block that has a masked position."""
        batch, seq_len = tokens.shape
        device = tokens.device
        time = torch.ones(batch, dtype=torch.float64, device=device)
        position = torch.arange(seq_len, device=device)
        if block_length is None:
            block = torch.zeros(batch, seq_len, dtype=torch.long, device=device)
        else:
            block = ((position - region_start).clamp(min=0) // block_length).expand(batch, -1).contiguous()
        state = cls(tokens=tokens.clone(), masked=masked.clone(), time=time, generated=masked.clone(), block=block,
                    block_length=block_length, model_block_length=model_block_length,
                    num_blocks=int(block.max()) + 1, region_start=region_start,
                    active_block=torch.full((batch,), -1, dtype=torch.long, device=device),
                    block_step=torch.zeros(batch, dtype=torch.long, device=device),
                    confidence=torch.full((batch, seq_len), float("nan"), dtype=torch.float64, device=device),
                    pending=torch.zeros(batch, dtype=torch.bool, device=device))
        return enter_blocks(state)

    @property
    def done(self) -> bool:
        return not bool(self.masked.any() or (self.pending is not None and self.pending.any()))

    def block_bounds(self, block: int) -> tuple[int, int]:
        """[start, end) of a block (block 0 also holds any masked position before the generated region)."""
        if self.block_length is None:
            return 0, self.tokens.shape[1]
        start = 0 if block == 0 else self.region_start + block * self.block_length
        return start, min(self.region_start + (block + 1) * self.block_length, self.tokens.shape[1])

    def windows(self, rows: torch.LongTensor) -> torch.LongTensor:
        """(R, 2): per row, the [start, end) of its active block (block 0 starting at the generated region, or at an
        earlier position being infilled). Outside it nothing changes until the row moves on: a denoiser may reuse
        what it computed there (a KV cache)."""
        blocks = self.active_block[rows]
        starts = self.region_start + blocks * self.block_length
        ends = (self.region_start + (blocks + 1) * self.block_length).clamp(max=self.tokens.shape[1])
        infilled = self.generated[rows] & (self.block[rows] == 0) & (blocks[:, None] == 0)  # decoded or not
        first = torch.where(infilled, torch.arange(self.tokens.shape[1], device=rows.device), self.tokens.shape[1])
        return torch.stack([torch.minimum(starts, first.amin(dim=1)), ends], dim=1)


def enter_blocks(state: DiffusionState, hold: torch.BoolTensor | None = None) -> DiffusionState:
    """Moves each row whose active block has no [MASK] left to its next block with one (resetting its block step and
    time), unless `hold` says the row stays (a remasking strategy finishing its block's time grid). generate() calls
    it between steps, so a strategy always finds each row in the block it must decode."""
    far = torch.iinfo(torch.long).max
    next_block = torch.where(state.masked, state.block, far).amin(dim=1)
    entered = state.masked.any(dim=1) & (next_block != state.active_block)
    if hold is not None:
        entered &= ~hold
    if not bool(entered.any()):
        return state
    active = torch.where(entered, next_block, state.active_block)
    block_step = torch.where(entered, 0, state.block_step)
    time = torch.where(entered, torch.ones_like(state.time), state.time)
    return replace(state, active_block=active, block_step=block_step, time=time)


def candidates(state: DiffusionState) -> torch.BoolTensor:
    """(batch, seq_len): the masked positions of each row's active block, the only ones a step may unmask."""
    return state.masked & (state.block == state.active_block[:, None])


def block_budget(state: DiffusionState, steps: int) -> torch.LongTensor:
    """(batch,) network calls each row may spend on its active block: `steps` split evenly across the blocks, the
    remainder to the first ones (LLaDA's generate.py requires steps % num_blocks == 0; this does not)."""
    if state.block_length is None:
        return torch.full_like(state.active_block, steps)
    if steps < state.num_blocks:
        raise ValueError(f"steps={steps} is fewer than the {state.num_blocks} blocks of block_length="
                         f"{state.block_length}: every block needs at least one network call.")
    per_block, extra = divmod(steps, state.num_blocks)
    return per_block + (state.active_block < extra).long()


def count_per_row(num_candidates: torch.LongTensor, state: DiffusionState, rows, tokens_per_step=None, steps=None):
    """(R,) positions each row unmasks this call: `tokens_per_step`, or the row's candidates spread evenly over the
    calls its block has left (ceil(n / calls left); with 10 positions and 4 calls: 3, 3, 2, 2), else one."""
    if tokens_per_step is not None:
        return num_candidates.clamp(max=tokens_per_step)
    if steps is None:
        return num_candidates.clamp(max=1)
    calls_left = (block_budget(state, steps)[rows] - state.block_step[rows]).clamp(min=1)
    return torch.div(num_candidates + calls_left - 1, calls_left, rounding_mode="floor")


def candidate_positions(mask: torch.BoolTensor) -> tuple[torch.LongTensor, torch.BoolTensor]:
    """(R, L) candidate mask -> their positions (R, c_max), in order, and which entries are real."""
    counts = mask.sum(dim=1)
    c_max = max(int(counts.max()), 1)
    positions = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices[:, :c_max]
    valid = torch.arange(c_max, device=mask.device)[None, :] < counts[:, None]
    return positions, valid


def uniformly_chosen_positions(masked: torch.BoolTensor, count: torch.LongTensor, generator) -> tuple:
    """Per row, `count` positions drawn uniformly without replacement among the masked ones.

    Returns `positions` (R, k_max) and `valid` (R, k_max), True for the first `count[r]` entries of row r.
    """
    scores = uniform(masked.shape, torch.float64, masked.device, generator).masked_fill(~masked, -1.0)
    k_max = int(count.max())
    positions = scores.topk(k_max, dim=-1).indices
    valid = torch.arange(k_max, device=masked.device)[None, :] < count[:, None]
    return positions, valid


def commit(state: DiffusionState, rows, positions, valid, sampled, confidence=None, **updates) -> DiffusionState:
    """The state after writing `sampled` at the `valid` entries of `positions` of `rows` (each step's last act)."""
    tokens, still_masked = state.tokens.clone(), state.masked.clone()
    row_index = rows[:, None].expand_as(positions)
    tokens[row_index, positions] = torch.where(valid, sampled, tokens[row_index, positions])
    still_masked[row_index, positions] = still_masked[row_index, positions] & ~valid
    recorded = state.confidence
    if confidence is not None:
        recorded = recorded.clone()
        current = recorded[row_index, positions]
        recorded[row_index, positions] = torch.where(valid, confidence.to(recorded.dtype), current)
    block_step = state.block_step.clone()
    block_step[rows] += 1
    return replace(state, tokens=tokens, masked=still_masked, step=state.step + 1, block_step=block_step,
                   confidence=recorded, **updates)


# ----------------------------------------------------------------------------------------------------------------
# The strategy contract and its registry.
# ----------------------------------------------------------------------------------------------------------------


def check_count(name: str, value, minimum: int = 1) -> None:
    """An optional integer setting: None, or an int >= minimum."""
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < minimum):
        raise ValueError(f"{name} must be an integer >= {minimum} (or None), got {value!r}.")


def check_threshold(name: str, value, allow_one: bool = False, optional: bool = False) -> None:
    """A probability threshold: a number in (0, 1), or in (0, 1] with `allow_one`; None too when `optional`."""
    if value is None and optional:
        return
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number or not 0 < value <= 1 or (value == 1 and not allow_one):
        interval = "(0, 1]" if allow_one else "(0, 1)"
        raise ValueError(f"{name} must be a number in {interval}{' (or None)' if optional else ''}, got {value!r}.")


@dataclass
class StrategySettings:
    """The settings of a decoding strategy: a dataclass whose fields are `generate()` keywords, validated when it is
    made (`validate` raises ValueError naming the field and the allowed values) and saved in generation_config.json
    as `sampler_config`. A strategy without settings uses this empty one."""

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        pass

    def to_dict(self) -> dict:
        return {field.name: getattr(self, field.name) for field in fields(self)}


class Draws(NamedTuple):
    """What `DecodingStrategy.draw_in_blocks` gives a step: the state (with its time), the busy rows, their candidate
    positions (R, c) and which are real, the logits (R, c, V), the sampling distribution and the drawn tokens."""

    state: DiffusionState
    rows: torch.LongTensor
    positions: torch.LongTensor
    valid: torch.BoolTensor
    logits: torch.Tensor
    probs: torch.Tensor
    sampled: torch.LongTensor


class DecodingStrategy:
    """One way of running the reverse process, behind one contract:

        state = strategy.step(state, denoise)

    `state` is a `DiffusionState` (tokens, which positions are masked, per-row time and block), `denoise(rows,
    tokens, positions, times) -> logits` the network (see `Denoiser`). A step calls `denoise` once, draws tokens with
    `self.categorical` (the one categorical sampler, in `sampling_dtype`) and returns the new state; it never sees
    the model, the padding or the KV cache. Rows with nothing masked are left alone.

    A strategy is registered under its name with `@register_strategy(name)`; `generate(sampler=name, **settings)`
    then builds it. Class attributes:
        Settings: its settings dataclass (a `StrategySettings` subclass); `self.settings` holds the instance.
        supports_blocks: whether it decodes semi-autoregressive blocks (`block_length`): it must then unmask only
            `candidates(state)`, the masked positions of each row's active block.
        time_agnostic_only: whether it reuses network outputs across times, which only a model without time input
            allows.
    Attributes set at construction: `settings`, `schedule` (the model's noise schedule), `categorical`,
    `mask_token_id`, `time_conditioned` (whether the network reads the time: a strategy may skip computing times
    it would ignore).
    """

    name: str = ""
    Settings: type = StrategySettings
    supports_blocks: bool = False
    time_agnostic_only: bool = False

    def __init__(self, settings: StrategySettings | None = None, *, schedule: NoiseSchedule | None = None,
                 categorical: CategoricalSampler | None = None, mask_token_id: int | None = None,
                 time_conditioned: bool = True, **fields):
        if settings is not None and fields:
            raise ValueError(f"{type(self).__name__}: pass settings or their fields ({sorted(fields)}), not both.")
        self.settings = settings if settings is not None else self.Settings(**fields)
        if not isinstance(self.settings, self.Settings):
            raise TypeError(f"{type(self).__name__} takes {self.Settings.__name__} settings, got "
                            f"{type(self.settings).__name__}.")
        self.schedule = schedule if schedule is not None else LinearSchedule()
        self.mask_token_id = mask_token_id
        self.time_conditioned = time_conditioned
        self.categorical = categorical if categorical is not None else CategoricalSampler(mask_token_id=mask_token_id)

    def step(self, state: DiffusionState, denoise: Denoiser) -> DiffusionState:
        raise NotImplementedError

    def draw_in_blocks(self, state: DiffusionState, denoise: Denoiser) -> "Draws":
        """The first half of a confidence-style step: one call at the masked positions of each busy row's active
        block, and a token drawn at each from the categorical sampler."""
        rows = state.masked.any(dim=1).nonzero().squeeze(1)
        in_block = candidates(state)[rows]
        positions, valid = candidate_positions(in_block)
        state = self.expected_time(state, rows, in_block)
        logits = denoise(rows, state.tokens[rows], positions, state.time[rows])
        probs = self.categorical.probabilities(logits)
        return Draws(state, rows, positions, valid, logits, probs, self.categorical.choose(probs))

    def expected_time(self, state: DiffusionState, rows, in_block: torch.BoolTensor) -> DiffusionState:
        """For a strategy that unmasks by counts rather than times: tells a time-conditioned network the time at
        which its block's masked fraction is expected (a time-agnostic one reads no time)."""
        if not self.time_conditioned:
            return state
        block = state.generated[rows] & (state.block[rows] == state.active_block[rows, None])
        fraction = in_block.sum(dim=1).double() / block.sum(dim=1).clamp(min=1).double()
        time = state.time.clone()
        time[rows] = self.schedule.inverse(1 - fraction).clamp(0.0, 1.0)
        return replace(state, time=time)

    def step_limit(self, state: DiffusionState) -> int:
        """An upper bound on the steps to the end (generate() stops with an error past it): by default one position
        unmasked per step at least."""
        return int(state.masked.sum(dim=1).max())

    def holds_block(self, state: DiffusionState) -> torch.BoolTensor | None:
        """Rows that stay in their active block although nothing in it is masked (None: none)."""
        return None

    @classmethod
    def describe(cls, settings: StrategySettings) -> str:
        """A short name for tables and plots: the strategy's name and the settings that differ from their defaults."""
        changed = [f"{field.name}={getattr(settings, field.name)}" for field in fields(settings)
                   if getattr(settings, field.name) != field.default]
        return " ".join([cls.name] + changed)


STRATEGIES: dict[str, type[DecodingStrategy]] = {}


def register_strategy(name: str):
    """Class decorator: makes a `DecodingStrategy` subclass available as `generate(sampler=name)`, with its
    `Settings` fields as `generate()` keywords, `hf-mdm generate` flags and `hf-mdm evaluate --setting` fields.

    Refuses a name already taken and a class that is not a `DecodingStrategy` with its own `step`."""

    def register(cls):
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"register_strategy: the name must be an identifier (letters, digits, _), got {name!r}.")
        if name in STRATEGIES:
            raise ValueError(f"register_strategy: a decoding strategy named {name!r} is already registered "
                             f"({STRATEGIES[name].__module__}.{STRATEGIES[name].__qualname__}); choose another name.")
        if not isinstance(cls, type) or not issubclass(cls, DecodingStrategy):
            raise TypeError(f"register_strategy({name!r}): {cls!r} must subclass DecodingStrategy.")
        if not callable(getattr(cls, "step", None)) or cls.step is DecodingStrategy.step:
            raise TypeError(f"register_strategy({name!r}): {cls.__name__} must define step(self, state, denoise).")
        if not (isinstance(cls.Settings, type) and issubclass(cls.Settings, StrategySettings) and is_dataclass(cls.Settings)):
            raise TypeError(f"register_strategy({name!r}): {cls.__name__}.Settings must be a StrategySettings dataclass.")
        cls.name = name
        STRATEGIES[name] = cls
        return cls

    return register


def get_strategy(name: str) -> type[DecodingStrategy]:
    if name not in STRATEGIES:
        raise ValueError(f"sampler must be one of {tuple(STRATEGIES)} (registered decoding strategies), got {name!r}.")
    return STRATEGIES[name]


def setting_names(name: str) -> tuple[str, ...]:
    """The settings fields of the strategy registered as `name`."""
    return tuple(field.name for field in fields(get_strategy(name).Settings))


# ----------------------------------------------------------------------------------------------------------------
# Strategies: first-hitting, confidence-ordered, ancestral, ancestral with output reuse, ReMDM.
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class FirstHittingSettings(StrategySettings):
    """tokens_per_step: positions unmasked per network call (1, the default, is exact; more is parallel decoding).
    steps: a budget of network calls instead (k = ceil(n / calls left) per row)."""

    tokens_per_step: int | None = None
    steps: int | None = None

    def validate(self):
        check_count("tokens_per_step", self.tokens_per_step)
        check_count("steps", self.steps)
        if self.tokens_per_step is not None and self.steps is not None:
            raise ValueError("first_hitting takes either tokens_per_step or steps (a budget of network calls), not both.")


@register_strategy("first_hitting")
class FirstHittingSampler(DecodingStrategy):
    """First-hitting sampler (FHS, arXiv:2409.02908 section 4; docs/concepts/first-hitting.md).

    With `tokens_per_step = 1` (the default) it is exact: each step draws the next unmasking time of every row
    (tau <- alpha^{-1}(1 - u^(1/n)(1 - alpha_tau)), in float64), unmasks one uniformly chosen masked position,
    and samples its token from the network at the new time. One network call and one categorical over V per
    generated token; logits are computed at the chosen position only. Rows keep their own tau and n.

    With `tokens_per_step = k > 1`, or a `steps` budget (k = ceil(n / steps left) per row), k positions are
    unmasked per call, each sampled independently from the same output, and tau advances through k
    first-hitting draws. This parallel decoding is an APPROXIMATION: it ignores the dependence between the k
    tokens unmasked together.

    With blocks (`DiffusionState.block_length`), each row decodes its blocks left to right, the first-hitting
    process running within the active block (time restarting at 1, n = the block's masked positions), and
    `steps` is the budget of the whole sequence, split across blocks. With k = 1 this samples EXACTLY the
    block-factorised process p(block_1) p(block_2 | block_1) ..., each factor the MDM's reverse process with the
    later blocks fully masked, which is not the MDM's joint distribution.
    """

    Settings = FirstHittingSettings
    supports_blocks = True

    @classmethod
    def describe(cls, settings):
        return f"FHS {settings.steps} calls" if settings.steps else f"FHS k={settings.tokens_per_step or 1}"

    def step(self, state: DiffusionState, denoise: Denoiser) -> DiffusionState:
        tokens_per_step, steps = self.settings.tokens_per_step, self.settings.steps
        if tokens_per_step is None and steps is None:
            tokens_per_step = 1
        generator = self.categorical.generator
        rows = state.masked.any(dim=1).nonzero().squeeze(1)
        masked = candidates(state)[rows]
        num_masked = masked.sum(dim=1)
        count = count_per_row(num_masked, state, rows, tokens_per_step, steps)

        # Next unmasking times, drawn from the top down: the order statistics of i.i.d. uniforms (eq. 4.1).
        time = state.time[rows]
        network_time = None
        for j in range(int(count.max())):
            u = uniform(time.shape, torch.float64, time.device, generator)
            hit = self.schedule.first_hitting_time(time, (num_masked - j).clamp(min=1).double(), u)
            time = torch.where(j < count, hit, time)
            if network_time is None:
                network_time = time  # the network predicts at the time of the first unmasking of this step

        positions, valid = uniformly_chosen_positions(masked, count, generator)
        sampled = self.categorical(denoise(rows, state.tokens[rows], positions, network_time))
        new_time = state.time.clone()
        new_time[rows] = time
        return commit(state, rows, positions, valid, sampled, time=new_time)


def entropies(probs: torch.Tensor) -> torch.Tensor:
    """(..., V) probabilities -> (...) Shannon entropies in nats, with 0 log 0 = 0."""
    return -torch.where(probs > 0, probs * probs.clamp(min=torch.finfo(probs.dtype).tiny).log(), 0.0).sum(-1)


def ranks(scores: torch.Tensor) -> torch.Tensor:
    """(R, c) -> (R, c): 0 for each row's highest score, 1 for the next, ... (ties in position order)."""
    return scores.argsort(dim=1, descending=True, stable=True).argsort(dim=1)


def above_threshold_or_most_confident(confidence: torch.Tensor, candidates: torch.BoolTensor, count: torch.LongTensor,
                                      threshold: float) -> torch.BoolTensor:
    """(R, c): the candidates whose confidence exceeds `threshold` if they are at least `count` (per row), else the
    `count` most confident (SDAR's low_confidence_dynamic, LLaDA 2.x's mask-to-token rule)."""
    sure = candidates & (confidence > threshold)
    most_confident = candidates & (ranks(confidence.masked_fill(~candidates, float("-inf"))) < count[:, None])
    return torch.where((sure.sum(dim=1) >= count)[:, None], sure, most_confident)


def confidence_scores(order: str, probs: torch.Tensor, sampled: torch.LongTensor) -> torch.Tensor:
    """How sure the model is at each position, higher = surer (probs: (..., V) in the sampling dtype):

    - "confidence": the probability of the drawn token (LLaDA's low_confidence remasking, Dream's maskgit_plus);
    - "margin": top-1 minus top-2 probability (Dream's topk_margin);
    - "entropy": the negative entropy sum_v p_v log p_v (Dream's entropy), with 0 log 0 = 0.
    """
    if order == "confidence":
        return probs.gather(-1, sampled[..., None])[..., 0]
    if order == "margin":
        top = probs.topk(2, dim=-1).values
        return top[..., 0] - top[..., 1]
    if order == "entropy":
        return -entropies(probs)
    raise ValueError(f"order must be one of {CONFIDENCE_ORDERS}, got {order!r}.")


CONFIDENCE_ORDERS = ("confidence", "margin", "entropy")


@dataclass
class ConfidenceSettings(StrategySettings):
    """order: how a draw is scored, "confidence" (probability of the drawn token, LLaDA's low_confidence), "margin"
    (top-1 minus top-2, Dream's topk_margin) or "entropy" (negative entropy, Dream's entropy).
    How many positions a call unmasks: tokens_per_step, a budget of `steps` calls, or every draw whose score reaches
    confidence_threshold (and at least the most confident one: Fast-dLLM); one per call by default."""

    order: str = "confidence"
    tokens_per_step: int | None = None
    steps: int | None = None
    confidence_threshold: float | None = None

    def validate(self):
        if self.order not in CONFIDENCE_ORDERS:
            raise ValueError(f"order must be one of {CONFIDENCE_ORDERS}, got {self.order!r}.")
        check_count("tokens_per_step", self.tokens_per_step)
        check_count("steps", self.steps)
        if self.tokens_per_step is not None and self.steps is not None:
            raise ValueError("confidence takes either tokens_per_step or steps (a budget of network calls), not both.")
        check_threshold("confidence_threshold", self.confidence_threshold, optional=True)
        if self.confidence_threshold is not None:
            if self.tokens_per_step is not None or self.steps is not None:
                raise ValueError("confidence_threshold decides how many positions each call unmasks: do not also "
                                 "set tokens_per_step or steps.")


@register_strategy("confidence")
class ConfidenceSampler(DecodingStrategy):
    """Confidence-ordered unmasking (LLaDA's low_confidence remasking, Dream's maskgit_plus / topk_margin / entropy,
    Fast-dLLM's threshold decoding). An APPROXIMATION of the MDM's reverse process, biased towards likely tokens.

    Each step runs the network at every candidate position (the masked positions of the row's active block, or of
    the whole sequence without blocks), draws a token at each from the categorical sampler (in `sampling_dtype`,
    with its temperature and top-k / top-p), scores each draw with `order` (`confidence_scores`) under the model's
    own distribution (the softmax of the logits at temperature 1, unfiltered, in `sampling_dtype`: what LLaDA's
    low_confidence and Fast-dLLM score; Dream's code scores its tempered, filtered one) and keeps per row:
        - the `count` most confident (`tokens_per_step`, or the block's candidates spread over its `steps` budget,
          else one per call), or
        - with `confidence_threshold`, every draw whose score reaches it, and at least the most confident one.
    The others stay masked and are drawn again next step. Rows are independent: each has its own count.
    A time-conditioned network is told the time at which its block's masked fraction is expected.
    """

    Settings = ConfidenceSettings
    supports_blocks = True

    @classmethod
    def describe(cls, settings):
        if settings.confidence_threshold is not None:
            return f"{settings.order} thr {settings.confidence_threshold:g}"
        how = f"{settings.steps} calls" if settings.steps else f"k={settings.tokens_per_step or 1}"
        return f"{settings.order} {how}"

    def step(self, state: DiffusionState, denoise: Denoiser) -> DiffusionState:
        settings = self.settings
        tokens_per_step = settings.tokens_per_step
        if tokens_per_step is None and settings.steps is None and settings.confidence_threshold is None:
            tokens_per_step = 1
        state, rows, positions, valid, logits, probs, sampled = self.draw_in_blocks(state, denoise)
        scores = confidence_scores(settings.order, self.categorical.confidence_probabilities(logits), sampled)
        scores = scores.masked_fill(~valid, float("-inf"))
        if settings.confidence_threshold is not None:
            chosen = valid & (scores >= settings.confidence_threshold)
            chosen.scatter_(1, scores.argmax(dim=1, keepdim=True), True)  # at least one per row and call
        else:
            count = count_per_row(valid.sum(dim=1), state, rows, tokens_per_step, settings.steps)
            chosen = valid & (ranks(scores) < count[:, None])
        probability = probs.gather(-1, sampled[..., None])[..., 0]
        return commit(state, rows, positions, chosen, sampled, confidence=probability)


DREAM_ALGS = ("origin", "maskgit_plus", "topk_margin", "entropy")


def dream_filtered_logits(logits: torch.Tensor, temperature: float, top_p: float, top_k: int) -> torch.Tensor:
    """Dream's `sample_tokens` filters, in the logits' dtype: divided by the temperature (when > 0), then nucleus
    (when top_p < 1: an entry goes when the probability ranked above it exceeds top_p; the best one stays), then
    top-k (entries below the k-th largest value); what is filtered gets finfo.min. They apply at temperature 0
    too: the argmax is unchanged, but the scores, hence the order, come from the filtered distribution."""
    if temperature > 0:
        logits = logits / temperature
    floor = torch.finfo(logits.dtype).min
    if top_p < 1:
        ordered, order = torch.sort(logits, dim=-1, descending=True)
        running = torch.cumsum(torch.softmax(ordered, dim=-1), dim=-1)
        above = torch.cat([torch.zeros_like(running[..., :1]), running[..., :-1]], dim=-1)
        drop = (above > top_p).scatter(-1, torch.zeros_like(order[..., :1]), False)
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), floor)
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, floor)
    return logits


def dream_scores(alg: str, probs: torch.Tensor, tokens: torch.LongTensor) -> torch.Tensor:
    """Dream's confidence of each position (higher = surer), from its filtered distribution `probs` (..., V):
    maskgit_plus the probability of the chosen token, topk_margin top-1 minus top-2, entropy sum p log(p + 1e-10)."""
    if alg == "topk_margin":
        top = probs.topk(2, dim=-1).values
        return top[..., 0] - top[..., 1]
    if alg == "entropy":
        return (probs * torch.log(probs + 1e-10)).sum(-1)
    return probs.gather(-1, tokens[..., None])[..., 0]


def on_canvas(row_scores, row_positions, row_valid, length: int):
    """One row's candidate scores laid on its whole canvas (-inf elsewhere), as Dream ranks them: torch.topk over the
    same extent breaks equal scores the same way. Returns the canvas and, per canvas position, its candidate index."""
    canvas = torch.full((length,), -torch.inf, dtype=row_scores.dtype, device=row_scores.device)
    canvas[row_positions[row_valid]] = row_scores[row_valid]
    lookup = torch.full((length,), -1, dtype=torch.long, device=row_scores.device)
    lookup[row_positions[row_valid]] = torch.nonzero(row_valid).squeeze(1)
    return canvas, lookup


@dataclass
class DreamSettings(StrategySettings):
    """alg: "maskgit_plus" (probability of the token), "topk_margin", "entropy" (Dream's recommended), or "origin"
    (Dream's default: each masked position revealed with probability 1 - s/t, at random). steps: network calls
    (default: one per generated position). eps: where Dream's time grid ends. alg_temp: Dream's randomised choice
    of positions, from softmax(score / alg_temp) (None or 0: the best ones). confidence_threshold: Fast-dLLM's
    capped threshold rule for Dream instead of Dream's counts (maskgit_plus scores)."""

    alg: str = "maskgit_plus"
    steps: int | None = None
    eps: float = 1e-3
    alg_temp: float | None = None
    confidence_threshold: float | None = None

    def validate(self):
        if self.alg not in DREAM_ALGS:
            raise ValueError(f"alg must be one of {DREAM_ALGS}, got {self.alg!r}.")
        check_count("steps", self.steps)
        if not isinstance(self.eps, (int, float)) or isinstance(self.eps, bool) or not 0 <= self.eps < 1:
            raise ValueError(f"eps must be a number in [0, 1), got {self.eps!r}.")
        if self.alg_temp is not None and (not isinstance(self.alg_temp, (int, float)) or isinstance(self.alg_temp, bool)
                                          or self.alg_temp < 0):
            raise ValueError(f"alg_temp must be a number >= 0 (or None), got {self.alg_temp!r}.")
        check_threshold("confidence_threshold", self.confidence_threshold, optional=True)
        if self.confidence_threshold is not None:
            if self.alg != "maskgit_plus":
                raise ValueError(f"confidence_threshold is Fast-dLLM's rule on maskgit_plus scores: alg must be "
                                 f"'maskgit_plus', got {self.alg!r}.")


@register_strategy("dream")
class DreamSampler(DecodingStrategy):
    """Dream's own decoding (Dream-org/Dream-v0 `generation_utils.py`, `diffusion_generate` / `_sample`), as Dream's
    code does it. An APPROXIMATION of the MDM's reverse process.

    Each row runs `steps` calls on Dream's time grid `linspace(1, eps, steps + 1)` (float32), call i from t to s:
        1. every masked position of the row (of its active block, with blocks) is scored from Dream's filtered
           distribution (`dream_filtered_logits`: temperature, top-p, top-k, in the logits' dtype) by `alg`;
           its token is the argmax (temperature 0) or a draw by the shared categorical sampler (in sampling_dtype);
        2. "origin": each masked position is revealed with probability 1 - s/t (one torch.rand over the row's masked
           positions, as Dream draws them; every one on the last call); the others: the row's k = int(n (1 - s/t))
           best-scored positions (n its masked count; all of them on the last call) are revealed, chosen by
           torch.topk over the whole row, or with `alg_temp` > 0 by torch.multinomial on softmax(score / alg_temp),
           without replacement, as Dream chooses them.
    With `confidence_threshold` (Fast-dLLM's rule for Dream): each call takes the row's top quota + carry positions
    by maskgit_plus score (quota = n / steps), keeps the best one always and the others whose score reaches the
    threshold, and carries the dropped ones over; when the last call drops some, one more call follows.

    Where it differs from Dream's code, on purpose: rows are independent (Dream counts n as the batch's mean), and
    tokens at temperature > 0 are drawn by the shared categorical sampler (float64 by default), not from
    torch.distributions.Categorical in the logits' dtype, so seeded samples at temperature > 0 differ from Dream's
    (greedy decoding, the order of positions and origin's reveals are Dream's exactly).
    """

    Settings = DreamSettings
    supports_blocks = True

    @classmethod
    def describe(cls, settings):
        how = f"thr {settings.confidence_threshold:g}" if settings.confidence_threshold is not None else (
            f"{settings.steps} calls" if settings.steps else "L calls")
        return f"Dream {settings.alg} {how}"

    def total_steps(self, state: DiffusionState) -> int:
        return self.settings.steps or max(int(state.generated.sum(dim=1).max()), 1)

    def step_limit(self, state: DiffusionState) -> int:
        if self.settings.confidence_threshold is not None:
            return int(state.masked.sum(dim=1).max()) + state.num_blocks  # at least one a call, one extra a block
        steps = self.total_steps(state)
        if state.block_length is None:
            return steps
        per_block, extra = divmod(steps, state.num_blocks)
        return sum(max(per_block + (block < extra), 1) for block in range(state.num_blocks))

    def step(self, state: DiffusionState, denoise: Denoiser) -> DiffusionState:
        settings, categorical = self.settings, self.categorical
        rows = state.masked.any(dim=1).nonzero().squeeze(1)
        in_block = candidates(state)[rows]
        positions, valid = candidate_positions(in_block)
        logits = denoise(rows, state.tokens[rows], positions, state.time[rows])
        probs = torch.softmax(dream_filtered_logits(logits, *self.filters()), dim=-1)
        greedy_probs, tokens = probs.max(dim=-1)
        if not categorical.greedy:
            tokens = categorical.choose(categorical.probabilities(logits))
        scores = dream_scores(settings.alg, probs, tokens).masked_fill(~valid, -torch.inf)
        if settings.confidence_threshold is not None:
            chosen, scratch = self.threshold_choice(state, rows, positions, scores, valid)
            return commit(state, rows, positions, chosen, tokens, scratch=scratch)
        steps = self.total_steps(state)
        budget = block_budget(state, steps)[rows]
        call = state.block_step[rows]
        grid = torch.linspace(1, settings.eps, int(budget.max()) + 1, device=state.tokens.device)
        last = call + 1 >= budget
        chosen = torch.zeros_like(valid)
        for r in range(len(rows)):  # rows are independent; Dream's batch is the rows decoded alike
            row_grid = grid if int(budget[r]) == len(grid) - 1 else torch.linspace(1, settings.eps, int(budget[r]) + 1,
                                                                                      device=grid.device)
            t, s = row_grid[int(call[r])], row_grid[int(call[r]) + 1]
            n = int(valid[r].sum())
            if settings.alg == "origin":
                reveal = 1.0 if bool(last[r]) else 1 - s / t
                draws = torch.rand(n, device=state.tokens.device, generator=categorical.generator)
                chosen[r, :n] = draws < reveal
                continue
            k = n if bool(last[r]) else int(torch.tensor(float(n)) * (1 - s / t))
            if k == 0:
                continue
            canvas, lookup = on_canvas(scores[r], positions[r], valid[r], state.tokens.shape[1])
            if settings.alg_temp:
                weights = torch.softmax(canvas / settings.alg_temp, dim=-1)
                picked = torch.multinomial(weights, k, replacement=False, generator=categorical.generator)
            else:
                picked = torch.topk(canvas, k).indices
            chosen[r, lookup[picked]] = True
        return commit(state, rows, positions, chosen, tokens)

    def filters(self) -> tuple[float, float, int]:
        """The categorical sampler's temperature, top-p and top-k (generate()'s), for Dream's filtered scores."""
        categorical = self.categorical
        return categorical.temperature, categorical.top_p, categorical.top_k

    def threshold_choice(self, state, rows, positions, scores, valid):
        """Fast-dLLM's capped threshold rule: per row, the top quota + carry by score, the best always kept."""
        scratch = dict(state.scratch or {})
        carry = scratch.get("carry", torch.zeros(state.tokens.shape[0], dtype=torch.long, device=scores.device))
        quota = scratch.get("quota")
        if quota is None:
            steps = self.total_steps(state)
            quota = torch.div(state.generated.sum(dim=1), steps, rounding_mode="floor").clamp(min=1)
        carry, quota = carry.clone(), quota.clone()
        chosen = torch.zeros_like(valid)
        for r, row in enumerate(rows.tolist()):
            n = int(valid[r].sum())
            budget = min(int(quota[row]) + int(carry[row]), n)
            canvas, lookup = on_canvas(scores[r], positions[r], valid[r], state.tokens.shape[1])
            values, order = torch.topk(canvas, budget)
            keep = values >= self.settings.confidence_threshold
            keep[0] = True
            chosen[r, lookup[order[keep]]] = True
            carry[row] = int((~keep).sum())
            if n - int(keep.sum()) > 0 and int(state.block_step[row]) + 1 >= self.total_steps(state):
                quota[row] = 0  # the calls after the schedule take only what was carried over
        scratch.update(carry=carry, quota=quota)
        return chosen, scratch


NOISE_REMOVAL_MODES = ("mdlm", "last_step_argmax")
# MDLM's `Diffusion._sample(eps=1e-5)`: its time grid ends here, and noise removal runs the network at this time.
MDLM_NOISE_REMOVAL_TIME = 1e-5


SDAR_REMASKING = ("low_confidence_dynamic", "low_confidence_static", "sequential", "entropy_bounded")


@dataclass
class SdarSettings(StrategySettings):
    """SDAR's block decoding (JetAstra/SDAR generate.py, its OpenCompass decoder, JetEngine, lmdeploy):
    denoising_steps calls planned per block, step s of a block of B positions committing at least n_s of them
    (B // steps, one more in the first B % steps steps); remasking_strategy picks which:
        "low_confidence_dynamic": every draw whose confidence exceeds confidence_threshold if those are at least
            n_s, else the n_s most confident (SDAR's default, threshold 0.9);
        "low_confidence_static": the n_s most confident;
        "sequential": the first n_s masked positions, left to right;
        "entropy_bounded": the lowest-entropy positions while their entropies sum below entropy_bound (at least one;
            JetEngine's rule)."""

    remasking_strategy: str = "low_confidence_dynamic"
    denoising_steps: int = 4
    confidence_threshold: float = 0.9
    entropy_bound: float = 0.35

    def validate(self):
        if self.remasking_strategy not in SDAR_REMASKING:
            raise ValueError(f"remasking_strategy must be one of {SDAR_REMASKING}, got {self.remasking_strategy!r}.")
        check_count("denoising_steps", self.denoising_steps)
        check_threshold("confidence_threshold", self.confidence_threshold, allow_one=True)
        if not isinstance(self.entropy_bound, (int, float)) or isinstance(self.entropy_bound, bool) \
                or not self.entropy_bound > 0:
            raise ValueError(f"entropy_bound must be a positive number, got {self.entropy_bound!r}.")


@register_strategy("sdar")
class SdarSampler(DecodingStrategy):
    """SDAR's (and TraDo's) decoding inside each block: an APPROXIMATION of the block's reverse process that commits
    several confident tokens per call.

    Each step draws a token at every masked position of the row's active block from the categorical sampler (its
    temperature, top-k / top-p, in `sampling_dtype`; temperature 0 is SDAR's reported greedy decoding), scores each
    draw by its probability under the tempered, unfiltered distribution (SDAR's evaluation decoder; at
    temperature 0 the plain softmax), and commits the positions `remasking_strategy` picks. The step's quota n_s
    counts the block's B positions, a prompt's tail in the block included, as SDAR does, and is capped at the
    positions still masked (SDAR's own loop would overwrite prompt tokens there).
    """

    Settings = SdarSettings
    supports_blocks = True

    @classmethod
    def describe(cls, settings):
        rule = settings.remasking_strategy
        how = {"low_confidence_dynamic": f"thr {settings.confidence_threshold:g}",
               "entropy_bounded": f"eb {settings.entropy_bound:g}"}.get(rule, rule.split("_")[-1])
        return f"sdar {settings.denoising_steps} steps {how}"

    def quota(self, state: DiffusionState, rows) -> torch.LongTensor:
        """(R,) n_s: the block's positions spread over the planned steps, the remainder to the first ones."""
        block_length = state.block_length if state.block_length is not None else state.tokens.shape[1]
        per_step, extra = divmod(block_length, self.settings.denoising_steps)
        return (per_step + (state.block_step[rows] < extra).long()).clamp(min=1)

    def step(self, state: DiffusionState, denoise: Denoiser) -> DiffusionState:
        settings = self.settings
        state, rows, positions, valid, logits, probs, sampled = self.draw_in_blocks(state, denoise)
        count = torch.minimum(self.quota(state, rows), valid.sum(dim=1))
        if settings.remasking_strategy == "sequential":
            chosen = valid & (torch.arange(valid.shape[1], device=valid.device)[None] < count[:, None])
        elif settings.remasking_strategy == "entropy_bounded":
            spread = entropies(self.categorical.confidence_probabilities(logits, tempered=True)
                               if self.categorical.greedy else probs).masked_fill(~valid, float("inf"))
            order = ranks(-spread)
            sorted_spread = spread.sort(dim=1).values
            within = (sorted_spread.cumsum(dim=1) < settings.entropy_bound).sum(dim=1).clamp(min=1)
            chosen = valid & (order < within[:, None])
        else:
            confidence = self.categorical.confidence_probabilities(logits, tempered=True).gather(
                -1, sampled[..., None])[..., 0]
            threshold = settings.confidence_threshold if settings.remasking_strategy == "low_confidence_dynamic" \
                else float("inf")  # static: never above it, so the `count` most confident
            chosen = above_threshold_or_most_confident(confidence, valid, count, threshold)
        probability = probs.gather(-1, sampled[..., None])[..., 0]
        return commit(state, rows, positions, chosen, sampled, confidence=probability)


@dataclass
class FastDllmV2Settings(StrategySettings):
    """Fast-dLLM v2's decoding: confidence_threshold in (0, 1] (0.9 in its evaluation; 1 commits one token per
    call); sub-blocks are `block_length` (8 in blocks of 32)."""

    confidence_threshold: float = 0.9

    def validate(self):
        check_threshold("confidence_threshold", self.confidence_threshold, allow_one=True)


@register_strategy("fast_dllm_v2")
class FastDllmV2Sampler(DecodingStrategy):
    """Fast-dLLM v2's decoding (NVlabs/Fast-dLLM v2): an APPROXIMATION that commits every confident token.

    Decoding blocks are sub-blocks of the model's blocks, left to right. The first token of a model block is drawn
    autoregressively: the argmax of the prediction the previous (finished) block makes for it, one call, whatever
    the temperature (Fast-dLLM v2 reads it off the call that caches that block). Then each call draws a token at
    every masked position of the active sub-block and commits those whose probability under the distribution drawn
    from exceeds `confidence_threshold` (the softmax when greedy), and always the most probable one.
    """

    Settings = FastDllmV2Settings
    supports_blocks = True

    @classmethod
    def describe(cls, settings):
        return f"fast_dllm_v2 thr {settings.confidence_threshold:g}"

    def step(self, state: DiffusionState, denoise: Denoiser) -> DiffusionState:
        state, rows, positions, valid, logits, probs, sampled = self.draw_in_blocks(state, denoise)
        plain = self.categorical.confidence_probabilities(logits)
        confidence = (plain if self.categorical.greedy else probs).gather(-1, sampled[..., None])[..., 0]
        confidence = confidence.masked_fill(~valid, float("-inf"))
        chosen = valid & (confidence > self.settings.confidence_threshold)
        chosen.scatter_(1, confidence.argmax(dim=1, keepdim=True), True)
        if state.model_block_length is not None:
            # A model block not yet begun: its first position is drawn alone, by argmax (the AR step).
            starts = (positions[:, 0] - state.region_start) % state.model_block_length == 0
            if bool(starts.any()):
                first_only = torch.zeros_like(chosen)
                first_only[:, 0] = True
                chosen = torch.where(starts[:, None], first_only, chosen)
                sampled = torch.where(starts[:, None], plain.argmax(dim=-1), sampled)
        probability = probs.gather(-1, sampled[..., None])[..., 0]
        return commit(state, rows, positions, chosen, sampled, confidence=probability)


@dataclass
class TokenEditingSettings(StrategySettings):
    """LLaDA 2.1's decoding (its generate(): threshold 0.95, editing_threshold 0.9, max_post_steps 16,
    num_to_transfer 1; its "quality" mode 0.7 / 0.5, "speed" mode 0.5 / 0): confidence_threshold in (0, 1],
    editing_threshold in [0, 1] (0 takes every changed token), max_post_steps >= 0 calls a block may take after
    its last [MASK] is filled, num_to_transfer >= 1 masks filled per call at least."""

    confidence_threshold: float = 0.95
    editing_threshold: float = 0.9
    max_post_steps: int = 16
    num_to_transfer: int = 1

    def validate(self):
        check_threshold("confidence_threshold", self.confidence_threshold, allow_one=True)
        if not isinstance(self.editing_threshold, (int, float)) or isinstance(self.editing_threshold, bool) \
                or not 0 <= self.editing_threshold <= 1:
            raise ValueError(f"editing_threshold must be a number in [0, 1], got {self.editing_threshold!r}.")
        check_count("max_post_steps", self.max_post_steps, minimum=0)
        check_count("num_to_transfer", self.num_to_transfer)


@register_strategy("token_editing")
class TokenEditingSampler(DecodingStrategy):
    """LLaDA 2.1's decoding with token editing: an APPROXIMATION that fills masks and also rewrites tokens it wrote.

    Each call draws a token at every generated position of the row's active block (the categorical sampler;
    greedy in LLaDA 2.1's evaluations) and scores each by its probability (the softmax when greedy). Mask to token:
    the masked positions above `confidence_threshold` if at least `num_to_transfer` of them, else the
    `num_to_transfer` most confident. Token to token: every earlier-filled position of the block (never the prompt,
    never a finished block) whose draw differs from its token with probability above `editing_threshold`. Once the
    block has no [MASK] left the row stays in it, editing, until a call changes nothing or `max_post_steps` calls
    have been made; then it moves on. With a block-diffusion model the finished blocks never change, so the cache
    stays exact."""

    Settings = TokenEditingSettings
    supports_blocks = True

    @classmethod
    def describe(cls, settings):
        return f"token_editing thr {settings.confidence_threshold:g} edit {settings.editing_threshold:g}"

    def step_limit(self, state: DiffusionState) -> int:
        return int(state.masked.sum(dim=1).max()) + state.num_blocks * (self.settings.max_post_steps + 1)

    def counters(self, state: DiffusionState) -> tuple[torch.LongTensor, torch.BoolTensor]:
        """(batch,) calls each row has made in its active block since the block's last [MASK] was filled, and
        whether its last such call changed nothing; reset when a row enters a new block."""
        scratch = state.scratch or {}
        zeros = torch.zeros_like(state.active_block)
        block, post, settled = scratch.get("editing", (zeros - 1, zeros, zeros.bool()))
        same = block == state.active_block
        return post.where(same, zeros), settled & same

    def holds_block(self, state: DiffusionState) -> torch.BoolTensor:
        post, settled = self.counters(state)
        filled = ~candidates(state).any(dim=1)
        return (state.active_block >= 0) & filled & ~settled & (post < self.settings.max_post_steps)

    def step(self, state: DiffusionState, denoise: Denoiser) -> DiffusionState:
        settings = self.settings
        post, settled = self.counters(state)
        rows = (state.masked.any(dim=1) | self.holds_block(state)).nonzero().squeeze(1)
        in_block = state.generated[rows] & (state.block[rows] == state.active_block[rows, None])
        positions, valid = candidate_positions(in_block)
        masked = valid & state.masked[rows].gather(1, positions)
        filled = ~masked.any(dim=1)
        state = self.expected_time(state, rows, candidates(state)[rows])
        logits = denoise(rows, state.tokens[rows], positions, state.time[rows])
        probs = self.categorical.probabilities(logits)
        sampled = self.categorical.choose(probs)
        confidence = self.categorical.confidence_probabilities(logits, tempered=True).gather(
            -1, sampled[..., None])[..., 0]
        # Mask to token.
        count = masked.sum(dim=1).clamp(max=settings.num_to_transfer)
        unmask = above_threshold_or_most_confident(confidence, masked, count, settings.confidence_threshold)
        # Token to token.
        current = state.tokens[rows].gather(1, positions)
        edit = valid & ~masked & (confidence > settings.editing_threshold) & (sampled != current)
        post, settled = post.clone(), settled.clone()
        post[rows] += filled.long()
        settled[rows] = filled & ~edit.any(dim=1)
        probability = probs.gather(-1, sampled[..., None])[..., 0]
        after = commit(state, rows, positions, unmask | edit, sampled, confidence=probability,
                       scratch={**(state.scratch or {}), "editing": (state.active_block.clone(), post, settled)})
        return replace(after, pending=self.holds_block(after))


@dataclass
class Rnd1Settings(StrategySettings):
    """RND1's sampler (RadicalNumerics/RND1 `rnd/sampling.py`, its default schedule): steps is its
    num_diffusion_steps N (256 in its demo); None: one more than the row's masked positions, one token per call."""

    steps: int | None = None

    def validate(self):
        check_count("steps", self.steps, minimum=2)


@register_strategy("rnd1")
class Rnd1Sampler(DecodingStrategy):
    """RND1's decoding: an APPROXIMATION that leaves the most uncertain positions for last.

    Each call draws a token at every masked position (the categorical sampler) and scores each position by the
    entropy of the distribution it drew from (the softmax when greedy). Call j of N = `steps` keeps the
    floor(n (N - 1 - j) / N) highest-entropy positions masked, n being the row's masked positions at the start
    (computed in float32, as RND1 does), and commits the draws at the others; call N - 1 commits everything left.
    So N calls at most, and some commit nothing when N exceeds n + 1 (RND1 makes those calls too)."""

    Settings = Rnd1Settings

    def step_limit(self, state: DiffusionState) -> int:
        return self.settings.steps or int(state.masked.sum(dim=1).max()) + 1

    def step(self, state: DiffusionState, denoise: Denoiser) -> DiffusionState:
        scratch = dict(state.scratch or {})
        total = scratch.setdefault("rnd1_masked_at_start", state.masked.sum(dim=1))
        rows = state.masked.any(dim=1).nonzero().squeeze(1)
        positions, valid = candidate_positions(state.masked[rows])
        logits = denoise(rows, state.tokens[rows], positions, state.time[rows])
        probs = self.categorical.probabilities(logits)
        sampled = self.categorical.choose(probs)
        spread = entropies(self.categorical.confidence_probabilities(logits, tempered=True)
                           if self.categorical.greedy else probs).masked_fill(~valid, float("-inf"))
        steps = torch.full_like(total[rows], self.settings.steps) if self.settings.steps else total[rows] + 1
        rate = ((steps - 1 - state.step).clamp(min=0).double() / steps.double()).float()
        keep = (total[rows].float() * rate).long()
        unmask = valid & (ranks(spread) >= keep[:, None])
        probability = probs.gather(-1, sampled[..., None])[..., 0]
        return commit(state, rows, positions, unmask, sampled, confidence=probability, scratch=scratch)


def noise_removal_mode(value) -> str | None:
    """The `noise_removal` setting as a mode: None (off), "mdlm" (also True) or "last_step_argmax"."""
    if value is False:
        return None
    if value is True:
        return "mdlm"
    if isinstance(value, str) and value in NOISE_REMOVAL_MODES:
        return value
    raise ValueError(f"noise_removal must be one of {(False, True) + NOISE_REMOVAL_MODES}, got {value!r}.")


@dataclass
class AncestralSettings(StrategySettings):
    """steps: the uniform time grid's number of steps (default: one per generated position).
    noise_removal: False; True or "mdlm" (MDLM's: the grid ends at t = 1e-5, then one argmax call fills what is
    still masked); "last_step_argmax" (the last step takes the argmax instead of sampling). Neither is exact."""

    steps: int | None = None
    noise_removal: bool | str = False

    def validate(self):
        check_count("steps", self.steps)
        noise_removal_mode(self.noise_removal)


class ReuseUnchangedOutputs:
    """MDLM's "ddpm_cache" as a wrapper of `denoise`: a row whose tokens did not change since its last network call
    gets that call's logits again (as the network returned them); only changed rows run. Valid only for a network
    without time input, and for whole-canvas calls (positions=None)."""

    def __init__(self, batch_size: int):
        self.batch_size = batch_size
        self.logits = None  # (batch, L, V): each row's logits from its last call
        self.owned = False  # whether self.logits is our own tensor (never write into the network's)
        self.tokens = None  # (batch, L): each row's tokens at its last call

    def wrap(self, denoise: Denoiser) -> Denoiser:
        def reuse(rows, tokens, positions, times):
            if positions is not None:
                raise ValueError("output reuse (ancestral_cache) runs the network on whole canvases (positions=None).")
            changed = torch.ones(len(rows), dtype=torch.bool, device=rows.device) if self.tokens is None else \
                (self.tokens[rows] != tokens).any(dim=1)
            stale = changed.nonzero().squeeze(1)
            if len(stale):
                new_logits = denoise(rows[stale], tokens[stale], None, times[stale])
                if len(stale) == self.batch_size:
                    self.logits, self.owned = new_logits, False  # every row recomputed: the network's own tensor
                else:
                    if self.logits is None or not self.owned:
                        self.logits = (new_logits.new_empty((self.batch_size,) + tuple(new_logits.shape[1:]))
                                       if self.logits is None else self.logits.clone())
                    self.logits[rows[stale]], self.owned = new_logits, True
                if self.tokens is None:
                    self.tokens = tokens.new_full((self.batch_size, tokens.shape[1]), -1)
                self.tokens[rows[stale]] = tokens[stale]
            return self.logits if len(rows) == self.batch_size else self.logits[rows]

        return reuse


@register_strategy("ancestral")
class AncestralSampler(DecodingStrategy):
    """MDLM's ancestral sampler ("ddpm") on a uniform grid of `steps` times from 1 down to 0 (docs/concepts/first-hitting.md).

    From t to s < t every masked position independently becomes token x with probability
    ((alpha_s - alpha_t) / (1 - alpha_t)) p(x | x_t), or stays masked with probability
    (1 - alpha_s) / (1 - alpha_t): one categorical over V + 1 classes per position (the [MASK] column, of
    probability zero as a token, carries "stay masked"), drawn in the sampling dtype, which is how
    float32 lowers the temperature.

    `noise_removal`:
        - False: the grid ends at t = 0, where alpha = 1, so the last step unmasks every position left.
        - True / "mdlm" (MDLM's `sampling.noise_removal`, its `_sample` with eps = `final_time` = 1e-5): the grid
          1 = t_0 > ... > t_steps = final_time (`torch.linspace(1, eps, steps + 1)`), every step sampled, then ONE
          extra network call at t = final_time whose argmax fills only the positions still masked (MDLM's SUBS
          output carries the unmasked ones over). That call is made only for rows with positions left, so NFE is
          at most steps + 1.
        - "last_step_argmax" (hf_mdm's earlier `noise_removal=True`): the grid ends at 0 and the last step takes
          the argmax at every position still masked instead of sampling it. Not MDLM's: it replaces a whole
          sampled step by an argmax.

    With blocks, each block runs its own grid of `steps / num_blocks` times, over its own positions only.
    """

    Settings = AncestralSettings
    supports_blocks = True
    reuse_outputs = False  # ancestral_cache: MDLM's ddpm_cache

    def __init__(self, settings=None, *, final_time: float = MDLM_NOISE_REMOVAL_TIME, **kwargs):
        super().__init__(settings, **kwargs)
        if not 0 < final_time < 1:
            raise ValueError(f"final_time must lie in (0, 1), got {final_time!r}.")
        self.noise_removal = noise_removal_mode(self.settings.noise_removal)
        # Where the time grid ends: MDLM's eps with its noise removal, else 0.
        self.end_time = final_time if self.noise_removal == "mdlm" else 0.0

    @classmethod
    def describe(cls, settings):
        return f"{cls.name} {settings.steps} steps" if settings.steps else f"{cls.name} L steps"

    def total_steps(self, state: DiffusionState) -> int:
        """`steps`, or one per generated position (the most of any row)."""
        return self.settings.steps or max(int(state.generated.sum(dim=1).max()), 1)

    def step_limit(self, state: DiffusionState) -> int:
        steps = self.total_steps(state)
        extra_call = int(self.noise_removal == "mdlm")  # the argmax call after each grid
        if state.block_length is None:
            return steps + extra_call
        per_block, extra = divmod(steps, state.num_blocks)
        return sum(max(per_block + (block < extra), 1) + extra_call for block in range(state.num_blocks))

    def busy_rows(self, state: DiffusionState) -> torch.BoolTensor:
        return state.masked.any(dim=1)

    def step(self, state: DiffusionState, denoise: Denoiser) -> DiffusionState:
        steps = self.total_steps(state)
        device = state.tokens.device
        rows = self.busy_rows(state).nonzero().squeeze(1)
        budget = block_budget(state, steps)[rows]
        # The grid t_k = 1 - (1 - end) k / budget, k = 0..budget, from 1 down to end (0, or MDLM's eps).
        span = 1.0 - self.end_time
        t = (1.0 - span * state.block_step[rows].double() / budget.double()).clamp(min=self.end_time)
        s = (1.0 - span * (state.block_step[rows].double() + 1) / budget.double()).clamp(min=self.end_time)
        # Rows past their grid with positions still masked: MDLM's noise removal, an argmax call at t = end.
        final = state.block_step[rows] >= budget
        active = candidates(state)
        # Only masked positions of the active blocks are drawn: the (V + 1)-way categorical is the main cost.
        masked_rows, masked_positions = active.nonzero(as_tuple=True)
        row_of = torch.empty(state.tokens.shape[0], dtype=torch.long, device=device)
        row_of[rows] = torch.arange(len(rows), device=device)

        scratch = dict(state.scratch or {})
        if self.uses_output_reuse():
            reuse = scratch.setdefault("reuse", ReuseUnchangedOutputs(state.tokens.shape[0]))
            logits = reuse.wrap(denoise)(rows, state.tokens[rows], None, t)
            masked_probs = self.categorical.probabilities(logits[row_of[masked_rows], masked_positions])
        elif state.block_length is None:
            logits = denoise(rows, state.tokens[rows], None, t)
            masked_probs = self.categorical.probabilities(logits[row_of[masked_rows], masked_positions])
        else:
            positions, valid = candidate_positions(active[rows])
            logits = denoise(rows, state.tokens[rows], positions, t)
            masked_probs = self.categorical.probabilities(logits[valid])  # row-major: the order of active.nonzero()

        which = row_of[masked_rows]
        greedy = final[which]  # positions the noise-removal argmax fills
        alpha_t, alpha_s = self.schedule.alpha(t), self.schedule.alpha(s)
        if self.noise_removal == "last_step_argmax" and bool((s == 0).all()):
            sampled = masked_probs.argmax(dim=-1)
        elif bool(greedy.all()):
            sampled = masked_probs.argmax(dim=-1)
        else:
            greedy_tokens = masked_probs.argmax(dim=-1) if bool(greedy.any()) else None
            sampled = self.draw_transitions(state, rows, which, masked_probs, alpha_t, alpha_s)
            if greedy_tokens is not None:
                sampled = torch.where(greedy, greedy_tokens, sampled)

        unmasked_now = sampled != self.mask_token_id
        changed_rows, changed_positions = masked_rows[unmasked_now], masked_positions[unmasked_now]
        tokens, still_masked = state.tokens.clone(), state.masked.clone()
        tokens[changed_rows, changed_positions] = sampled[unmasked_now]
        still_masked[changed_rows, changed_positions] = False
        new_time = state.time.clone()
        new_time[rows] = s
        block_step = state.block_step.clone()
        block_step[rows] += 1
        after = replace(state, tokens=tokens, masked=still_masked, time=new_time, step=state.step + 1,
                        scratch=scratch, block_step=block_step)
        return self.after_transition(after, state, rows, final, masked_probs, sampled, unmasked_now, alpha_t, alpha_s)

    def uses_output_reuse(self) -> bool:
        return self.reuse_outputs

    def draw_transitions(self, state, rows, which, masked_probs, alpha_t, alpha_s) -> torch.LongTensor:
        """Each masked position's draw over V + 1 classes: token x with ((alpha_s - alpha_t) / (1 - alpha_t)) p(x),
        [MASK] ("stay masked") with (1 - alpha_s) / (1 - alpha_t)."""
        token_scale = ((alpha_s - alpha_t) / (1 - alpha_t)).to(masked_probs.dtype)
        stay_masked = ((1 - alpha_s) / (1 - alpha_t)).to(masked_probs.dtype)
        weights = masked_probs.mul_(token_scale[which, None])  # in place: nothing else reads the probabilities
        weights[..., self.mask_token_id] = stay_masked[which]
        return self.categorical.draw(weights)

    def after_transition(self, after, before, rows, final, masked_probs, sampled, unmasked_now, alpha_t, alpha_s):
        """The state after the step's draws (ReMDM adds its remasking here)."""
        return after


@register_strategy("ancestral_cache")
class AncestralCacheSampler(AncestralSampler):
    """MDLM's "ddpm_cache": the ancestral sampler, with rows whose tokens did not change since their last network call
    reusing its output (`ReuseUnchangedOutputs`). Only for a network without time input. Its calls run on whole
    canvases (so with blocks they bypass the block cache), which is what makes a reused output valid."""

    time_agnostic_only = True
    reuse_outputs = True


REMASKING_SCHEDULES = ("cap", "rescale", "conf")
# ReMDM's published settings for OpenWebText at 1024 steps (kuleshov-group/remdm scripts): eta_cap 0.008,
# eta_rescale 0.015; the confidence schedule has no eta.
DEFAULT_REMASKING_ETA = {"cap": 0.008, "rescale": 0.015, "conf": None}


class RemaskingSchedule:
    """ReMDM's remasking probability sigma_t (Wang et al., arXiv:2503.00307, section 4).

    From t to s < t, a decoded token is masked again with probability sigma, and a masked position becomes token
    x with probability (alpha_s - (1 - sigma) alpha_t) / (1 - alpha_t) p(x) (stays masked otherwise), which keeps
    the marginals of the forward process when 0 <= sigma <= sigma_max = min(1, (1 - alpha_s) / alpha_t):
        - "cap": sigma = min(eta, sigma_max);
        - "rescale": sigma = eta * sigma_max;
        - "conf": per decoded position, sigma_l = sigma_max * softmax_l(-confidence) over the row's decoded
          positions (the least confident most likely), masked positions using sigma = 0.
    At the last step alpha_s = 1, so sigma_max = 0: nothing is remasked and every masked position unmasks.
    """

    def __init__(self, name: str = "cap", eta: float | None = None):
        if name not in REMASKING_SCHEDULES:
            raise ValueError(f"remasking_schedule must be one of {REMASKING_SCHEDULES}, got {name!r}.")
        self.name = name
        self.eta = DEFAULT_REMASKING_ETA[name] if eta is None else eta

    def sigma_max(self, alpha_t: torch.Tensor, alpha_s: torch.Tensor) -> torch.Tensor:
        return torch.where(alpha_t > 0, ((1 - alpha_s) / alpha_t.clamp(min=1e-300)).clamp(max=1.0), 1.0)

    def sigmas(self, alpha_t, alpha_s, decoded: torch.BoolTensor, confidence: torch.Tensor):
        """(sigma for masked positions (R,), remasking probability of each decoded position (R, L))."""
        top = self.sigma_max(alpha_t, alpha_s)
        if self.name == "conf":
            weights = torch.softmax((-confidence.nan_to_num(0.0)).masked_fill(~decoded, float("-inf")), dim=1)
            return torch.zeros_like(top), (weights.nan_to_num(0.0) * top[:, None]).masked_fill(~decoded, 0.0)
        sigma = torch.minimum(torch.full_like(top, self.eta), top) if self.name == "cap" else self.eta * top
        return sigma, sigma[:, None].expand_as(confidence).masked_fill(~decoded, 0.0)


@dataclass
class RemdmSettings(AncestralSettings):
    """The ancestral settings, and ReMDM's: remasking_schedule ("cap", "rescale" or "conf"), remasking_eta (default
    0.008 for cap, 0.015 for rescale, ReMDM's; none for conf), reuse_outputs (MDLM's ddpm_cache: rows that did not
    change reuse their last network output; time-agnostic networks only)."""

    remasking_schedule: str = "cap"
    remasking_eta: float | None = None
    reuse_outputs: bool = False

    def validate(self):
        super().validate()
        if self.remasking_schedule not in REMASKING_SCHEDULES:
            raise ValueError(f"remasking_schedule must be one of {REMASKING_SCHEDULES}, got {self.remasking_schedule!r}.")
        value = self.remasking_eta
        if value is not None:
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value <= 1:
                raise ValueError(f"remasking_eta must be a number in [0, 1] (or None), got {value!r}.")
            if DEFAULT_REMASKING_ETA[self.remasking_schedule] is None:
                raise ValueError(f"remasking_schedule={self.remasking_schedule!r} takes no remasking_eta.")
        if not isinstance(self.reuse_outputs, bool):
            raise ValueError(f"reuse_outputs must be True or False, got {self.reuse_outputs!r}.")


@register_strategy("remdm")
class RemdmSampler(AncestralSampler):
    """ReMDM (Wang et al., arXiv:2503.00307): the ancestral sampler, with decoded tokens masked again with probability
    sigma_t (`RemaskingSchedule`) and the unmasking probabilities adjusted to keep the forward marginals; with more
    steps than tokens it corrects earlier draws. The prompt is never remasked. A row runs its block's whole time
    grid (it may still remask), so it stays in its block until the grid is over."""

    Settings = RemdmSettings

    @classmethod
    def describe(cls, settings):
        eta = f" eta={settings.remasking_eta:g}" if settings.remasking_eta is not None else ""
        return f"ReMDM-{settings.remasking_schedule}{eta} {settings.steps or 'L'} steps"

    def __init__(self, settings=None, **kwargs):
        super().__init__(settings, **kwargs)
        self.remasking = RemaskingSchedule(self.settings.remasking_schedule, self.settings.remasking_eta)
        self.time_agnostic_only = self.settings.reuse_outputs

    def uses_output_reuse(self) -> bool:
        return self.settings.reuse_outputs

    def holds_block(self, state: DiffusionState) -> torch.BoolTensor:
        return (state.active_block >= 0) & (state.block_step < block_budget(state, self.total_steps(state)))

    def busy_rows(self, state: DiffusionState) -> torch.BoolTensor:
        return state.masked.any(dim=1) | self.holds_block(state)

    def decoded(self, state: DiffusionState, rows) -> torch.BoolTensor:
        """(R, L): the generated positions of each row's active block that hold a token now."""
        return state.generated[rows] & ~state.masked[rows] & (state.block[rows] == state.active_block[rows, None])

    def draw_transitions(self, state, rows, which, masked_probs, alpha_t, alpha_s) -> torch.LongTensor:
        sigma, _ = self.remasking.sigmas(alpha_t, alpha_s, self.decoded(state, rows), state.confidence[rows])
        kept = 1 - sigma
        token_scale = ((alpha_s - kept * alpha_t) / (1 - alpha_t)).to(masked_probs.dtype)
        stay_masked = ((1 - alpha_s - (1 - kept) * alpha_t) / (1 - alpha_t)).to(masked_probs.dtype)
        weights = masked_probs.mul(token_scale[which, None])  # not in place: the confidences read masked_probs
        weights[..., self.mask_token_id] = stay_masked[which]
        return self.categorical.draw(weights)

    def after_transition(self, after, before, rows, final, masked_probs, sampled, unmasked_now, alpha_t, alpha_s):
        masked_rows, masked_positions = candidates(before).nonzero(as_tuple=True)
        changed_rows, changed_positions = masked_rows[unmasked_now], masked_positions[unmasked_now]
        decoded = self.decoded(before, rows)
        _, remask = self.remasking.sigmas(alpha_t, alpha_s, decoded, before.confidence[rows])
        remask = remask.masked_fill(final[:, None], 0.0)  # the noise-removal call only fills, never remasks
        tokens, still_masked, recorded = after.tokens, after.masked, before.confidence.clone()
        recorded[changed_rows, changed_positions] = masked_probs[unmasked_now].gather(
            -1, sampled[unmasked_now][:, None])[:, 0].double()
        # Each decoded token of the active block is masked again with its probability (a 2-way draw).
        decoded_rows, decoded_positions = (decoded & (remask > 0)).nonzero(as_tuple=True)
        if len(decoded_rows):  # no draw where nothing can be remasked (eta = 0 is then MDLM's sampler exactly)
            p = remask[decoded_rows, decoded_positions].to(self.categorical.dtype)
            again = self.categorical.draw(torch.stack([1 - p, p], dim=-1)) == 1
            again_rows, again_positions = rows[decoded_rows[again]], decoded_positions[again]
            tokens[again_rows, again_positions] = self.mask_token_id
            still_masked[again_rows, again_positions] = True
            recorded[again_rows, again_positions] = float("nan")
        pending = after.block_step < block_budget(after, self.total_steps(after))
        return replace(after, tokens=tokens, masked=still_masked, confidence=recorded, pending=pending)


def build_strategy(name: str, settings: StrategySettings | None = None, **kwargs) -> DecodingStrategy:
    """The registered strategy `name` with its settings (defaults when None); kwargs: schedule, categorical,
    mask_token_id."""
    return get_strategy(name)(settings, **kwargs)
