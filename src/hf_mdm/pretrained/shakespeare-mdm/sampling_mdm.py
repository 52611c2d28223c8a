"""Sampling for masked diffusion models: noise schedules, one categorical sampler, and the strategies.

Like diffusers' schedulers, nothing here knows the model: a strategy sees the current tokens and a `denoise`
callable that returns logits. Every strategy follows one contract,

    state = strategy.step(state, denoise)

with `state` a `DiffusionState` (tokens, which positions are still masked, per-row time) and
`denoise(rows, tokens, positions, times) -> logits`, so `generate()` has no per-strategy special cases.
Equations cite Zheng et al., arXiv:2409.02908 ("FHS" = first-hitting sampler, section 4) and MDLM,
arXiv:2310.07524 (ancestral "ddpm" sampler). See `../shared/mdm-notes.md` sections 1, 3 and 4.

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
        """NELBO weight -alpha'_t / (1 - alpha_t) (notes section 2); 1/t for the linear and log-linear schedules."""
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


# ----------------------------------------------------------------------------------------------------------------
# The shared contract of every strategy.
# ----------------------------------------------------------------------------------------------------------------

# denoise(rows, tokens, positions, times) -> logits
#   rows:      (R,) indices of the batch rows being denoised
#   tokens:    (R, L) their current tokens
#   positions: (R, k) positions whose logits are needed, or None for all L positions
#   times:     (R,) float64 diffusion times (the network reads them only if it is time-conditioned)
#   returns    (R, k, V) or (R, L, V) logits; the [MASK] logit is ignored (the categorical sampler zeroes it)
Denoiser = Callable[[torch.LongTensor, torch.LongTensor, torch.LongTensor | None, torch.Tensor], torch.Tensor]


@dataclass
class DiffusionState:
    """Where a batch of sequences stands in the reverse process.

    Args:
        tokens (`torch.LongTensor` of shape `(batch, seq_len)`): the current draft; masked positions hold [MASK].
        masked (`torch.BoolTensor` of shape `(batch, seq_len)`): positions still to be generated.
        time (`torch.DoubleTensor` of shape `(batch,)`): each row's diffusion time, 1 = fully noised.
        step (`int`): number of steps taken so far.
        cache (`dict`, *optional*): strategy-private scratch space (ancestral_cache keeps its probabilities here).
    """

    tokens: torch.LongTensor
    masked: torch.BoolTensor
    time: torch.Tensor
    step: int = 0
    cache: dict | None = None

    @classmethod
    def start(cls, tokens: torch.LongTensor, masked: torch.BoolTensor) -> "DiffusionState":
        time = torch.ones(tokens.shape[0], dtype=torch.float64, device=tokens.device)
        return cls(tokens=tokens.clone(), masked=masked.clone(), time=time)

    @property
    def done(self) -> bool:
        return not bool(self.masked.any())


def uniformly_chosen_positions(masked: torch.BoolTensor, count: torch.LongTensor, generator) -> tuple:
    """Per row, `count` positions drawn uniformly without replacement among the masked ones.

    Returns `positions` (R, k_max) and `valid` (R, k_max), True for the first `count[r]` entries of row r.
    """
    scores = uniform(masked.shape, torch.float64, masked.device, generator).masked_fill(~masked, -1.0)
    k_max = int(count.max())
    positions = scores.topk(k_max, dim=-1).indices
    valid = torch.arange(k_max, device=masked.device)[None, :] < count[:, None]
    return positions, valid


class FirstHittingSampler:
    """First-hitting sampler (FHS, arXiv:2409.02908 section 4; notes section 3.2).

    With `tokens_per_step = 1` (the default) it is exact: each step draws the next unmasking time of every row
    (tau <- alpha^{-1}(1 - u^(1/n)(1 - alpha_tau)), in float64), unmasks one uniformly chosen masked position,
    and samples its token from the network at the new time. One network call and one categorical over V per
    generated token; logits are computed at the chosen position only. Rows keep their own tau and n.

    With `tokens_per_step = k > 1`, or a `steps` budget (k = ceil(n / steps left) per row), k positions are
    unmasked per call, each sampled independently from the same output, and tau advances through k
    first-hitting draws. This parallel decoding is an APPROXIMATION: it ignores the dependence between the k
    tokens unmasked together.
    """

    def __init__(self, schedule: NoiseSchedule, categorical: CategoricalSampler, tokens_per_step=None, steps=None):
        self.schedule = schedule
        self.categorical = categorical
        self.tokens_per_step = tokens_per_step or 1
        self.steps = steps

    def tokens_this_step(self, num_masked: torch.LongTensor, step: int) -> torch.LongTensor:
        if self.steps is None:
            return num_masked.clamp(max=self.tokens_per_step)
        steps_left = max(self.steps - step, 1)
        return torch.div(num_masked + steps_left - 1, steps_left, rounding_mode="floor")

    def step(self, state: DiffusionState, denoise: Denoiser) -> DiffusionState:
        generator = self.categorical.generator
        rows = state.masked.any(dim=1).nonzero().squeeze(1)
        masked = state.masked[rows]
        num_masked = masked.sum(dim=1)
        count = self.tokens_this_step(num_masked, state.step)

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
        logits = denoise(rows, state.tokens[rows], positions, network_time)
        sampled = self.categorical(logits)

        tokens, still_masked = state.tokens.clone(), state.masked.clone()
        row_index = rows[:, None].expand_as(positions)
        current = tokens[row_index, positions]
        tokens[row_index, positions] = torch.where(valid, sampled, current)
        still_masked[row_index, positions] = still_masked[row_index, positions] & ~valid
        new_time = state.time.clone()
        new_time[rows] = time
        return replace(state, tokens=tokens, masked=still_masked, time=new_time, step=state.step + 1)


