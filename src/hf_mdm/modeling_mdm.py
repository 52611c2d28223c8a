"""MDLM's diffusion transformer (DiT; arXiv:2406.07524, hf_mdm's docs/concepts/mdlm-dit.md) as a transformers model.

`MDMForMaskedDiffusion` is, weight for weight, MDLM's released network: weight-only float32 LayerNorm, adaLN
modulation from a timestep embedding, rotary q/k, bias-free attention projections, GELU(tanh) MLP, adaLN output
layer. What every hf_mdm family shares (the head's `forward`, the loss, the [MASK] logit, rotary embeddings, masks)
is in `modeling_mdm_common.py`.

This file travels with every saved checkpoint as remote code: it imports only torch/transformers and same-folder
modules, never `hf_mdm`.
"""

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .configuration_mdm import MDMConfig
from .generation_mdm import MDMGenerationConfig, MDMGenerationMixin
from .modeling_mdm_common import (
    MASK_LOGIT,
    MDMHeadMixin,
    MDMModelOutput,
    MDMPreTrainedBase,
    MDMRotaryEmbedding,
    apply_rotary_pos_emb,
    backbone_inputs,
    check_kwargs,
    eager_attention_forward,
    gather_positions,
    noisy_half,
    upcast,
    validate_inputs,
)


# Width of the sinusoidal timestep features fed to the conditioning MLP (MDLM: 256).
TIMESTEP_FREQUENCY_SIZE = 256


def zero_initialized(linear: nn.Linear) -> nn.Linear:
    """Marks a layer that starts at zero (DiT's adaLN-zero: every block starts as the identity and the output layer
    at zero; docs/concepts/mdlm-dit.md). `_init_weights` sees the layer itself: transformers initialises only
    modules that hold parameters of their own."""
    linear.zero_init = True
    return linear


def modulate(hidden_states: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: `x * (1 + scale) + shift`, with per-sequence shift/scale of shape (batch, 1, hidden)."""
    return hidden_states * (1 + scale) + shift


class MDMLayerNorm(nn.Module):
    """Weight-only LayerNorm, always computed in float32 (MDLM's DiT keeps its norms out of autocast)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        normed = F.layer_norm(upcast(hidden_states), (hidden_states.shape[-1],)) * upcast(self.weight)
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

    def forward(self, hidden_states, position_embeddings, attention_mask=None, cache=None, attn_implementation=None):
        """(batch, seq_len, hidden) -> (batch, seq_len, hidden) and the attention weights (eager only, else None)."""
        batch_size, seq_len, _ = hidden_states.shape
        qkv = self.qkv_proj(hidden_states).view(batch_size, seq_len, 3, self.num_heads, self.head_dim)
        query, key, value = (t.transpose(1, 2) for t in qkv.unbind(dim=2))
        query, key = apply_rotary_pos_emb(query, key, *position_embeddings)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)

        # The backbone passes the implementation it resolved (eager when attention weights are asked for).
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            attn_implementation or self.config._attn_implementation, eager_attention_forward)
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
        self.modulation = zero_initialized(nn.Linear(config.cond_dim, 6 * config.hidden_size, bias=True))
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, hidden_states, conditioning, position_embeddings, attention_mask=None, cache=None,
                attn_implementation=None):
        """(batch, seq_len, hidden) -> (batch, seq_len, hidden)."""
        shift_attn, scale_attn, gate_attn, shift_mlp, scale_mlp, gate_mlp = (
            self.modulation(conditioning)[:, None].chunk(6, dim=2)
        )
        attn_input = modulate(self.norm1(hidden_states), shift_attn, scale_attn)
        attn_output, _ = self.self_attn(attn_input, position_embeddings, attention_mask, cache, attn_implementation)
        hidden_states = hidden_states + gate_attn * self.dropout(attn_output)

        mlp_output = self.mlp(modulate(self.norm2(hidden_states), shift_mlp, scale_mlp))
        return hidden_states + gate_mlp * self.dropout(mlp_output)


class MDMOutputLayer(nn.Module):
    """Final adaLN layer: weight-only norm, shift/scale from the conditioning vector, Linear(hidden, vocab)."""

    def __init__(self, config: MDMConfig):
        super().__init__()
        self.norm = MDMLayerNorm(config.hidden_size)
        self.modulation = zero_initialized(nn.Linear(config.cond_dim, 2 * config.hidden_size, bias=True))
        self.linear = zero_initialized(nn.Linear(config.hidden_size, config.vocab_size, bias=True))

    def forward(self, hidden_states, conditioning):
        shift, scale = self.modulation(conditioning)[:, None].chunk(2, dim=2)
        return self.linear(modulate(self.norm(hidden_states), shift, scale))


