"""Per-token estimates of a completion's log-probability under a masked diffusion model, for policy gradients.

A masked diffusion model has no closed-form log p(y | c) for a completion y of a prompt c: each RL method for
diffusion LMs estimates it from a few masked forward passes. Every estimator here is one rule for drawing noisy
copies of the sequence and a weight per masked completion token; the per-token estimate is

    logp_j = sum over copies k of  weight_k(j) * [j masked in copy k] * log p_theta(y_j | copy k),

and the sum of logp_j over the completion estimates (or approximates) log p(y | c). Logits are divided by the
sampling temperature first, as TRL does for autoregressive policies. The copies are drawn from per-row generators
seeded by the caller, so the old policy, the reference model and the current policy score the same masks.

- `diffu_grpo` (d1, Zhao et al. 2025, arXiv:2504.12216): one copy, the whole completion masked and each prompt token
  masked with probability `p_mask_prompt`. logp_j = log p(y_j | masked prompt). Its sum is the log-likelihood of
  the factorised (mean-field) one-step model, not log p(y | c): biased, by how much the completion's tokens depend
  on each other (and more with prompt masking); cheap (one pass) and of low variance (only the prompt mask is
  random).
- `coupled` (DiffuCoder's coupled-GRPO, Gong et al. 2025, arXiv:2506.20639): t ~ U(`coupled_time_range`) per row, a
  uniform u_j per completion token; copy 1 masks the tokens with u_j < t (weight 1/t), copy 2 exactly the others
  (weight 1/(1 - t)), so every completion token is scored exactly once across the pair; DiffuCoder's code also adds
  the fully masked copy and averages: logp_j = (log p(y_j | all masked) + w_j log p(y_j | its pair copy)) / 2.
  Biased (the ELBO is not its expectation): in expectation each token counts once from the fully masked copy and
  twice from the pair.
- `elbo`: the masked diffusion ELBO over the number of masked tokens (paper Prop. 3.1, as in
  `hf_mdm.evaluation.likelihood`): `elbo_samples` draws, each masking l of the m completion tokens (l stratified over
  {1..m}), weight m / (l * draws). Its expectation is the ELBO, a lower bound on log p(y | c) that is tight for a
  perfect denoiser; the prompt is never masked. Unbiased for the ELBO; the variance falls as 1 / draws.

A block-diffusion model (`diffusion_block_size`) scores its noisy copy beside the clean sequence, as BD3-LM trains
(each block reads the clean earlier blocks); a time-conditioned network is told the time of each copy's masking
rate.
"""

import hashlib
import inspect
from dataclasses import dataclass

import torch

from ..evaluation.likelihood import draw_masks
from ..sampling_mdm import get_noise_schedule


@dataclass
class NoisyCopies:
    """`masked` (copies, batch, length) bool: the [MASK] positions of each copy; `weights` (copies, batch, length):
    the weight of log p(token) at each masked completion position (0 elsewhere); `rates` (copies, batch): the
    fraction of the completion each copy masks, for a time-conditioned network."""

    masked: torch.Tensor
    weights: torch.Tensor
    rates: torch.Tensor


class LogProbEstimator:
    """One rule for noisy copies. `copies(scored, prompt, generators)`: scored (batch, length) are the completion
    tokens to score, prompt (batch, length) the real prompt tokens, one generator per row."""

    name: str
    copies_per_row: int

    def copies(self, scored: torch.Tensor, prompt: torch.Tensor, generators: list[torch.Generator]) -> NoisyCopies:
        raise NotImplementedError


class DiffuGRPOEstimator(LogProbEstimator):
    name = "diffu_grpo"
    copies_per_row = 1

    def __init__(self, p_mask_prompt: float = 0.15):
        if not 0.0 <= p_mask_prompt < 1.0:
            raise ValueError(f"p_mask_prompt must lie in [0, 1), got {p_mask_prompt!r}.")
        self.p_mask_prompt = p_mask_prompt

    def copies(self, scored, prompt, generators):
        uniforms = torch.stack([torch.rand(scored.shape[1], generator=g) for g in generators])
        masked = scored | (prompt & (uniforms < self.p_mask_prompt))
        return NoisyCopies(masked[None], scored.double()[None], torch.ones(1, len(scored), dtype=torch.float64))


