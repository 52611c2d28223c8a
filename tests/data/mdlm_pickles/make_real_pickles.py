"""Writes the reference pickles in this folder with the libraries MDLM's training pins (not hf_mdm dependencies):

    python -m venv /tmp/mdlm-pickles && /tmp/mdlm-pickles/bin/pip install omegaconf==2.3.0 hydra-core==1.3.2 \
        transformers==4.38.2
    /tmp/mdlm-pickles/bin/python tests/data/mdlm_pickles/make_real_pickles.py tests/data/mdlm_pickles

Each file is `pickle.dumps(obj, protocol=2)`, the protocol torch.save uses, of what MDLM's `Diffusion` passes to
`save_hyperparameters()`: an omegaconf config as hydra leaves it (struct flag on the root, the `now` resolver
registered with use_cache=True and read once, a list, an enum member) and the tokenizers of its three data sets
(LM1B's BertTokenizer, OpenWebText's GPT2TokenizerFast, text8's own Text8Tokenizer), after MDLM's get_tokenizer
edits (bos = [CLS], eos = [SEP] for BERT; BertProcessing and an added [PAD] for GPT-2). The tests never unpickle
them for real: `tests/mdlm_pickles.py` must write the same opcodes (test_convert_mdlm.py checks it).
"""

import json
import pickle
import sys
import types
from pathlib import Path

import tokenizers
import transformers
from omegaconf import OmegaConf

BERT_WORDS = ["[PAD]", "[unused0]", "[unused1]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list("abcdefghij") + ["the", "##s"]
GPT2_SYMBOLS = "abcdefghijĠ.,"
RUN_CONFIG = {"mode": "train", "backbone": "dit", "parameterization": "subs", "time_conditioning": False,
              "model": {"hidden_size": 64, "n_heads": 4, "length": 32, "dropout": 0.1},
              "noise": {"type": "loglinear", "sigma_min": 1e-4},
              "wandb": {"tags": ["${noise.type}", "owt"]}, "hydra_mode": None,
              "run_dir": "./outputs/${now:%Y.%m.%d}/${now:%H%M%S}"}


def config():
    import hydra.types
    OmegaConf.register_new_resolver("now", lambda pattern: {"%Y.%m.%d": "2024.05.01", "%H%M%S": "120000"}[pattern],
                                    use_cache=True, replace=True)
    cfg = OmegaConf.create(dict(RUN_CONFIG, hydra_mode=hydra.types.RunMode.RUN))
    OmegaConf.set_struct(cfg, True)
    assert cfg.run_dir == "./outputs/2024.05.01/120000"  # fills the root's resolver cache, as hydra does
    return cfg


def bert(folder: Path):
    (folder / "vocab.txt").write_text("\n".join(BERT_WORDS) + "\n")
    tokenizer = transformers.BertTokenizer(str(folder / "vocab.txt"))
    tokenizer.bos_token, tokenizer.eos_token = tokenizer.cls_token, tokenizer.sep_token
    return tokenizer


def gpt2(folder: Path):
    vocab = {symbol: i for i, symbol in enumerate(GPT2_SYMBOLS)}
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = transformers.GPT2TokenizerFast(vocab_file=str(folder / "vocab.json"), merges_file=str(folder / "merges.txt"))
    tokenizer._tokenizer.post_processor = tokenizers.processors.BertProcessing(
        (tokenizer.bos_token, tokenizer.bos_token_id), (tokenizer.eos_token, tokenizer.eos_token_id))
    tokenizer.add_special_tokens({"pad_token": "[PAD]"})
    return tokenizer


def text8():
    """MDLM's Text8Tokenizer, re-declared under its module name `dataloader` (same vocabulary and special tokens)."""
    module = types.ModuleType("dataloader")
    sys.modules["dataloader"] = module

    class Text8Tokenizer(transformers.PreTrainedTokenizer):
        def __init__(self, **kwargs):
            self.characters = list("abcdefghijklmnopqrstuvwxyz ")
            self._vocab_str_to_int = {"[CLS]": 0, "[SEP]": 1, "[BOS]": 2, "[EOS]": 3, "[MASK]": 4, "[PAD]": 5,
                                      "[RESERVED]": 6, "[UNK]": 7, **{ch: i + 8 for i, ch in enumerate(self.characters)}}
            self._vocab_int_to_str = {v: k for k, v in self._vocab_str_to_int.items()}
            super().__init__(bos_token="[BOS]", eos_token="[EOS]", sep_token="[SEP]", cls_token="[CLS]",
                             pad_token="[PAD]", mask_token="[MASK]", unk_token="[UNK]", **kwargs)

        @property
        def vocab_size(self):
            return len(self._vocab_str_to_int)

        def _convert_token_to_id(self, token):
            return self._vocab_str_to_int.get(token, 7)

        def _convert_id_to_token(self, index):
            return self._vocab_int_to_str[index]

        def get_vocab(self):
            return self._vocab_str_to_int

    Text8Tokenizer.__module__, Text8Tokenizer.__qualname__ = "dataloader", "Text8Tokenizer"
    module.Text8Tokenizer = Text8Tokenizer
    return Text8Tokenizer()


def main(out: Path):
    out.mkdir(parents=True, exist_ok=True)
    work = out / "_work"
    work.mkdir(exist_ok=True)
    for name, obj in (("omegaconf_config", config()), ("bert_tokenizer", bert(work)), ("gpt2_tokenizer_fast", gpt2(work)),
                      ("text8_tokenizer", text8())):
        (out / f"{name}.pkl").write_bytes(pickle.dumps(obj, protocol=2))
    for path in work.iterdir():
        path.unlink()
    work.rmdir()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
