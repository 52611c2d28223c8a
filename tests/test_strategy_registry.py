"""Decoding strategies as registered classes: the public extension contract, the registry's refusals, settings
serialised inside generation_config.json, earlier releases' flat fields mapped (with a warning), flags and sweep
fields read from the registry."""

import dataclasses
import json
import subprocess
import sys
import textwrap

import pytest
import torch

import hf_mdm
from hf_mdm import MDMGenerationConfig
from hf_mdm.generation_options import add_generation_flags, generation_kwargs, option_types
from hf_mdm.sampling_mdm import STRATEGIES, ConfidenceSampler, ConfidenceSettings, DecodingStrategy, StrategySettings

from conftest import tiny_model


# The example, word for word, run from a script outside the package.
EXTENSION = '''
import dataclasses, hf_mdm, torch
from transformers import AutoModel

@hf_mdm.register_strategy("leftmost")
class Leftmost(hf_mdm.DecodingStrategy):
    def step(self, state, denoise):
        rows = state.masked.any(dim=1).nonzero().squeeze(1)
        positions = state.masked[rows].float().argmax(dim=1, keepdim=True)
        logits = denoise(rows, state.tokens[rows], positions, state.time[rows])
        sampled = self.categorical(logits)              # the one categorical sampler, in sampling_dtype
        tokens, masked = state.tokens.clone(), state.masked.clone()
        tokens[rows, positions[:, 0]] = sampled.reshape(-1)
        masked[rows, positions[:, 0]] = False
        return dataclasses.replace(state, tokens=tokens, masked=masked, step=state.step + 1)

model = AutoModel.from_pretrained(hf_mdm.pretrained_path())
out = model.generate(sampler="leftmost", max_new_tokens=12, return_dict_in_generate=True,
                     generator=torch.Generator().manual_seed(0))
print(out.nfe, int((out.sequences == model.config.mask_token_id).sum()), out.sequences.shape[1])
'''


def test_the_extension_example_runs_from_outside_the_package(tmp_path):
    (tmp_path / "leftmost.py").write_text(EXTENSION)
    result = subprocess.run([sys.executable, str(tmp_path / "leftmost.py")], cwd=tmp_path, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    nfe, still_masked, length = map(int, result.stdout.split()[-3:])
    assert (nfe, still_masked, length) == (12, 0, 12)  # 12 network calls, nothing left masked


class Leftmost(DecodingStrategy):
    """Unmasks each row's leftmost masked position (a test strategy; registered per test)."""

    def step(self, state, denoise):
        rows = state.masked.any(dim=1).nonzero().squeeze(1)
        positions = state.masked[rows].float().argmax(dim=1, keepdim=True)
        sampled = self.categorical(denoise(rows, state.tokens[rows], positions, state.time[rows]))
        tokens, masked = state.tokens.clone(), state.masked.clone()
        tokens[rows, positions[:, 0]] = sampled.reshape(-1)
        masked[rows, positions[:, 0]] = False
        return dataclasses.replace(state, tokens=tokens, masked=masked, step=state.step + 1)


@dataclasses.dataclass
class StrideSettings(StrategySettings):
    """stride: unmask every stride-th masked position per call (at least one)."""

    stride: int = 2

    def validate(self):
        if not isinstance(self.stride, int) or isinstance(self.stride, bool) or self.stride < 1:
            raise ValueError(f"stride must be an integer >= 1, got {self.stride!r}.")


class Stride(DecodingStrategy):
    Settings = StrideSettings

    def step(self, state, denoise):
        rows = state.masked.any(dim=1).nonzero().squeeze(1)
        order = state.masked[rows].long().cumsum(dim=1) - 1
        chosen = state.masked[rows] & (order % self.settings.stride == 0)
        positions = torch.arange(state.tokens.shape[1]).expand(len(rows), -1)
        sampled = self.categorical(denoise(rows, state.tokens[rows], positions, state.time[rows]))
        tokens, masked = state.tokens.clone(), state.masked.clone()
        tokens[rows] = torch.where(chosen, sampled, tokens[rows])
        masked[rows] = masked[rows] & ~chosen
        return dataclasses.replace(state, tokens=tokens, masked=masked, step=state.step + 1)


@pytest.fixture
def registered():
    """Registers the test strategies and removes them afterwards (the registry is process-wide)."""
    hf_mdm.register_strategy("test_leftmost")(Leftmost)
    hf_mdm.register_strategy("test_stride")(Stride)
    yield
    STRATEGIES.pop("test_leftmost")
    STRATEGIES.pop("test_stride")


def test_a_registered_strategy_with_settings_is_a_generate_keyword_a_flag_and_a_saved_field(registered, tmp_path):
    model = tiny_model()
    out = model.generate(sampler="test_stride", stride=3, max_new_tokens=12, return_dict_in_generate=True,
                         generator=torch.Generator().manual_seed(0))
    assert not (out.sequences == model.config.mask_token_id).any()
    assert out.nfe == 6  # 12, 8, 5, 3, 2, 1 left: ceil(n / 3) per call
    with pytest.raises(ValueError, match="stride must be an integer >= 1"):
        model.generate(sampler="test_stride", stride=0, max_new_tokens=4)
    with pytest.raises(ValueError, match=r"stride=3 is not a setting of sampler='first_hitting'"):
        model.generate(stride=3, max_new_tokens=4)

    config = MDMGenerationConfig(sampler="test_stride", stride=4)
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "generation_config.json").read_text())
    assert saved["sampler"] == "test_stride" and saved["sampler_config"] == {"stride": 4}
    loaded = MDMGenerationConfig.from_pretrained(tmp_path)
    assert loaded.sampler_config == StrideSettings(stride=4) and loaded.stride == 4

    import argparse
    parser = argparse.ArgumentParser()
    add_generation_flags(parser)
    args = parser.parse_args(["--sampler", "test_stride", "--stride", "5", "--block-length", "4"])
    assert generation_kwargs(args) == {"sampler": "test_stride", "stride": 5, "block_length": 4}
    assert option_types()["stride"] is int


