"""An independent reference of Dream's own decoding loop, to test hf_mdm's Dream decoding against token for token.

Written in our own words from reading Dream's `generation_utils.py` (the remote code of the Hub checkpoints
Dream-org/Dream-v0-Base-7B and Dream-org/Dream-v0-Instruct-7B, loaded with trust_remote_code; the GitHub repository
DreamLM/Dream holds only demos and evaluation code that call `model.diffusion_generate`) and the copy of it that
NVlabs/Fast-dLLM ships as `dream/model/generation_utils.py` (plus its `generation_utils_block.py`), which adds the
`confidence_threshold` rule. No code is copied from either.

What Dream does (`DreamGenerationMixin.diffusion_generate` -> `DreamGenerationMixin._sample`):

1. Length. max_length = prompt length + max_new_tokens; the prompt is right-padded with [MASK] up to max_length
   (`x`). `num_return_sequences` repeats rows (repeat_interleave) before anything else; not modelled here (repeat
   the inputs yourself). Dream never stops early: every position up to max_length is decoded, EOS is a token like
   any other, and the logits of the [MASK] id itself are NOT suppressed (a position whose chosen token is [MASK]
   stays masked).

2. Padding (`_sample`, before the loop). Only when an attention_mask is given AND has a zero somewhere:
   - the (B, prompt_len) mask is right-padded with ones to max_length (the [MASK] positions are attended to);
   - position ids `tok_idx` = cumsum(mask) - 1, then set to 1 at the padded (mask == 0) positions: real prompt
     tokens get 0, 1, 2, ... and the generated region continues the count without gaps;
   - the network's mask is (B, 1, L, L) boolean mask[b, j] & mask[b, i] (query i, key j): pad queries see nothing
     (SDPA returns 0 for such fully masked rows in torch >= 2.5), real queries do not see pad keys.
   Otherwise (no mask, or a mask of all ones) the network gets attention_mask="full" (SDPA without a mask) and
   tok_idx=None (positions 0..L-1). The same mask and positions are used for every call.

3. Time grid. timesteps = torch.linspace(1, eps, steps + 1) in the default float dtype on x's device; call i
   (0-based) goes from t = timesteps[i] to s = timesteps[i + 1].

4. Every call i (exactly `steps` network calls):
   a. mask_index = (x == mask_token_id), over the WHOLE sequence (a [MASK] inside the prompt counts too);
   b. raw = network(x, attention_mask, tok_idx).logits; logits = cat(raw[:, :1], raw[:, :-1]) along the sequence:
      the distribution of token i is the raw output at i - 1 (position 0 keeps its own);
   c. `generation_logits_hook_func(i, x, logits)` (identity by default; not modelled);
   d. the masked rows' logits are gathered in row-major order (batch, then position): logits[mask_index];
   e. alg "origin" (Austin et al. 2021, Dream's default):
        p = 1 - s / t, or exactly 1 on the last call;
        ONE torch.rand over all masked positions of the batch (flattened); a position is revealed when its
        uniform < p (each masked position independently: the per-row count is random, NOT int(n * (1 - s/t)));
        the revealed rows' logits go through `sample_tokens` (below) and the tokens are written; the others stay
        [MASK]. On the last call every uniform in [0, 1) is < 1, so everything left is revealed.
      other algs: `sample_tokens` on ALL masked rows, which returns (confidence, token) per row:
        "maskgit_plus": confidence = the probability of the returned token (top-1 at temperature 0; at
                        temperature > 0 the probability of the SAMPLED token, not the top-1);
        "topk_margin":  confidence = top-1 minus top-2 probability;
        "entropy":      confidence = sum_v p_v * log(p_v + 1e-10) (negative entropy; higher = more certain);
      then k = int(n * (1 - s / t)) with n = mask_index.sum() / batch_size (a float tensor: the MEAN number of
      masked positions per row, equal to each row's count when rows are alike), and k = int(n) on the last call;
      the confidences are scattered into a (B, L) tensor that is -inf at unmasked positions (dtype = the logits'
      dtype, e.g. bfloat16 for the real model); if k > 0:
        alg_temp None or 0: torch.topk(confidences, k) per row;
        alg_temp > 0: torch.multinomial(softmax(confidences / alg_temp), k) per row, without replacement (the -inf
                      positions get probability 0);
      and the chosen positions receive their token (tokens for the other masked positions are thrown away).
      Ties: torch.topk over the (B, L) row breaks equal confidences by its own (device-dependent) rule; equal
      confidences are common in bfloat16 and at probability 1.0, so a token-exact match needs the same topk call on
      the same tensor extent (this module does that; Fast-dLLM's block rule ranks the span from the block start).
   f. `generation_tokens_hook_func(i, x, logits)` (identity by default; not modelled).

5. `sample_tokens(logits, temperature, top_p, top_k, margin_confidence, neg_entropy)`:
   logits / temperature (only if temperature > 0) -> top-p filter (only if top_p is not None and < 1) -> top-k filter
   (only if top_k is not None) -> softmax = probs. Filtered entries are set to finfo(dtype).min (so they get
   probability exactly 0). The top-p rule (`top_p_logits`): sort descending, cumulative softmax; an entry is
   removed when the cumulative probability BEFORE it exceeds top_p (the first entry is always kept). The top-k rule
   (`top_k_logits`): remove entries strictly below the k-th largest value (ties at the boundary are kept).
   NOTE: the filters apply at temperature 0 too. The argmax token is unchanged, but the confidence is computed from
   the renormalised filtered distribution, so top_p / top_k change maskgit_plus / topk_margin / entropy scores
   (hence the ORDER) even in greedy decoding.
   Tokens: temperature > 0 -> `torch.distributions.Categorical(probs=probs).sample()` inside a try; on any exception
   (e.g. the Simplex validation |sum(p) - 1| < 1e-6 failing for bfloat16 probs over a large vocabulary, or NaNs) it
   silently falls back to the argmax for ALL rows of that call. temperature 0 -> argmax (first maximal index).
   So at Dream's recommended settings (entropy, temperature 0.2, top_p 0.95) the ORDER comes from the entropy of the
   tempered nucleus distribution and the TOKENS are samples from it.

6. Random-number calls, in order, all on the GLOBAL torch generator of x's device (Dream takes no generator):
   per call, "origin": (1) torch.rand(n_masked_total); (2) only when temperature > 0: torch.multinomial(probs / probs
   .sum(-1), 1, replacement=True) over the revealed rows (Categorical.sample; skipped when its validation raised).
   Other algs: (1) only when temperature > 0: the same multinomial over ALL masked rows of the batch; (2) only when
   alg_temp not in (None, 0) and k > 0: torch.multinomial(softmax(conf / alg_temp), k, replacement=False) on the
   (B, L) scores. Greedy decoding (temperature 0 and alg_temp None/0, any alg but "origin") draws nothing.
   This module makes the same calls with the same shapes in the same order (with `generator=None` it uses the global
   generator, like Dream), so on the same device, with the same seed and bit-identical logits, it reproduces Dream's
   samples; an implementation that draws differently (Gumbel noise, one draw per row, another order) can only be
   compared in distribution.

7. Step counts (confidence algs, one row of n masks, eps = 1e-3), checked by `self_check` below:
   16 tokens / 16 steps -> [0, 1 x 14, 2]; 16 tokens / 8 steps -> [1, 2, 2, 2, 2, 2, 2, 3]; 256 / 256 -> [0, 1 x 254,
   2]. The first call rounds 16 * 0.999 / 16 down to 0, so one call is wasted and the last call takes two. The counts
   are float32 truncations: with eps = 0, 16 / 16 gives [1, 0, 1, ..., 1, 2] (16 * (1 - s/t) lands just below an
   integer at call 1), and another device's linspace may round differently near integers.

Fast-dLLM's Dream threshold rules (NVlabs/Fast-dLLM, dream/model/), reproduced here with `threshold=`:
  - `generation_utils.py`, alg="confidence_threshold" (no cache; batch 1; the masked count must divide by steps):
    quota = n_masked // steps per call plus a carry; each call scores every masked position like maskgit_plus,
    takes the top-(quota + carry) and keeps the best one always and the others only if their confidence is
    >= threshold; the dropped ones are carried to the next call. When the last scheduled call drops any, one more
    call is added (steps += 1, once) with quota 0 (only the carry), and so on until all are unmasked.
  - `generation_utils_block.py` (used by Fast-dLLM's eval with use_cache; `block_length` here): blocks of
    block_length over the generated region, left to right; the first call of a block decodes the block's FIRST
    position unconditionally (the token `sample_tokens` gives there from a call on the full sequence), then each
    call keeps, among the block's masked positions, the most confident one and every other one with confidence >=
    threshold, until the block is full (no step budget). Fast-dLLM serves these later calls from a prefix (or dual)
    KV cache, which changes the logits slightly; this module recomputes the whole sequence each call, i.e. it
    reproduces the DECISION rule, not the cached numerics. (That file's non-threshold path always scores by entropy
    and is not modelled.)

Interface: `logits_fn(x, attention_mask, position_ids) -> raw logits (B, L, V)`, the network's UNSHIFTED output.
With mask_format="4d" (default) it receives exactly what Dream's network receives: attention_mask None (Dream's
"full") or the (B, 1, L, L) boolean mask, and position_ids None or tok_idx. With mask_format="2d" it receives the
(B, L) padded 0/1 mask (or None) instead, e.g. to plug in `llada_dream_reference.dream_reference_logits`:
    logits_fn = lambda x, mask, pos: dream_reference_logits(config, weights, x, mask)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F


DREAM_ALGS = ("origin", "maskgit_plus", "topk_margin", "entropy")
ENTROPY_EPS = 1e-10  # Dream's log(p + 1e-10)
SIMPLEX_TOL = 1e-6  # torch.distributions.constraints.simplex: |sum(p) - 1| < 1e-6


# ------------------------------------------------------------------------------------------------ schedule


def dream_timesteps(steps: int, eps: float = 1e-3, device=None) -> torch.Tensor:
    """Dream's grid 1 = t_0 > t_1 > ... > t_steps = eps (default float dtype, like `_sample`)."""
    return torch.linspace(1, eps, steps + 1, device=device)


