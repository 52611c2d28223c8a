"""hf_mdm's masked diffusion language models as transformers models: one contract, two backbone families.

- MDLM's diffusion transformer (DiT; arXiv:2310.07524, hf_mdm's docs/mdm-math.md section 6): `MDMForMaskedDiffusion`,
  weight for weight MDLM's released network (weight-only float32 LayerNorm, adaLN modulation from a timestep
  embedding, rotary q/k, bias-free attention projections, GELU(tanh) MLP, adaLN output layer).
- A bidirectional Llama-family transformer: `MDMLlamaForMaskedDiffusion`, the network of LLaDA (Llama/OLMo blocks)
  and Dream (Qwen2 blocks with q/k/v biases and grouped-query attention, whose output at position i predicts token
  i + 1: the model shifts it back inside, so that no sampler ever knows).

Both heads share one `forward` (`MDMHeadMixin`): logits aligned with the input positions, the [MASK] logit set to
`MASK_LOGIT`, `output_positions` to run the output projection only where asked, `labels` for a masked-token loss,
and the hidden states and attentions transformers users expect. Attention goes through transformers' attention
interface (SDPA by default, eager and flash available), never a hard-wired kernel.

`forward` reads no tensor values on the host: it can be compiled with `torch.compile(fullgraph=True)`, exported
with `torch.export`, and called once per sampling step without forcing a device synchronisation. The checks that
need values (ids in range, positions in range) run only for CPU tensors outside compilation; `generate()` makes
them once per call on any device.

This file travels with every saved checkpoint as remote code: it imports only torch/transformers and
same-folder modules, never `hf_mdm`.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import MaskedLMOutput
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import ModelOutput, is_torchdynamo_compiling, logging

from .configuration_mdm import MDMConfig, MDMLlamaConfig
from .generation_mdm import MDMGenerationConfig, MDMGenerationMixin


logger = logging.get_logger(__name__)

# Width of the sinusoidal timestep features fed to the conditioning MLP (MDLM: 256).
TIMESTEP_FREQUENCY_SIZE = 256

# The logit the model returns for [MASK] (MDLM's SUBS parameterisation: the denoiser never predicts [MASK]). It is
# finite so that no downstream arithmetic turns it into NaN (-inf - -inf in a difference of logits, 0 * -inf in an
# entropy, a float32 -> float16 cast of finfo.min), and low enough that its probability is exactly 0 in float16,
# bfloat16, float32 and float64 for any logits above -9000. It is exactly representable in float16 and float32.
# Samplers do not rely on it: the categorical sampler removes [MASK] itself.
MASK_LOGIT = -1.0e4


# ----------------------------------------------------------------------------------------------------------------
# Shared pieces: rotary embedding, attention, masks, outputs, input checks.
# ----------------------------------------------------------------------------------------------------------------


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin):
    """Rotary embedding in the rotate-half form, computed in float32 (as MDLM and LLaDA do) and cast back.

    q, k: (batch, heads, seq_len, head_dim); cos, sin: (batch, seq_len, head_dim).
    """
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    q_embed = q.float() * cos + rotate_half(q.float()) * sin
    k_embed = k.float() * cos + rotate_half(k.float()) * sin
    return q_embed.to(q.dtype), k_embed.to(k.dtype)


def repeat_kv(hidden_states: torch.Tensor, groups: int) -> torch.Tensor:
    """(batch, kv_heads, seq_len, head_dim) -> (batch, kv_heads * groups, seq_len, head_dim): key/value head j
    serves query heads j * groups .. (j + 1) * groups - 1 (grouped-query attention)."""
    if groups == 1:
        return hidden_states
    batch, kv_heads, seq_len, head_dim = hidden_states.shape
    expanded = hidden_states[:, :, None].expand(batch, kv_heads, groups, seq_len, head_dim)
    return expanded.reshape(batch, kv_heads * groups, seq_len, head_dim)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
):
    """Attention written out, so that its weights can be returned. `attention_mask` is boolean (True = attend)
    or additive, broadcastable to (batch, heads, seq_len, seq_len)."""
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    attn_weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None and attention_mask.dtype == torch.bool:
        attn_weights = attn_weights.masked_fill(~attention_mask, torch.finfo(attn_weights.dtype).min)
    elif attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = F.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = F.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value).transpose(1, 2).contiguous()
    return attn_output, attn_weights


def bidirectional_attention_mask(config, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None,
                                 attn_implementation: str):
    """The (batch, seq_len) padding mask in the form the attention implementation takes.

    For SDPA and eager it is a boolean (batch, 1, 1, seq_len) mask, every query attending to every real key. It is
    built without reading the mask's values: transformers' helper checks `attention_mask.all()` on the host to drop
    an all-ones mask, which would synchronise the device on every sampling step. Pass `attention_mask=None` when
    nothing is padded (`generate()` does): that lets SDPA pick its fastest kernel.
    """
    if attention_mask is None:
        return None
    if attn_implementation in ("sdpa", "eager"):
        return attention_mask.bool()[:, None, None, :]
    return create_bidirectional_mask(config, hidden_states, attention_mask)  # flash and flex: their own formats


def resolve_attn_implementation(model: nn.Module, output_attentions: bool) -> str:
    """The configured attention, or eager (with transformers' kind of warning) when attention weights are asked."""
    attn_implementation = model.config._attn_implementation
    if output_attentions and attn_implementation != "eager":
        logger.warning_once(
            f"{type(model).__name__} uses attn_implementation={attn_implementation!r}, which cannot return attention "
            "weights (output_attentions=True): falling back to eager attention for these calls. Load the model with "
            "attn_implementation='eager' to remove this warning."
        )
        return "eager"
    return attn_implementation


def position_ids_from_mask(attention_mask: torch.Tensor | None, batch_size: int, seq_len: int, device) -> torch.Tensor:
    """Rotary positions that count real tokens only, so that a padded row sees the positions it would see alone."""
    if attention_mask is None:
        return torch.arange(seq_len, device=device).expand(batch_size, -1)
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def segment_position_ids(attention_mask, batch_size: int, seq_len: int, device, kv_cache=None) -> torch.Tensor:
    """The rotary positions of the input: the whole canvas's, or those of the segment a KV-cache read runs on."""
    if kv_cache is None or not kv_cache.reading:
        return position_ids_from_mask(attention_mask, batch_size, seq_len, device)
    start, end = kv_cache.segment
    return position_ids_from_mask(attention_mask, batch_size, kv_cache.length, device)[:, start:end]


class MDMKVCache:
    """Keys and values (after rotary) of every layer over whole canvases, row by row, for block decoding
    (Fast-dLLM's cache).

    `record(rows)`: the next forward pass (on those batch rows, whole canvases) stores each layer's keys and values
    and the backbone's last hidden states at those rows of the cache. `read(rows, start, end)`: the next forward pass
    gets the tokens of positions [start, end) of those rows only; each layer computes their queries, keys and values
    and attends over the rows' recorded keys and values with [start, end) replaced by the fresh ones. That is exact if
    nothing outside [start, end) changed since the rows were recorded, and an approximation otherwise (for a
    bidirectional network, recorded positions then do not see the new tokens). Rows are independent: each keeps what
    its own last recording saw.
    """

    def __init__(self, batch_size: int):
        self.batch_size = batch_size
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.hidden: torch.Tensor | None = None
        self.rows: torch.LongTensor | None = None
        self.segment: tuple[int, int] | None = None

    def record(self, rows: torch.LongTensor) -> None:
        self.rows, self.segment = rows, None

    def read(self, rows: torch.LongTensor, start: int, end: int) -> None:
        if not self.keys:
            raise ValueError("MDMKVCache.read: nothing was recorded; call record() and a forward pass first.")
        self.rows, self.segment = rows, (start, end)

    @property
    def reading(self) -> bool:
        return self.segment is not None

    @property
    def length(self) -> int:
        return next(iter(self.keys.values())).shape[2]

    def _store(self, store: dict, key, tensor: torch.Tensor) -> None:
        if key not in store or store[key].shape[1:] != tensor.shape[1:]:
            store[key] = tensor.new_zeros((self.batch_size,) + tuple(tensor.shape[1:]))
        store[key][self.rows] = tensor.detach()

    def update(self, layer_idx: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Records (rows, kv_heads, seq_len, head_dim) keys and values, or returns the rows' recorded ones of the whole
        canvas with the segment's replaced by these."""
        if self.segment is None:
            self._store(self.keys, layer_idx, key)
            self._store(self.values, layer_idx, value)
            return key, value
        start, end = self.segment
        keys, values = self.keys[layer_idx][self.rows], self.values[layer_idx][self.rows]
        return (torch.cat([keys[:, :, :start], key, keys[:, :, end:]], dim=2),
                torch.cat([values[:, :, :start], value, values[:, :, end:]], dim=2))

    def record_hidden(self, hidden_states: torch.Tensor) -> None:
        store = {"hidden": self.hidden} if self.hidden is not None else {}
        self._store(store, "hidden", hidden_states)
        self.hidden = store["hidden"]

    def hidden_before(self, start: int) -> torch.Tensor:
        """(rows, 1, hidden): the recorded last hidden state at position start - 1 (a shifted head reads it)."""
        return self.hidden[self.rows, start - 1 : start]


class MDMRotaryEmbedding(nn.Module):
    """cos/sin tables for rotary attention, computed in float32 from position ids.

    Frequencies follow `config.rope_parameters` (transformers 5's convention): the plain rotary embedding of base
    `rope_theta` for "default", transformers' own initialisation functions for the scaled types.
    """

    def __init__(self, config: MDMConfig):
        super().__init__()
        self.config = config
        inv_freq, self.attention_scaling = self.compute_parameters()
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def compute_inv_freq(self) -> torch.Tensor:
        """(head_dim / 2,) float32 inverse frequencies."""
        return self.compute_parameters()[0]

    def compute_parameters(self) -> tuple[torch.Tensor, float]:
        """The inverse frequencies and the factor applied to cos/sin (1 but for scaled types such as yarn)."""
        rope_type = self.config.rope_parameters["rope_type"]
        if rope_type != "default":
            inv_freq, attention_scaling = ROPE_INIT_FUNCTIONS[rope_type](self.config, None)
            return inv_freq.float(), float(attention_scaling)
        head_dim = self.config.head_dim
        exponents = torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim
        return 1.0 / (float(self.config.rope_parameters["rope_theta"]) ** exponents), 1.0

    @torch.no_grad()
    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids (batch, seq_len) -> cos, sin of shape (batch, seq_len, head_dim), float32."""
        freqs = position_ids.float()[..., None] * self.inv_freq.float().to(position_ids.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos() * self.attention_scaling, emb.sin() * self.attention_scaling



@dataclass
class MDMModelOutput(ModelOutput):
    """
    Args:
        last_hidden_state (`torch.FloatTensor` of shape `(batch, seq_len, hidden)`): output of the backbone (after
            its final norm, for the Llama family).
        conditioning (`torch.FloatTensor` of shape `(batch, cond_dim)`, *optional*): the DiT's adaLN conditioning
            vector, which its output layer needs too (None for the Llama family).
        hidden_states (`tuple(torch.FloatTensor)`, *optional*): with `output_hidden_states`, the embeddings and the
            output of every block, `num_hidden_layers + 1` tensors of shape `(batch, seq_len, hidden)`.
        attentions (`tuple(torch.FloatTensor)`, *optional*): with `output_attentions`, every block's attention
            weights, of shape `(batch, heads, seq_len, seq_len)`.
    """

    last_hidden_state: torch.FloatTensor | None = None
    conditioning: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


def _first_bad_value(name: str, values: torch.Tensor, low: int, high: int):
    """Range check on values, made only where it costs no device synchronisation: on the CPU, outside compilation."""
    if values.numel() == 0 or values.device.type != "cpu" or is_torchdynamo_compiling():
        return
    smallest, largest = int(values.min()), int(values.max())
    if smallest < low or largest >= high:
        raise ValueError(f"{name} must lie in [{low}, {high}), got values in [{smallest}, {largest}].")


def validate_inputs(config, input_ids, inputs_embeds, attention_mask, timesteps, kv_cache=None):
    """Clear errors for malformed backbone inputs before any tensor work; returns the timesteps as a (batch,)
    tensor (None for a time-agnostic network).

    Shape and dtype checks are free; the range check of the ids reads values, so it runs only for CPU tensors
    outside compilation (`generate()` checks ids once per call on every device).
    """
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("Pass exactly one of input_ids (batch, seq_len) and inputs_embeds (batch, seq_len, hidden).")
    if input_ids is not None:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise ValueError(f"input_ids must be a tensor of shape (batch, seq_len), got {shape}.")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_ids must hold integer token ids (int64), got dtype {input_ids.dtype}.")
        shape = input_ids.shape
    else:
        if not isinstance(inputs_embeds, torch.Tensor) or inputs_embeds.dim() != 3 or \
                inputs_embeds.shape[-1] != config.hidden_size:
            got = tuple(inputs_embeds.shape) if isinstance(inputs_embeds, torch.Tensor) else type(inputs_embeds).__name__
            raise ValueError(f"inputs_embeds must have shape (batch, seq_len, {config.hidden_size}), got {got}.")
        shape = inputs_embeds.shape[:2]
    batch_size, seq_len = shape
    if seq_len == 0:
        raise ValueError("input_ids must hold at least one position, got seq_len = 0.")
    if seq_len > config.max_position_embeddings:
        if not getattr(config, "length_extrapolation", False):
            raise ValueError(
                f"input_ids has seq_len {seq_len}, longer than max_position_embeddings ({config.max_position_embeddings}). "
                "A rotary DiT can run longer sequences (MDLM's does): set config.length_extrapolation = True to allow it."
            )
        logger.warning_once(
            f"seq_len {seq_len} is longer than max_position_embeddings ({config.max_position_embeddings}): running "
            "anyway (config.length_extrapolation), with rotary positions past those the model was trained on."
        )
    if input_ids is not None:
        _first_bad_value(f"input_ids (vocab_size={config.vocab_size})", input_ids, 0, config.vocab_size)
    # Reading a KV cache, the inputs are a segment of the canvas and the mask covers the whole canvas.
    mask_shape = (batch_size, kv_cache.length) if kv_cache is not None and kv_cache.reading else tuple(shape)
    if attention_mask is not None and tuple(attention_mask.shape) != tuple(mask_shape):
        raise ValueError(
            f"attention_mask must have the shape (batch, seq_len) = {tuple(mask_shape)}, got {tuple(attention_mask.shape)}."
        )
    if not config.time_conditioning:
        return None
    if timesteps is None:
        raise ValueError("timesteps (one noise level per sequence) is required: config.time_conditioning is True.")
    device = input_ids.device if input_ids is not None else inputs_embeds.device
    timesteps = torch.as_tensor(timesteps, device=device)
    if timesteps.dim() == 0:
        timesteps = timesteps.expand(batch_size)
    if timesteps.shape != (batch_size,):
        raise ValueError(f"timesteps must have shape (batch,) = ({batch_size},), got {tuple(timesteps.shape)}.")
    return timesteps


# ----------------------------------------------------------------------------------------------------------------
# DiT modules (MDLM).
# ----------------------------------------------------------------------------------------------------------------


def modulate(hidden_states: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: `x * (1 + scale) + shift`, with per-sequence shift/scale of shape (batch, 1, hidden)."""
    return hidden_states * (1 + scale) + shift


class MDMLayerNorm(nn.Module):
    """Weight-only LayerNorm, always computed in float32 (MDLM's DiT keeps its norms out of autocast)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        normed = F.layer_norm(hidden_states.float(), (hidden_states.shape[-1],)) * self.weight.float()
        return normed.to(hidden_states.dtype)


class MDMTimestepEmbedder(nn.Module):
    """Noise level -> conditioning vector: sinusoidal features, then Linear, SiLU, Linear (DiT's embedder)."""

    def __init__(self, config: MDMConfig):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(TIMESTEP_FREQUENCY_SIZE, config.cond_dim, bias=True),
            nn.SiLU(),
            nn.Linear(config.cond_dim, config.cond_dim, bias=True),
        )

    @staticmethod
    def sinusoidal_features(timesteps: torch.Tensor, size: int = TIMESTEP_FREQUENCY_SIZE, max_period: float = 10000.0):
        """(batch,) -> (batch, size): [cos(t * f_i), sin(t * f_i)] with geometric frequencies f_i."""
        half = size // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
        args = timesteps.float()[:, None] * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        features = self.sinusoidal_features(timesteps).to(self.mlp[0].weight.dtype)
        return self.mlp(features)


class MDMAttention(nn.Module):
    """Bidirectional multi-head attention with a packed, bias-free qkv projection (layout: 3, heads, head_dim)."""

    def __init__(self, config: MDMConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.scaling = self.head_dim**-0.5
        self.is_causal = False
        self.qkv_proj = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=False)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, hidden_states, position_embeddings, attention_mask=None, attn_implementation="sdpa", kv_cache=None):
        """(batch, seq_len, hidden) -> (batch, seq_len, hidden) and the attention weights (eager only, else None)."""
        batch_size, seq_len, _ = hidden_states.shape
        qkv = self.qkv_proj(hidden_states).view(batch_size, seq_len, 3, self.num_heads, self.head_dim)
        query, key, value = (t.transpose(1, 2) for t in qkv.unbind(dim=2))
        query, key = apply_rotary_pos_emb(query, key, *position_embeddings)
        if kv_cache is not None:
            key, value = kv_cache.update(self.layer_idx, key, value)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(attn_implementation, eager_attention_forward)
        # MDLM trains without attention dropout; dropout acts on the residual branches instead.
        attn_output, attn_weights = attention_interface(
            self, query, key, value, attention_mask, dropout=0.0, scaling=self.scaling, is_causal=False
        )
        return self.o_proj(attn_output.reshape(batch_size, seq_len, -1)), attn_weights


class MDMMLP(nn.Module):
    def __init__(self, config: MDMConfig):
        super().__init__()
        self.fc_in = nn.Linear(config.hidden_size, config.intermediate_size, bias=True)
        self.fc_out = nn.Linear(config.intermediate_size, config.hidden_size, bias=True)

    def forward(self, hidden_states):
        return self.fc_out(F.gelu(self.fc_in(hidden_states), approximate="tanh"))


class MDMBlock(GradientCheckpointingLayer):
    """DiT block: x = x + gate * f(norm(x) * (1 + scale) + shift), for f = attention, then f = MLP."""

    def __init__(self, config: MDMConfig, layer_idx: int):
        super().__init__()
        self.norm1 = MDMLayerNorm(config.hidden_size)
        self.self_attn = MDMAttention(config, layer_idx)
        self.norm2 = MDMLayerNorm(config.hidden_size)
        self.mlp = MDMMLP(config)
        self.modulation = nn.Linear(config.cond_dim, 6 * config.hidden_size, bias=True)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, hidden_states, conditioning, position_embeddings, attention_mask=None, attn_implementation="sdpa",
                kv_cache=None):
        """Returns the block's output (batch, seq_len, hidden) and its attention weights (or None)."""
        shift_attn, scale_attn, gate_attn, shift_mlp, scale_mlp, gate_mlp = (
            self.modulation(conditioning)[:, None].chunk(6, dim=2)
        )
        attn_input = modulate(self.norm1(hidden_states), shift_attn, scale_attn)
        attn_output, attn_weights = self.self_attn(attn_input, position_embeddings, attention_mask, attn_implementation,
                                                   kv_cache)
        hidden_states = hidden_states + gate_attn * self.dropout(attn_output)

        mlp_output = self.mlp(modulate(self.norm2(hidden_states), shift_mlp, scale_mlp))
        return hidden_states + gate_mlp * self.dropout(mlp_output), attn_weights