def test_the_registry_refuses_a_taken_name_and_a_class_without_step(registered):
    with pytest.raises(ValueError, match="'first_hitting' is already registered"):
        hf_mdm.register_strategy("first_hitting")(Leftmost)

    class NoStep(DecodingStrategy):
        pass

    with pytest.raises(TypeError, match="must define step"):
        hf_mdm.register_strategy("no_step")(NoStep)
    with pytest.raises(TypeError, match="must subclass DecodingStrategy"):
        hf_mdm.register_strategy("not_a_strategy")(object)

    class BadSettings(Leftmost):
        Settings = dict

    with pytest.raises(TypeError, match="Settings must be a StrategySettings dataclass"):
        hf_mdm.register_strategy("bad_settings")(BadSettings)
    with pytest.raises(ValueError, match="must be an identifier"):
        hf_mdm.register_strategy("two words")(Leftmost)
    assert not {"no_step", "not_a_strategy", "bad_settings"} & set(STRATEGIES)


def test_a_strategy_without_blocks_refuses_block_length(registered):
    with pytest.raises(ValueError, match="does not decode in blocks"):
        tiny_model().generate(sampler="test_leftmost", block_length=4, max_new_tokens=8)


def test_one_name_one_class_and_the_old_spelling_maps_with_a_warning(caplog):
    from transformers.utils import logging as hf_logging

    from hf_mdm import generation_mdm

    hf_logging.enable_propagation()
    type(generation_mdm.logger).warning_once.cache_clear()
    with caplog.at_level("WARNING"):
        config = MDMGenerationConfig(sampler="first_hitting", unmasking="margin", steps=8)
    assert "spelled sampler='confidence'" in caplog.text
    assert config.sampler == "confidence" and config.sampler_config == ConfidenceSettings(order="margin", steps=8)
    model = tiny_model()
    strategy_classes = []
    original = ConfidenceSampler.step

    def spy(self, state, denoise):
        strategy_classes.append(type(self))
        return original(self, state, denoise)

    ConfidenceSampler.step = spy
    try:
        model.generate(sampler="first_hitting", unmasking="confidence", steps=4, max_new_tokens=8)
    finally:
        ConfidenceSampler.step = original
    assert set(strategy_classes) == {ConfidenceSampler}
    assert MDMGenerationConfig(sampler="ancestral_cache", remasking="remdm").sampler_config.reuse_outputs is True


@pytest.mark.parametrize("name", ["first_hitting", "confidence", "ancestral", "ancestral_cache", "remdm"])
def test_every_built_in_strategy_round_trips_through_generation_config_json(name, tmp_path):
    config = MDMGenerationConfig(sampler=name, steps=16, block_length=None, temperature=0.5)
    config.save_pretrained(tmp_path)
    loaded = MDMGenerationConfig.from_pretrained(tmp_path)
    assert loaded.sampler == name and loaded.sampler_config == config.sampler_config and loaded.temperature == 0.5
    assert loaded == config


def test_switching_strategy_keeps_shared_settings_and_drops_the_others(registered):
    config = MDMGenerationConfig(sampler="confidence", order="entropy", steps=24, block_length=8)
    config.update(sampler="ancestral")
    assert config.sampler_config.steps == 24 and config.block_length == 8 and not hasattr(config.sampler_config, "order")
    config.update(sampler="ancestral_cache")  # it decodes in blocks too (reusing outputs within a block)
    assert config.block_length == 8
    config.update(sampler="test_leftmost")  # a strategy without blocks: the block settings go
    assert config.block_length is None and config.use_cache is False
    config.update(sampler="ancestral")
    with pytest.raises(ValueError, match="sampler must be one of"):
        config.update(sampler="dpm")
