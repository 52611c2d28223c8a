"""hf_mdm's masked diffusion language model: MDLM's diffusion transformer (DiT) as a transformers model.

The architecture is the one MDLM released (arXiv:2310.07524; `../shared/mdm-notes.md` section 6), so that its
checkpoints convert weight for weight: weight-only float32 LayerNorm, adaLN modulation from a timestep
embedding, rotary q/k, bias-free attention projections, GELU(tanh) MLP and an adaLN output layer. Attention
goes through transformers' attention interface (SDPA by default, eager available), never a hard-wired kernel.

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
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import ModelOutput

from .configuration_mdm import MDMConfig
from .generation_mdm import MDMGenerationConfig, MDMGenerationMixin


# Width of the sinusoidal timestep features fed to the conditioning MLP (MDLM: 256).
TIMESTEP_FREQUENCY_SIZE = 256


def modulate(hidden_states: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: `x * (1 + scale) + shift`, with per-sequence shift/scale of shape (batch, 1, hidden)."""
    return hidden_states * (1 + scale) + shift


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin):
    """Rotary embedding in the rotate-half form. q, k: (batch, heads, seq_len, head_dim); cos, sin: (batch, seq_len, head_dim)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    q_embed = q.float() * cos + rotate_half(q.float()) * sin
    k_embed = k.float() * cos + rotate_half(k.float()) * sin
    return q_embed.to(q.dtype), k_embed.to(k.dtype)


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
    attn_weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = F.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = F.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value).transpose(1, 2).contiguous()
    return attn_output, attn_weights


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


class MDMRotaryEmbedding(nn.Module):
    """cos/sin tables for rotary attention, computed in float32 from position ids."""

    def __init__(self, config: MDMConfig):
        super().__init__()
        self.head_dim = config.head_dim
        self.rope_theta = float(config.rope_theta)
        self.register_buffer("inv_freq", self.compute_inv_freq(), persistent=False)

    def compute_inv_freq(self) -> torch.Tensor:
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.float32) / self.head_dim
        return 1.0 / (self.rope_theta**exponents)

    @torch.no_grad()
    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids (batch, seq_len) -> cos, sin of shape (batch, seq_len, head_dim), float32."""
        freqs = position_ids.float()[..., None] * self.inv_freq.float().to(position_ids.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()


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

    def forward(self, hidden_states, position_embeddings, attention_mask=None, **kwargs):
        batch_size, seq_len, _ = hidden_states.shape
        qkv = self.qkv_proj(hidden_states).view(batch_size, seq_len, 3, self.num_heads, self.head_dim)
        query, key, value = (t.transpose(1, 2) for t in qkv.unbind(dim=2))
        query, key = apply_rotary_pos_emb(query, key, *position_embeddings)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        # MDLM trains without attention dropout; dropout acts on the residual branches instead.
        attn_output, _ = attention_interface(
            self, query, key, value, attention_mask, dropout=0.0, scaling=self.scaling, is_causal=False, **kwargs
        )
        return self.o_proj(attn_output.reshape(batch_size, seq_len, -1))


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

    def forward(self, hidden_states, conditioning, position_embeddings, attention_mask=None, **kwargs):
        shift_attn, scale_attn, gate_attn, shift_mlp, scale_mlp, gate_mlp = (
            self.modulation(conditioning)[:, None].chunk(6, dim=2)
        )
        attn_input = modulate(self.norm1(hidden_states), shift_attn, scale_attn)
        attn_output = self.self_attn(attn_input, position_embeddings, attention_mask, **kwargs)
        hidden_states = hidden_states + gate_attn * self.dropout(attn_output)

        mlp_output = self.mlp(modulate(self.norm2(hidden_states), shift_mlp, scale_mlp))
        return hidden_states + gate_mlp * self.dropout(mlp_output)


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


@dataclass
class MDMModelOutput(ModelOutput):
    """
    Args:
        last_hidden_state (`torch.FloatTensor` of shape `(batch, seq_len, hidden)`): output of the last block.
        conditioning (`torch.FloatTensor` of shape `(batch, cond_dim)`): the adaLN conditioning vector, which
            the output layer needs too.
    """

    last_hidden_state: torch.FloatTensor | None = None
    conditioning: torch.FloatTensor | None = None


class MDMPreTrainedModel(PreTrainedModel):
    config: MDMConfig
    config_class = MDMConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["MDMBlock"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, MDMLayerNorm):
            init.ones_(module.weight)
        elif isinstance(module, MDMRotaryEmbedding):
            init.copy_(module.inv_freq, module.compute_inv_freq())
        # DiT's adaLN-zero: every block starts as the identity and the output layer at zero (notes section 6).
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
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        timesteps: torch.Tensor | None = None,
        **kwargs,
    ) -> MDMModelOutput:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(batch, seq_len)`): partly masked token ids.
            attention_mask (`torch.Tensor` of shape `(batch, seq_len)`, *optional*): 1 for real tokens, 0 for
                padding (left or right). Padding is never attended to, and rotary positions count real tokens only.
            timesteps (`torch.Tensor` of shape `(batch,)`, *optional*): the noise level fed to the timestep
                embedding (MDLM: the total noise sigma(t) = -log alpha_t). Read only when
                `config.time_conditioning`; otherwise the conditioning input is zero.
        """
        attention_mask, timesteps = self._validate_inputs(input_ids, attention_mask, timesteps)
        batch_size, seq_len = input_ids.shape
        hidden_states = self.embed_tokens(input_ids)

        if not self.config.time_conditioning:
            timesteps = torch.zeros(batch_size, device=input_ids.device)
        conditioning = F.silu(self.timestep_embedder(timesteps))

        if attention_mask is None:
            position_ids = torch.arange(seq_len, device=input_ids.device).expand(batch_size, -1)
        else:
            # Positions count real tokens, so a left-padded row sees the positions it would see alone.
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        position_embeddings = self.rotary_emb(position_ids)
        mask = create_bidirectional_mask(config=self.config, inputs_embeds=hidden_states, attention_mask=attention_mask)

        for layer in self.layers:
            hidden_states = layer(hidden_states, conditioning, position_embeddings, mask, **kwargs)
        return MDMModelOutput(last_hidden_state=hidden_states, conditioning=conditioning)

    def _validate_inputs(self, input_ids, attention_mask, timesteps):
        """Clear errors for malformed inputs, before any tensor work (an index error deep inside helps nobody)."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise ValueError(f"input_ids must be a tensor of shape (batch, seq_len), got {shape}.")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_ids must hold integer token ids (int64), got dtype {input_ids.dtype}.")
        batch_size, seq_len = input_ids.shape
        if seq_len == 0:
            raise ValueError("input_ids must hold at least one position, got seq_len = 0.")
        if seq_len > self.config.max_position_embeddings:
            raise ValueError(
                f"input_ids has seq_len {seq_len}, longer than max_position_embeddings "
                f"({self.config.max_position_embeddings})."
            )
        low, high = int(input_ids.min()), int(input_ids.max())
        if low < 0 or high >= self.config.vocab_size:
            raise ValueError(
                f"input_ids must lie in [0, vocab_size={self.config.vocab_size}), got values in [{low}, {high}]."
            )
        if attention_mask is not None:
            if attention_mask.shape != input_ids.shape:
                raise ValueError(
                    f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, "
                    f"got {tuple(attention_mask.shape)}."
                )
            if bool(attention_mask.all()):
                attention_mask = None  # no padding: let SDPA run without a mask
        if self.config.time_conditioning:
            if timesteps is None:
                raise ValueError("timesteps (one noise level per sequence) is required: config.time_conditioning is True.")
            timesteps = torch.as_tensor(timesteps, device=input_ids.device)
            if timesteps.dim() == 0:
                timesteps = timesteps.expand(batch_size)
            if timesteps.shape != (batch_size,):
                raise ValueError(f"timesteps must have shape (batch,) = ({batch_size},), got {tuple(timesteps.shape)}.")
        return attention_mask, timesteps


class MDMForMaskedDiffusion(MDMPreTrainedModel, MDMGenerationMixin):
    """The DiT backbone plus its adaLN output layer: per-position distributions over the real tokens.

    This is the class `AutoModel` and `AutoModelForMaskedLM` return, and the one users call `.generate()` on.
    """

    _auto_class = "AutoModel"  # makes save_pretrained copy this file (and its relative imports) for remote code
    generation_config_class = MDMGenerationConfig

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

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        timesteps: torch.Tensor | None = None,
        output_positions: torch.LongTensor | None = None,
        **kwargs,
    ) -> MaskedLMOutput:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(batch, seq_len)`): partly masked token ids.
            attention_mask (`torch.Tensor` of shape `(batch, seq_len)`, *optional*): 1 for real tokens, 0 for padding.
            timesteps (`torch.Tensor` of shape `(batch,)`, *optional*): noise level, read only with time_conditioning.
            output_positions (`torch.LongTensor` of shape `(batch, k)`, *optional*): positions whose logits are
                wanted. The output projection (the largest matrix for big vocabularies) runs there only.

        Returns:
            `MaskedLMOutput` whose `logits` have shape `(batch, seq_len, vocab)`, or `(batch, k, vocab)` with
            `output_positions`. The [MASK] logit is always -inf: the model never predicts [MASK] (MDLM's SUBS).
        """
        seq_len = input_ids.shape[-1] if isinstance(input_ids, torch.Tensor) else None
        if output_positions is not None:
            output_positions = self._validate_output_positions(output_positions, input_ids, seq_len)
        outputs = self.model(input_ids, attention_mask=attention_mask, timesteps=timesteps, **kwargs)
        hidden_states = outputs.last_hidden_state
        if output_positions is not None:
            index = output_positions.unsqueeze(-1).expand(-1, -1, hidden_states.shape[-1])
            hidden_states = hidden_states.gather(1, index)
        logits = self.output_layer(hidden_states, outputs.conditioning)
        logits[..., self.config.mask_token_id] = float("-inf")
        return MaskedLMOutput(logits=logits)

    @staticmethod
    def _validate_output_positions(output_positions, input_ids, seq_len):
        if not isinstance(output_positions, torch.Tensor) or output_positions.dim() != 2:
            shape = tuple(output_positions.shape) if isinstance(output_positions, torch.Tensor) else output_positions
            raise ValueError(f"output_positions must be a LongTensor of shape (batch, k), got {shape}.")
        if output_positions.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"output_positions must hold integer positions, got dtype {output_positions.dtype}.")
        if isinstance(input_ids, torch.Tensor) and input_ids.dim() == 2 and output_positions.shape[0] != input_ids.shape[0]:
            raise ValueError(
                f"output_positions has batch size {output_positions.shape[0]}, input_ids {input_ids.shape[0]}."
            )
        if output_positions.numel() and seq_len is not None:
            low, high = int(output_positions.min()), int(output_positions.max())
            if low < 0 or high >= seq_len:
                raise ValueError(f"output_positions must lie in [0, seq_len={seq_len}), got values in [{low}, {high}].")
        return output_positions.long()


__all__ = ["MDMPreTrainedModel", "MDMModel", "MDMForMaskedDiffusion"]
