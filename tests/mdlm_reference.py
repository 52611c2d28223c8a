"""The test suite's own reference implementation of MDLM's published DiT forward, and writers of MDLM's two formats.

Written from the description in docs/concepts/mdlm-dit.md (and MDLM's paper, arXiv:2406.07524), not from
hf_mdm's code, in plain float32 torch with eager attention and no flash-attn, so that the conversion tests compare
two independent implementations:

- token embedding: a bare parameter `vocab_embed.embedding` of shape (vocab, hidden), indexed by the ids;
- conditioning: c = SiLU(MLP(sinusoidal(sigma))), 256 sinusoidal features laid out [cos, sin] with frequencies
  exp(-ln(10000) i / 128), MLP = Linear(256, cond) SiLU Linear(cond, cond); sigma is zeroed when the model is not
  time-conditioned (MDLM feeds zeros);
- each block: (shift, scale, gate) for attention then for the MLP from Linear(cond, 6 hidden);
  x = x + gate * f(LN(x) * (1 + scale) + shift), LN weight-only in float32;
  attention: packed bias-free qkv whose output features are laid out (three, heads, head_dim), rotary embedding in
  the rotate-half form with base 10000 on q and k only, softmax(q k^T / sqrt(head_dim)) v, bias-free output
  projection; MLP: Linear(hidden, 4 hidden) GELU(tanh) Linear(4 hidden, hidden), both with bias;
- output: LN(x) * (1 + scale) + shift with (shift, scale) from Linear(cond, 2 hidden), then Linear(hidden, vocab):
  logits over every id, [MASK] included (MDLM's SUBS step, which hf_mdm builds in, comes after the network).

The module names and their registration order are MDLM's, so `state_dict()` has MDLM's keys and `parameters()`
MDLM's order, which is the order of the EMA's `shadow_params` in MDLM's Lightning checkpoints.
"""

import json
import math
from collections import OrderedDict
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn


FREQUENCY_FEATURES = 256


def layer_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    x = x.float()
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


class Embedding(nn.Module):
    def __init__(self, vocab_size, hidden):
        super().__init__()
        self.embedding = nn.Parameter(torch.zeros(vocab_size, hidden))


class SigmaMap(nn.Module):
    def __init__(self, cond_dim):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(FREQUENCY_FEATURES, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim))

    def forward(self, sigma):
        half = FREQUENCY_FEATURES // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
        args = sigma.float()[:, None] * freqs[None, :]
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))


class Rotary(nn.Module):
    def __init__(self, head_dim, base=10000.0):
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / base ** (torch.arange(0, head_dim, 2).float() / head_dim))

    def forward(self, seq_len):
        angles = torch.arange(seq_len, dtype=torch.float32)[:, None] * self.inv_freq[None, :]
        angles = torch.cat([angles, angles], dim=-1)  # (seq_len, head_dim)
        return angles.cos(), angles.sin()


class Block(nn.Module):
    def __init__(self, hidden, n_heads, cond_dim):
        super().__init__()
        self.n_heads = n_heads
        self.norm1 = nn.Module()
        self.norm1.weight = nn.Parameter(torch.ones(hidden))
        self.attn_qkv = nn.Linear(hidden, 3 * hidden, bias=False)
        self.attn_out = nn.Linear(hidden, hidden, bias=False)
        self.norm2 = nn.Module()
        self.norm2.weight = nn.Parameter(torch.ones(hidden))
        self.mlp = nn.Sequential(nn.Linear(hidden, 4 * hidden), nn.Identity(), nn.Linear(4 * hidden, hidden))
        self.adaLN_modulation = nn.Linear(cond_dim, 6 * hidden)

    def forward(self, x, c, cos, sin, attend=None):
        batch, seq_len, hidden = x.shape
        head_dim = hidden // self.n_heads
        mod = self.adaLN_modulation(c)  # (batch, 6 hidden)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (m[:, None, :] for m in mod.split(hidden, -1))

        h = layer_norm(x, self.norm1.weight) * (1 + scale_msa) + shift_msa
        qkv = self.attn_qkv(h).view(batch, seq_len, 3, self.n_heads, head_dim)  # 'b s (three h d)'
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (batch, seq, heads, head_dim)
        q = q * cos[None, :, None, :] + rotate_half(q) * sin[None, :, None, :]
        k = k * cos[None, :, None, :] + rotate_half(k) * sin[None, :, None, :]
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(head_dim)
        if attend is not None:  # (seq, seq) bool, True = may attend (BD3-LM's block-causal mask)
            scores = scores.masked_fill(~attend, float("-inf"))
        attn = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(dim=-1), v).reshape(batch, seq_len, hidden)
        x = x + gate_msa * self.attn_out(attn)

        h = layer_norm(x, self.norm2.weight) * (1 + scale_mlp) + shift_mlp
        h = self.mlp[2](gelu_tanh(self.mlp[0](h)))
        return x + gate_mlp * h


