"""The judge: a causal LM that scores samples (generative perplexity) and embeds them (MAUVE features).

Samples are text: whatever model produced them, they are decoded first and retokenized with the judge's own
tokenizer (with its default special tokens), so that MDMs and AR models with different vocabularies are scored by
one yardstick (GPT-2 Large in the literature, docs/concepts/elbo.md).

Generative perplexity, per text of n judge tokens:
    1. cut the tokens into consecutive chunks of the judge's context C (`n_positions` / `max_position_embeddings`);
    2. score each chunk on its own with next-token cross-entropy: the first token of a chunk has no prediction, so
       a text scores n - ceil(n / C) tokens;
    3. per-sample value exp(sum NLL / predicted tokens); corpus value exp(total NLL / total predicted tokens).
Chunks are batched, right-padded, with an attention mask; padded positions are masked out of the attention and of
the loss, so the padding id does not matter: it is the judge's pad token, else its EOS, else 0 (a judge without a
pad token, like GPT-2, works as it is). A text with fewer than two judge tokens has nothing to predict: it is
excluded and counted (`excluded`), its per-sample value is None, never NaN; if every text is excluded, ValueError.

MAUVE features: the judge's final hidden state at the last token of each text, truncated to `max_length` tokens
(1024 by default), as mauve-text's own featurizer does.
"""

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from ..constants import DEFAULT_JUDGE, HUB_ID_PATTERN
from ..pretrained import MDM_MODEL_TYPES, shipped_or_given
from ..training.objectives import token_cross_entropy


# Config fields that hold a causal LM's context length, in the order transformers' model families use them.
CONTEXT_FIELDS = ("n_positions", "max_position_embeddings", "n_ctx", "seq_length")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """`device`, or "cuda" when a GPU is visible and "cpu" otherwise."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def model_context(config) -> int | None:
    """A causal LM's context length from its config (`n_positions`, `max_position_embeddings`, ...), or None."""
    for name in CONTEXT_FIELDS:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 1:
            return value
    return None


@dataclass
class Judge:
    """A causal LM with its tokenizer, in eval mode on one device."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str = ""

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def context(self) -> int:
        """The longest sequence the judge scores in one piece."""
        context = model_context(self.model.config)
        if context is None:
            raise ValueError(f"judge {self.name!r}: its config has none of {CONTEXT_FIELDS}; pass max_length explicitly.")
        return context

    @property
    def pad_token_id(self) -> int:
        """Fills padded positions, which are masked out: the pad token, else EOS, else 0."""
        for token_id in (self.tokenizer.pad_token_id, self.tokenizer.eos_token_id):
            if token_id is not None:
                return token_id
        return 0

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Judge token ids of each text, with the tokenizer's default special tokens, never truncated."""
        return self.tokenizer(list(texts), verbose=False)["input_ids"]


def load_judge(judge: "str | Judge" = DEFAULT_JUDGE, device: str | torch.device | None = None,
               dtype: torch.dtype | str = torch.float32) -> Judge:
    """A `Judge` from a local folder, a shipped name ("shakespeare-ar") or a Hub id (default "openai-community/gpt2-large", which
    needs the Hub or its cache).

    A `Judge` passes through (moved to `device` if one is given). `dtype` is float32 by default, whatever the
    checkpoint stores: scores are computed in the judge's dtype, and a float16 checkpoint (such as the shipped
    shakespeare-ar) would otherwise run in float16, imprecise everywhere and many times slower on a CPU.
    """
    if isinstance(judge, Judge):
        if device is not None:
            judge.model.to(resolve_device(device))
        return judge
    name, judge = str(judge), shipped_or_given(judge)
    try:
        tokenizer = AutoTokenizer.from_pretrained(judge)
        model = AutoModelForCausalLM.from_pretrained(judge, dtype=dtype)
    except OSError as error:
        from huggingface_hub import constants as hub

        if hub.HF_HUB_OFFLINE and re.match(HUB_ID_PATTERN, name) and not Path(name).exists():
            raise OSError(f"the judge {name!r} is a Hub id, hf_mdm is working offline (HF_HUB_OFFLINE=1, or "
                          "huggingface.co cannot be reached) and it is not in the Hugging Face cache: download it once "
                          "online, or give a local folder or the shipped judge (shakespeare-ar).") from None
        raise OSError(
            f"Could not load the judge {judge!r} as a causal LM with its tokenizer ({error}). Give a local folder, or "
            "a Hub id while online (or already in the Hugging Face cache)."
        ) from error
    if model.config.model_type in MDM_MODEL_TYPES:  # AutoModelForCausalLM loads MDMs too (for pipelines)
        raise ValueError(f"the judge {judge!r} is a masked diffusion model; a judge scores next-token likelihoods, "
                         "so it must be autoregressive (e.g. shakespeare-ar, openai-community/gpt2-large).")
    return Judge(model.to(resolve_device(device)).eval(), tokenizer, name)


