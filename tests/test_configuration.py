import pytest
from transformers import AutoConfig

import hf_mdm  # noqa: F401  (registers "mdm")
from hf_mdm import MDMConfig

from conftest import tiny_config


def test_round_trip(tmp_path):
    config = tiny_config(time_conditioning=True, noise_schedule="cosine", eos_token_id=3, mlp_ratio=2.5)
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, MDMConfig)
    for key in ("vocab_size", "mask_token_id", "hidden_size", "num_hidden_layers", "num_attention_heads", "cond_dim",
                "mlp_ratio", "dropout", "max_position_embeddings", "rope_parameters", "time_conditioning",
                "noise_schedule", "noise_eps", "pad_token_id", "eos_token_id", "bos_token_id"):
        assert getattr(loaded, key) == getattr(config, key), key
    assert loaded.auto_map["AutoModelForMaskedLM"] == "modeling_mdm.MDMForMaskedDiffusion"


def test_mask_token_defaults_to_last_id():
    assert MDMConfig(vocab_size=10, hidden_size=16, num_attention_heads=2).mask_token_id == 9
    assert MDMConfig().mask_token_id == 50257  # MDLM's GPT-2 [MASK]


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(hidden_size=65), "hidden_size"),
        (dict(hidden_size=12, num_attention_heads=4), "head size"),
        (dict(mask_token_id=51), "mask_token_id"),
        (dict(mask_token_id=-1), "mask_token_id"),
        (dict(pad_token_id=60), "pad_token_id"),
        (dict(pad_token_id=50), "pad_token_id"),  # equals [MASK]
        (dict(noise_schedule="sqrt"), "noise_schedule"),
        (dict(noise_eps=1.5), "noise_eps"),
        (dict(num_hidden_layers=0), "num_hidden_layers"),
        (dict(dropout=1.0), "dropout"),
        (dict(time_conditioning="yes"), "time_conditioning"),
        (dict(mlp_ratio=0), "mlp_ratio"),
        (dict(vocab_size=1, mask_token_id=0), "vocab_size"),
        (dict(rope_parameters={"rope_type": "default", "rope_theta": "big"}), "rope_theta"),
        (dict(rope_parameters={"rope_type": "default", "rope_theta": -1.0}), "rope_theta"),
        (dict(rope_parameters={"rope_type": "ntk", "rope_theta": 10.0}), "rope_type"),
        (dict(rope_parameters={"rope_type": "linear", "rope_theta": 10.0}), "factor"),
    ],
)
def test_invalid_config_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        tiny_config(**overrides)


def test_unknown_schedule_lists_allowed_values():
    with pytest.raises(ValueError, match="loglinear"):
        tiny_config(noise_schedule="nope")


def test_mdlm_behaviour_fields_default_off_round_trip_and_are_validated(tmp_path):
    """attend_to_padding and length_extrapolation (MDLM's DiT: no attention mask, rotary positions past the training
    length) are off for models trained here, saved and restored, and must be booleans."""
    assert (tiny_config().attend_to_padding, tiny_config().length_extrapolation) == (False, False)
    config = tiny_config(attend_to_padding=True, length_extrapolation=True)
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert (loaded.attend_to_padding, loaded.length_extrapolation) == (True, True)
    for field in ("attend_to_padding", "length_extrapolation"):
        with pytest.raises(ValueError, match=rf"MDMConfig\.{field} must be True or False, got 'yes'"):
            tiny_config(**{field: "yes"})
