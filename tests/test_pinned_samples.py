"""Behaviour does not move: fixed-seed samples of every strategy equal those the release before the house refactor
drew (tests/pinned_samples.py recorded them), on the shipped DiT and on Llama-family folders that release saved."""

import json

import pytest
from transformers import AutoModel

import pinned_samples
from pinned_samples import CHECKPOINTS, CONVERTED_GENERATION_CONFIGS, PINNED, cases, converted_folder, load, sample


RECORDED = json.loads(PINNED.read_text())
MODELS = {}


def model_for(checkpoint):
    if checkpoint not in MODELS:
        MODELS[checkpoint] = load(checkpoint)
    return MODELS[checkpoint]


@pytest.mark.parametrize("checkpoint", CHECKPOINTS)
def test_every_strategy_samples_as_before(checkpoint):
    model = model_for(checkpoint)
    moved = []
    for name_checkpoint, name, kwargs, infill in cases():
        if name_checkpoint != checkpoint:
            continue
        if sample(model, kwargs, infill) != RECORDED[f"{checkpoint}/{name}"]:
            moved.append(name)
    assert not moved, f"{checkpoint}: these settings no longer sample as before: {moved}"


@pytest.mark.parametrize("name", sorted(CONVERTED_GENERATION_CONFIGS))
def test_converted_folders_decode_with_their_old_generation_config(name, tmp_path):
    model = AutoModel.from_pretrained(converted_folder(name, tmp_path / name)).eval()
    assert sample(model, {}, None) == RECORDED[f"{name}/converted_defaults"]


def test_the_record_covers_every_case():
    expected = {f"{checkpoint}/{name}" for checkpoint, name, _, _ in cases()}
    expected |= {f"{name}/converted_defaults" for name in CONVERTED_GENERATION_CONFIGS}
    assert set(RECORDED) == expected
    assert len(pinned_samples.SETTINGS) + len(pinned_samples.INFILL_SETTINGS) >= 35
