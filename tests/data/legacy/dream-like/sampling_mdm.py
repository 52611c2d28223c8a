"""Sampling for masked diffusion models: noise schedules, one categorical sampler, and the strategies.

Like diffusers' schedulers, nothing here knows the model: a strategy sees the current tokens and a `denoise`
callable that returns logits. Every strategy follows one contract,

    state = strategy.step(state, denoise)

with `state` a `DiffusionState` (tokens, which positions are still masked, per-row time) and
`denoise(rows, tokens, positions, times) -> logits`, so `generate()` has no per-strategy special cases.
Equations cite Zheng et al., arXiv:2409.02908 ("FHS" = first-hitting sampler, section 4) and MDLM,
arXiv:2310.07524 (ancestral "ddpm" sampler). See hf_mdm's docs/mdm-math.md, sections 1, 3 and 4.

This file travels with every saved checkpoint as remote code: it imports only numpy, torch and transformers.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

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
        """NELBO weight -alpha'_t / (1 - alpha_t) (docs/mdm-math.md section 2); 1/t for the linear and log-linear schedules."""
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
        self.dtype = dtype
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
        return probs.view(logits.shape)

    def draw(self, probs: torch.Tensor) -> torch.LongTensor:
        """(..., K) non-negative, possibly unnormalised weights -> (...) sampled indices (exponential race)."""
        exponential = uniform(probs.shape, probs.dtype, probs.device, self.generator).log_().neg_()  # E = -log U
        return torch.div(probs, exponential, out=exponential).argmax(dim=-1)  # in place: this is the hot loop

    def __call__(self, logits: torch.Tensor) -> torch.LongTensor:
        return self.draw(self.probabilities(logits))

    def confidence_probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """The model's own distribution, which confidences are read from: the softmax of the logits at temperature
        1, without top-k / top-p, in the sampling dtype (LLaDA's low_confidence, Fast-dLLM)."""
        scores = logits.to(self.dtype, copy=True)
        if self.mask_token_id is not None:
            scores[..., self.mask_token_id] = float("-inf")
        return torch.softmax(scores, dim=-1)


# ----------------------------------------------------------------------------------------------------------------
# The shared contract of every strategy.
# ----------------------------------------------------------------------------------------------------------------