def _padded_batches(sequences: Sequence[Sequence[int]], batch_size: int, pad_token_id: int, device):
    """Yields (indices, input_ids, attention_mask): right-padded batches, longest sequences first."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    for start in range(0, len(order), batch_size):
        indices = order[start : start + batch_size]
        width = len(sequences[indices[0]])
        input_ids = torch.full((len(indices), width), pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(indices), width), dtype=torch.long)
        for row, i in enumerate(indices):
            input_ids[row, : len(sequences[i])] = torch.tensor(sequences[i], dtype=torch.long)
            attention_mask[row, : len(sequences[i])] = 1
        yield indices, input_ids.to(device), attention_mask.to(device)


@dataclass
class GenerativePerplexityResult:
    """Generative perplexity of a list of texts under a judge.

    Attributes:
        generative_perplexity: exp(total NLL / total predicted tokens) over the texts that were scored.
        mean_nll: total NLL / total predicted tokens, in nats.
        per_sample: exp(mean NLL) of each text; None for an excluded text.
        num_tokens: predicted judge tokens in total.
        num_scored: texts scored.
        excluded: indices of texts with fewer than two judge tokens (nothing to predict).
    """

    generative_perplexity: float
    mean_nll: float
    per_sample: list[float | None]
    num_tokens: int
    num_scored: int
    excluded: list[int] = field(default_factory=list)


@torch.no_grad()
def generative_perplexity(texts: Sequence[str], judge: Judge, batch_size: int = 8,
                          max_length: int | None = None) -> GenerativePerplexityResult:
    """Generative perplexity of `texts` under `judge` (see the module docstring for the exact definition).

    Args:
        texts: decoded samples.
        judge: from `load_judge`.
        batch_size: chunks per forward pass.
        max_length: chunk length; default the judge's context.
    """
    if len(texts) == 0:
        raise ValueError("generative_perplexity got an empty list of texts.")
    chunk_length = max_length or judge.context
    if chunk_length < 2:
        raise ValueError(f"max_length must be >= 2 (one token of context and one to predict), got {chunk_length}.")
    token_ids = judge.encode(texts)
    excluded = [i for i, ids in enumerate(token_ids) if len(ids) < 2]
    if len(excluded) == len(texts):
        raise ValueError(f"every text has fewer than two {judge.name!r} tokens: nothing to score.")

    # 1. Chunks of at most `chunk_length` tokens; a one-token tail has nothing to predict and is dropped.
    chunks, owners = [], []
    for i, ids in enumerate(token_ids):
        for start in range(0, len(ids), chunk_length):
            if len(ids) - start >= 2:
                chunks.append(ids[start : start + chunk_length])
                owners.append(i)

    # 2. Next-token cross-entropy per chunk, padding masked out.
    nll = [0.0] * len(texts)
    count = [0] * len(texts)
    model_was_training = judge.model.training
    judge.model.eval()
    for indices, input_ids, attention_mask in _padded_batches(chunks, batch_size, judge.pad_token_id, judge.device):
        logits = judge.model(input_ids=input_ids, attention_mask=attention_mask).logits
        predicted = attention_mask[:, 1:].bool()
        losses = (token_cross_entropy(logits[:, :-1], input_ids[:, 1:]) * predicted).double().sum(-1)
        for row, chunk_index in enumerate(indices):
            nll[owners[chunk_index]] += losses[row].item()
            count[owners[chunk_index]] += int(predicted[row].sum())
    judge.model.train(model_was_training)

    # 3. Per sample and corpus.
    per_sample = [math.exp(nll[i] / count[i]) if count[i] else None for i in range(len(texts))]
    mean_nll = sum(nll) / sum(count)
    return GenerativePerplexityResult(math.exp(mean_nll), mean_nll, per_sample, sum(count),
                                      len(texts) - len(excluded), excluded)


@torch.no_grad()
def judge_features(texts: Sequence[str], judge: Judge, batch_size: int = 8,
                   max_length: int = 1024) -> tuple[np.ndarray, list[int]]:
    """MAUVE features: the judge's final hidden state at the last token of each text (first `max_length` tokens).

    Returns:
        (features of shape `(num_kept, hidden_size)` in float32, indices of texts with no token, which are left out).
    """
    if len(texts) == 0:
        raise ValueError("judge_features got an empty list of texts.")
    limit = min(max_length, judge.context)
    token_ids = [ids[:limit] for ids in judge.encode(texts)]
    kept = [i for i, ids in enumerate(token_ids) if ids]
    if not kept:
        raise ValueError("every text is empty for the judge's tokenizer: no MAUVE features.")
    features = [None] * len(kept)
    sequences = [token_ids[i] for i in kept]
    for indices, input_ids, attention_mask in _padded_batches(sequences, batch_size, judge.pad_token_id, judge.device):
        outputs = judge.model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        last = attention_mask.sum(-1) - 1
        hidden = outputs.hidden_states[-1][torch.arange(len(indices), device=last.device), last]
        for row, i in enumerate(indices):
            features[i] = hidden[row].float().cpu().numpy()
    excluded = [i for i, ids in enumerate(token_ids) if not ids]
    return np.stack(features), excluded
