"""Data for training: documents from text/jsonl files or a `datasets` dataset, tokenized and packed into blocks.

1. `check_text_files` reads every file once and stops on a missing or empty file, bytes that are not UTF-8
   (naming the file and line) or a jsonl line without the text field, before anything is tokenized.
2. `load_documents` gives a `datasets.Dataset` with one document per row (a file, a paragraph or a line of a
   text file; an object of a jsonl file; a row of a named dataset).
3. `tokenize_and_pack` tokenizes with any Hugging Face tokenizer (batched `map`) and packs the token stream
   into blocks of `block_size`, with EOS after every document (MDLM's "wrap": no padding anywhere).
4. `BlockSampler` says which blocks make up the global batch of step s. It is a function of (seed, step) only,
   so a resumed run reads exactly the batches the interrupted one would have read.
"""

import json
import os
from collections.abc import Sequence
from itertools import chain
from pathlib import Path

import datasets
import torch
from transformers import PreTrainedTokenizerBase


JSON_SUFFIXES = (".jsonl", ".json")
SAMPLE_BY = ("document", "paragraph", "line")


def check_text_files(files: Sequence[str | os.PathLike], text_field: str = "text") -> None:
    """Raises ValueError for a missing or empty file, undecodable bytes (file and line), or a bad jsonl line."""
    if not files:
        raise ValueError("No data files given.")
    kinds = {Path(f).suffix in JSON_SUFFIXES for f in files}
    if len(kinds) > 1:
        raise ValueError(f"Data files must be all text or all jsonl, got a mix: {[str(f) for f in files]}.")
    for file in map(Path, files):
        if not file.is_file():
            raise ValueError(f"Data file {str(file)!r} does not exist.")
        has_text = False
        with file.open("rb") as handle:
            for line_number, raw in enumerate(handle, start=1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as error:
                    raise ValueError(
                        f"Data file {str(file)!r}, line {line_number}: bytes that are not UTF-8 ({error.reason} at "
                        f"byte {error.start} of the line). Re-encode the file as UTF-8."
                    ) from None
                if not line.strip():
                    continue
                if file.suffix in JSON_SUFFIXES:
                    line = _jsonl_text(line, file, line_number, text_field)
                has_text = has_text or bool(line.strip())
        if not has_text:
            raise ValueError(f"Data file {str(file)!r} is empty (it holds no text).")


def _jsonl_text(line: str, file: Path, line_number: int, text_field: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"Data file {str(file)!r}, line {line_number}: not valid JSON ({error.msg}).") from None
    if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
        raise ValueError(
            f"Data file {str(file)!r}, line {line_number}: expected a JSON object with a string field {text_field!r}."
        )
    return record[text_field]


def iter_texts(files: Sequence[str | os.PathLike], text_field: str = "text"):
    """The text of checked files, line by line (jsonl: the `text_field` of each object), e.g. to train a tokenizer."""
    for file in map(Path, files):
        with file.open(encoding="utf-8") as handle:
            for line in handle:
                if file.suffix not in JSON_SUFFIXES:
                    yield line
                elif line.strip():
                    yield json.loads(line)[text_field]


def load_documents(
    files: Sequence[str | os.PathLike] | None = None,
    dataset_name: str | None = None,
    dataset_config: str | None = None,
    split: str = "train",
    text_field: str = "text",
    sample_by: str = "paragraph",
) -> datasets.Dataset:
    """One document per row, in column `text_field`: from local files (checked first) or a named dataset.

    Text files are cut into documents by `sample_by` ("document": a whole file, "paragraph": text between blank
    lines, "line"); jsonl files hold one JSON object per line with the text in `text_field`.
    """
    if (files is None) == (dataset_name is None):
        raise ValueError("Give either data files or a dataset name, not both or neither.")
    if dataset_name is not None:
        documents = datasets.load_dataset(dataset_name, dataset_config, split=split)
        if text_field not in documents.column_names:
            raise ValueError(
                f"Dataset {dataset_name!r} has no column {text_field!r}; its columns: {documents.column_names}."
            )
    else:
        if sample_by not in SAMPLE_BY:
            raise ValueError(f"sample_by must be one of {SAMPLE_BY}, got {sample_by!r}.")
        check_text_files(files, text_field)
        files = [str(f) for f in files]
        if Path(files[0]).suffix in JSON_SUFFIXES:
            documents = datasets.load_dataset("json", data_files=files, split="train")
        else:
            documents = datasets.load_dataset("text", data_files=files, split="train", sample_by=sample_by)
            documents = documents.rename_column("text", text_field) if text_field != "text" else documents
    documents = documents.select_columns([text_field])
    return documents.filter(lambda batch: [bool(text.strip()) for text in batch[text_field]], batched=True)


def tokenize_and_pack(
    documents: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    block_size: int,
    text_field: str = "text",
    num_proc: int | None = None,
) -> datasets.Dataset:
    """Tokenizes documents and packs them into rows of exactly `block_size` tokens, EOS after each document.

    The tail of the stream that does not fill a block is dropped (per `map` batch of 1000 documents). A literal
    mask token in the text (the string "[MASK]") is dropped too: the model can never predict [MASK].

    Returns:
        A dataset with one column, `input_ids`, each row a list of `block_size` ints, in torch format.
    """
    eos, mask = tokenizer.eos_token_id, tokenizer.mask_token_id

    def tokenize(batch):
        ids = tokenizer(batch[text_field], add_special_tokens=False)["input_ids"]
        return {"input_ids": [[t for t in doc if t != mask] + [eos] for doc in ids]}

    def pack(batch):
        stream = list(chain.from_iterable(batch["input_ids"]))
        usable = len(stream) // block_size * block_size
        return {"input_ids": [stream[i : i + block_size] for i in range(0, usable, block_size)]}

    tokens = documents.map(tokenize, batched=True, remove_columns=documents.column_names, num_proc=num_proc,
                           desc="tokenizing")
    blocks = tokens.map(pack, batched=True, num_proc=num_proc, desc=f"packing into blocks of {block_size}")
    return blocks.with_format("torch")


def split_documents(documents: datasets.Dataset, validation_fraction: float, seed: int):
    """(train, validation) documents: a seeded, held-out `validation_fraction` of the documents (at least one)."""
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction}.")
    num_validation = max(1, round(validation_fraction * len(documents)))
    if num_validation >= len(documents):
        raise ValueError(
            f"Cannot hold out a validation split: the corpus has {len(documents)} document(s). Give --validation-files, "
            "or more documents (--sample-by paragraph or line cuts text files into more)."
        )
    split = documents.train_test_split(test_size=num_validation, seed=seed, shuffle=True)
    return split["train"], split["test"]


class BlockSampler:
    """Which blocks form the global batch of each optimizer step: a function of (seed, step) only.

    The blocks are read epoch after epoch, each epoch in its own seeded random order; step s takes positions
    [s * global_batch_size, (s + 1) * global_batch_size) of that endless stream. Resuming at step s therefore
    continues the data exactly where the interrupted run was, on any number of processes.
    """

    def __init__(self, num_blocks: int, global_batch_size: int, seed: int):
        if num_blocks < 1:
            raise ValueError("The training split holds no block: the corpus has fewer tokens than block_size.")
        self.num_blocks, self.global_batch_size, self.seed = num_blocks, global_batch_size, seed
        self._epoch, self._order = None, None

    def epoch_order(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._order = epoch, torch.randperm(self.num_blocks, generator=generator)
        return self._order

    def indices(self, step: int) -> torch.Tensor:
        """(global_batch_size,) block indices of step `step`."""
        positions = range(step * self.global_batch_size, (step + 1) * self.global_batch_size)
        return torch.stack([self.epoch_order(p // self.num_blocks)[p % self.num_blocks] for p in positions])