# denoise(rows, tokens, positions, times, windows=None) -> logits
#   rows:      (R,) indices of the batch rows being denoised
#   tokens:    (R, L) their current tokens
#   positions: (R, k) positions whose logits are needed, or None for all L positions
#   times:     (R,) float64 diffusion times (the network reads them only if it is time-conditioned)
#   windows:   (R, 2) per row [start, end) of the block the strategy is decoding (block decoding only; else None);
#              (-1, -1) for a row that has just entered its block. Since a row entered its block only positions in
#              its window changed, so a denoiser may reuse what it computed for the others (a KV cache), row by row.
#              `positions` lie inside the windows.
#   returns    (R, k, V) or (R, L, V) logits; the [MASK] logit is ignored (the categorical sampler zeroes it)
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
        cache (`dict`, *optional*): strategy-private scratch space (ancestral_cache keeps its network outputs here).
        generated (`torch.BoolTensor` of shape `(batch, seq_len)`): the positions generate() fills (masked at the
            start): the only ones a remasking strategy may mask again. The prompt never is.
        block (`torch.LongTensor` of shape `(batch, seq_len)`): each position's block for semi-autoregressive
            decoding (all 0 without blocks).
        block_length (`int`, *optional*): the block size; None without blocks.
        region_start (`int`): where block 0's generated region starts (the prompt length); earlier masked
            positions (infilling) belong to block 0.
        active_block (`torch.LongTensor` of shape `(batch,)`): the block each row decodes now.
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
    cache: dict | None = None
    generated: torch.BoolTensor | None = None
    block: torch.LongTensor | None = None
    block_length: int | None = None
    region_start: int = 0
    active_block: torch.LongTensor | None = None
    block_step: torch.LongTensor | None = None
    confidence: torch.Tensor | None = None
    pending: torch.BoolTensor | None = None

    @classmethod
    def start(cls, tokens: torch.LongTensor, masked: torch.BoolTensor, block_length: int | None = None,
              region_start: int = 0) -> "DiffusionState":
        batch, seq_len = tokens.shape
        device = tokens.device
        time = torch.ones(batch, dtype=torch.float64, device=device)
        position = torch.arange(seq_len, device=device)
        if block_length is None:
            block = torch.zeros(batch, seq_len, dtype=torch.long, device=device)
        else:
            block = ((position - region_start).clamp(min=0) // block_length).expand(batch, -1).contiguous()
        state = cls(tokens=tokens.clone(), masked=masked.clone(), time=time, generated=masked.clone(), block=block,
                    block_length=block_length, region_start=region_start,
                    active_block=torch.full((batch,), -1, dtype=torch.long, device=device),
                    block_step=torch.zeros(batch, dtype=torch.long, device=device),
                    confidence=torch.full((batch, seq_len), float("nan"), dtype=torch.float64, device=device),
                    pending=torch.zeros(batch, dtype=torch.bool, device=device))
        return state

    @property
    def done(self) -> bool:
        return not bool(self.masked.any() or (self.pending is not None and self.pending.any()))

    @property
    def num_blocks(self) -> int:
        return int(self.block.max()) + 1

    def block_bounds(self, block: int) -> tuple[int, int]:
        """[start, end) of a block (block 0 also holds any masked position before the generated region)."""
        if self.block_length is None:
            return 0, self.tokens.shape[1]
        start = 0 if block == 0 else self.region_start + block * self.block_length
        return start, min(self.region_start + (block + 1) * self.block_length, self.tokens.shape[1])


def enter_blocks(state: DiffusionState, keep: torch.BoolTensor | None = None) -> tuple[DiffusionState, torch.BoolTensor]:
    """Moves each row whose active block has no [MASK] left to its next block with one (resetting its block step and
    time), unless `keep` says the row stays (a remasking strategy finishing its block's time grid). Returns the new
    state and which rows entered a block."""
    far = torch.iinfo(torch.long).max
    next_block = torch.where(state.masked, state.block, far).amin(dim=1)
    entered = state.masked.any(dim=1) & (next_block != state.active_block)
    if keep is not None:
        entered &= ~keep
    if not bool(entered.any()):
        return state, entered
    active = torch.where(entered, next_block, state.active_block)
    block_step = torch.where(entered, 0, state.block_step)
    time = torch.where(entered, torch.ones_like(state.time), state.time)
    return replace(state, active_block=active, block_step=block_step, time=time), entered


def candidates(state: DiffusionState) -> torch.BoolTensor:
    """(batch, seq_len): the masked positions of each row's active block, the only ones a step may unmask."""
    return state.masked & (state.block == state.active_block[:, None])


def decoding_window(state: DiffusionState, rows: torch.LongTensor, entered: torch.BoolTensor):
    """The `windows` a strategy passes to denoise: None without blocks, else per row the [start, end) of its active
    block (block 0 starting at the generated region, or at an earlier position being infilled), (-1, -1) for a row
    that has just entered it."""
    if state.block_length is None:
        return None
    blocks = state.active_block[rows]
    starts = state.region_start + blocks * state.block_length
    ends = (state.region_start + (blocks + 1) * state.block_length).clamp(max=state.tokens.shape[1])
    infilled = state.generated[rows] & (state.block[rows] == 0) & (blocks[:, None] == 0)  # decoded or not
    first = torch.where(infilled, torch.arange(state.tokens.shape[1], device=rows.device), state.tokens.shape[1])
    starts = torch.minimum(starts, first.amin(dim=1))
    windows = torch.stack([starts, ends], dim=1)
    return windows.masked_fill(entered[rows][:, None], -1)


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
# Strategies.
# ----------------------------------------------------------------------------------------------------------------


class FirstHittingSampler:
    """First-hitting sampler (FHS, arXiv:2409.02908 section 4; docs/mdm-math.md section 3.2).

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

    def __init__(self, schedule: NoiseSchedule, categorical: CategoricalSampler, tokens_per_step=None, steps=None):
        self.schedule = schedule
        self.categorical = categorical
        self.tokens_per_step = tokens_per_step if steps is None else None
        self.steps = steps
        if tokens_per_step is None and steps is None:
            self.tokens_per_step = 1

    def step_limit(self, state: DiffusionState) -> int:
        return int(state.masked.sum(dim=1).max())

    def step(self, state: DiffusionState, denoise: Denoiser) -> DiffusionState:
        generator = self.categorical.generator
        state, entered = enter_blocks(state)
        rows = state.masked.any(dim=1).nonzero().squeeze(1)
        masked = candidates(state)[rows]
        num_masked = masked.sum(dim=1)
        count = count_per_row(num_masked, state, rows, self.tokens_per_step, self.steps)

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
        logits = denoise(rows, state.tokens[rows], positions, network_time, decoding_window(state, rows, entered))
        sampled = self.categorical(logits)
        new_time = state.time.clone()
        new_time[rows] = time
        return commit(state, rows, positions, valid, sampled, time=new_time)


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
        return torch.where(probs > 0, probs * probs.clamp(min=torch.finfo(probs.dtype).tiny).log(), 0.0).sum(-1)
    raise ValueError(f"unmasking order must be one of {CONFIDENCE_ORDERS}, got {order!r}.")


CONFIDENCE_ORDERS = ("confidence", "margin", "entropy")


class ConfidenceSampler:
    """Confidence-ordered unmasking (LLaDA's low_confidence remasking, Dream's maskgit_plus / topk_margin / entropy,
    Fast-dLLM's threshold decoding). An APPROXIMATION of the MDM's reverse process, biased towards likely tokens.

    Each step runs the network at every candidate position (the masked positions of the row's active block, or of
    the whole sequence without blocks), draws a token at each from the categorical sampler (in `sampling_dtype`,
    with its temperature and top-k / top-p), scores each draw with `order` (`confidence_scores`) under the model's
    own distribution (the softmax of the logits at temperature 1, unfiltered, in `sampling_dtype`: what LLaDA's
    low_confidence and Fast-dLLM score; Dream's code scores its tempered, filtered one) and keeps per row:
        - the `count` most confident (`tokens_per_step`, or the block's candidates spread over its `steps` budget,
          else one per call), or
        - with `threshold`, every draw whose score reaches it, and at least the most confident one (Fast-dLLM).
    The others stay masked and are drawn again next step. Rows are independent: each has its own count.
    """

    def __init__(self, categorical: CategoricalSampler, order: str = "confidence", tokens_per_step=None, steps=None,
                 threshold: float | None = None, schedule: NoiseSchedule | None = None):
        if order not in CONFIDENCE_ORDERS:
            raise ValueError(f"unmasking must be one of {('random',) + CONFIDENCE_ORDERS}, got {order!r}.")
        self.categorical = categorical
        self.schedule = schedule
        self.order = order
        self.tokens_per_step = tokens_per_step if steps is None else None
        self.steps = steps
        self.threshold = threshold
        if tokens_per_step is None and steps is None and threshold is None:
            self.tokens_per_step = 1

    def step_limit(self, state: DiffusionState) -> int:
        return int(state.masked.sum(dim=1).max())

    def step(self, state: DiffusionState, denoise: Denoiser) -> DiffusionState:
        state, entered = enter_blocks(state)
        rows = state.masked.any(dim=1).nonzero().squeeze(1)
        in_block = candidates(state)[rows]
        positions, valid = candidate_positions(in_block)
        # A time-conditioned network is told the time at which its block's masked fraction is expected.
        if self.schedule is not None:
            block = state.generated[rows] & (state.block[rows] == state.active_block[rows, None])
            fraction = in_block.sum(dim=1).double() / block.sum(dim=1).clamp(min=1).double()
            time = state.time.clone()
            time[rows] = self.schedule.inverse(1 - fraction).clamp(0.0, 1.0)
            state = replace(state, time=time)
        logits = denoise(rows, state.tokens[rows], positions, state.time[rows], decoding_window(state, rows, entered))
        probs = self.categorical.probabilities(logits)
        sampled = self.categorical.draw(probs)
        scores = confidence_scores(self.order, self.categorical.confidence_probabilities(logits), sampled)
        scores = scores.masked_fill(~valid, float("-inf"))
        if self.threshold is not None:
            chosen = valid & (scores >= self.threshold)
            chosen.scatter_(1, scores.argmax(dim=1, keepdim=True), True)  # at least one per row and call
        else:
            count = count_per_row(valid.sum(dim=1), state, rows, self.tokens_per_step, self.steps)
            rank = scores.argsort(dim=1, descending=True, stable=True).argsort(dim=1)
            chosen = valid & (rank < count[:, None])
        probability = probs.gather(-1, sampled[..., None])[..., 0]
        return commit(state, rows, positions, chosen, sampled, confidence=probability)


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


NOISE_REMOVAL_MODES = ("mdlm", "last_step_argmax")
# MDLM's `Diffusion._sample(eps=1e-5)`: its time grid ends here, and noise removal runs the network at this time.
MDLM_NOISE_REMOVAL_TIME = 1e-5


def noise_removal_mode(value) -> str | None:
    """`MDMGenerationConfig.noise_removal` as a mode: None (off), "mdlm" (also True) or "last_step_argmax"."""
    if value is None or value is False:
        return None
    if value is True:
        return "mdlm"
    if value in NOISE_REMOVAL_MODES:
        return value
    raise ValueError(f"noise_removal must be one of (False, True) + {NOISE_REMOVAL_MODES}, got {value!r}.")


class AncestralSampler:
    """MDLM's ancestral sampler ("ddpm") on a uniform grid of `steps` times from 1 down to 0 (docs/mdm-math.md section 3.1).

    From t to s < t every masked position independently becomes token x with probability
    ((alpha_s - alpha_t) / (1 - alpha_t)) p(x | x_t), or stays masked with probability
    (1 - alpha_s) / (1 - alpha_t): one categorical over V + 1 classes per position (the [MASK] column, of
    probability zero as a token, carries "stay masked"), drawn in the sampling dtype, which is how
    float32 lowers the temperature.

    `noise_removal`:
        - None: the grid ends at t = 0, where alpha = 1, so the last step unmasks every position left.
        - "mdlm" (MDLM's `sampling.noise_removal`, its `_sample` with eps = `final_time` = 1e-5): the grid
          1 = t_0 > ... > t_steps = final_time (`torch.linspace(1, eps, steps + 1)`), every step sampled, then ONE
          extra network call at t = final_time whose argmax fills only the positions still masked (MDLM's SUBS
          output carries the unmasked ones over). That call is made only for rows with positions left, so NFE is
          at most steps + 1.
        - "last_step_argmax" (hf_mdm's earlier `noise_removal=True`): the grid ends at 0 and the last step takes
          the argmax at every position still masked instead of sampling it. Not MDLM's: it replaces a whole
          sampled step by an argmax.

    With `reuse_unchanged` ("ancestral_cache", MDLM's "ddpm_cache"), a row whose tokens
    did not change since its last network call reuses that call's output (its logits, as the network returned them,
    batch x L x V values); only changed rows are recomputed. That is valid only for a time-agnostic network.

    With `remasking` (a `RemaskingSchedule`), this is ReMDM: decoded tokens are masked again with probability
    sigma_t and the unmasking probabilities adjust to keep the forward marginals; the prompt is never remasked.
    With blocks, each block runs its own grid of `steps / num_blocks` times, over its own positions only.
    """

    def __init__(self, schedule, categorical, steps: int, noise_removal=None, reuse_unchanged=False, mask_token_id=None,
                 remasking: RemaskingSchedule | None = None, final_time: float = MDLM_NOISE_REMOVAL_TIME):
        self.schedule = schedule
        self.categorical = categorical
        self.steps = steps
        self.noise_removal = noise_removal_mode(noise_removal)
        self.reuse_unchanged = reuse_unchanged
        self.mask_token_id = mask_token_id
        self.remasking = remasking
        if not 0 < final_time < 1:
            raise ValueError(f"final_time must lie in (0, 1), got {final_time!r}.")
        # Where the time grid ends: MDLM's eps with its noise removal, else 0.
        self.end_time = final_time if self.noise_removal == "mdlm" else 0.0

    def step_limit(self, state: DiffusionState) -> int:
        extra_call = int(self.noise_removal == "mdlm")  # the argmax call after each grid
        if state.block_length is None:
            return self.steps + extra_call
        per_block, extra = divmod(self.steps, state.num_blocks)
        return sum(max(per_block + (block < extra), 1) + extra_call for block in range(state.num_blocks))

    def step(self, state: DiffusionState, denoise: Denoiser) -> DiffusionState:
        device = state.tokens.device
        # With remasking a row stays in its block until the block's time grid is over, even if nothing is masked.
        in_grid = (state.active_block >= 0) & (state.block_step < block_budget(state, self.steps))
        keep = in_grid if self.remasking is not None else None
        state, entered = enter_blocks(state, keep)
        busy = state.masked.any(dim=1) | (keep if keep is not None else False)
        rows = busy.nonzero().squeeze(1)
        budget = block_budget(state, self.steps)[rows]
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

        cache = dict(state.cache or {})
        if self.reuse_unchanged:
            # MDLM's ddpm_cache: a row that did not change keeps its network output, computed once per network call
            # and kept as the network returned it (its logits); probabilities are formed where a draw needs them.
            logits = cache.get("logits")
            fresh = cache.get("fresh", torch.zeros(state.tokens.shape[0], dtype=torch.bool, device=device))
            stale = rows[~fresh[rows]]
            if len(stale):
                new_logits = denoise(stale, state.tokens[stale], None, t[row_of[stale]])
                if len(stale) == state.tokens.shape[0]:
                    logits, owned = new_logits, False  # every row recomputed: the network's own tensor, no copy
                else:
                    if logits is None or not cache.get("owned", False):  # never write into the network's tensor
                        logits = (new_logits.new_empty((state.tokens.shape[0],) + tuple(new_logits.shape[1:]))
                                  if logits is None else logits.clone())
                    logits[stale], owned = new_logits, True
                cache["owned"] = owned
            masked_probs = self.categorical.probabilities(logits[masked_rows, masked_positions])
        elif state.block_length is None:
            logits = denoise(rows, state.tokens[rows], None, t)
            masked_probs = self.categorical.probabilities(logits[row_of[masked_rows], masked_positions])
        else:
            positions, valid = candidate_positions(active[rows])
            logits = denoise(rows, state.tokens[rows], positions, t, decoding_window(state, rows, entered))
            masked_probs = self.categorical.probabilities(logits[valid])  # row-major: the order of active.nonzero()

        alpha_t, alpha_s = self.schedule.alpha(t), self.schedule.alpha(s)
        decoded = state.generated[rows] & ~state.masked[rows] & (state.block[rows] == state.active_block[rows, None])
        sigma = remask = None
        if self.remasking is not None:
            sigma, remask = self.remasking.sigmas(alpha_t, alpha_s, decoded, state.confidence[rows])
        if remask is not None:
            remask = remask.masked_fill(final[:, None], 0.0)  # the noise-removal call only fills, never remasks
        last_step = s == 0
        confidence = masked_probs
        which = row_of[masked_rows]
        greedy = final[which]  # positions the noise-removal argmax fills
        if self.noise_removal == "last_step_argmax" and bool(last_step.all()):
            sampled = masked_probs.argmax(dim=-1)
        elif bool(greedy.all()):
            sampled = masked_probs.argmax(dim=-1)
        else:
            greedy_tokens = masked_probs.argmax(dim=-1) if bool(greedy.any()) else None
            kept = 1 - (sigma if sigma is not None else torch.zeros_like(alpha_t))
            token_scale = ((alpha_s - kept * alpha_t) / (1 - alpha_t)).to(masked_probs.dtype)
            stay_masked = ((1 - alpha_s - (1 - kept) * alpha_t) / (1 - alpha_t)).to(masked_probs.dtype)
            weights = masked_probs.mul(token_scale[which, None]) if self.remasking is not None else \
                masked_probs.mul_(token_scale[which, None])  # in place when nothing else reads the probabilities
            weights[..., self.mask_token_id] = stay_masked[which]
            sampled = self.categorical.draw(weights)
            if greedy_tokens is not None:
                sampled = torch.where(greedy, greedy_tokens, sampled)

        unmasked_now = sampled != self.mask_token_id
        changed_rows, changed_positions = masked_rows[unmasked_now], masked_positions[unmasked_now]
        tokens, still_masked = state.tokens.clone(), state.masked.clone()
        tokens[changed_rows, changed_positions] = sampled[unmasked_now]
        still_masked[changed_rows, changed_positions] = False
        recorded = state.confidence
        if self.remasking is not None:
            recorded = recorded.clone()
            recorded[changed_rows, changed_positions] = confidence[unmasked_now].gather(
                -1, sampled[unmasked_now][:, None])[:, 0].double()
            # ReMDM: each decoded token of the active block is masked again with its probability (a 2-way draw).
            decoded_rows, decoded_positions = (decoded & (remask > 0)).nonzero(as_tuple=True)
            if len(decoded_rows):  # no draw where nothing can be remasked (eta = 0 is then MDLM's sampler exactly)
                p = remask[decoded_rows, decoded_positions].to(self.categorical.dtype)
                again = self.categorical.draw(torch.stack([1 - p, p], dim=-1)) == 1
                again_rows, again_positions = rows[decoded_rows[again]], decoded_positions[again]
                tokens[again_rows, again_positions] = self.mask_token_id
                still_masked[again_rows, again_positions] = True
                recorded[again_rows, again_positions] = float("nan")
                changed_rows = torch.cat([changed_rows, again_rows])
        new_time = state.time.clone()
        new_time[rows] = s
        block_step = state.block_step.clone()
        block_step[rows] += 1
        if self.reuse_unchanged:
            fresh = fresh.clone()
            fresh[rows] = True
            fresh[changed_rows] = False  # a row that did not change keeps a valid network output
            cache.update(logits=logits, fresh=fresh)
        pending = state.pending
        if self.remasking is not None:
            pending = block_step < block_budget(replace(state, block_step=block_step), self.steps)
        return replace(state, tokens=tokens, masked=still_masked, time=new_time, step=state.step + 1, cache=cache,
                       block_step=block_step, confidence=recorded, pending=pending)


SAMPLERS = ("first_hitting", "ancestral", "ancestral_cache")
UNMASKING_ORDERS = ("random",) + CONFIDENCE_ORDERS


def build_sampler(name, schedule, categorical, mask_token_id, tokens_per_step=None, steps=None, noise_removal=None,
                  unmasking="random", confidence_threshold=None, remasking=None, remasking_schedule="cap",
                  remasking_eta=None):
    """The strategy named by `MDMGenerationConfig.sampler` (and its `unmasking` / `remasking` fields)."""
    remasker = RemaskingSchedule(remasking_schedule, remasking_eta) if remasking == "remdm" else None
    factories = {
        "first_hitting": lambda: (
            FirstHittingSampler(schedule, categorical, tokens_per_step, steps) if unmasking == "random"
            else ConfidenceSampler(categorical, unmasking, tokens_per_step, steps, confidence_threshold, schedule)),
        "ancestral": lambda: AncestralSampler(schedule, categorical, steps, noise_removal, False, mask_token_id, remasker),
        "ancestral_cache": lambda: AncestralSampler(schedule, categorical, steps, noise_removal, True, mask_token_id,
                                                    remasker),
    }
    if name not in factories:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {name!r}.")
    return factories[name]()
