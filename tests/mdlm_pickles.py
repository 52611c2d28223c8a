"""Writes Lightning checkpoints the way MDLM's training writes them, without omegaconf, hydra or transformers 4.

MDLM's `Diffusion.__init__` calls `save_hyperparameters()`, so Lightning pickles the run's hydra config (an omegaconf
`DictConfig`) and its tokenizer into every checkpoint, with `torch.save` (pickle protocol 2). This module writes the
same pickle: every object is NEWOBJ'd (or REDUCE'd) under the module and class name the real library pickles it as
(`omegaconf.dictconfig.DictConfig`, `transformers.models.bert.tokenization_bert.BertTokenizer`, ...), with the same
state, in the same order, through Python's own pickler. What it reproduces, from omegaconf 2.3.0, hydra-core 1.3.2
and transformers 4.38.2 (the versions MDLM pins):

- `DictConfig` / `ListConfig` / `AnyNode`, each with a `ContainerMetadata` / `Metadata` holding `typing.Any`,
  `dict` / `list` / `int` markers and a `collections.defaultdict(dict)` resolver cache: empty on every node but the
  root, where hydra's `now` resolver (registered with `use_cache=True`) leaves `{"now": {("%Y.%m.%d",): ...}}`;
  the root carries hydra's struct flag; `_parent` links make cycles; enum members (hydra's `RunMode`) are REDUCE'd;
- the tokenizers of MDLM's data sets after its `get_tokenizer`: LM1B's slow `BertTokenizer` (vocabulary laid out
  like bert-base-uncased's: [PAD] 0, [UNK] 100, [CLS] 101, [SEP] 102, [MASK] 103), OpenWebText's
  `GPT2TokenizerFast` (a `tokenizers.Tokenizer` pickled as its tokenizer.json bytes; BertProcessing; [PAD] added
  after the vocabulary) and text8's own `dataloader.Text8Tokenizer` ([MASK] = 4).

`tests/data/mdlm_pickles/` holds the same objects pickled by the real libraries (and the script that made them);
test_convert_mdlm.py checks that this writer gives the same object tree and globals.
"""

import copyreg
import json
import pickle
import types
import typing
from collections import OrderedDict, defaultdict
from pathlib import Path

import torch

from mdlm_reference import MDLMReferenceDiT, backbone_state


# ----------------------------------------------------------------------------------------------------------------
# A pickler that writes chosen classes under the names the real libraries pickle them as.
# ----------------------------------------------------------------------------------------------------------------


class NamedGlobalPickler(pickle._Pickler):
    """Python's pickler, except that a class with `__pickle_global__ = (module, name)` in its own namespace is
    written as GLOBAL 'module name' (what pickling the real class writes), without importing `module`."""

    def save_global(self, obj, name=None):
        target = obj.__dict__.get("__pickle_global__") if isinstance(obj, type) else None
        if target is None:
            return super().save_global(obj, name)
        module, qualname = target
        self.write(pickle.GLOBAL + f"{module}\n{qualname}\n".encode("utf-8"))
        self.memoize(obj)


# What torch.save(..., pickle_module=PICKLE_MODULE) subclasses.
PICKLE_MODULE = types.ModuleType("mdlm_pickle_module")
PICKLE_MODULE.Pickler = NamedGlobalPickler


class Pickled:
    """An instance pickled as NEWOBJ of its class (with `newargs`) then BUILD with `state`: protocol 2's default
    for a plain object, whose state is its `__dict__` unless `state` is set."""

    def __reduce_ex__(self, protocol):
        newargs = self.__dict__.get("__newargs__", ())
        state = self.__dict__["__state__"] if "__state__" in self.__dict__ else self.__dict__
        if self.__dict__.get("__fresh__"):
            # Objects from Rust (tokenizers' AddedToken) build their state anew on every pickling, strings included,
            # so no string of it is shared with (memoized against) the rest of the pickle.
            state = {_fresh(key): _fresh(value) for key, value in state.items() if key != "__fresh__"}
        return copyreg.__newobj__, (type(self),) + tuple(newargs), state


def _fresh(value):
    """An equal str that is a new object (not interned), or the value itself."""
    return "".join(list(value)) if isinstance(value, str) and len(value) > 1 else value