class AncestralSampler:
    """MDLM's ancestral sampler ("ddpm") on a uniform grid of `steps` times from 1 down to 0 (notes section 3.1).

    From t to s < t every masked position independently becomes token x with probability
    ((alpha_s - alpha_t) / (1 - alpha_t)) p(x | x_t), or stays masked with probability
    (1 - alpha_s) / (1 - alpha_t): one categorical over V + 1 classes per position (the [MASK] column, of
    probability zero as a token, carries "stay masked"), drawn in the sampling dtype, which is how
    float32 lowers the temperature. `noise_removal` replaces the last step's sampling by an argmax, as
    MDLM's scripts do. With `reuse_unchanged` ("ancestral_cache", MDLM's "ddpm_cache"), a row whose tokens
    did not change since its last network call reuses that call's probabilities (kept in the sampling dtype,
    batch x L x V values); only changed rows are recomputed. That is valid only for a time-agnostic network.
    """

    def __init__(self, schedule, categorical, steps: int, noise_removal=False, reuse_unchanged=False, mask_token_id=None):
        self.schedule = schedule
        self.categorical = categorical
        self.steps = steps
        self.noise_removal = noise_removal
        self.reuse_unchanged = reuse_unchanged
        self.mask_token_id = mask_token_id

    def step(self, state: DiffusionState, denoise: Denoiser) -> DiffusionState:
        device = state.tokens.device
        t = torch.tensor(1.0 - state.step / self.steps, dtype=torch.float64, device=device)
        s = torch.tensor(max(1.0 - (state.step + 1) / self.steps, 0.0), dtype=torch.float64, device=device)
        rows = state.masked.any(dim=1).nonzero().squeeze(1)
        # Only masked positions are drawn: the (V + 1)-way categorical of every step is the sampler's main cost.
        masked_rows, masked_positions = state.masked.nonzero(as_tuple=True)

        cache = dict(state.cache or {})
        if self.reuse_unchanged:
            # MDLM's ddpm_cache: a row that did not change keeps its p(x_0 | x_t), computed once per network call.
            probs = cache.get("probs")
            fresh = cache.get("fresh", torch.zeros(state.tokens.shape[0], dtype=torch.bool, device=device))
            stale = rows[~fresh[rows]]
            if len(stale):
                new_probs = self.categorical.probabilities(denoise(stale, state.tokens[stale], None, t.expand(len(stale))))
                if probs is None:
                    probs = new_probs.new_empty((state.tokens.shape[0],) + tuple(new_probs.shape[1:]))
                probs[stale] = new_probs
            masked_probs = probs[masked_rows, masked_positions]
        else:
            logits = denoise(rows, state.tokens[rows], None, t.expand(len(rows)))
            row_of = torch.empty(state.tokens.shape[0], dtype=torch.long, device=device)
            row_of[rows] = torch.arange(len(rows), device=device)
            masked_probs = self.categorical.probabilities(logits[row_of[masked_rows], masked_positions])

        last_step = bool(s == 0)
        if last_step and self.noise_removal:
            sampled = masked_probs.argmax(dim=-1)
        else:
            alpha_t, alpha_s = self.schedule.alpha(t), self.schedule.alpha(s)
            token_scale = ((alpha_s - alpha_t) / (1 - alpha_t)).to(masked_probs.dtype)
            stay_masked = ((1 - alpha_s) / (1 - alpha_t)).to(masked_probs.dtype)
            weights = masked_probs.mul_(token_scale)  # in place: masked_probs is a fresh (masked, V) tensor
            weights[..., self.mask_token_id] = stay_masked
            sampled = self.categorical.draw(weights)

        unmasked_now = sampled != self.mask_token_id
        changed_rows, changed_positions = masked_rows[unmasked_now], masked_positions[unmasked_now]
        tokens, still_masked = state.tokens.clone(), state.masked.clone()
        tokens[changed_rows, changed_positions] = sampled[unmasked_now]
        still_masked[changed_rows, changed_positions] = False
        new_time = state.time.clone()
        new_time[rows] = s
        if self.reuse_unchanged:
            fresh = fresh.clone()
            fresh[rows] = True
            fresh[changed_rows] = False  # a row that did not change keeps a valid network output
            cache.update(probs=probs, fresh=fresh)
        return DiffusionState(tokens, still_masked, new_time, state.step + 1, cache)


SAMPLERS = ("first_hitting", "ancestral", "ancestral_cache")


def build_sampler(name, schedule, categorical, mask_token_id, tokens_per_step=None, steps=None, noise_removal=False):
    """The strategy named by `MDMGenerationConfig.sampler`."""
    factories = {
        "first_hitting": lambda: FirstHittingSampler(schedule, categorical, tokens_per_step, steps),
        "ancestral": lambda: AncestralSampler(schedule, categorical, steps, noise_removal, False, mask_token_id),
        "ancestral_cache": lambda: AncestralSampler(schedule, categorical, steps, noise_removal, True, mask_token_id),
    }
    if name not in factories:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {name!r}.")
    return factories[name]()