def dream_transfer_count(mean_masked: torch.Tensor, t: torch.Tensor, s: torch.Tensor, last: bool) -> int:
    """How many positions per row a confidence-ordered call unmasks: int(n * (1 - s/t)) truncated, all of n on the
    last call. `mean_masked` is the float tensor mask_index.sum() / batch_size, as in `_sample`."""
    return int(mean_masked) if last else int(mean_masked * (1 - s / t))


def dream_step_counts(num_masked: int, steps: int, eps: float = 1e-3, batch_size: int = 1) -> list[int]:
    """Per-call counts of Dream's confidence algs for rows that each start with `num_masked` masks."""
    grid = dream_timesteps(steps, eps)
    counts, remaining = [], num_masked
    for i in range(steps):
        mean = torch.full((batch_size, remaining), True).sum() / batch_size
        k = dream_transfer_count(mean, grid[i], grid[i + 1], last=i == steps - 1)
        counts.append(k)
        remaining -= k
    return counts


# ------------------------------------------------------------------------------------------------ padding


def dream_padding(attention_mask: torch.Tensor | None, total_length: int):
    """Dream's conversion of a (B, prompt_len) 0/1 mask, done once before the loop.

    Returns (mask_2d, mask_4d, tok_idx): all None unless the mask has a zero (Dream then uses "full" attention and
    positions 0..L-1); otherwise the mask right-padded with ones to total_length, the (B, 1, L, L) boolean
    key-and-query mask, and positions cumsum - 1 with 1 at the padded positions."""
    if attention_mask is None or not bool((attention_mask == 0).any()):
        return None, None, None
    extra = total_length - attention_mask.shape[1]
    mask_2d = F.pad(attention_mask, (0, extra), value=1)
    keep = mask_2d != 0
    tok_idx = mask_2d.long().cumsum(-1) - 1
    tok_idx = tok_idx.masked_fill(~keep, 1)
    mask_4d = keep[:, None, :, None] & keep[:, None, None, :]
    return mask_2d, mask_4d, tok_idx