class CoupledEstimator(LogProbEstimator):
    name = "coupled"
    copies_per_row = 3

    def __init__(self, coupled_time_range: tuple[float, float] = (0.2, 0.8)):
        low, high = coupled_time_range
        if not 0.0 < low <= high < 1.0:
            raise ValueError(f"coupled_time_range must satisfy 0 < low <= high < 1, got {tuple(coupled_time_range)}.")
        self.t_low, self.t_high = low, high

    def copies(self, scored, prompt, generators):
        t = torch.stack([self.t_low + (self.t_high - self.t_low) * torch.rand((), generator=g, dtype=torch.float64)
                         for g in generators])
        uniforms = torch.stack([torch.rand(scored.shape[1], generator=g, dtype=torch.float64) for g in generators])
        first = scored & (uniforms < t[:, None])
        second = scored & ~first
        weights = torch.stack([scored.double() / 2, first / (2 * t[:, None]), second / (2 * (1 - t[:, None]))])
        return NoisyCopies(torch.stack([scored, first, second]), weights, torch.stack([torch.ones_like(t), t, 1 - t]))


class ELBOEstimator(LogProbEstimator):
    name = "elbo"

    def __init__(self, elbo_samples: int = 8):
        if not isinstance(elbo_samples, int) or isinstance(elbo_samples, bool) or elbo_samples < 1:
            raise ValueError(f"elbo_samples must be an integer >= 1, got {elbo_samples!r}.")
        self.copies_per_row = elbo_samples

    def copies(self, scored, prompt, generators):
        draws = self.copies_per_row
        masked = torch.zeros(draws, *scored.shape, dtype=torch.bool)
        weights = torch.zeros(draws, *scored.shape, dtype=torch.float64)
        rates = torch.ones(draws, len(scored), dtype=torch.float64)
        for row, generator in enumerate(generators):
            columns = scored[row].nonzero().squeeze(1)
            m = len(columns)
            if m == 0:
                continue
            for k, chosen in enumerate(draw_masks(m, draws, generator)):
                masked[k, row, columns[chosen]] = True
                weights[k, row, columns[chosen]] = m / (len(chosen) * draws)
                rates[k, row] = len(chosen) / m
        return NoisyCopies(masked, weights, rates)


# A new estimator is one class: a LogProbEstimator whose __init__ takes (and checks) its settings by the name of
# their MDMGRPOConfig fields, registered here.
ESTIMATORS = {cls.name: cls for cls in (DiffuGRPOEstimator, CoupledEstimator, ELBOEstimator)}


def build_estimator(name: str, **settings) -> LogProbEstimator:
    """The estimator `name`, given the settings its class takes (others are ignored: a config holds every
    estimator's); bad values raise ValueError naming the field and what is allowed."""
    if name not in ESTIMATORS:
        raise ValueError(f"estimator={name!r} is not a log-probability estimator; allowed: {sorted(ESTIMATORS)}.")
    cls = ESTIMATORS[name]
    accepted = inspect.signature(cls.__init__).parameters
    return cls(**{key: value for key, value in settings.items() if key in accepted})


def row_generators(seeds: torch.Tensor, iteration: int = 0) -> list[torch.Generator]:
    """One generator per row, from its seed and the pass over the rollout (a new mask on each pass, as d1 draws).
    Hashed: a CPU generator reads only 32 bits of its seed, so seed + iteration * 2**32 would repeat the masks."""
    return [torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(f"{seed}|{iteration}".encode()).digest()[:8],
                                                         "little")) for seed in seeds.tolist()]


