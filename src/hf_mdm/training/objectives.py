"""Training objectives, all in nats per token: the MDM NELBO (continuous time or over the number of masked
tokens) and next-token cross-entropy for an autoregressive baseline. See docs/concepts/time-agnostic.md.

Every objective turns a batch of clean blocks, plus noise drawn for the whole global batch, into one loss per
sequence:

    noise = objective.draw_noise(generator, global_batch_size, seq_len)     # identical on every process
    losses = objective.sequence_losses(model, input_ids, noise[rows])       # (batch,)

Times are low-discrepancy ("antithetic") over the GLOBAL batch: row i of the global batch gets
t_i = (u + i) / B, one shared u per step, and each process and accumulation micro-step takes its own rows, so
the times of all of them together cover [0, 1) with one time per stratum of width 1 / B.

`validation_nelbo` is the public, reusable estimate on held-out blocks with a fixed, seeded time grid.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..sampling_mdm import get_noise_schedule


# Continuous time is drawn from [T_MIN, 1] instead of [0, 1]: the weight -alpha'_t / (1 - alpha_t) ~ 1/t blows up
# at t = 0, while the number of masked tokens goes to zero there. The estimate is the integral over [T_MIN, 1]
# (times 1 - T_MIN, the Jacobian of t = T_MIN + (1 - T_MIN) s). That integral, and a schedule that never masks
# everything (log-linear: alpha_1 = eps), make the continuous form sit BELOW the bound by an exact offset:
# `continuous_count_weights` below.
T_MIN = 1e-3


def continuous_count_weights(seq_len: int, schedule, t_min: float = T_MIN) -> torch.Tensor:
    """(seq_len,) weights w_n, n = 1..L, that give the continuous-time estimate's expectation in terms of the bound.

    Write g(n) for the mean cross-entropy of a masked token when n of the L tokens, chosen uniformly, are masked
    (an expectation over the choice; for an exact denoiser, of -log p(x_l | the others visible)). Then
        bound (the discrete form, `mdm-discrete`)      = (1 / L) sum_n g(n),
        E[continuous estimate on [t_min, 1]] (`mdm`)    = (1 / L) sum_n w_n g(n),
        w_n = P(a_0 < A_n < a_1),  A_n ~ Beta(n, L - n + 1),  a_0 = 1 - alpha(t_min),  a_1 = 1 - alpha(1),
    because with a = 1 - alpha_t the NELBO weight is -alpha'_t dt / (1 - alpha_t) = da / a, the number masked is
    Binomial(L, a), and n C(L, n) a^(n-1) (1 - a)^(L-n) is the Beta(n, L - n + 1) density. So the offset
        bound - E[continuous] = (1 / L) sum_n (1 - w_n) g(n) >= 0
    is about (1 - alpha(t_min)) g(1) (n = 1: t below t_min) plus (1 - (1 - alpha(1))^L) / L * g(L) (n = L, only
    when alpha(1) > 0: the log-linear schedule's eps leaves a token clean with probability eps at t = 1). With
    T_MIN = 1e-3 and eps = 1e-3 that is ~0.1% of g(1) plus ~0.09% (L = 256) of g(L), the loss of a token with
    nothing visible. w_n = P(Binomial(L, a_1) >= n) - P(Binomial(L, a_0) >= n), computed here in float64.
    """
    n = torch.arange(0, seq_len + 1, dtype=torch.float64)
    log_choose = torch.lgamma(n[-1:] + 1) - torch.lgamma(n + 1) - torch.lgamma(seq_len - n + 1)

    def at_least(a: float) -> torch.Tensor:  # P(Binomial(L, a) >= n) for n = 1..L
        if a <= 0:
            return torch.zeros(seq_len, dtype=torch.float64)
        if a >= 1:
            return torch.ones(seq_len, dtype=torch.float64)
        pmf = torch.exp(log_choose + n * math.log(a) + (seq_len - n) * math.log1p(-a))
        return pmf.flip(0).cumsum(0).flip(0)[1:].clamp(max=1.0)

    t = torch.tensor([t_min, 1.0], dtype=torch.float64)
    a_0, a_1 = (1 - schedule.alpha(t)).tolist()
    return at_least(a_1) - at_least(a_0)


@dataclass
class Noise:
    """The randomness of one global batch.

    Args:
        times (`torch.Tensor` of shape `(batch,)`, float64): stratified uniforms s_i = (u + i) / B in [0, 1).
        uniforms (`torch.Tensor` of shape `(batch, seq_len)`, float32): per-position uniforms that pick the
            masked positions.
    """

    times: torch.Tensor
    uniforms: torch.Tensor

    def __getitem__(self, rows) -> "Noise":
        return Noise(self.times[rows], self.uniforms[rows])

    def to(self, device) -> "Noise":
        return Noise(self.times.to(device), self.uniforms.to(device))


def antithetic_times(u: float, batch_size: int) -> torch.Tensor:
    """t_i = (u + i) / B mod 1 for i = 0..B-1 (docs/concepts/time-agnostic.md): one time in each stratum [i / B, (i + 1) / B)."""
    return ((u + torch.arange(batch_size, dtype=torch.float64)) / batch_size) % 1.0


def draw_noise(generator: torch.Generator, batch_size: int, seq_len: int) -> Noise:
    """The noise of one global batch from a CPU generator (seeded identically on every process)."""
    u = torch.rand((), generator=generator, dtype=torch.float64).item()
    return Noise(antithetic_times(u, batch_size), torch.rand(batch_size, seq_len, generator=generator))


def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(batch, seq_len, vocab), (batch, seq_len) -> (batch, seq_len) cross-entropy in nats, computed in float32."""
    return F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")


class MaskedDiffusionObjective:
    """Continuous-time MDM NELBO (docs/concepts/time-agnostic.md), per token:

        NELBO = E_t [ w(t) * sum over masked l of -log p_theta(x0_l | x_t) ] / L,   w(t) = -alpha'_t / (1 - alpha_t),

    every token masked independently with probability 1 - alpha_t. The network sees the time (as the total
    noise sigma(t)) only when `config.time_conditioning`. t is drawn on [T_MIN, 1], so the expectation is the
    bound minus a small exact offset (`continuous_count_weights`); `mdm-discrete` estimates the bound itself.

    For a block-diffusion model (`config.diffusion_block_size` = B) it is BD3-LM's NELBO (Arriola et al.,
    arXiv:2503.09573): each block gets its own time (stratified over the global batch's blocks), and each block is
    scored given its noisy self and the CLEAN earlier blocks, all in one pass over [x_t ; x_0]:

        NELBO = E [ sum_b w(t_b) * sum over masked l in block b of -log p_theta(x0_l | x_t^b, x0^{<b}) ] / L.

    B = L is the MDM NELBO above; B = 1 is the autoregressive NLL, times alpha(T_MIN) - alpha(1) (~1 - 2e-3) in
    expectation: a token is masked with probability 1 - alpha_t and then weighted by w(t).
    """

    name = "mdm"
    needs_noise = True

    def __init__(self, config):
        self.schedule = get_noise_schedule(config.noise_schedule, config.noise_eps)
        self.mask_token_id = config.mask_token_id
        self.time_conditioning = config.time_conditioning
        # A network that predicts token i from position i - 1 (Dream) has no prediction for position 0: the
        # bound is that of the other L - 1 tokens given the first, which is never masked.
        self.first_position_kept = bool(getattr(config, "shift_logits", False))
        self.block_size = getattr(config, "diffusion_block_size", None)
        # A mixture of experts that trains with a load-balancing loss (LLaDA-MoE's 0.01, RND1's Qwen3-MoE one).
        self.router_aux_loss_coef = getattr(config, "router_aux_loss_coef", 0.0) \
            if getattr(config, "num_experts", None) else 0.0
        self.auxiliary_losses: list[torch.Tensor] = []
        if self.block_size is not None and self.time_conditioning:
            raise ValueError("block diffusion draws one time per block, and a time-conditioned network reads one per "
                             "sequence: train a block-diffusion model with time_conditioning=False (BD3-LM's is).")

    def draw_noise(self, generator: torch.Generator, batch_size: int, seq_len: int) -> Noise:
        if self.block_size is None:
            return draw_noise(generator, batch_size, seq_len)
        num_blocks = math.ceil(seq_len / self.block_size)
        u = torch.rand((), generator=generator, dtype=torch.float64).item()
        times = antithetic_times(u, batch_size * num_blocks).view(batch_size, num_blocks)
        return Noise(times, torch.rand(batch_size, seq_len, generator=generator))

    def token_times(self, noise: Noise, seq_len: int, first: int = 0) -> torch.Tensor:
        """(batch, seq_len) the time in [T_MIN, 1] of the tokens at positions first, first + 1, ...: their row's, or
        their block's (per-row times, as the validation grid draws them, give every block of a row the same time:
        the same expectation)."""
        times = noise.times if noise.times.dim() == 2 else noise.times[:, None]
        if times.shape[1] > 1:  # one time per block
            times = times.repeat_interleave(self.block_size, dim=1)[:, first : first + seq_len]
        return T_MIN + (1 - T_MIN) * times.expand(-1, seq_len)

    def corrupt(self, input_ids: torch.Tensor, noise: Noise, first: int = 0):
        """-> (masked (batch, seq_len) bool, weight (batch, seq_len) per masked cross-entropy, time t (batch,)), for
        the tokens at positions first, first + 1, ... of their rows."""
        t = self.token_times(noise, input_ids.shape[1], first)
        masked = noise.uniforms < (1 - self.schedule.alpha(t))
        weight = (1 - T_MIN) * self.schedule.loss_weight(t) / input_ids.shape[1]
        return masked, weight, t[:, 0]

    def network_logits(self, model, noisy_ids, input_ids, t):
        """The denoiser's logits for x_t: with the clean copy beside it for a block-diffusion model."""
        timesteps = self.schedule.total_noise(t).float() if self.time_conditioning else None
        clean = {"clean_input_ids": input_ids} if self.block_size is not None else {}
        if not (self.router_aux_loss_coef and model.training):
            return model(noisy_ids, timesteps=timesteps, **clean).logits
        outputs = model(noisy_ids, timesteps=timesteps, output_router_logits=True, **clean)
        self.auxiliary_losses.append(self.router_aux_loss_coef * outputs.aux_loss)
        return outputs.logits

    def training_loss(self, model, input_ids: torch.Tensor, noise: Noise, **extras) -> torch.Tensor:
        """The loss a training step minimises: the mean bound over the rows, plus the routers' load-balancing loss
        (weighted by `router_aux_loss_coef`) for a mixture of experts that trains with one. Validation reports the
        bound alone (`sequence_losses`)."""
        self.auxiliary_losses = []
        loss = self.sequence_losses(model, input_ids, noise, **extras).mean()
        return loss + sum(self.auxiliary_losses) if self.auxiliary_losses else loss

    def sequence_losses(self, model, input_ids: torch.Tensor, noise: Noise) -> torch.Tensor:
        """(batch, seq_len) clean blocks -> (batch,) NELBO estimates in nats per token."""
        if self.first_position_kept:  # the process runs on positions 1..L-1; position 0 stays clean
            masked, weight, t = self.corrupt(input_ids[:, 1:], Noise(noise.times, noise.uniforms[:, 1:]), first=1)
            masked = torch.cat([torch.zeros_like(masked[:, :1]), masked], dim=1)
            weight = torch.cat([torch.zeros_like(weight[:, :1]), weight], dim=1)
        else:
            masked, weight, t = self.corrupt(input_ids, noise)
        noisy_ids = torch.where(masked, self.mask_token_id, input_ids)
        logits = self.network_logits(model, noisy_ids, input_ids, t)
        masked_nll = token_cross_entropy(logits, input_ids) * masked
        return (weight.to(masked_nll.dtype) * masked_nll).sum(-1)


class DiscreteMaskedDiffusionObjective(MaskedDiffusionObjective):
    """The same NELBO over the number of masked tokens (paper Prop. 3.1, docs/concepts/time-agnostic.md):

        n ~ Uniform{1..L},  mask n positions chosen uniformly,  NELBO = E_n [ (L / n) * sum of masked CE ] / L,

    with n_i = floor(L * s_i) + 1 for the stratified s_i, so n too is stratified across the global batch.
    A time-conditioned network is told the time at which alpha_t = 1 - n / L.
    """

    name = "mdm-discrete"

    def __init__(self, config):
        super().__init__(config)
        if self.block_size is not None:
            raise ValueError("objective mdm-discrete has no block form: a block-diffusion model trains with BD3-LM's "
                             "NELBO, objective mdm.")

    def corrupt(self, input_ids: torch.Tensor, noise: Noise, first: int = 0):
        seq_len = input_ids.shape[1]
        num_masked = (noise.times * seq_len).floor().long().clamp(max=seq_len - 1) + 1
        # The n positions with the smallest uniforms: a uniformly random subset of size n.
        ranks = noise.uniforms.argsort(dim=-1).argsort(dim=-1)
        masked = ranks < num_masked[:, None]
        t = self.schedule.inverse(1 - num_masked.double() / seq_len).clamp(max=1.0)
        return masked, (1.0 / num_masked.double())[:, None].expand(-1, seq_len), t


class SupervisedObjective(MaskedDiffusionObjective):
    """Supervised fine-tuning on chat examples (LLaDA's SFT recipe): rows `[prompt][response][EOS padding]` with the
    response starting at `prompt_lengths`. Per example,

        loss = w(t) * (sum over masked response positions of -log p_theta(x0_l | x_t)) / m,

    m the response length (its EOS padding included, which is trained on), w(t) = -alpha'_t / (1 - alpha_t) the
    NELBO weight (1/t for the linear and log-linear schedules: LLaDA's 1 / p_mask), every response position masked
    with probability 1 - alpha_t, the prompt never masked and never scored. So the loss is the MDM bound per
    response token of the response given the prompt; t is drawn as for the continuous NELBO (stratified over the
    global batch, on [T_MIN, 1] with its Jacobian 1 - T_MIN).
    """

    name = "sft"
    needs_prompt = True

    def sequence_losses(self, model, input_ids: torch.Tensor, noise: Noise, prompt_lengths: torch.Tensor) -> torch.Tensor:
        """(batch, seq_len) rows and (batch,) prompt lengths -> (batch,) bounds in nats per response token."""
        response = torch.arange(input_ids.shape[1], device=input_ids.device)[None, :] >= prompt_lengths[:, None]
        t = self.token_times(noise, input_ids.shape[1])
        masked = response & (noise.uniforms < (1 - self.schedule.alpha(t)))
        weight = (1 - T_MIN) * self.schedule.loss_weight(t) / response.sum(-1, keepdim=True).clamp(min=1)
        noisy_ids = torch.where(masked, self.mask_token_id, input_ids)
        logits = self.network_logits(model, noisy_ids, input_ids, t[:, 0])
        masked_nll = token_cross_entropy(logits, input_ids) * masked
        return (weight.to(masked_nll.dtype) * masked_nll).sum(-1)


class AutoregressiveObjective:
    """Next-token cross-entropy of a causal LM, per predicted token (exact likelihood, not a bound).

    The first token of a block has no prediction, so a block of L tokens scores L - 1 of them.
    """

    name = "ar"
    needs_noise = False

    def __init__(self, config):
        pass

    def draw_noise(self, generator, batch_size, seq_len):
        return None

    def sequence_losses(self, model, input_ids: torch.Tensor, noise=None) -> torch.Tensor:
        logits = model(input_ids).logits[:, :-1]
        return token_cross_entropy(logits, input_ids[:, 1:]).mean(-1)

    def training_loss(self, model, input_ids: torch.Tensor, noise=None, **extras) -> torch.Tensor:
        return self.sequence_losses(model, input_ids).mean()


OBJECTIVES = {
    objective.name: objective
    for objective in (MaskedDiffusionObjective, DiscreteMaskedDiffusionObjective, SupervisedObjective,
                      AutoregressiveObjective)
}


def get_objective(name: str, config):
    """The objective called `name` ("mdm", "mdm-discrete", "sft" or "ar") for a model with this config."""
    if name not in OBJECTIVES:
        raise ValueError(f"objective must be one of {tuple(OBJECTIVES)}, got {name!r}.")
    return OBJECTIVES[name](config)


ESTIMATES = {
    "ar": "nll",  # exact next-token NLL
    "mdm-discrete": "nelbo",  # the bound itself, in expectation over the noise
    "mdm": "truncated_nelbo",  # the bound minus the offset of `continuous_count_weights`
    "sft": "truncated_nelbo",  # the same, for the response given the prompt
}


@dataclass
class ValidationResult:
    """Held-out loss in nats per token, and what it is (`estimate`):

    - "nll" (objective "ar"): a causal LM's exact next-token NLL; `perplexity` = exp of it, exact.
    - "nelbo" ("mdm-discrete"): an unbiased estimate of the MDM's NELBO, the mean over masked counts n = 1..L of
      (L / n) x the masked cross-entropy, per token. Its expectation is an upper bound on -log p_theta(x) / L, the
      NLL of the MDM's own generative distribution (the first-hitting sampler's: any-order generation averaged over
      orders, Jensen), and equals it for an exact denoiser. `is_bound` True: exp(nats_per_token) bounds the
      perplexity, in expectation over the noise.
    - "truncated_nelbo" ("mdm", and "sft" for a response given its prompt): the continuous-time form on
      [T_MIN, 1] with the model's schedule. Its expectation is that bound MINUS the offset
      (1 / L) sum_n (1 - w_n) g(n) >= 0 (`continuous_count_weights`): ~0.1-0.2% of a token's loss with T_MIN = 1e-3
      and the log-linear eps = 1e-3 (for an exact denoiser it lies below the true NLL by that much). `is_bound`
      False: it bounds nothing exactly, though it is within that offset of a bound.
    """

    nats_per_token: float
    perplexity: float
    num_sequences: int
    num_tokens: int
    is_bound: bool
    estimate: str = ""


@torch.no_grad()
def validation_loss(model, input_ids: torch.Tensor, objective: str = "mdm", batch_size: int = 32, num_passes: int = 1,
                    seed: int = 0, accelerator=None, prompt_lengths: torch.Tensor | None = None) -> ValidationResult:
    """The objective's loss on held-out blocks, with noise fixed by `seed` so that runs are comparable.

    Pass k gives block j the time s = (u_k + pi_k(j)) / N, with u_k and the permutation pi_k drawn from `seed`
    (a stratified grid over all N blocks, decorrelated from block order), and fixed per-position uniforms. The
    result does not depend on `batch_size` nor on the number of processes.

    Args:
        model: an hf_mdm model (objective "mdm", "mdm-discrete" or "sft") or a causal LM ("ar"); put in eval
            mode for the call and restored afterwards.
        input_ids (`torch.LongTensor` of shape `(num_blocks, seq_len)`): clean held-out blocks.
        objective: "mdm" (continuous time), "mdm-discrete" (number of masked tokens), "sft" or "ar".
        batch_size: blocks per forward pass (per process).
        num_passes: independent noise draws per block; more passes, less variance.
        seed: fixes the time grid and the masks.
        accelerator: an `accelerate.Accelerator`; when given, the blocks are split across its processes and the
            sums reduced, and the model's inputs go to its device.
        prompt_lengths (`torch.LongTensor` of shape `(num_blocks,)`, *optional*): objective "sft": where each
            row's response starts (the loss is per response token, the prompt never masked).
    """
    config = (accelerator.unwrap_model(model) if accelerator is not None else model).config
    objective = get_objective(objective, config)
    num_blocks, seq_len = input_ids.shape
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    device = accelerator.device if accelerator else next(model.parameters()).device
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    for k in range(num_passes):
        generator = torch.Generator().manual_seed(seed * 1_000_003 + k)
        noise = None
        if objective.needs_noise:
            u = torch.rand((), generator=generator, dtype=torch.float64).item()
            order = torch.randperm(num_blocks, generator=generator)
            noise = Noise(antithetic_times(u, num_blocks)[order], torch.rand(num_blocks, seq_len, generator=generator))
        # Every process makes the same number of forward calls (DDP and FSDP forwards hold collectives): the rows
        # are dealt round-robin and padded past the end with copies of the last block, whose losses are dropped.
        rows = torch.arange(rank, math.ceil(num_blocks / world) * world, world)
        real = (rows < num_blocks).to(device)
        rows = rows.clamp(max=num_blocks - 1)
        for start in range(0, len(rows), batch_size):
            batch_rows = rows[start : start + batch_size]
            batch_noise = noise[batch_rows].to(device) if noise is not None else None
            extras = {}
            if getattr(objective, "needs_prompt", False):
                if prompt_lengths is None:
                    raise ValueError("objective 'sft' needs prompt_lengths (where each row's response starts).")
                extras["prompt_lengths"] = prompt_lengths[batch_rows].to(device)
            losses = objective.sequence_losses(model, input_ids[batch_rows].to(device), batch_noise, **extras)
            total += (losses.double() * real[start : start + batch_size]).sum()
    if accelerator is not None:
        total = accelerator.reduce(total, reduction="sum")
    model.train(was_training)
    nats = total.item() / (num_blocks * num_passes)
    predicted_first = objective.name != "ar" and not getattr(objective, "first_position_kept", False)
    if getattr(objective, "needs_prompt", False):  # the response tokens (EOS padding included) are the ones scored
        num_tokens = int((seq_len - prompt_lengths[:num_blocks]).sum())
    else:
        num_tokens = num_blocks * (seq_len if predicted_first else seq_len - 1)
    estimate = ESTIMATES[objective.name]
    return ValidationResult(nats, math.exp(min(nats, 700.0)), num_blocks, num_tokens, is_bound=estimate == "nelbo",
                            estimate=estimate)


def validation_nelbo(model, input_ids: torch.Tensor, discrete: bool = False, batch_size: int = 32,
                     num_passes: int = 1, seed: int = 0, accelerator=None) -> ValidationResult:
    """Validation NELBO of an MDM in nats per token and exp of it, on a fixed, seeded time grid (see
    `validation_loss`). `discrete=True` uses the form over the number of masked tokens, whose expectation is the
    bound (`is_bound`); the default continuous form sits below it by the offset of `continuous_count_weights`."""
    objective = "mdm-discrete" if discrete else "mdm"
    return validation_loss(model, input_ids, objective, batch_size, num_passes, seed, accelerator)