def shift_dream_logits(raw: torch.Tensor) -> torch.Tensor:
    """Row i of the result is the raw output at i - 1 (row 0 keeps its own), as Dream's loop does."""
    return torch.cat([raw[:, :1], raw[:, :-1]], dim=1)


# ------------------------------------------------------------------------------------------------ scoring


def dream_filtered_logits(logits: torch.Tensor, temperature: float = 0.0, top_p: float | None = None,
                          top_k: int | None = None) -> torch.Tensor:
    """Temperature (only if > 0), then nucleus (only if top_p < 1), then top-k; filtered entries -> finfo.min."""
    if temperature > 0:
        logits = logits / temperature
    floor = torch.finfo(logits.dtype).min
    if top_p is not None and top_p < 1:
        ordered, order = torch.sort(logits, dim=-1, descending=True)
        running = torch.cumsum(torch.softmax(ordered, dim=-1), dim=-1)
        # cumulative probability of everything ranked above each entry (0 for the best one)
        above = torch.cat([torch.zeros_like(running[..., :1]), running[..., :-1]], dim=-1)
        drop_sorted = above > top_p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, floor)
    if top_k is not None:
        kth_value = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth_value, floor)
    return logits


def _draw_tokens(probs: torch.Tensor, generator: torch.Generator | None):
    """Categorical(probs).sample() as Dream calls it, with its try/except: the distribution renormalises, validates
    the simplex (|sum - 1| < 1e-6 and p >= 0, unless validation is switched off globally) and draws one multinomial
    sample per row with replacement. Returns None where Dream's except branch would take the argmax instead."""
    normalised = probs / probs.sum(-1, keepdim=True)
    if torch.distributions.Distribution._validate_args:
        valid = (normalised >= 0).all(-1) & ((normalised.sum(-1) - 1).abs() < SIMPLEX_TOL)
        if not bool(valid.all()):
            return None
    try:
        return torch.multinomial(normalised.reshape(-1, probs.shape[-1]), 1, True, generator=generator)[:, 0]
    except RuntimeError:
        return None