class MDMPreTrainedModel(MDMPreTrainedBase):
    config: MDMConfig
    config_class = MDMConfig
    _no_split_modules = ["MDMBlock"]
    _can_record_outputs = {"hidden_states": MDMBlock, "attentions": OutputRecorder(MDMAttention, index=1)}

    @torch.no_grad()
    def _init_weights(self, module: nn.Module):
        super()._init_weights(module)
        if getattr(module, "zero_init", False):
            init.zeros_(module.weight)
            init.zeros_(module.bias)


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

    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        timesteps: torch.Tensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        clean_input_ids: torch.LongTensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> MDMModelOutput:
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
            position_ids (`torch.LongTensor` of shape `(batch, seq_len)`, *optional*): rotary positions (default:
                counted over the real tokens).
            cache (`MDMCanvasCache`, *optional*): keys and values over whole canvases; the inputs are then a segment
                of the canvas (see `MDMHeadMixin.forward`).
            clean_input_ids (`torch.LongTensor` of shape `(batch, seq_len)`, *optional*): block-diffusion training
                (BD3-LM): the clean sequence x_0 of the partly masked `input_ids` x_t. The network runs both in one
                pass, x_0 at the same positions, so that each block of x_t sees its own noisy block and the clean
                earlier blocks; the output covers x_t only. Needs `config.diffusion_block_size`.
            kwargs: `output_attentions`, `output_hidden_states`, `return_dict`, as in every transformers model.
        """
        check_kwargs(self, kwargs)
        timesteps = validate_inputs(self.config, input_ids, inputs_embeds, attention_mask, timesteps, cache,
                        clean_input_ids)
        if self.config.attend_to_padding:
            attention_mask = None  # MDLM's DiT: no attention mask, positions 0..L-1

        hidden_states, position_embeddings, mask, implementation = backbone_inputs(
            self, input_ids, inputs_embeds, attention_mask, position_ids, cache, kwargs.get("output_attentions", False),
            clean_input_ids)
        if not self.config.time_conditioning:
            timesteps = torch.zeros(hidden_states.shape[0], device=hidden_states.device)
        conditioning = F.silu(self.timestep_embedder(timesteps))

        for layer in self.layers:
            hidden_states = layer(hidden_states, conditioning, position_embeddings, mask, cache, implementation)
        if clean_input_ids is not None:
            hidden_states = noisy_half(self.config, hidden_states, attention_mask, position_ids)
        return MDMModelOutput(last_hidden_state=hidden_states, conditioning=conditioning)


class MDMForMaskedDiffusion(MDMHeadMixin, MDMPreTrainedModel, MDMGenerationMixin):
    """The DiT backbone plus its adaLN output layer: per-position distributions over the real tokens.

    This is the class `AutoModel` and `AutoModelForMaskedLM` return for an `MDMConfig`, and the one users call
    `.generate()` on. `forward` is `MDMHeadMixin.forward`.
    """

    _auto_class = "AutoModel"  # makes save_pretrained write this file (and its relative imports) as remote code
    generation_config_class = MDMGenerationConfig
    # Declared for configs with tie_word_embeddings=True; MDLM's DiT keeps them separate (the default).
    _tied_weights_keys = {"output_layer.linear.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MDMConfig):
        super().__init__(config)
        self.model = MDMModel(config)
        self.output_layer = MDMOutputLayer(config)
        self.post_init()

    def get_output_embeddings(self):
        return self.output_layer.linear

    def set_output_embeddings(self, new_embeddings):
        self.output_layer.linear = new_embeddings

    def compute_logits(self, outputs: MDMModelOutput, output_positions: torch.LongTensor | None,
                       cache=None) -> torch.Tensor:
        hidden_states = outputs.last_hidden_state
        if output_positions is not None:
            hidden_states = gather_positions(hidden_states, output_positions)
        return self.output_layer(hidden_states, outputs.conditioning)


__all__ = ["MASK_LOGIT", "MDMPreTrainedModel", "MDMModel", "MDMForMaskedDiffusion"]