class FinalLayer(nn.Module):
    def __init__(self, hidden, vocab_size, cond_dim):
        super().__init__()
        self.norm_final = nn.Module()
        self.norm_final.weight = nn.Parameter(torch.ones(hidden))
        self.linear = nn.Linear(hidden, vocab_size)
        self.adaLN_modulation = nn.Linear(cond_dim, 2 * hidden)

    def forward(self, x, c):
        shift, scale = (m[:, None, :] for m in self.adaLN_modulation(c).chunk(2, dim=-1))
        return self.linear(layer_norm(x, self.norm_final.weight) * (1 + scale) + shift)


class MDLMReferenceDiT(nn.Module):
    """MDLM's DiT: `forward(indices (B, L), sigma (B,)) -> logits (B, L, vocab_size)`, float32."""

    def __init__(self, vocab_size=53, hidden_dim=64, cond_dim=32, n_blocks=2, n_heads=4, model_length=32,
                 dropout=0.1, time_conditioning=False):
        super().__init__()
        self.fields = dict(vocab_size=vocab_size, model_length=model_length, hidden_dim=hidden_dim, cond_dim=cond_dim,
                           n_blocks=n_blocks, n_heads=n_heads, dropout=dropout, time_conditioning=time_conditioning)
        self.vocab_embed = Embedding(vocab_size, hidden_dim)
        self.sigma_map = SigmaMap(cond_dim)
        self.rotary_emb = Rotary(hidden_dim // n_heads)
        self.blocks = nn.ModuleList([Block(hidden_dim, n_heads, cond_dim) for _ in range(n_blocks)])
        self.output_layer = FinalLayer(hidden_dim, vocab_size, cond_dim)

    def forward(self, indices, sigma, attend=None):
        """`attend` (L, L) bool, optional: which positions each position attends to (default: all)."""
        if not self.fields["time_conditioning"]:
            sigma = torch.zeros_like(sigma)
        x = self.vocab_embed.embedding[indices]
        c = torch.nn.functional.silu(self.sigma_map(sigma))
        cos, sin = self.rotary_emb(indices.shape[1])
        for block in self.blocks:
            x = block(x, c, cos, sin, attend)
        return self.output_layer(x, c)


def random_reference(seed=0, **fields) -> MDLMReferenceDiT:
    """Random weights everywhere (MDLM starts adaLN and the output layer at zero, which would hide errors)."""
    torch.manual_seed(seed)
    model = MDLMReferenceDiT(**fields)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if "norm" in name:
                param.copy_(1.0 + 0.2 * noise)
            elif "embedding" in name:
                param.copy_(noise)
            else:
                param.copy_(noise / math.sqrt(param.shape[-1]))
    return model.eval()


# ----------------------------------------------------------------------------------------------------------------
# MDLM's formats.
# ----------------------------------------------------------------------------------------------------------------


def backbone_state(model: MDLMReferenceDiT, prefix="backbone.") -> OrderedDict:
    return OrderedDict((prefix + key, value.detach().clone().contiguous()) for key, value in model.state_dict().items())


def save_hub_layout(model: MDLMReferenceDiT, folder, weights="safetensors", **config_overrides) -> Path:
    """The layout of `kuleshov-group/mdlm-owt`: config.json (model_type "mdlm") + weights under `backbone.`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = dict(architectures=["MDLM"], model_type="mdlm", return_dict=False, torch_dtype="float32",
                  auto_map={"AutoConfig": "configuration_mdlm.MDLMConfig",
                            "AutoModelForMaskedLM": "modeling_mdlm.MDLM"},
                  **model.fields)
    config.update(config_overrides)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    state = backbone_state(model)
    if weights == "safetensors":
        save_file(dict(state), str(folder / "model.safetensors"), metadata={"format": "pt"})
    else:
        torch.save(state, folder / "pytorch_model.bin")
    return folder


class OmegaConfLikeNode:
    """Pickles like omegaconf's value nodes (NEWOBJ, then BUILD with a state holding `_val`).

    `__setstate__` records that it ran: the converter must never construct pickled objects.
    """

    constructed = []

    def __init__(self, value, parent=None):
        self._val, self._parent = value, parent

    def __getstate__(self):
        return {"_metadata": None, "_parent": self._parent, "_val": self._val}

    def __setstate__(self, state):
        OmegaConfLikeNode.constructed.append(type(self).__name__)
        self.__dict__.update(state)


class OmegaConfLikeDict(OmegaConfLikeNode):
    """Pickles like omegaconf's DictConfig: a state holding `_metadata`, `_parent` (a cycle) and `_content`."""

    def __init__(self, content, parent=None):
        self._parent = parent
        self._content = {
            key: OmegaConfLikeDict(value, self) if isinstance(value, dict) else OmegaConfLikeNode(value, self)
            for key, value in content.items()
        }

    def __getstate__(self):
        return {"_metadata": None, "_parent": self._parent, "_content": self._content}


def mdlm_run_config(model: MDLMReferenceDiT, **overrides) -> dict:
    """The part of MDLM's hydra config that describes the network."""
    fields = model.fields
    config = {
        "backbone": "dit",
        "parameterization": "subs",
        "time_conditioning": fields["time_conditioning"],
        "T": 0,
        "noise": {"type": "loglinear", "sigma_min": 1e-4, "sigma_max": 20},
        "model": {"name": "small", "type": "ddit", "hidden_size": fields["hidden_dim"], "cond_dim": fields["cond_dim"],
                  "length": fields["model_length"], "n_blocks": fields["n_blocks"], "n_heads": fields["n_heads"],
                  "scale_by_sigma": True, "dropout": fields["dropout"], "tie_word_embeddings": False},
        "training": {"ema": 0.9999, "antithetic_sampling": True, "sampling_eps": 1e-3},
    }
    for key, value in overrides.items():
        config[key] = value
    return config


def save_lightning_checkpoint(model: MDLMReferenceDiT, path, ema_model: MDLMReferenceDiT | None = None,
                              run_config: dict | None = None, tokenizer=None, prefix="backbone.") -> Path:
    """What MDLM's `main.py` saves through Lightning: `state_dict` under `backbone.`, `ema` (MDLM's
    ExponentialMovingAverage.state_dict(): shadow_params in `parameters()` order), the run's config and tokenizer as
    hyper-parameters (pickled objects), optimizer and loop state."""
    state = backbone_state(model, prefix)
    checkpoint = {
        "epoch": 0,
        "global_step": 20,
        "pytorch-lightning_version": "2.2.1",
        "state_dict": state,
        "loops": {"fit_loop": {"epoch_progress": {"current": {"completed": 0}},
                               "epoch_loop.batch_progress": {"current": {"completed": 20}}}},
        "callbacks": {"ModelCheckpoint{'monitor': 'val/nll'}": {"best_model_score": torch.tensor(3.2),
                                                                "best_model_path": "/tmp/best.ckpt"}},
        "optimizer_states": [{"state": {i: {"step": torch.tensor(20.0), "exp_avg": torch.zeros_like(p),
                                            "exp_avg_sq": torch.zeros_like(p)}
                                        for i, p in enumerate(model.parameters())},
                              "param_groups": [{"lr": 3e-4, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0,
                                                "params": list(range(len(list(model.parameters()))))}]}],
        "lr_schedulers": [{"base_lrs": [3e-4], "last_epoch": 20, "_step_count": 21, "lr_lambdas": [None]}],
        "sampler": {"random_state": None},
        "hparams_name": "kwargs",
    }
    hyper = {}
    if run_config is not None:
        hyper["config"] = OmegaConfLikeDict(run_config)
    if tokenizer is not None:
        hyper["tokenizer"] = tokenizer
    if hyper:
        checkpoint["hyper_parameters"] = hyper
    if ema_model is not None:
        checkpoint["ema"] = {"decay": 0.9999, "num_updates": 20,
                             "shadow_params": [p.detach().clone() for p in ema_model.parameters()]}
    torch.save(checkpoint, path)
    return Path(path)