def dream_scores(logits: torch.Tensor, alg: str = "maskgit_plus", temperature: float = 0.0,
                 top_p: float | None = None, top_k: int | None = None, generator: torch.Generator | None = None):
    """(confidence, token) per row of (N, V) shifted logits, as Dream's `sample_tokens` computes them for `alg`.

    Every score comes from the tempered, filtered distribution. maskgit_plus: the probability of the returned token
    (the sampled one at temperature > 0); topk_margin: top-1 minus top-2 probability; entropy: sum p log(p + 1e-10).
    "origin" uses the tokens only (its confidence is maskgit_plus's and ignored)."""
    probs = torch.softmax(dream_filtered_logits(logits, temperature, top_p, top_k), dim=-1)
    tokens = _draw_tokens(probs, generator) if temperature > 0 else None
    if tokens is None:
        confidence, tokens = probs.max(dim=-1)
    else:
        confidence = probs.gather(-1, tokens[:, None])[:, 0]
    if alg == "topk_margin":
        best_two = torch.topk(probs, 2, dim=-1).values
        confidence = best_two[:, 0] - best_two[:, 1]
    elif alg == "entropy":
        confidence = (probs * torch.log(probs + ENTROPY_EPS)).sum(-1)
    elif alg not in ("maskgit_plus", "origin"):
        raise ValueError(f"unknown alg {alg!r}; Dream's are {DREAM_ALGS}")
    return confidence, tokens


# ------------------------------------------------------------------------------------------------ the loop


@dataclass
class DreamTrace:
    """What happened per network call: how many positions each row unmasked, the scheduled count k (confidence algs;
    None for origin / threshold), and optionally x after the call."""

    unmasked: list = field(default_factory=list)  # one (B,) list per call
    scheduled: list = field(default_factory=list)
    history: list = field(default_factory=list)