class MDMOutputLayer(nn.Module):
    """Final adaLN layer: weight-only norm, shift/scale from the conditioning vector, Linear(hidden, vocab)."""

    def __init__(self, config: MDMConfig):
        super().__init__()
        self.norm = MDMLayerNorm(config.hidden_size)
        self.modulation = nn.Linear(config.cond_dim, 2 * config.hidden_size, bias=True)
        self.linear = nn.Linear(config.hidden_size, config.vocab_size, bias=True)

    def forward(self, hidden_states, conditioning):
        shift, scale = self.modulation(conditioning)[:, None].chunk(2, dim=2)
        return self.linear(modulate(self.norm(hidden_states), shift, scale))




# ----------------------------------------------------------------------------------------------------------------
# Llama-family modules (LLaDA, Dream).
# ----------------------------------------------------------------------------------------------------------------


class MDMRMSNorm(nn.Module):
    """RMSNorm as Llama, LLaDA and Dream compute it: normalised in float32, cast back, then scaled by the weight."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x = hidden_states.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(hidden_states.dtype)


class MDMLlamaAttention(nn.Module):
    """Bidirectional grouped-query attention: separate q/k/v projections (biased for Qwen2/Dream), rotary q/k."""

    def __init__(self, config: MDMLlamaConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scaling = self.head_dim**-0.5
        self.is_causal = False
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=config.attention_bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_key_value_heads * self.head_dim, bias=config.attention_bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_key_value_heads * self.head_dim, bias=config.attention_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(self, hidden_states, position_embeddings, attention_mask=None, attn_implementation="sdpa", kv_cache=None):
        """(batch, seq_len, hidden) -> (batch, seq_len, hidden) and the attention weights (eager only, else None)."""
        batch_size, seq_len, _ = hidden_states.shape
        query = self.q_proj(hidden_states).view(batch_size, seq_len, -1, self.head_dim).transpose(1, 2)
        key = self.k_proj(hidden_states).view(batch_size, seq_len, -1, self.head_dim).transpose(1, 2)
        value = self.v_proj(hidden_states).view(batch_size, seq_len, -1, self.head_dim).transpose(1, 2)
        query, key = apply_rotary_pos_emb(query, key, *position_embeddings)
        if kv_cache is not None:
            key, value = kv_cache.update(self.layer_idx, key, value)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(attn_implementation, eager_attention_forward)
        dropout = self.config.attention_dropout if self.training else 0.0
        attn_output, attn_weights = attention_interface(
            self, query, key, value, attention_mask, dropout=dropout, scaling=self.scaling, is_causal=False
        )
        return self.o_proj(attn_output.reshape(batch_size, seq_len, -1)), attn_weights


class MDMLlamaMLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)) (LLaDA's ff_proj is the gate, up_proj the up, ff_out the down)."""

    def __init__(self, config: MDMLlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, hidden_states):
        return self.down_proj(F.silu(self.gate_proj(hidden_states)) * self.up_proj(hidden_states))


