"""The training loop, in process: it learns, saves loadable models, accumulates gradients over the global batch,
trains the AR baseline, and survives a crash in the middle of a checkpoint write."""

import re

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from huggingface_hub import ModelCard
from safetensors.torch import load_file
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

from hf_mdm.hub import checkpoint_files
from hf_mdm.training import checkpointing, train
from hf_mdm.training.checkpointing import latest_checkpoint
from hf_mdm.training.cli import main as cli_main

from training_scripts.common import one_thread_and_fresh_accelerate_state  # noqa: F401 (autouse fixture)
from training_scripts.common import read_log, tiny_run, write_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


def test_mdm_run_learns_and_saves_a_hub_ready_folder(corpus, tmp_path):
    metrics = train(tiny_run(corpus, tmp_path / "run", max_steps=30))
    validation = read_log(tmp_path / "run", "val/nats_per_token")
    assert sorted(validation) == [0, 10, 20, 30]
    assert validation[30] < validation[0] - 0.5, validation  # a fresh model: ~log 300 = 5.7 nats
    assert metrics["step"] == 30 and metrics["val/perplexity"] == pytest.approx(2.718281828 ** validation[30], rel=1e-6)
    folder = tmp_path / "run" / "model"
    model, tokenizer = AutoModel.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    assert model.config.mask_token_id == tokenizer.mask_token_id and model.config.vocab_size == len(tokenizer)
    assert (folder / "generation_config.json").is_file()
    block_size = tiny_run(corpus, tmp_path / "unused").block_size
    assert block_size < model.config.max_position_embeddings
    assert model.generation_config.max_new_tokens == block_size  # by default generate() fills a training block
    assert model.generate(generator=torch.Generator().manual_seed(0)).shape == (1, block_size)
    assert latest_checkpoint(tmp_path / "run").name == "step_00000030"
    # The run writes its model card: Hub metadata, and the training facts of this very run.
    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == "transformers" and "masked-diffusion" in card.data.tags
    assert "Optimizer steps: 30" in card.text and f"{validation[30]:.4f}" in card.text
    assert checkpoint_files(folder)  # complete enough for `hf-mdm publish`


@pytest.mark.parametrize("preset", ["gpt2-tiny", "llama-tiny"])
def test_ar_baseline_trains_through_the_same_loop(corpus, tmp_path, preset):
    train(tiny_run(corpus, tmp_path / "ar", objective="ar", model_config=preset, max_steps=20))
    validation = read_log(tmp_path / "ar", "val/nats_per_token")
    assert validation[20] < validation[0] - 0.5, validation
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "ar" / "model")
    assert model.config.model_type == preset.split("-")[0]
    assert f"{validation[20]:.4f}" in (tmp_path / "ar" / "model" / "README.md").read_text()


def test_gradient_accumulation_matches_one_big_batch(corpus, tmp_path):
    """The global batch is the same rows with the same noise however it is split into micro-steps."""
    train(tiny_run(corpus, tmp_path / "one", max_steps=4))
    train(tiny_run(corpus, tmp_path / "four", max_steps=4, grad_accum=4))
    one, four = read_log(tmp_path / "one", "train/nats_per_token"), read_log(tmp_path / "four", "train/nats_per_token")
    assert list(one.values()) == pytest.approx(list(four.values()), rel=1e-5)


def test_discrete_objective_ema_and_bf16_run(corpus, tmp_path):
    train(tiny_run(corpus, tmp_path / "run", objective="mdm-discrete", ema_decay=0.9, mixed_precision="bf16",
                   max_steps=6, eval_every=6, save_every=3))
    checkpoint = latest_checkpoint(tmp_path / "run")
    assert (checkpoint / "custom_checkpoint_0.pkl").is_file()  # the EMA travels with the checkpoint
    final = load_file(tmp_path / "run" / "model" / "model.safetensors")
    trained = load_file(checkpoint / "model.safetensors")
    name = "model.embed_tokens.weight"
    assert not torch.equal(final[name], trained[name])  # the saved model holds the EMA weights


def test_crash_inside_a_checkpoint_write_keeps_the_previous_one(corpus, tmp_path, monkeypatch):
    settings = dict(max_steps=6, save_every=2, eval_every=100)
    train(tiny_run(corpus, tmp_path / "whole", **settings))
    AcceleratorState._reset_state(True)

    real_write = checkpointing.write_training_state

    def crash_at_step_4(folder, step):
        if step == 4:
            raise KeyboardInterrupt("killed halfway through the checkpoint of step 4")
        real_write(folder, step)

    monkeypatch.setattr(checkpointing, "write_training_state", crash_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_run(corpus, tmp_path / "crashed", **settings))
    monkeypatch.undo()
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    root = tmp_path / "crashed" / "checkpoints"
    assert (root / ".tmp-step_00000004" / "model.safetensors").is_file()  # written, never renamed
    assert latest_checkpoint(tmp_path / "crashed").name == "step_00000002"

    train(tiny_run(corpus, tmp_path / "crashed", resume=True, **settings))
    assert not (root / ".tmp-step_00000004").exists()
    whole = load_file(tmp_path / "whole" / "model" / "model.safetensors")
    resumed = load_file(tmp_path / "crashed" / "model" / "model.safetensors")
    for name in whole:
        torch.testing.assert_close(resumed[name], whole[name], rtol=1e-5, atol=1e-6)
    log = read_log(tmp_path / "crashed", "train/nats_per_token")
    assert log[6] == pytest.approx(read_log(tmp_path / "whole", "train/nats_per_token")[6], rel=1e-5)


def test_cli_reads_a_yaml_config_and_flags_override_it(corpus, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(f"train-files: [{corpus}]\ntrain_tokenizer: 300\nblock_size: 32\nbatch_size: 4\nmax_steps: 3\n"
                      f"eval_every: 100\neval_blocks: 4\noutput_dir: {tmp_path / 'ignored'}\n")
    cli_main(["--config", str(config), "--output-dir", str(tmp_path / "run"), "--max-steps", "2"])
    assert read_log(tmp_path / "run", "val/nats_per_token").keys() == {0, 2}  # max_steps from the flag
    assert not (tmp_path / "ignored").exists()
    config.write_text("max_stepz: 3\n")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["--config", str(config)])
    assert exit_info.value.code == 2 and "unknown settings" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["--train-files", str(tmp_path / "nope.txt"), "--train-tokenizer", "300", "--output-dir",
                  str(tmp_path / "missing")])
    assert exit_info.value.code == 2
    assert re.match(r"hf-mdm train: error: Data file '.*nope.txt' does not exist", capsys.readouterr().err)