def dream_reference_generate(
    logits_fn: Callable,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 16,
    steps: int = 16,
    eps: float = 1e-3,
    alg: str = "origin",
    alg_temp: float | None = None,
    temperature: float = 0.0,
    top_p: float | None = None,
    top_k: int | None = None,
    mask_token_id: int = 151666,
    generator: torch.Generator | None = None,
    threshold: float | None = None,
    block_length: int | None = None,
    mask_format: str = "4d",
    trace: DreamTrace | None = None,
    keep_history: bool = False,
) -> torch.Tensor:
    """Dream's `diffusion_generate` / `_sample` on any network: returns the (B, prompt_len + max_new_tokens) ids.

    `logits_fn(x, attention_mask, position_ids)` returns the raw, UNSHIFTED logits; see the module docstring for the
    mask formats. `generator=None` draws from the global generator like Dream. `threshold` switches to Fast-dLLM's
    confidence_threshold rule (`alg` must be "maskgit_plus", whose scores it uses): the global one of its
    generation_utils.py, or with `block_length` the block one of generation_utils_block.py (without its KV cache).
    Pass a `DreamTrace` to record per-call counts (and x with keep_history)."""
    if alg not in DREAM_ALGS:
        raise ValueError(f"unknown alg {alg!r}; Dream's are {DREAM_ALGS}")
    if mask_format not in ("4d", "2d"):
        raise ValueError("mask_format must be '4d' or '2d'")
    if block_length is not None and threshold is None:
        raise NotImplementedError("Fast-dLLM's block loop without a threshold (always entropy) is not modelled")
    if threshold is not None and alg != "maskgit_plus":
        raise ValueError("Fast-dLLM's confidence_threshold scores like maskgit_plus: pass alg='maskgit_plus'")

    batch, prompt_len = input_ids.shape
    total = prompt_len + max_new_tokens
    x = F.pad(input_ids, (0, max_new_tokens), value=mask_token_id)
    mask_2d, mask_4d, tok_idx = dream_padding(attention_mask, total)
    net_mask = mask_4d if mask_format == "4d" else mask_2d

    def call(i):
        return shift_dream_logits(logits_fn(x, net_mask, tok_idx))

    def record(before, scheduled):
        if trace is not None:
            newly = (before == mask_token_id) & (x != mask_token_id)
            trace.unmasked.append(newly.sum(-1).tolist())
            trace.scheduled.append(scheduled)
            if keep_history:
                trace.history.append(x.clone())

    if threshold is not None:
        if block_length is None:
            _threshold_global(x, call, steps, threshold, temperature, top_p, top_k, mask_token_id, generator, record)
        else:
            _threshold_blocks(x, call, prompt_len, max_new_tokens, steps, block_length, threshold, temperature,
                              top_p, top_k, mask_token_id, generator, record)
        return x

    grid = dream_timesteps(steps, eps, device=x.device)
    for i in range(steps):
        last = i == steps - 1
        before = x.clone()
        masked = x == mask_token_id
        logits = call(i)
        rows = logits[masked]  # (n_masked_total, V), batch-major then position
        t, s = grid[i], grid[i + 1]
        if alg == "origin":
            reveal_prob = 1 if last else 1 - s / t
            reveal = torch.rand(rows.shape[0], device=x.device, generator=generator) < reveal_prob
            filled = torch.full((rows.shape[0],), mask_token_id, dtype=torch.long, device=x.device)
            _, filled[reveal] = dream_scores(rows[reveal], "origin", temperature, top_p, top_k, generator)
            x[masked] = filled
            record(before, None)
            continue
        confidence, tokens = dream_scores(rows, alg, temperature, top_p, top_k, generator)
        k = dream_transfer_count(masked.sum() / batch, t, s, last)
        scores = torch.full(x.shape, -torch.inf, dtype=logits.dtype, device=x.device)
        scores[masked] = confidence
        if k > 0:
            if alg_temp is None or alg_temp == 0:
                chosen = torch.topk(scores, k, dim=-1).indices
            else:
                weights = torch.softmax(scores / alg_temp, dim=-1)
                chosen = torch.multinomial(weights, k, replacement=False, generator=generator)
            proposal = torch.full_like(x, mask_token_id)
            proposal[masked] = tokens
            row_ids = torch.arange(batch, device=x.device)[:, None].expand_as(chosen)
            x[row_ids, chosen] = proposal[row_ids, chosen]
        record(before, k)
    return x


