"""Likelihoods of continuations under an MDM, by a Monte-Carlo estimate of its ELBO (what benchmark harnesses need).

For a context c and a continuation y of m tokens, the MDM's bound (over the number of masked tokens; paper
Prop. 3.1, docs/concepts/time-agnostic.md and elbo.md) is

    -log p(y | c) <= E_l E_S [ (m / l) * sum over j in S of -log p_theta(y_j | c, y outside S) ],

l uniform in {1..m} and S a uniformly random set of l positions of y; the context is never masked. For a perfect
denoiser the bound is an equality (it is the any-order autoregressive chain rule averaged over orders).
`mc_loglikelihood` estimates it with `mc_samples` draws per request: l is stratified across the draws
(l_i = floor(m * ((u + i) / N mod 1)) + 1, one u per request), S drawn uniformly, each draw weighted by m / l.
The estimate's standard error comes with it. Every request draws from its own generator, seeded from its tokens,
so results do not depend on batching, ordering or the number of processes.

Cost: requests x mc_samples sequences, `batch_size` per network call; logits are computed at masked positions only.
"""

import hashlib
import math
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm


@dataclass
class LikelihoodEstimate:
    """`loglikelihood`: the estimated ELBO of the continuation (a lower bound on log p(y | c), in nats);
    `stderr`: its Monte-Carlo standard error; `samples`: the per-draw values (negated bound terms)."""

    loglikelihood: float
    stderr: float
    samples: list[float]


def request_generator(context: list[int], continuation: list[int], seed: int) -> torch.Generator:
    """A generator seeded from the request's tokens and `seed`: the same request always gets the same draws."""
    digest = hashlib.sha256(f"{seed}|{context}|{continuation}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def draw_masks(continuation_length: int, mc_samples: int, generator: torch.Generator) -> list[torch.LongTensor]:
    """For each draw, the masked continuation positions: l stratified over {1..m}, then l of them uniformly."""
    m = continuation_length
    u = torch.rand((), generator=generator, dtype=torch.float64).item()
    masks = []
    for i in range(mc_samples):
        count = min(int(m * (((u + i) / mc_samples) % 1.0)) + 1, m)
        masks.append(torch.randperm(m, generator=generator)[:count])
    return masks


def check_request(context: list[int], continuation: list[int], max_length: int, shifted: bool) -> None:
    if not continuation:
        raise ValueError("the continuation is empty: a likelihood needs at least one continuation token.")
    if len(continuation) + (1 if shifted else 0) > max_length:
        raise ValueError(f"the continuation has {len(continuation)} tokens, more than the model's context window "
                         f"({max_length}{', one of them for the first token a shifted model needs' if shifted else ''}).")


@torch.no_grad()
def mc_loglikelihood(model, requests: list[tuple[list[int], list[int]]], mc_samples: int = 128, batch_size: int = 32,
                     seed: int = 0, progress: bool = False, prefix_token_id: int | None = None) -> list[LikelihoodEstimate]:
    """Monte-Carlo ELBO estimates of log p(continuation | context) for token-id requests (see the module docstring).

    Args:
        model: an hf_mdm model (any family); its `forward` must take `attention_mask` and `output_positions`.
        requests: (context ids, continuation ids) pairs. A context longer than the window is cut on the left.
        mc_samples: draws per request; the standard error falls as 1 / sqrt(mc_samples).
        batch_size: sequences per network call.
        prefix_token_id: put before an empty context (a shifted model, such as Dream, needs a first token).
    """
    if not isinstance(mc_samples, int) or isinstance(mc_samples, bool) or mc_samples < 1:
        raise ValueError(f"mc_samples must be an integer >= 1, got {mc_samples!r}.")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}.")
    config = model.config
    shifted = bool(getattr(config, "shift_logits", False))
    window = config.max_position_embeddings
    items = []  # (request index, full ids, masked absolute positions, weight)
    for index, (context, continuation) in enumerate(requests):
        context, continuation = list(context), list(continuation)
        check_request(context, continuation, window, shifted)
        if not context and shifted:
            if prefix_token_id is None:
                raise ValueError("this model predicts token i from position i - 1 (shift_logits): an empty context "
                                 "needs prefix_token_id (e.g. BOS).")
            context = [prefix_token_id]
        context = context[max(len(context) + len(continuation) - window, 0):]
        ids = torch.tensor(context + continuation, dtype=torch.long)
        generator = request_generator(context, continuation, seed)
        for masked in draw_masks(len(continuation), mc_samples, generator):
            items.append((index, ids, masked + len(context), len(continuation) / len(masked)))

    device = next(model.parameters()).device
    pad_id = config.pad_token_id if config.pad_token_id is not None else 0
    order = sorted(range(len(items)), key=lambda i: (len(items[i][1]), len(items[i][2])))
    values = [[] for _ in requests]
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in tqdm(batches, desc="likelihood", disable=not progress, leave=False):
        width = max(len(items[i][1]) for i in batch)
        count = max(len(items[i][2]) for i in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        attention = torch.zeros(len(batch), width, dtype=torch.long)
        positions = torch.zeros(len(batch), count, dtype=torch.long)
        valid = torch.zeros(len(batch), count, dtype=torch.bool)
        for row, i in enumerate(batch):
            _, full, masked, _ = items[i]
            ids[row, : len(full)], attention[row, : len(full)] = full, 1
            positions[row, : len(masked)], valid[row, : len(masked)] = masked, True
        targets = ids.gather(1, positions)
        noisy = ids.clone()
        noisy.scatter_(1, positions, torch.where(valid, config.mask_token_id, targets))
        mask = None if bool(attention.all()) else attention.to(device)
        logits = model(noisy.to(device), attention_mask=mask, output_positions=positions.to(device)).logits
        log_probs = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.to(device)[..., None])[..., 0]
        log_probs = (log_probs * valid.to(device)).sum(dim=1).cpu().double()
        for row, i in enumerate(batch):
            index, _, _, weight = items[i]
            values[index].append(weight * log_probs[row].item())
    estimates = []
    for samples in values:
        mean = sum(samples) / len(samples)
        variance = sum((s - mean) ** 2 for s in samples) / max(len(samples) - 1, 1)
        estimates.append(LikelihoodEstimate(mean, math.sqrt(variance / len(samples)), samples))
    return estimates


