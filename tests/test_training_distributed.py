"""Runs in separate processes: 2 CPU processes (gloo, through torchrun) against 1, and a run killed with SIGKILL
after a checkpoint, then resumed, against an uninterrupted one."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hf_mdm.training.checkpointing import latest_checkpoint

from training_scripts.common import read_log, cli_args, subprocess_env, write_corpus


SCRIPTS = Path(__file__).parent / "training_scripts"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


def run(command, timeout=120):
    result = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.slow
def test_two_processes_follow_one_with_the_same_global_batch(corpus, tmp_path):
    """Same global batch of 8 (2 processes x 4 rows vs 1 x 8): the same losses, up to float summation order
    (tolerance: relative 1e-4), and the times of both processes together fill the 8 strata of [0, 1). 15
    validation blocks: one process validates 8, the other 7 (plus one padding block whose loss is dropped)."""
    steps = 5
    # --standalone: a free local port for the rendezvous, so concurrent runs of the suite do not collide.
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    for name, launcher in (("one", [sys.executable]), ("two", torchrun)):
        (tmp_path / name).mkdir()
        run([*launcher, SCRIPTS / "record_times.py", tmp_path / name,
             *cli_args(corpus, tmp_path / name / "run", max_steps=steps, eval_every=steps, eval_blocks=15)])

    for key in ("train/nats_per_token", "val/nats_per_token"):
        one, two = read_log(tmp_path / "one" / "run", key), read_log(tmp_path / "two" / "run", key)
        assert one.keys() == two.keys() and len(one) >= 2
        assert list(two.values()) == pytest.approx(list(one.values()), rel=1e-4), key

    times = [json.loads((tmp_path / "two" / f"times_rank{r}.json").read_text()) for r in (0, 1)]
    single = json.loads((tmp_path / "one" / "times_rank0.json").read_text())
    assert len(times[0]) == len(times[1]) == len(single) == steps
    for step in range(steps):
        union = times[0][step] + times[1][step]
        assert len(union) == 8 and sorted(int(t * 8) for t in union) == list(range(8))  # one time per stratum
        assert union == pytest.approx(single[step], abs=1e-12)  # and the very times of the single process


@pytest.mark.slow
def test_killed_run_resumes_exactly(corpus, tmp_path):
    """SIGKILL after the first checkpoint; the resumed run ends with the weights and loss of an uninterrupted one.
    Dropout is on (0.1), so the RNG state has to come back too."""
    model_config = tmp_path / "model.json"
    model_config.write_text(json.dumps(dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, cond_dim=32,
                                            max_position_embeddings=64, dropout=0.1)))
    settings = dict(max_steps=60, save_every=10, eval_every=30, model_config=str(model_config))
    run([sys.executable, "-m", "hf_mdm.training.cli", *cli_args(corpus, tmp_path / "whole", **settings)])

    killed = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "-m", "hf_mdm.training.cli", *cli_args(corpus, killed, **settings)],
                               env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while latest_checkpoint(killed) is None and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    checkpoint = latest_checkpoint(killed)
    assert checkpoint is not None and not (killed / "model").exists(), "the run must die between checkpoint and end"
    steps_before_kill = max(read_log(killed, "train/nats_per_token"))
    assert steps_before_kill < settings["max_steps"]

    run([sys.executable, "-m", "hf_mdm.training.cli", *cli_args(corpus, killed, resume=True, **settings)])
    whole = load_file(tmp_path / "whole" / "model" / "model.safetensors")
    resumed = load_file(killed / "model" / "model.safetensors")
    for name in whole:
        torch.testing.assert_close(resumed[name], whole[name], rtol=1e-5, atol=1e-6)
    for key in ("train/nats_per_token", "val/nats_per_token"):
        assert read_log(killed, key)[60] == pytest.approx(read_log(tmp_path / "whole", key)[60], rel=1e-5)