def _keep_confident(scores_row: torch.Tensor, budget: int, threshold: float) -> torch.Tensor:
    """Fast-dLLM's selection: the top-`budget` positions by score; the best is kept always, any other below
    `threshold` is dropped. Returns the kept positions' indices and the number dropped."""
    values, order = torch.topk(scores_row, budget)
    keep = values >= threshold
    keep[0] = True
    return order[keep], int((~keep).sum())


def _threshold_global(x, call, steps, threshold, temperature, top_p, top_k, mask_token_id, generator, record):
    """Fast-dLLM generation_utils.py, alg='confidence_threshold' (see the module docstring)."""
    if x.shape[0] != 1:
        raise ValueError("Fast-dLLM's confidence_threshold decodes one row at a time")
    n_masked = int((x == mask_token_id).sum())
    if n_masked % steps:
        raise ValueError("Fast-dLLM's confidence_threshold needs the number of masks to divide by steps")
    quota, carry, i = n_masked // steps, 0, 0
    while i < steps:
        before = x.clone()
        masked = x == mask_token_id
        logits = call(i)
        confidence, tokens = dream_scores(logits[masked], "maskgit_plus", temperature, top_p, top_k, generator)
        scores = torch.full(x.shape, -torch.inf, dtype=logits.dtype, device=x.device)
        scores[masked] = confidence
        proposal = torch.full_like(x, mask_token_id)
        proposal[masked] = tokens
        budget = quota + carry
        kept, dropped = _keep_confident(scores[0], budget, threshold)
        carry = dropped
        if dropped and i == steps - 1:
            # Fast-dLLM bumps `steps` inside its loop over the dropped ones, which makes its own `i < steps - 1`
            # test true again for the rest: one extra call however many were dropped, and quota 0 from then on
            quota = 0
            steps += 1
        x[0, kept] = proposal[0, kept]
        record(before, None)
        i += 1