_CLASSES: dict = {}


def named(module: str, qualname: str) -> type:
    """The stand-in class written as `module.qualname` (one per name, so pickles memoize it like the real one)."""
    key = (module, qualname)
    if key not in _CLASSES:
        _CLASSES[key] = type(qualname.rpartition(".")[2], (Pickled,), {"__pickle_global__": key})
    return _CLASSES[key]


def make(module: str, qualname: str, state=None, newargs=(), **fields):
    """An instance of `named(module, qualname)` whose `__dict__` is `fields` (or whose state is `state`)."""
    instance = object.__new__(named(module, qualname))
    instance.__dict__.update(fields)
    if state is not None:
        instance.__dict__["__state__"] = state
    if newargs:
        instance.__dict__["__newargs__"] = newargs
    return instance


class PickledEnum:
    """An enum member: REDUCE of its class with its value, as `Enum.__reduce_ex__` writes it."""

    def __init__(self, module: str, qualname: str, value):
        self.cls, self.value = named(module, qualname), value

    def __reduce_ex__(self, protocol):
        return self.cls, (self.value,)


# ----------------------------------------------------------------------------------------------------------------
# omegaconf 2.3.0 containers, as hydra 1.3.2 hands them to the task function.
# ----------------------------------------------------------------------------------------------------------------


def _metadata(key, object_type=None, flags=None, resolver_cache=None, container=False, key_type=typing.Any):
    fields = dict(ref_type=typing.Any, object_type=object_type, optional=True, key=key, flags=flags or {},
                  flags_root=False, resolver_cache=defaultdict(dict, resolver_cache or {}))
    if container:
        fields.update(key_type=key_type, element_type=typing.Any)
        return make("omegaconf.base", "ContainerMetadata", **fields)
    return make("omegaconf.base", "Metadata", **fields)


def _node(value, key, parent):
    if isinstance(value, dict):
        node = make("omegaconf.dictconfig", "DictConfig", _metadata=_metadata(key, dict, container=True),
                    _parent=parent)
        node._content = {k: _node(v, k, node) for k, v in value.items()}
        return node
    if isinstance(value, list):
        node = make("omegaconf.listconfig", "ListConfig", _metadata=_metadata(key, list, container=True, key_type=int),
                    _parent=parent)
        node._content = [_node(v, i, node) for i, v in enumerate(value)]
        return node
    return make("omegaconf.nodes", "AnyNode", _metadata=_metadata(key), _parent=parent, _val=value)


def omegaconf_config(content: dict, resolver_cache: dict | None = None):
    """The `DictConfig` hydra passes to MDLM's `main`: struct flag on the root, the root's resolver cache filled
    (`resolver_cache`, e.g. {"now": {("%Y.%m.%d",): "2024.05.01"}}), every other node's empty."""
    root = make("omegaconf.dictconfig", "DictConfig",
                _metadata=_metadata(None, dict, flags={"struct": True}, resolver_cache=resolver_cache, container=True),
                _parent=None)
    root._content = {key: _node(value, key, root) for key, value in content.items()}
    return root


NOW_CACHE = {"now": {("%Y.%m.%d",): "2024.05.01", ("%H%M%S",): "120000"}}
RUN_MODE = PickledEnum("hydra.types", "RunMode", 1)  # hydra.types.RunMode.RUN


