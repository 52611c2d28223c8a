"""The special token ids of a tokenizer pickled into a checkpoint, read without constructing it.

MDLM's `Diffusion.__init__` calls `save_hyperparameters()`, so every Lightning checkpoint of an MDLM run pickles
the run's tokenizer (`hyper_parameters.tokenizer`), and MDLM decides [MASK] from it: the tokenizer's own mask token
when it has one (LM1B's `bert-base-uncased`: 103; text8's `Text8Tokenizer`: 4), else a new id after its vocabulary
(`mask_index = tokenizer.vocab_size`: GPT-2's 50257). Its bos / eos / pad tokens are the run's too (MDLM sets a
missing bos to [CLS], a missing eos to [SEP], and adds [PAD] when there is none: for GPT-2 that [PAD] gets id
50257, the same id as [MASK]).

`safe_load.torch_load_weights_only` leaves the tokenizer a `PickledObject`; its `state` is the tokenizer's
`__dict__`. This module looks the ids up in it, in the layouts transformers 4 and 5 pickle:
- the special token strings: `_mask_token`, `_bos_token`, ... (transformers 4: a str or an `AddedToken`, whose
  state holds its `content`), or `_special_tokens_map` (transformers 5);
- their ids: the added-token tables (`_added_tokens_encoder` str -> id, `_added_tokens_decoder` id -> AddedToken),
  a slow tokenizer's vocabulary (any str -> int table of its state: BERT's `vocab`, GPT-2's `encoder`, text8's
  `_vocab_str_to_int`), or a fast tokenizer's `tokenizers.Tokenizer`, pickled as its tokenizer.json text.
Every table that knows a token must give it the same id; otherwise the id counts as unreadable.
"""

import json
from dataclasses import dataclass, field

from .safe_load import PickledObject


SPECIAL_TOKENS = ("mask", "bos", "eos", "pad")
ADDED_TOKEN_TABLES = ("_added_tokens_encoder", "added_tokens_encoder")


@dataclass
class PickledTokenizerIds:
    """What the pickled tokenizer says about the run's ids.

    Args:
        class_name: the tokenizer class the pickle names (e.g. `transformers.models.bert.tokenization_bert.BertTokenizer`).
        readable: whether its mask token (or the absence of one) could be read.
        mask_token: the mask token's text; None when the tokenizer has none (or when unreadable).
        ids: "mask_token_id", "bos_token_id", "eos_token_id", "pad_token_id" -> id, for the tokens it has and whose
            id could be read.
        vocab_size: the tokenizer's own vocabulary size (MDLM's `tokenizer.vocab_size`, added tokens left out),
            when it can be read.
        problems: why something could not be read.
    """

    class_name: str
    readable: bool = False
    mask_token: str | None = None
    ids: dict = field(default_factory=dict)
    vocab_size: int | None = None
    problems: list[str] = field(default_factory=list)


def _state(value) -> dict:
    state = value.state if isinstance(value, PickledObject) else None
    if isinstance(state, tuple) and len(state) == 2 and isinstance(state[0], dict):  # (dict state, slot state)
        state = state[0]
    return state if isinstance(state, dict) else {}


def _token_text(value) -> str | None:
    """A special token as pickled: a str, or an `AddedToken` stand-in whose state holds its `content`."""
    if isinstance(value, str):
        return value
    content = _state(value).get("content")
    return content if isinstance(content, str) else None


def _is_str_to_int(table) -> bool:
    return isinstance(table, dict) and bool(table) and all(
        isinstance(key, str) and isinstance(value, int) and not isinstance(value, bool) for key, value in table.items()
    )


def _fast_tokenizer_json(state: dict, problems: list[str]) -> dict | None:
    """The tokenizer.json of a fast tokenizer: `tokenizers.Tokenizer` pickles it as its state (bytes or str)."""
    backend = state.get("_tokenizer")
    text = backend.state if isinstance(backend, PickledObject) else None
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    if not isinstance(text, str):
        return None
    try:
        parsed = json.loads(text)
    except ValueError:
        problems.append("its pickled tokenizer.json is not valid JSON")
        return None
    except RecursionError:
        problems.append("its pickled tokenizer.json nests deeper than Python's recursion limit")
        return None
    return parsed if isinstance(parsed, dict) else None


def _lookup_tables(state: dict, problems: list[str]) -> tuple[list[tuple[str, dict]], int | None]:
    """(name, str -> id table) for every place the state records ids, and the base vocabulary size if known."""
    tables, vocab_size = [], None
    decoder = state.get("_added_tokens_decoder")
    if isinstance(decoder, dict):
        decoded = {_token_text(token): index for index, token in decoder.items() if isinstance(index, int)}
        tables.append(("_added_tokens_decoder", {text: index for text, index in decoded.items() if text is not None}))
    vocabularies = []
    for name, table in state.items():
        if _is_str_to_int(table):
            tables.append((name, table))
            if name not in ADDED_TOKEN_TABLES:
                vocabularies.append(len(table))
    spec = _fast_tokenizer_json(state, problems)
    if spec is not None:
        added = {entry.get("content"): entry.get("id") for entry in spec.get("added_tokens") or []
                 if isinstance(entry, dict) and isinstance(entry.get("id"), int)}
        tables.append(("tokenizer.json added_tokens", added))
        vocab = (spec.get("model") or {}).get("vocab")
        if isinstance(vocab, list):  # Unigram: [[piece, score], ...], ids in order
            vocab = {entry[0]: index for index, entry in enumerate(vocab) if isinstance(entry, (list, tuple)) and entry}
        if _is_str_to_int(vocab):
            tables.append(("tokenizer.json model.vocab", vocab))
            vocab_size = len(vocab)
    if vocab_size is None and vocabularies:
        vocab_size = max(vocabularies)  # a slow tokenizer's vocabulary: its largest str -> id table
    return tables, vocab_size


def read_pickled_tokenizer(tokenizer) -> PickledTokenizerIds:
    """The special token ids of a pickled tokenizer stand-in (see the module docstring); never constructs it."""
    name = tokenizer.qualified_name if isinstance(tokenizer, PickledObject) else type(tokenizer).__name__
    result = PickledTokenizerIds(class_name=name)
    state = _state(tokenizer)
    if not state:
        result.problems.append(f"the pickled {name} has no readable state")
        return result
    special_map = state.get("_special_tokens_map") if isinstance(state.get("_special_tokens_map"), dict) else {}
    tables, result.vocab_size = _lookup_tables(state, result.problems)

    for kind in SPECIAL_TOKENS:
        key = f"{kind}_token"
        if f"_{key}" in state:
            raw, known = state[f"_{key}"], True
        elif key in special_map:
            raw, known = special_map[key], True
        else:
            raw, known = None, False
        text = _token_text(raw)
        if kind == "mask":
            if not known or (raw is not None and text is None):
                result.problems.append(f"the pickled {name} does not say what its mask token is")
                return result
            result.mask_token = text
        if text is None:
            continue
        found = {table_name: table[text] for table_name, table in tables if text in table}
        if len(set(found.values())) == 1:
            result.ids[f"{key}_id"] = next(iter(found.values()))
        elif found:
            result.problems.append(f"its {key} {text!r} has different ids in different tables: {found}")
        else:
            result.problems.append(f"its {key} {text!r} is in none of its vocabularies")
        if kind == "mask" and f"{key}_id" not in result.ids:
            return result
    result.readable = True
    return result


__all__ = ["PickledTokenizerIds", "read_pickled_tokenizer"]