def completion_logps(model, estimator: LogProbEstimator, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                     completion_length: int, seeds: torch.Tensor, config=None, iteration: int = 0,
                     temperature: float = 1.0,
                     batch_size: int | None = None, compute_entropy: bool = False, compute_aux_loss: bool = False):
    """Per-token log-probability estimates of the last `completion_length` tokens of each row.

    Args:
        input_ids: (batch, length) prompt (left-padded) followed by the completion (right-padded).
        attention_mask: (batch, length), 0 on padding; padded completion positions are neither masked nor scored.
        seeds: (batch,) one seed per row; with `iteration` they fix the row's noisy copies.
        config: the model's config, when `model` is a wrapper without one (DistributedDataParallel).
        batch_size: rows per network call (each row runs `estimator.copies_per_row` copies).

    Returns:
        (logps (batch, completion_length), entropies of the predictive distributions at the scored positions
        averaged over the copies that mask them, or None; the mixture-of-experts load-balancing loss, or None).
    """
    batch, length = input_ids.shape
    device = input_ids.device
    real = attention_mask.bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
    columns = torch.arange(length, device=device)
    scored = real & (columns >= length - completion_length)[None]
    prompt = real & ~scored
    copies = estimator.copies(scored.cpu(), prompt.cpu(), row_generators(seeds, iteration))
    masked, weights = copies.masked.to(device), copies.weights.to(device)
    config = config if config is not None else model.config
    time_conditioned = bool(getattr(config, "time_conditioning", False))
    schedule = get_noise_schedule(config.noise_schedule, config.noise_eps) if time_conditioned else None
    block_model = getattr(config, "diffusion_block_size", None) is not None
    output_positions = (columns[length - completion_length:])[None].expand(batch, -1)

    all_logps, all_entropies, aux_losses = [], [], []
    step = batch_size or batch
    for start in range(0, batch, step):
        rows = slice(start, min(start + step, batch))
        n_copies = masked.shape[0]
        ids = input_ids[rows].repeat(n_copies, 1)
        copy_masked = masked[:, rows].reshape(-1, length)
        noisy = ids.masked_fill(copy_masked, config.mask_token_id)
        kwargs = {"output_positions": output_positions[rows].repeat(n_copies, 1)}
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask[rows].repeat(n_copies, 1)
        if block_model:
            kwargs["clean_input_ids"] = ids
        if time_conditioned:
            rates = copies.rates[:, rows].reshape(-1)
            kwargs["timesteps"] = schedule.total_noise(schedule.inverse(1 - rates).clamp(max=1.0)).float().to(device)
        if compute_aux_loss:
            kwargs["output_router_logits"] = True
        outputs = model(noisy, **kwargs)
        logits = outputs.logits.float() / temperature  # (copies * rows, K, vocab)
        log_probs = torch.log_softmax(logits, dim=-1)
        targets = ids[:, length - completion_length:]
        token_logps = log_probs.gather(-1, targets[..., None]).squeeze(-1).view(n_copies, -1, completion_length)
        copy_weights = weights[:, rows, length - completion_length:].to(token_logps.dtype)
        copy_masked_kept = masked[:, rows, length - completion_length:]
        # where(), not a product: a position a copy leaves unmasked may hold -inf (the [MASK] logit of a token).
        all_logps.append(torch.where(copy_masked_kept, copy_weights * token_logps, 0.0).sum(0))
        if compute_entropy:
            with torch.no_grad():
                entropy = torch.special.entr(log_probs.exp()).sum(-1).view(n_copies, -1, completion_length)
                counted = copy_masked_kept.to(entropy.dtype)
                all_entropies.append((entropy * counted).sum(0) / counted.sum(0).clamp(min=1))
        if compute_aux_loss and getattr(outputs, "aux_loss", None) is not None:
            aux_losses.append(outputs.aux_loss)
    logps = torch.cat(all_logps)
    entropies = torch.cat(all_entropies) if compute_entropy else None
    aux_loss = torch.stack(aux_losses).mean() if aux_losses else None
    return logps, entropies, aux_loss


__all__ = ["ESTIMATORS", "CoupledEstimator", "DiffuGRPOEstimator", "ELBOEstimator", "LogProbEstimator", "NoisyCopies",
           "build_estimator", "completion_logps", "row_generators"]