def mdlm_hydra_config(reference: MDLMReferenceDiT, **overrides) -> dict:
    """The parts of MDLM's configs/config.yaml (with model=small's keys) that the converter reads, and a few that it
    does not (interpolations, lists, an enum member, the run directory that fills the `now` cache)."""
    fields = reference.fields
    config = {
        "mode": "train", "diffusion": "absorbing_state", "backbone": "dit", "parameterization": "subs",
        "time_conditioning": fields["time_conditioning"], "T": 0, "subs_masking": False, "seed": 1,
        "loader": {"global_batch_size": 512, "eval_global_batch_size": "${.global_batch_size}",
                   "batch_size": "${div_up:${.global_batch_size}, ${eval:${trainer.devices} * ${trainer.num_nodes}}}"},
        "sampling": {"predictor": "ddpm_cache", "steps": 128, "noise_removal": True},
        "training": {"ema": 0.9999, "antithetic_sampling": True, "sampling_eps": 1e-3},
        "noise": {"type": "loglinear", "sigma_min": 1e-4, "sigma_max": 20},
        "model": {"name": "small", "type": "ddit", "hidden_size": fields["hidden_dim"], "cond_dim": fields["cond_dim"],
                  "length": fields["model_length"], "n_blocks": fields["n_blocks"], "n_heads": fields["n_heads"],
                  "scale_by_sigma": True, "dropout": fields["dropout"], "tie_word_embeddings": False},
        "data": {"train": "openwebtext", "tokenizer_name_or_path": "gpt2", "wrap": True},
        "trainer": {"_target_": "lightning.Trainer", "devices": "${device_count:}", "num_nodes": 1, "precision": "bf16"},
        "wandb": {"project": "text-diffusion", "tags": ["${noise.type}", "${data.train}"]},
        "checkpointing": {"save_dir": "${cwd:}", "resume_ckpt_path": "${.save_dir}/checkpoints/last.ckpt"},
        "hydra_mode": RUN_MODE,
    }
    for key, value in overrides.items():
        config[key] = value
    return config


# ----------------------------------------------------------------------------------------------------------------
# transformers 4.38.2 tokenizers, after MDLM's get_tokenizer.
# ----------------------------------------------------------------------------------------------------------------

TOKENIZER_COMMON = dict(name_or_path="", _processor_class=None, model_max_length=int(1e30), padding_side="right",
                        truncation_side="right")


def _added_token(content, normalized=False, special=True):
    return make("tokenizers", "AddedToken", content=content, single_word=False, lstrip=False, rstrip=False,
                normalized=normalized, special=special, __fresh__=True)


def _trie(tokens):
    data = {}
    for token in tokens:
        node = data
        for char in token:
            node = node.setdefault(char, {})
        node[""] = 1
    return make("transformers.tokenization_utils", "Trie", data=data, _tokens={_fresh(token) for token in tokens})


def _slow_tail(model_input_names, specials: dict) -> dict:
    """The fields PreTrainedTokenizerBase and SpecialTokensMixin leave in a slow tokenizer's __dict__."""
    return dict(
        model_input_names=model_input_names, clean_up_tokenization_spaces=True, split_special_tokens=False,
        deprecation_warnings={}, _in_target_context_manager=False, chat_template=None,
        **{f"_{name}_token": specials.get(name) for name in ("bos", "eos", "unk", "sep", "pad", "cls", "mask")},
        _pad_token_type_id=0, _additional_special_tokens=[], verbose=False,
    )


def bert_base_uncased_words(extra=("the", "a", "of", "##s", "to", "and")) -> list[str]:
    """bert-base-uncased's layout for its first 104 ids ([PAD] 0, [unused0..98], [UNK] 100, [CLS] 101, [SEP] 102,
    [MASK] 103), then a few words."""
    return ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(extra)


def bert_tokenizer(words=None):
    """`transformers.BertTokenizer(vocab.txt)` with MDLM's bos = [CLS], eos = [SEP] (LM1B runs)."""
    words = bert_base_uncased_words() if words is None else words
    vocab = OrderedDict((word, i) for i, word in enumerate(words))
    specials = ["[UNK]", "[SEP]", "[PAD]", "[CLS]", "[MASK]"]  # the order transformers adds them in
    decoder = {vocab[token]: _added_token(token) for token in specials}
    return make(
        "transformers.models.bert.tokenization_bert", "BertTokenizer",
        vocab=vocab, ids_to_tokens=OrderedDict((i, word) for word, i in vocab.items()), do_basic_tokenize=True,
        basic_tokenizer=make("transformers.models.bert.tokenization_bert", "BasicTokenizer", do_lower_case=True,
                             never_split=set(), tokenize_chinese_chars=True, strip_accents=None, do_split_on_punc=True),
        wordpiece_tokenizer=make("transformers.models.bert.tokenization_bert", "WordpieceTokenizer", vocab=vocab,
                                 unk_token="[UNK]", max_input_chars_per_word=100),
        tokens_trie=_trie(specials), _added_tokens_decoder=decoder,
        _added_tokens_encoder={_fresh(token): vocab[token] for token in specials}, init_inputs=(),
        init_kwargs=dict(do_lower_case=True, do_basic_tokenize=True, never_split=None, unk_token="[UNK]",
                         sep_token="[SEP]", pad_token="[PAD]", cls_token="[CLS]", mask_token="[MASK]",
                         tokenize_chinese_chars=True, strip_accents=None),
        **TOKENIZER_COMMON,
        **_slow_tail(["input_ids", "token_type_ids", "attention_mask"],
                     dict(bos="[CLS]", eos="[SEP]", unk="[UNK]", sep="[SEP]", pad="[PAD]", cls="[CLS]", mask="[MASK]")),
        _decode_use_source_tokenizer=False,
    )


