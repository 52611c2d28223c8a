import pytest
import torch

from hf_mdm import MDMConfig, MDMForMaskedDiffusion


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
