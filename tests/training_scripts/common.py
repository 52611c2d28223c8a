"""Shared by the training tests: a small synthetic corpus and the settings of a tiny, fast run."""

import json
import os
import random
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState

from hf_mdm.training import TrainConfig


NOUNS = "cat dog bird fish horse mouse river tree stone house garden window".split()
ADJECTIVES = "small big red green quiet loud old young".split()
VERBS = "sees chases finds likes follows watches".split()


@pytest.fixture(autouse=True)
def one_thread_and_fresh_accelerate_state():
    """Imported by the training test modules, for every test. One torch thread: with two on a two-core machine
    that other jobs share, OpenMP threads spin-wait on each other (a 1 s test took 58 s). And each run builds its
    own Accelerator, while Accelerate keeps process-wide singletons: reset them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def write_corpus(folder: Path, num_documents: int = 300, seed: int = 0) -> Path:
    """A text file of `num_documents` paragraphs of toy sentences ("the old cat sees a red bird."), blank-line
    separated: regular enough that a tiny model learns it in a few dozen steps."""
    rng = random.Random(seed)
    paragraphs = []
    for _ in range(num_documents):
        sentences = [
            f"the {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)} {rng.choice(VERBS)} a {rng.choice(ADJECTIVES)} "
            f"{rng.choice(NOUNS)}." for _ in range(rng.randint(2, 5))
        ]
        paragraphs.append(" ".join(sentences))
    path = Path(folder) / "corpus.txt"
    path.write_text("\n\n".join(paragraphs) + "\n")
    return path


def tiny_run(corpus: Path, output_dir: Path, **overrides) -> TrainConfig:
    """A run of a 2-block, width-64 model on blocks of 32 tokens with a 300-token BPE: well under a second a step."""
    settings = dict(train_files=[str(corpus)], train_tokenizer=300, model_config="tiny", block_size=32,
                    batch_size=8, lr=3e-3, min_lr=3e-4, warmup_steps=5, max_steps=20, eval_every=10, eval_blocks=16,
                    log_every=1, save_every=0, output_dir=str(output_dir), seed=0)
    settings.update(overrides)
    return TrainConfig(**settings)


def subprocess_env() -> dict:
    """One OpenMP thread per process: with more, two processes on two cores spin-wait on each other (~50x slower)."""
    # No ACCELERATE_USE_CPU: a CPU-only torchrun launch must join one job by itself, as the docs say it does.
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def cli_args(corpus: Path, output_dir: Path, **overrides) -> list[str]:
    """The CLI flags of `tiny_run`."""
    config = tiny_run(corpus, output_dir, **overrides)
    args = []
    for name, value in vars(config).items():
        if value is None or value is False or value == () or name in ("report_to",):
            continue
        flag = "--" + name.replace("_", "-")
        if value is True:
            args.append(flag)
        elif isinstance(value, list):
            args += [flag, *map(str, value)]
        else:
            args += [flag, str(value)]
    return args


def read_log(output_dir: Path, key: str) -> dict:
    """{step: value} of one key of a run's log.jsonl."""
    lines = [json.loads(line) for line in (Path(output_dir) / "log.jsonl").read_text().splitlines()]
    return {line["step"]: line[key] for line in lines if key in line}