def _bpe_model_json(vocab) -> dict:
    return {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "vocab": vocab, "merges": []}


def gpt2_tokenizer_fast(symbols="abcdefghijĠ.,"):
    """`transformers.GPT2TokenizerFast(vocab.json, merges.txt)` after MDLM's get_tokenizer: a BertProcessing post
    processor and [PAD] added after the vocabulary (OpenWebText runs). No mask token."""
    vocab = {symbol: i for i, symbol in enumerate(symbols)}
    eos = len(vocab)
    vocab["<|endoftext|>"] = eos

    def entry(index, content, normalized):
        return {"id": index, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
                "normalized": normalized, "special": True}

    model = dict(_bpe_model_json(vocab), continuing_subword_prefix="", end_of_word_suffix="")
    spec = {"version": "1.0", "truncation": None, "padding": None,
            "added_tokens": [entry(eos, "<|endoftext|>", True), entry(eos + 1, "[PAD]", False)],
            "normalizer": None,
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
            "post_processor": {"type": "BertProcessing", "sep": ["<|endoftext|>", eos], "cls": ["<|endoftext|>", eos]},
            "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
            "model": model}
    dummy_model = make("tokenizers.models", "Model",
                       state=json.dumps(_bpe_model_json({}), separators=(",", ":")).encode())
    backend = make("tokenizers", "Tokenizer", state=json.dumps(spec, separators=(",", ":"), ensure_ascii=False).encode(),
                   newargs=(dummy_model,))

    def endoftext(special=False):
        return _added_token("<|endoftext|>", normalized=True, special=special)

    return make(
        "transformers.models.gpt2.tokenization_gpt2_fast", "GPT2TokenizerFast",
        _tokenizer=backend, _decode_use_source_tokenizer=False, init_inputs=(),
        init_kwargs=dict(unk_token=endoftext(), bos_token=endoftext(), eos_token=endoftext(), add_prefix_space=False,
                         errors="replace", pad_token=None, add_bos_token=False),
        **TOKENIZER_COMMON,
        model_input_names=["input_ids", "attention_mask"], clean_up_tokenization_spaces=True,
        split_special_tokens=False, deprecation_warnings={}, _in_target_context_manager=False, chat_template=None,
        _bos_token=endoftext(special=True), _eos_token=endoftext(), _unk_token=endoftext(), _sep_token=None,
        _pad_token=_added_token("[PAD]"), _cls_token=None, _mask_token=None, _pad_token_type_id=0,
        _additional_special_tokens=[], verbose=False, add_bos_token=False, add_prefix_space=False,
    )


TEXT8_SPECIALS = ("[CLS]", "[SEP]", "[BOS]", "[EOS]", "[MASK]", "[PAD]", "[RESERVED]", "[UNK]")