class MDMLlamaBlock(GradientCheckpointingLayer):
    """Pre-norm block: x = x + attention(norm(x)); x = x + mlp(norm(x))."""

    def __init__(self, config: MDMLlamaConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = MDMRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = MDMLlamaAttention(config, layer_idx)
        self.post_attention_layernorm = MDMRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MDMLlamaMLP(config)

    def forward(self, hidden_states, position_embeddings, attention_mask=None, attn_implementation="sdpa", kv_cache=None):
        """Returns the block's output (batch, seq_len, hidden) and its attention weights (or None)."""
        attn_output, attn_weights = self.self_attn(
            self.input_layernorm(hidden_states), position_embeddings, attention_mask, attn_implementation, kv_cache
        )
        hidden_states = hidden_states + attn_output
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states)), attn_weights


# ----------------------------------------------------------------------------------------------------------------
# The head contract shared by every family.
# ----------------------------------------------------------------------------------------------------------------


class MDMHeadMixin:
    """`forward`, the loss and the embedding-resize guard of every hf_mdm head: `self.model` is the backbone and
    `compute_logits(backbone_outputs, output_positions)` the family's output projection."""

    # Trainer would pass num_items_in_batch = the count of labels != -100, which is not the count of scored (masked)
    # positions when labels are the clean ids everywhere: the loss normalises itself per batch instead, and Trainer
    # averages over accumulation steps.
    accepts_loss_kwargs = False

    def compute_logits(self, outputs: MDMModelOutput, output_positions: torch.LongTensor | None,
                       kv_cache: "MDMKVCache | None" = None) -> torch.Tensor:
        raise NotImplementedError

    def make_kv_cache(self, batch_size: int) -> MDMKVCache:
        """An empty key/value cache for `batch_size` rows of block decoding (`generate(use_cache=True)` makes one per
        call)."""
        return MDMKVCache(batch_size)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        timesteps: torch.Tensor | None = None,
        output_positions: torch.LongTensor | None = None,
        labels: torch.LongTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
        kv_cache: MDMKVCache | None = None,
    ) -> MaskedLMOutput | tuple:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(batch, seq_len)`): partly masked token ids.
            attention_mask (`torch.Tensor` of shape `(batch, seq_len)`, *optional*): 1 for real tokens, 0 for
                padding (left or right). Padding is never attended to, and rotary positions count real tokens
                only, so a padded row gives the logits it gives alone.
            timesteps (`torch.Tensor` of shape `(batch,)`, *optional*): noise level, read only with time_conditioning.
            output_positions (`torch.LongTensor` of shape `(batch, k)`, *optional*): positions whose logits are
                wanted. The output projection (the largest matrix for big vocabularies) runs there only.
            labels (`torch.LongTensor` of shape `(batch, seq_len)`, *optional*): the clean ids (-100 where no loss
                is wanted). The loss is the cross-entropy of the label at every position that is [MASK] in
                `input_ids` (every position with inputs_embeds), is not padding and whose label is not -100,
                summed and divided by the number of those positions in the batch (by `num_items_in_batch` when
                given). A shifted model (Dream) never scores a row's first real position, which it cannot predict.
                It carries no NELBO weight: the training objectives (`hf_mdm.training.objectives`) add that.
            inputs_embeds (`torch.FloatTensor` of shape `(batch, seq_len, hidden)`, *optional*): instead of input_ids.
            output_attentions, output_hidden_states, return_dict (`bool`, *optional*): as in every transformers
                model; default to the config's fields of the same names. Attention weights come from eager
                attention: with another implementation the call falls back to eager, with a warning.
            num_items_in_batch (`int` or `torch.Tensor`, *optional*): divisor of the summed loss.
            kv_cache (`MDMKVCache`, *optional*): block decoding's key/value cache (see `MDMKVCache`); in read mode
                `input_ids` are the tokens of the cache's segment and positions are relative to it.

        Returns:
            `MaskedLMOutput` with `loss` (with `labels`), `logits` of shape `(batch, seq_len, vocab)`, or
            `(batch, k, vocab)` with `output_positions`, and the hidden states and attentions when asked. The logits
            at position i are the distribution of the token at position i, for every family. The [MASK] logit is
            `MASK_LOGIT` (-1e4): finite, and of probability exactly zero (MDLM's SUBS: [MASK] is never predicted).
        """
        return_dict = self.config.return_dict if return_dict is None else return_dict
        reference = input_ids if input_ids is not None else inputs_embeds
        seq_len = reference.shape[1] if isinstance(reference, torch.Tensor) and reference.dim() >= 2 else None
        if output_positions is not None:
            output_positions = self._validate_output_positions(output_positions, reference, seq_len)
        if labels is not None and seq_len is not None:
            if not isinstance(labels, torch.Tensor) or tuple(labels.shape) != tuple(reference.shape[:2]):
                got = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
                raise ValueError(f"labels must have the shape (batch, seq_len) = {tuple(reference.shape[:2])}, got {got}.")

        outputs = self.model(
            input_ids, attention_mask, timesteps, inputs_embeds=inputs_embeds, output_attentions=output_attentions,
            output_hidden_states=output_hidden_states, return_dict=True, kv_cache=kv_cache,
        )
        if kv_cache is not None and not kv_cache.reading:
            kv_cache.record_hidden(outputs.last_hidden_state)
        logits = self.compute_logits(outputs, output_positions, kv_cache)
        logits[..., self.config.mask_token_id] = MASK_LOGIT

        loss = None
        if labels is not None:
            loss = self.masked_token_loss(logits, labels, input_ids, attention_mask, output_positions, num_items_in_batch)
        output = MaskedLMOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states,
                                attentions=outputs.attentions)
        return output if return_dict else output.to_tuple()

    def masked_token_loss(self, logits, labels, input_ids=None, attention_mask=None, output_positions=None,
                          num_items_in_batch=None) -> torch.Tensor:
        """Summed cross-entropy (float32) over the scored positions (see `forward`), divided by their number.

        A batch with no scored position has loss 0 (not NaN): with few masked tokens that happens in training.
        """
        scored = labels != -100
        if input_ids is not None:
            scored = scored & (input_ids == self.config.mask_token_id)
        if attention_mask is not None:
            scored = scored & attention_mask.bool()
        if getattr(self.config, "shift_logits", False):
            scored = scored & ~first_real_position(scored, attention_mask)  # it has no prediction of its own
        if output_positions is not None:
            labels, scored = labels.gather(1, output_positions), scored.gather(1, output_positions)
        targets = labels.long().masked_fill(~scored, -100)
        total = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")
        if num_items_in_batch is None:
            num_items_in_batch = scored.sum().clamp(min=1)
        elif isinstance(num_items_in_batch, torch.Tensor):
            num_items_in_batch = num_items_in_batch.to(total.device)
        return total / num_items_in_batch

    @staticmethod
    def _validate_output_positions(output_positions, reference, seq_len):
        if not isinstance(output_positions, torch.Tensor) or output_positions.dim() != 2:
            shape = tuple(output_positions.shape) if isinstance(output_positions, torch.Tensor) else output_positions
            raise ValueError(f"output_positions must be a LongTensor of shape (batch, k), got {shape}.")
        if output_positions.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"output_positions must hold integer positions, got dtype {output_positions.dtype}.")
        if seq_len is not None and output_positions.shape[0] != reference.shape[0]:
            raise ValueError(
                f"output_positions has batch size {output_positions.shape[0]}, input_ids {reference.shape[0]}."
            )
        if seq_len is not None:
            _first_bad_value(f"output_positions (seq_len={seq_len})", output_positions, 0, seq_len)
        return output_positions.long()

    def resize_token_embeddings(self, new_num_tokens: int | None = None, pad_to_multiple_of: int | None = None,
                                mean_resizing: bool = True) -> nn.Embedding:
        """transformers' resize (input embedding and output projection together), refusing to drop a special id."""
        if new_num_tokens is not None:
            for name in ("mask_token_id", "pad_token_id", "bos_token_id", "eos_token_id"):
                token_id = getattr(self.config, name)
                if token_id is not None and new_num_tokens <= token_id:
                    raise ValueError(
                        f"resize_token_embeddings: new_num_tokens={new_num_tokens} would drop {name}={token_id}; "
                        f"it must be > {token_id}."
                    )
        return super().resize_token_embeddings(new_num_tokens, pad_to_multiple_of, mean_resizing)


def first_real_position(like: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.BoolTensor:
    """(batch, seq_len) True at each row's first real (non-padding) position."""
    first = torch.zeros(like.shape, dtype=torch.bool, device=like.device)
    index = attention_mask.long().argmax(dim=1, keepdim=True) if attention_mask is not None else \
        torch.zeros(like.shape[0], 1, dtype=torch.long, device=like.device)
    return first.scatter_(1, index, True)


def gather_positions(hidden_states: torch.Tensor, positions: torch.LongTensor) -> torch.Tensor:
    """(batch, seq_len, hidden), (batch, k) -> (batch, k, hidden)."""
    return hidden_states.gather(1, positions.unsqueeze(-1).expand(-1, -1, hidden_states.shape[-1]))


# ----------------------------------------------------------------------------------------------------------------
# DiT: pretrained base, backbone, head.
# ----------------------------------------------------------------------------------------------------------------


class MDMPreTrainedBase(PreTrainedModel):
    """What every hf_mdm family declares to transformers (capability flags) and the initialisation they share."""

    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = True

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """transformers' `from_pretrained`, refusing block weights that do not fit the config: a block the model
        lacks, or one it has but the checkpoint does not (so left at random), means the config's layer count (or
        layout) is not the weights', and sampling from it would be silent nonsense. Other mismatches (a base model
        loaded from a checkpoint with a head) stay transformers' warnings."""
        wants_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        in_blocks = lambda keys: sorted(key for key in keys if key.startswith("layers.") or ".layers." in key)
        unexpected, missing = in_blocks(info.get("unexpected_keys", ())), in_blocks(info.get("missing_keys", ()))
        if unexpected or missing:
            shown = lambda keys: ", ".join(keys[:4]) + (f" and {len(keys) - 4} more" if len(keys) > 4 else "")
            problems = ([f"not in the model: {shown(unexpected)}"] if unexpected else []) + (
                [f"missing from the weights: {shown(missing)}"] if missing else [])
            raise ValueError(
                f"the weights do not match the config ({type(model.config).__name__}, num_hidden_layers="
                f"{model.config.num_hidden_layers}): {'; '.join(problems)}. Fix config.json (or pass the config the "
                "weights were saved with)."
            )
        return (model, info) if wants_info else model

    @torch.no_grad()
    def _init_weights(self, module: nn.Module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, (MDMLayerNorm, MDMRMSNorm)):
            init.ones_(module.weight)
        elif isinstance(module, MDMRotaryEmbedding):
            init.copy_(module.inv_freq, module.compute_inv_freq())


class MDMPreTrainedModel(MDMPreTrainedBase):
    config: MDMConfig
    config_class = MDMConfig
    _no_split_modules = ["MDMBlock"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module):
        super()._init_weights(module)
        # DiT's adaLN-zero: every block starts as the identity and the output layer at zero (docs/mdm-math.md section 6).
        if isinstance(module, (MDMBlock, MDMOutputLayer)):
            init.zeros_(module.modulation.weight)
            init.zeros_(module.modulation.bias)
        if isinstance(module, MDMOutputLayer):
            init.zeros_(module.linear.weight)
            init.zeros_(module.linear.bias)


class MDMModel(MDMPreTrainedModel):
    """The DiT backbone: token embedding, timestep conditioning and the blocks, without the output layer."""

    def __init__(self, config: MDMConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.timestep_embedder = MDMTimestepEmbedder(config)
        self.rotary_emb = MDMRotaryEmbedding(config)
        self.layers = nn.ModuleList([MDMBlock(config, i) for i in range(config.num_hidden_layers)])
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        timesteps: torch.Tensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        kv_cache: MDMKVCache | None = None,
    ) -> MDMModelOutput | tuple:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(batch, seq_len)`): partly masked token ids.
            attention_mask (`torch.Tensor` of shape `(batch, seq_len)`, *optional*): 1 for real tokens, 0 for
                padding (left or right). Padding is never attended to, and rotary positions count real tokens only;
                with `config.attend_to_padding` (MDLM's DiT) it is ignored: every position attends to every position.
            timesteps (`torch.Tensor` of shape `(batch,)`, *optional*): the noise level fed to the timestep
                embedding (MDLM: the total noise sigma(t) = -log alpha_t). Read only when
                `config.time_conditioning`; otherwise the conditioning input is zero.
            inputs_embeds (`torch.FloatTensor` of shape `(batch, seq_len, hidden)`, *optional*): instead of
                `input_ids`, vectors in the embedding space.
            output_attentions, output_hidden_states, return_dict (`bool`, *optional*): as in every transformers
                model; default to the config's fields of the same names.
            kv_cache (`MDMKVCache`, *optional*): records every layer's keys and values, or, in read mode, lets the
                inputs be a segment of the canvas (`attention_mask` then covers the whole canvas).
        """
        output_attentions = self.config.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        return_dict = self.config.return_dict if return_dict is None else return_dict
        timesteps = validate_inputs(self.config, input_ids, inputs_embeds, attention_mask, timesteps, kv_cache)
        if self.config.attend_to_padding:
            attention_mask = None  # MDLM's DiT: no attention mask, positions 0..L-1

        hidden_states = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        batch_size, seq_len = hidden_states.shape[:2]
        if not self.config.time_conditioning:
            timesteps = torch.zeros(batch_size, device=hidden_states.device)
        conditioning = F.silu(self.timestep_embedder(timesteps))
        position_ids = segment_position_ids(attention_mask, batch_size, seq_len, hidden_states.device, kv_cache)
        position_embeddings = self.rotary_emb(position_ids)
        attn_implementation = resolve_attn_implementation(self, output_attentions)
        mask = bidirectional_attention_mask(self.config, hidden_states, attention_mask, attn_implementation)

        all_hidden_states = (hidden_states,) if output_hidden_states else None
        all_attentions = () if output_attentions else None
        for layer in self.layers:
            hidden_states, attn_weights = layer(hidden_states, conditioning, position_embeddings, mask, attn_implementation,
                                                kv_cache)
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            if output_attentions:
                all_attentions += (attn_weights,)
        output = MDMModelOutput(hidden_states, conditioning, all_hidden_states, all_attentions)
        return output if return_dict else output.to_tuple()


class MDMForMaskedDiffusion(MDMHeadMixin, MDMPreTrainedModel, MDMGenerationMixin):
    """The DiT backbone plus its adaLN output layer: per-position distributions over the real tokens.

    This is the class `AutoModel` and `AutoModelForMaskedLM` return for an `MDMConfig`, and the one users call
    `.generate()` on. `forward` is `MDMHeadMixin.forward`.
    """

    _auto_class = "AutoModel"  # makes save_pretrained copy this file (and its relative imports) for remote code
    generation_config_class = MDMGenerationConfig
    # Declared for configs with tie_word_embeddings=True; MDLM's DiT keeps them separate (the default).
    _tied_weights_keys = {"output_layer.linear.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MDMConfig):
        super().__init__(config)
        self.model = MDMModel(config)
        self.output_layer = MDMOutputLayer(config)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.output_layer.linear

    def set_output_embeddings(self, new_embeddings):
        self.output_layer.linear = new_embeddings

    def compute_logits(self, outputs: MDMModelOutput, output_positions: torch.LongTensor | None,
                       kv_cache: MDMKVCache | None = None) -> torch.Tensor:
        hidden_states = outputs.last_hidden_state
        if output_positions is not None:
            hidden_states = gather_positions(hidden_states, output_positions)
        return self.output_layer(hidden_states, outputs.conditioning)


# ----------------------------------------------------------------------------------------------------------------
# Llama family: pretrained base, backbone, head.
# ----------------------------------------------------------------------------------------------------------------


class MDMLlamaPreTrainedModel(MDMPreTrainedBase):
    config: MDMLlamaConfig
    config_class = MDMLlamaConfig
    _no_split_modules = ["MDMLlamaBlock"]


class MDMLlamaModel(MDMLlamaPreTrainedModel):
    """The bidirectional Llama-family backbone: token embedding, blocks and the final RMSNorm, without the head."""

    def __init__(self, config: MDMLlamaConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.rotary_emb = MDMRotaryEmbedding(config)
        self.layers = nn.ModuleList([MDMLlamaBlock(config, i) for i in range(config.num_hidden_layers)])
        self.norm = MDMRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        timesteps: torch.Tensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        kv_cache: MDMKVCache | None = None,
    ) -> MDMModelOutput | tuple:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(batch, seq_len)`): partly masked token ids.
            attention_mask (`torch.Tensor` of shape `(batch, seq_len)`, *optional*): 1 for real tokens, 0 for
                padding (left or right). Padding is never attended to, and rotary positions count real tokens only.
            timesteps (`torch.Tensor`, *optional*): ignored (the network reads no noise level); accepted so that
                every hf_mdm backbone takes the same arguments.
            inputs_embeds, output_attentions, output_hidden_states, return_dict, kv_cache: as for `MDMModel`.

        The last entry of `hidden_states` is `last_hidden_state`, after the final norm, as in transformers' Llama.
        """
        output_attentions = self.config.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        return_dict = self.config.return_dict if return_dict is None else return_dict
        validate_inputs(self.config, input_ids, inputs_embeds, attention_mask, timesteps, kv_cache)

        hidden_states = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        batch_size, seq_len = hidden_states.shape[:2]
        position_ids = segment_position_ids(attention_mask, batch_size, seq_len, hidden_states.device, kv_cache)
        position_embeddings = self.rotary_emb(position_ids)
        attn_implementation = resolve_attn_implementation(self, output_attentions)
        mask = bidirectional_attention_mask(self.config, hidden_states, attention_mask, attn_implementation)

        all_hidden_states = (hidden_states,) if output_hidden_states else None
        all_attentions = () if output_attentions else None
        for layer in self.layers:
            hidden_states, attn_weights = layer(hidden_states, position_embeddings, mask, attn_implementation, kv_cache)
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            if output_attentions:
                all_attentions += (attn_weights,)
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden_states = all_hidden_states[:-1] + (hidden_states,)
        output = MDMModelOutput(hidden_states, None, all_hidden_states, all_attentions)
        return output if return_dict else output.to_tuple()


class MDMLlamaForMaskedDiffusion(MDMHeadMixin, MDMLlamaPreTrainedModel, MDMGenerationMixin):
    """The bidirectional Llama-family backbone plus its output projection (`lm_head`): LLaDA and Dream.

    With `config.shift_logits` (Dream), the network's output at position i - 1 is the prediction for token i, so
    the logits at position i are computed from the hidden state at i - 1: every family returns logits aligned with
    its input positions, and samplers never know. Position 0 then has no prediction of its own: its logits are
    those of position 0's hidden state (Dream's convention), and `generate()` never lets it be masked.
    `forward` is `MDMHeadMixin.forward`.
    """

    _auto_class = "AutoModel"
    generation_config_class = MDMGenerationConfig
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MDMLlamaConfig):
        super().__init__(config)
        self.model = MDMLlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def compute_logits(self, outputs: MDMModelOutput, output_positions: torch.LongTensor | None,
                       kv_cache: MDMKVCache | None = None) -> torch.Tensor:
        hidden_states = outputs.last_hidden_state
        if self.config.shift_logits:
            # Token i is predicted from position i - 1. The first position of a cache segment reads the recorded
            # hidden state before it; the first of the sequence its own (Dream's convention: it has no prediction).
            reading = kv_cache is not None and kv_cache.reading and kv_cache.segment[0] > 0
            before = kv_cache.hidden_before(kv_cache.segment[0]) if reading else hidden_states[:, :1]
            hidden_states = torch.cat([before.to(hidden_states.dtype), hidden_states[:, :-1]], dim=1)
        if output_positions is not None:
            hidden_states = gather_positions(hidden_states, output_positions)
        return self.lm_head(hidden_states)


__all__ = [
    "MASK_LOGIT",
    "MDMKVCache",
    "MDMPreTrainedModel",
    "MDMModel",
    "MDMForMaskedDiffusion",
    "MDMLlamaPreTrainedModel",
    "MDMLlamaModel",
    "MDMLlamaForMaskedDiffusion",
]