@torch.no_grad()
def greedy_matches(model, requests: list[tuple[list[int], list[int]]], batch_size: int = 32,
                   prefix_token_id: int | None = None) -> list[bool]:
    """Whether the greedy fill of each continuation equals it: all its positions masked after the context, then
    unmasked one per network call, most confident first, by argmax (LLaDA's check in its lm-eval wrapper)."""
    config = model.config
    shifted = bool(getattr(config, "shift_logits", False))
    device = next(model.parameters()).device
    pad_id = config.pad_token_id if config.pad_token_id is not None else 0
    out = [False] * len(requests)
    by_length: dict[int, list[int]] = {}
    for index, (_, continuation) in enumerate(requests):
        by_length.setdefault(len(continuation), []).append(index)
    for length, indices in by_length.items():
        for start in range(0, len(indices), batch_size):
            chunk = indices[start : start + batch_size]
            contexts = []
            for i in chunk:
                context = list(requests[i][0]) or ([prefix_token_id] if shifted and prefix_token_id is not None else [])
                contexts.append(context[max(len(context) + length - config.max_position_embeddings, 0):])
            width = max(len(c) for c in contexts)
            ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            attention = torch.zeros(len(chunk), width, dtype=torch.long)
            for row, context in enumerate(contexts):
                if context:
                    ids[row, width - len(context):], attention[row, width - len(context):] = torch.tensor(context), 1
            filled = model.generate(ids.to(device), attention_mask=attention.to(device), max_new_tokens=length,
                                    sampler="first_hitting", unmasking="confidence", tokens_per_step=1, steps=None,
                                    confidence_threshold=None, block_length=None, temperature=0.0).cpu()
            for row, i in enumerate(chunk):
                out[i] = filled[row, -length:].tolist() == list(requests[i][1])
    return out


__all__ = ["LikelihoodEstimate", "mc_loglikelihood", "greedy_matches", "draw_masks", "request_generator"]
