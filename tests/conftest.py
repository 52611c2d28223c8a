import pytest
import torch

from hf_mdm import MDMConfig, MDMForMaskedDiffusion, MDMLlamaConfig, MDMLlamaForMaskedDiffusion
from hf_mdm.configuration_mdm_gpt2 import MDMGPT2Config
from hf_mdm.modeling_mdm_gpt2 import MDMGPT2ForMaskedDiffusion
from hf_mdm.modeling_mdm_common import MASK_LOGIT


FLOAT32_EPS = torch.finfo(torch.float32).eps


def assert_float32_close(actual: torch.Tensor, expected: torch.Tensor, ulps: float = 16, msg: str | None = None):
    """Two float32 computations of the same quantity that may sum in a different order (another thread count, a
    matrix of another shape, another attention kernel): each element within `ulps` units in the last place of
    itself, plus `ulps` of the largest magnitude for elements that cancel to near zero. A reordered sum of n float32
    terms typically moves by sqrt(n) ulps (n = 32-128 here); a wrong position, mask or weight moves logits by
    1e-2 or more, thousands of ulps."""
    values = expected.detach()
    values = values[torch.isfinite(values) & (values != MASK_LOGIT)]  # [MASK]'s constant logit is not a scale
    scale = float(values.abs().max()) if values.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=ulps * FLOAT32_EPS, atol=ulps * FLOAT32_EPS * scale, msg=msg)


def tiny_config(**overrides) -> MDMConfig:
    """A model small enough for a CPU test: 2 blocks of width 64, 4 heads, 50 tokens + [MASK]."""
    fields = dict(
        vocab_size=51,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        cond_dim=32,
        max_position_embeddings=64,
        dropout=0.0,
        pad_token_id=0,
    )
    fields.update(overrides)
    return MDMConfig(**fields)


def tiny_llama_config(dream: bool = False, **overrides) -> MDMLlamaConfig:
    """A tiny bidirectional Llama-family model: LLaDA-like (no biases, full heads) or, with `dream`, Dream-like
    (q/k/v biases, 2 key/value heads for 4 query heads, logits shifted inside the model). 50 tokens + [MASK]."""
    fields = dict(
        vocab_size=51,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2 if dream else 4,
        attention_bias=dream,
        shift_logits=dream,
        rms_norm_eps=1e-6 if dream else 1e-5,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
    )
    fields.update(overrides)
    return MDMLlamaConfig(**fields)


def tiny_llama_model(seed: int = 0, dream: bool = False, **overrides) -> MDMLlamaForMaskedDiffusion:
    torch.manual_seed(seed)
    return randomize_(MDMLlamaForMaskedDiffusion(tiny_llama_config(dream, **overrides)), seed=seed)


def tiny_gpt2_model(seed: int = 0, **overrides) -> MDMGPT2ForMaskedDiffusion:
    """A tiny GPT-2-style model (learned positions, LayerNorm with biases, tied head), logits shifted as an
    AR-adapted one's. 50 tokens + [MASK]."""
    fields = dict(vocab_size=51, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
                  max_position_embeddings=64, shift_logits=True, pad_token_id=0, bos_token_id=1)
    fields.update(overrides)
    torch.manual_seed(seed)
    return randomize_(MDMGPT2ForMaskedDiffusion(MDMGPT2Config(**fields)), seed=seed)


def randomize_(model: torch.nn.Module, seed: int = 0, std: float = 0.2) -> torch.nn.Module:
    """Random weights everywhere. DiT's adaLN-zero init makes a fresh model ignore its blocks and time input,
    so equivalence tests on a fresh model would pass trivially."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator) * std
            param.copy_((1.0 + noise) if name.endswith("norm.weight") or ".norm1." in name or ".norm2." in name else noise)
    return model.eval()


def tiny_model(seed: int = 0, **overrides) -> MDMForMaskedDiffusion:
    torch.manual_seed(seed)
    return randomize_(MDMForMaskedDiffusion(tiny_config(**overrides)), seed=seed)


@pytest.fixture
def model():
    return tiny_model()


BLOCK_HF_MDM = '''
import importlib.abc, sys
class BlockHfMdm(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "hf_mdm" or name.startswith("hf_mdm."):
            raise ImportError("hf_mdm is not importable in this process")
sys.meta_path.insert(0, BlockHfMdm())
'''


def run_without_hf_mdm(script: str, args: list, tmp_path):
    """Runs `script` in `python -I` with HF_HUB_OFFLINE=1, an empty HF_HOME and hf_mdm made unimportable."""
    import os
    import subprocess
    import sys

    (tmp_path / "script.py").write_text(BLOCK_HF_MDM + script)
    hf_home = tmp_path / "hf_home"
    hf_home.mkdir(exist_ok=True)
    env = {"PATH": os.environ["PATH"], "HF_HUB_OFFLINE": "1", "HF_HOME": str(hf_home), "HOME": str(tmp_path)}
    result = subprocess.run([sys.executable, "-I", str(tmp_path / "script.py"), *map(str, args)],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result