def _threshold_blocks(x, call, prompt_len, gen_len, steps, block_length, threshold, temperature, top_p, top_k,
                      mask_token_id, generator, record):
    """Fast-dLLM generation_utils_block.py with alg='confidence_threshold', recomputed without a KV cache."""
    if x.shape[0] != 1:
        raise ValueError("Fast-dLLM's block decoding handles one row at a time")
    if gen_len % block_length or steps % (gen_len // block_length):
        raise ValueError("Fast-dLLM needs max_new_tokens % block_length == 0 and steps % num_blocks == 0")
    for block in range(gen_len // block_length):
        start = prompt_len + block * block_length
        end = start + block_length
        # the block's first call: every position is scored (all L rows, RNG included), only `start` is written
        before = x.clone()
        logits = call(None)
        _, tokens = dream_scores(logits[0], "maskgit_plus", temperature, top_p, top_k, generator)
        x[0, start] = tokens[start]
        record(before, None)
        while bool((x[0, start:end] == mask_token_id).any()):
            before = x.clone()
            logits = call(None)
            # scored: every masked position from the block start to the END (the prefix-cache call's span)
            masked = torch.zeros_like(x, dtype=torch.bool)
            masked[:, start:] = x[:, start:] == mask_token_id
            confidence, tokens = dream_scores(logits[masked], "maskgit_plus", temperature, top_p, top_k, generator)
            scores = torch.full(x.shape, -torch.inf, dtype=logits.dtype, device=x.device)
            scores[masked] = confidence
            scores[:, end:] = -torch.inf
            proposal = torch.full_like(x, mask_token_id)
            proposal[masked] = tokens
            budget = int((x[0, start:end] == mask_token_id).sum())
            # topk over the span from the block start, as Fast-dLLM does: ties (equal confidences, common in
            # bfloat16 or at probability 1.0) break by position within the tensor that topk sees
            kept, _ = _keep_confident(scores[0, start:], budget, threshold)
            x[0, start + kept] = proposal[0, start + kept]
            record(before, None)


# ------------------------------------------------------------------------------------------------ self-check


def _toy_network(vocab: int, mask_token_id: int, seed: int = 0, width: int = 16, max_len: int = 64):
    """A tiny bidirectional one-layer attention network honouring Dream's mask and positions, never predicting
    [MASK] (so every position ends filled). Returns logits_fn(x, mask_4d_or_None, positions_or_None)."""
    g = torch.Generator().manual_seed(seed)
    embed = torch.randn(vocab, width, generator=g)
    pos_embed = torch.randn(max_len, width, generator=g)
    head = torch.randn(width, vocab, generator=g) * 2

    def logits_fn(x, mask, positions):
        if positions is None:
            positions = torch.arange(x.shape[1])[None].expand_as(x)
        h = embed[x] + pos_embed[positions]
        att = F.scaled_dot_product_attention(h[:, None], h[:, None], h[:, None], attn_mask=mask)[:, 0]
        out = (h + att) @ head
        out[..., mask_token_id] = torch.finfo(out.dtype).min
        return out

    return logits_fn


def self_check() -> None:
    V, MASK = 40, 39
    net = _toy_network(V, MASK)
    prompt = torch.randint(0, MASK, (2, 5), generator=torch.Generator().manual_seed(1))

    # 1. the step counts claimed in the issue, from the schedule alone
    assert dream_step_counts(16, 16) == [0] + [1] * 14 + [2], dream_step_counts(16, 16)
    assert dream_step_counts(16, 8) == [1, 2, 2, 2, 2, 2, 2, 3], dream_step_counts(16, 8)
    assert dream_step_counts(256, 256) == [0] + [1] * 254 + [2]
    assert dream_step_counts(16, 16, eps=0.0) == [1, 0] + [1] * 13 + [2]  # float32 truncation at eps = 0
    for n, steps in [(16, 16), (16, 8), (32, 5), (7, 3), (64, 64)]:
        assert sum(dream_step_counts(n, steps)) == n

    # 2. the loop follows the schedule and fills everything, for every confidence alg and sampling setting
    for alg in ("maskgit_plus", "topk_margin", "entropy"):
        for temperature, top_p, top_k, alg_temp in [(0.0, None, None, None), (0.2, 0.95, None, None),
                                                    (1.0, None, 5, 0.5), (0.0, 0.9, None, 0.0)]:
            for n, steps in [(16, 16), (16, 8), (12, 5)]:
                tr = DreamTrace()
                out = dream_reference_generate(net, prompt, max_new_tokens=n, steps=steps, alg=alg,
                                               temperature=temperature, top_p=top_p, top_k=top_k, alg_temp=alg_temp,
                                               mask_token_id=MASK, generator=torch.Generator().manual_seed(0),
                                               trace=tr)
                assert (out != MASK).all() and torch.equal(out[:, :5], prompt)
                assert tr.scheduled == dream_step_counts(n, steps), (alg, tr.scheduled)
                assert all(row == [k] * 2 for row, k in zip(tr.unmasked, tr.scheduled))

    # 3. origin: random per-position counts, but everything left is revealed on the last call
    tr = DreamTrace()
    out = dream_reference_generate(net, prompt, max_new_tokens=16, steps=8, alg="origin", mask_token_id=MASK,
                                   generator=torch.Generator().manual_seed(0), trace=tr)
    assert (out != MASK).all() and sum(sum(r) for r in tr.unmasked) == 32 and len(tr.unmasked) == 8

    # 4. the shift: raw output j peaks at token j % MASK -> generated position i holds (i - 1) % MASK
    def diagonal(x, mask, positions):
        raw = torch.zeros(*x.shape, V)
        raw[:, torch.arange(x.shape[1]), torch.arange(x.shape[1]) % MASK] = 5.0
        return raw
    for alg in DREAM_ALGS:
        out = dream_reference_generate(diagonal, prompt, max_new_tokens=8, steps=4, alg=alg, mask_token_id=MASK,
                                       generator=torch.Generator().manual_seed(0))
        assert torch.equal(out[0, 5:], torch.arange(4, 12) % MASK), (alg, out)

    # 5. padding: positions, masks, and row-wise equality with unpadded single-row runs at temperature 0
    padded = torch.tensor([[0, 0, 7, 8, 9], [1, 2, 3, 4, 5]])
    attn = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    m2, m4, pos = dream_padding(attn, 9)
    assert pos.tolist() == [[1, 1, 0, 1, 2, 3, 4, 5, 6], [0, 1, 2, 3, 4, 5, 6, 7, 8]]
    assert m4.shape == (2, 1, 9, 9) and not m4[0, 0, 0].any() and m4[0, 0, 2].tolist() == [False] * 2 + [True] * 7
    assert dream_padding(torch.ones(2, 5, dtype=torch.long), 9) == (None, None, None)
    for alg in ("maskgit_plus", "topk_margin", "entropy"):
        both = dream_reference_generate(net, padded, attn, max_new_tokens=8, steps=8, alg=alg, mask_token_id=MASK)
        alone0 = dream_reference_generate(net, padded[:1, 2:], max_new_tokens=8, steps=8, alg=alg, mask_token_id=MASK)
        alone1 = dream_reference_generate(net, padded[1:], max_new_tokens=8, steps=8, alg=alg, mask_token_id=MASK)
        assert torch.equal(both[0, 2:], alone0[0]) and torch.equal(both[1], alone1[0]), alg

    # 6. randomness: generator=None uses the global generator (Dream's), seeded runs repeat, greedy draws nothing
    for alg, temperature, alg_temp in [("origin", 0.0, None), ("entropy", 0.2, None), ("maskgit_plus", 0.0, 0.3)]:
        kw = dict(max_new_tokens=16, steps=8, alg=alg, temperature=temperature, top_p=0.95, alg_temp=alg_temp,
                  mask_token_id=MASK)
        torch.manual_seed(3)
        a = dream_reference_generate(net, prompt, **kw)
        b = dream_reference_generate(net, prompt, generator=torch.Generator().manual_seed(3), **kw)
        assert torch.equal(a, b), alg
    state = torch.get_rng_state()
    dream_reference_generate(net, prompt, max_new_tokens=16, steps=8, alg="entropy", top_p=0.9, mask_token_id=MASK)
    assert torch.equal(state, torch.get_rng_state())

    # 7. Fast-dLLM threshold rules: everything filled; threshold 0 -> full quotas; a threshold no probability reaches
    # -> exactly one per call (the scheduled calls, then one extension call at a time)
    one = prompt[:1]
    for thr in (0.0, 0.9, 1.5):
        tr = DreamTrace()
        out = dream_reference_generate(net, one, max_new_tokens=16, steps=4, alg="maskgit_plus", threshold=thr,
                                       mask_token_id=MASK, trace=tr)
        assert (out != MASK).all()
        if thr == 0.0:
            assert [r[0] for r in tr.unmasked] == [4, 4, 4, 4]
        if thr == 1.5:
            assert [r[0] for r in tr.unmasked] == [1] * 16
        tr = DreamTrace()
        out = dream_reference_generate(net, one, max_new_tokens=16, steps=4, alg="maskgit_plus", threshold=thr,
                                       block_length=8, mask_token_id=MASK, trace=tr)
        assert (out != MASK).all()
        if thr == 0.0:
            assert [r[0] for r in tr.unmasked] == [1, 7, 1, 7]
        if thr == 1.5:
            assert [r[0] for r in tr.unmasked] == [1] * 16
    print("dream_decoding_reference self-check passed")


if __name__ == "__main__":
    self_check()
