"""Non-finite numbers stop the work: a diverging training run stops at the first non-finite loss or gradient norm,
naming the step, with nothing non-finite on disk and its last checkpoint resumable; generate() refuses non-finite
logits in every strategy (naming the batch rows) and settings that make the probabilities non-finite."""

import json

import pytest
import torch
from safetensors.torch import load_file

from hf_mdm.training import train
from hf_mdm.training.checkpointing import latest_checkpoint
from hf_mdm.training.loop import TrainingDiverged

from conftest import tiny_llama_model, tiny_model
from training_scripts.common import one_thread_and_fresh_accelerate_state  # noqa: F401 (autouse fixture)
from training_scripts.common import tiny_run, write_corpus


STRATEGIES = [
    dict(),
    dict(tokens_per_step=2),
    dict(sampler="confidence", steps=4),
    dict(sampler="confidence", confidence_threshold=0.5),
    dict(sampler="ancestral", steps=4),
    dict(sampler="ancestral_cache", steps=4),
    dict(sampler="remdm", steps=8),
    dict(sampler="dream", steps=4),
    dict(sampler="confidence", steps=4, block_length=4, use_cache=True),
]
CORRUPTIONS = {
    "nan": lambda logits: logits.fill_(float("nan")),
    "one +inf": lambda logits: logits[..., 3].fill_(float("inf")),
    "all -inf": lambda logits: logits.fill_(float("-inf")),
}


def corrupting(model, row: int, corruption, from_call: int = 1):
    """The model with its logits corrupted for batch row `row` from the `from_call`-th forward pass on."""
    original, calls = model.forward, []

    def forward(input_ids, *args, **kwargs):
        output = original(input_ids, *args, **kwargs)
        calls.append(1)
        if len(calls) >= from_call and input_ids.shape[0] > row:
            corruption(output.logits[row])
        return output

    model.forward = forward
    return model


@pytest.mark.parametrize("settings", STRATEGIES, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()) or "fhs")
@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_non_finite_logits_stop_generation_naming_the_row(settings, corruption):
    model = corrupting(tiny_model(), row=1, corruption=CORRUPTIONS[corruption], from_call=2)
    with pytest.raises(ValueError, match=r"non-finite logits .* for batch rows \[1\]"):
        model.generate(max_new_tokens=8, num_return_sequences=3, generator=torch.Generator().manual_seed(0),
                       **settings)


def test_a_shifted_model_and_a_clean_run_are_unaffected():
    clean = tiny_llama_model(dream=True).generate(torch.tensor([[1, 5, 6]]), max_new_tokens=6,
                                                  generator=torch.Generator().manual_seed(0))
    assert clean.shape == (1, 9)


@pytest.mark.parametrize("kwargs, message", [
    (dict(sampling_dtype="float16"), r"not finite in sampling_dtype=torch.float16"),
    (dict(sampling_dtype="float16", temperature=1e-30), r"not finite in sampling_dtype=torch.float16"),
    (dict(sampler="ancestral", steps=4, sampling_dtype="float16"), r"not finite in sampling_dtype=torch.float16"),
])
def test_probabilities_that_overflow_the_sampling_dtype_are_refused(kwargs, message):
    model = tiny_model()
    with torch.no_grad():
        model.output_layer.linear.weight.mul_(1e5)  # logits of order 1e5: past float16's largest number
    with pytest.raises(ValueError, match=message):
        model.generate(max_new_tokens=6, generator=torch.Generator().manual_seed(0), **kwargs)
    assert model.generate(max_new_tokens=6, generator=torch.Generator().manual_seed(0)).shape == (1, 6)  # float64


@pytest.mark.parametrize("temperature", [float("inf"), float("nan"), -1.0])
def test_temperature_must_be_finite(temperature):
    with pytest.raises(ValueError, match="temperature must be a finite number >= 0"):
        tiny_model().generate(max_new_tokens=4, temperature=temperature)


def test_a_diverging_run_stops_at_the_first_non_finite_step_and_writes_nothing_non_finite(tmp_path):
    corpus = write_corpus(tmp_path)
    run = tmp_path / "run"
    config = tiny_run(corpus, run, lr=1e6, min_lr=1e5, warmup_steps=0, max_steps=12, save_every=1, eval_every=100)
    with pytest.raises(TrainingDiverged, match=r"^step (\d+): the loss is .* training stops before updating") as error:
        train(config)
    step = int(error.value.args[0].split()[1].rstrip(":"))
    assert 1 < step <= 12
    assert not (run / "model").exists()  # no final model
    last = latest_checkpoint(run)
    assert last is not None and json.loads((last / "training_state.json").read_text())["step"] < step
    for path in last.rglob("*.safetensors"):
        assert all(bool(torch.isfinite(tensor).all()) for tensor in load_file(path).values()), path
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert all(all(value == value for value in entry.values() if isinstance(value, float)) for entry in log)  # no NaN

    # The last checkpoint is a whole training state: resumed, the run continues from it and meets the same step
    # again (training is deterministic), stopping the same way.
    with pytest.raises(TrainingDiverged, match=rf"^step {step}: "):
        train(tiny_run(corpus, run, lr=1e6, min_lr=1e5, warmup_steps=0, max_steps=12, save_every=1, eval_every=100,
                       resume=True))
    assert latest_checkpoint(run) == last
