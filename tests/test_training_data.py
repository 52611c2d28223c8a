"""Data pipeline and bad input: every problem is a ValueError that names it, raised before training starts."""

import json

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from hf_mdm.training import BlockSampler, load_documents, tokenize_and_pack, train, train_bpe_tokenizer
from hf_mdm.training.data import check_text_files
from hf_mdm.training.loop import check_settings

from training_scripts.common import one_thread_and_fresh_accelerate_state  # noqa: F401 (autouse fixture)
from training_scripts.common import tiny_run, write_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"), num_documents=60)


@pytest.fixture(scope="module")
def tokenizer(corpus):
    return train_bpe_tokenizer([corpus], vocab_size=300)


def test_bpe_tokenizer_has_mask_eos_and_pad(tokenizer, corpus):
    assert {tokenizer.mask_token, tokenizer.eos_token, tokenizer.pad_token} == {"[MASK]", "<|endoftext|>", "[PAD]"}
    text = corpus.read_text().split("\n\n")[0]
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text  # byte-level: lossless


def test_bpe_tokenizer_learns_from_the_text_of_jsonl_files(corpus, tmp_path):
    documents = corpus.read_text().split("\n\n")
    (tmp_path / "docs.jsonl").write_text("\n".join(json.dumps({"body": d}) for d in documents) + "\n")
    vocabulary = train_bpe_tokenizer([tmp_path / "docs.jsonl"], vocab_size=300, text_field="body").get_vocab()
    assert not [token for token in vocabulary if '"' in token and len(token) > 1]  # no merges of JSON syntax
    assert "Ġthe" in vocabulary and "Ġloud" in vocabulary


def test_packing_wraps_documents_with_eos_into_full_blocks(tokenizer, tmp_path):
    documents = ["the cat sees a dog.", "a bird.", "the old horse follows the young mouse. [MASK]"]
    (tmp_path / "docs.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in documents) + "\n")
    blocks = tokenize_and_pack(load_documents([tmp_path / "docs.jsonl"]), tokenizer, block_size=4)
    stream = [t for d in documents for t in tokenizer(d.replace("[MASK]", ""))["input_ids"] + [tokenizer.eos_token_id]]
    assert blocks[:]["input_ids"].shape == (len(stream) // 4, 4)
    assert blocks[:]["input_ids"].flatten().tolist() == stream[: len(stream) // 4 * 4]


def test_text_files_split_into_paragraphs_or_lines(tmp_path):
    (tmp_path / "a.txt").write_text("one two\nthree\n\nfour\n\n\nfive\n")
    paragraphs = [text.strip() for text in load_documents([tmp_path / "a.txt"], sample_by="paragraph")["text"]]
    assert paragraphs == ["one two\nthree", "four", "five"]
    assert len(load_documents([tmp_path / "a.txt"], sample_by="line")) == 4
    assert len(load_documents([tmp_path / "a.txt"], sample_by="document")) == 1


def test_block_sampler_is_a_function_of_seed_and_step():
    sampler = BlockSampler(num_blocks=10, global_batch_size=4, seed=3)
    first_epoch = torch.cat([sampler.indices(s) for s in range(5)])  # 20 positions = 2 epochs
    assert sorted(first_epoch[:10].tolist()) == list(range(10)) and sorted(first_epoch[10:].tolist()) == list(range(10))
    assert not torch.equal(first_epoch[:10], first_epoch[10:])  # each epoch its own order
    assert torch.equal(BlockSampler(10, 4, seed=3).indices(3), sampler.indices(3))  # a fresh sampler, as after resume


def test_missing_empty_and_undecodable_files(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        check_text_files([tmp_path / "nope.txt"])
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(ValueError, match="empty.txt.*is empty"):
        check_text_files([tmp_path / "empty.txt"])
    (tmp_path / "latin1.txt").write_bytes("fine\nstill fine\ncaf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.txt', line 3: bytes that are not UTF-8"):
        check_text_files([tmp_path / "latin1.txt"])
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"txt": "no"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl', line 2: expected a JSON object with a string field 'text'"):
        check_text_files([tmp_path / "bad.jsonl"])


def no_training_started(output_dir):
    return not (output_dir / "log.jsonl").exists() and not (output_dir / "checkpoints").exists()


def test_bad_data_file_stops_the_run_before_training(corpus, tmp_path):
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9\n")
    with pytest.raises(ValueError, match="line 1: bytes that are not UTF-8"):
        train(tiny_run(corpus, tmp_path / "run", validation_files=[str(tmp_path / "latin1.txt")]))
    assert no_training_started(tmp_path / "run")


def test_tokenizer_without_mask_token(corpus, tmp_path):
    bare = Tokenizer(models.WordLevel({"[UNK]": 0, "<eos>": 1, **{w: i + 2 for i, w in enumerate("the a cat".split())}},
                                      unk_token="[UNK]"))
    bare.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=bare, eos_token="<eos>", unk_token="[UNK]").save_pretrained(tmp_path / "tok")
    settings = dict(train_tokenizer=None, tokenizer=str(tmp_path / "tok"), block_size=8, max_steps=1)
    with pytest.raises(ValueError, match="has no mask token.*--add-mask-token"):
        train(tiny_run(corpus, tmp_path / "run", **settings))
    assert no_training_started(tmp_path / "run")
    AcceleratorState._reset_state(True)
    metrics = train(tiny_run(corpus, tmp_path / "added", add_mask_token=True, **settings))
    assert metrics["step"] == 1
    config = json.loads((tmp_path / "added" / "model" / "config.json").read_text())
    assert (config["vocab_size"], config["mask_token_id"]) == (6, 5)  # [MASK] appended to the 5 words


def test_block_size_above_max_position_embeddings(corpus, tmp_path):
    with pytest.raises(ValueError, match="--block-size 512 is above the model's max_position_embeddings \\(256\\)"):
        train(tiny_run(corpus, tmp_path / "run", block_size=512))
    assert no_training_started(tmp_path / "run")


def test_global_batch_must_divide_across_processes(corpus, tmp_path):
    with pytest.raises(ValueError, match="global --batch-size 8 does not divide across 3 process"):
        check_settings(tiny_run(corpus, tmp_path), num_processes=3)
    assert check_settings(tiny_run(corpus, tmp_path, grad_accum=2), num_processes=2) == 2


def test_output_dir_holding_a_different_run(corpus, tmp_path):
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not an hf_mdm training run"):
        train(tiny_run(corpus, tmp_path / "other"))
    train(tiny_run(corpus, tmp_path / "run", max_steps=2))
    AcceleratorState._reset_state(True)
    with pytest.raises(ValueError, match="holds a different run \\(weight_decay: 0.0 there, 0.05 now\\)"):
        train(tiny_run(corpus, tmp_path / "run", weight_decay=0.05, max_steps=2))
    with pytest.raises(ValueError, match="already holds this run's checkpoints. Pass --resume"):
        train(tiny_run(corpus, tmp_path / "run", max_steps=2))


def test_a_datasets_dataset_by_name(tmp_path):
    """`--dataset-name` takes anything `datasets.load_dataset` does; offline, a local folder of jsonl files."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text('{"text": "a cat."}\n{"text": "  "}\n{"text": "a dog."}\n')
    assert list(load_documents(dataset_name=str(tmp_path / "data"))["text"]) == ["a cat.", "a dog."]
    with pytest.raises(ValueError, match="has no column 'body'"):
        load_documents(dataset_name=str(tmp_path / "data"), text_field="body")