def text8_tokenizer():
    """MDLM's `dataloader.Text8Tokenizer()`: 8 special tokens ([MASK] = 4) then 27 characters."""
    characters = list("abcdefghijklmnopqrstuvwxyz ")
    to_int = {token: i for i, token in enumerate(TEXT8_SPECIALS)}
    to_int.update({char: i + len(TEXT8_SPECIALS) for i, char in enumerate(characters)})
    added = ["[BOS]", "[EOS]", "[UNK]", "[SEP]", "[PAD]", "[CLS]", "[MASK]"]  # the order transformers adds them in
    return make(
        "dataloader", "Text8Tokenizer",
        characters=characters, _vocab_str_to_int=to_int, _vocab_int_to_str={i: token for token, i in to_int.items()},
        tokens_trie=_trie(added), _added_tokens_decoder={to_int[token]: _added_token(token) for token in added},
        _added_tokens_encoder={_fresh(token): to_int[token] for token in added}, init_inputs=(),
        init_kwargs=dict(bos_token="[BOS]", eos_token="[EOS]", sep_token="[SEP]", cls_token="[CLS]", pad_token="[PAD]",
                         mask_token="[MASK]", unk_token="[UNK]"),
        **TOKENIZER_COMMON,
        **_slow_tail(["input_ids", "token_type_ids", "attention_mask"],
                     dict(bos="[BOS]", eos="[EOS]", unk="[UNK]", sep="[SEP]", pad="[PAD]", cls="[CLS]", mask="[MASK]")),
        _decode_use_source_tokenizer=False,
    )


# The ids MDLM's Diffusion derives from each tokenizer: (tokenizer, mask, bos, eos, pad, model vocabulary size).
BERT_IDS = dict(mask=103, bos=101, eos=102, pad=0, vocab_size=len(bert_base_uncased_words()))
GPT2_IDS = dict(mask=14, bos=13, eos=13, pad=14, vocab_size=15)  # [PAD] = [MASK] = 14, after 13 symbols + <|endoftext|>
TEXT8_IDS = dict(mask=4, bos=2, eos=3, pad=5, vocab_size=35)
TOKENIZERS = {"bert": (bert_tokenizer, BERT_IDS), "gpt2": (gpt2_tokenizer_fast, GPT2_IDS),
              "text8": (text8_tokenizer, TEXT8_IDS)}


# ----------------------------------------------------------------------------------------------------------------
# The checkpoint Lightning 2.2.1 writes for MDLM.
# ----------------------------------------------------------------------------------------------------------------


def save_mdlm_checkpoint(path, model: MDLMReferenceDiT, ema_model: MDLMReferenceDiT | None = None, config=None,
                         tokenizer=None, prefix: str = "backbone.") -> Path:
    """`trainer.save_checkpoint` of MDLM's Diffusion: Lightning's keys, MDLM's `ema` (on_save_checkpoint) and the
    hyper-parameters save_hyperparameters() records (`config`, `tokenizer`), torch.save'd with protocol 2."""
    parameters = list(model.parameters())
    checkpoint = {
        "epoch": 0,
        "global_step": 3,
        "pytorch-lightning_version": "2.2.1",
        "state_dict": backbone_state(model, prefix),
        "loops": {"fit_loop": {"state_dict": {}, "epoch_loop.state_dict": {"_batches_that_stepped": 3},
                               "epoch_loop.batch_progress": {"total": {"ready": 3, "completed": 3, "started": 3,
                                                                       "processed": 3},
                                                             "current": {"ready": 3, "completed": 3, "started": 3,
                                                                         "processed": 3},
                                                             "is_last_batch": False}}},
        "callbacks": {"ModelCheckpoint{'monitor': None, 'mode': 'min', 'every_n_train_steps': 0, 'every_n_epochs': 1, "
                      "'train_time_interval': None}": {"monitor": None, "best_model_score": None,
                                                       "kth_value": torch.tensor(float("inf")), "best_k_models": {},
                                                       "dirpath": "/checkpoints", "last_model_path": ""}},
        "optimizer_states": [{"state": {i: {"step": torch.tensor(3.0), "exp_avg": torch.zeros_like(p),
                                            "exp_avg_sq": torch.zeros_like(p)} for i, p in enumerate(parameters)},
                              "param_groups": [{"lr": 3e-4, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0,
                                                "amsgrad": False, "params": list(range(len(parameters)))}]}],
        "lr_schedulers": [{"base_lrs": [3e-4], "last_epoch": 3, "_step_count": 4, "lr_lambdas": [{}]}],
        "hparams_name": "kwargs",
        "hyper_parameters": {"config": config, "tokenizer": tokenizer},
    }
    if ema_model is not None:
        checkpoint["ema"] = {"decay": 0.9999, "num_updates": 3,
                             "shadow_params": [p.detach().clone() for p in ema_model.parameters()]}
    torch.save(checkpoint, path, pickle_module=PICKLE_MODULE, pickle_protocol=2)
    return Path(path)
