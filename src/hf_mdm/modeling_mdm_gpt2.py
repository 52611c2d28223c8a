"""GPT-2's transformer as a transformers masked diffusion model: learned absolute positions, pre-LayerNorm blocks with
biases, a fused query/key/value projection and a GELU MLP, with GPT-2's causal mask replaced by full bidirectional
or block-causal attention. It is what a GPT-2 causal LM (the shipped `shakespeare-ar`) becomes when adapted into
block diffusion: its weights map one for one (GPT-2's `Conv1D` matrices transposed), and with `shift_logits` and
blocks of one token the model IS the causal LM. What every hf_mdm family shares is in `modeling_mdm_common.py`.

This file travels with every saved checkpoint as remote code: it imports only torch/transformers and same-folder
modules, never `hf_mdm`.
"""

from collections.abc import Callable

import torch
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .configuration_mdm_gpt2 import MDMGPT2Config
from .generation_mdm import MDMGenerationConfig, MDMGenerationMixin
from .modeling_mdm_common import (
    MDMHeadMixin,
    MDMModelOutput,
    MDMPreTrainedBase,
    backbone_inputs,
    check_kwargs,
    eager_attention_forward,
    noisy_half,
    validate_inputs,
)


class MDMGPT2Attention(nn.Module):
    """Multi-head attention with GPT-2's biased, fused query/key/value projection and biased output projection; no
    position input (GPT-2 adds its positions to the embeddings)."""

    def __init__(self, config: MDMGPT2Config, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.scaling = self.head_dim**-0.5
        self.num_key_value_groups = 1  # read by transformers' attention functions
        self.is_causal = False
        self.qkv_proj = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=True)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=True)

    def forward(self, hidden_states, attention_mask=None, cache=None, attn_implementation=None):
        """(batch, seq_len, hidden) -> (batch, seq_len, hidden) and the attention weights (eager only, else None)."""
        batch_size, seq_len, _ = hidden_states.shape
        query, key, value = (part.view(batch_size, seq_len, -1, self.head_dim).transpose(1, 2)
                             for part in self.qkv_proj(hidden_states).chunk(3, dim=-1))
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            attn_implementation or self.config._attn_implementation, eager_attention_forward)
        dropout = self.config.attention_dropout if self.training else 0.0
        attn_output, attn_weights = attention_interface(
            self, query, key, value, attention_mask, dropout=dropout, scaling=self.scaling, is_causal=False
        )
        return self.o_proj(attn_output.reshape(batch_size, seq_len, -1)), attn_weights


class MDMGPT2MLP(nn.Module):
    """fc_out(act(fc_in(x))): GPT-2's c_fc and c_proj."""

    def __init__(self, config: MDMGPT2Config):
        super().__init__()
        self.fc_in = nn.Linear(config.hidden_size, config.intermediate_size, bias=True)
        self.act = ACT2FN[config.activation_function]
        self.fc_out = nn.Linear(config.intermediate_size, config.hidden_size, bias=True)

    def forward(self, hidden_states):
        return self.fc_out(self.act(self.fc_in(hidden_states)))


class MDMGPT2Block(GradientCheckpointingLayer):
    """Pre-LayerNorm block: x = x + drop(attention(ln(x))); x = x + drop(mlp(ln(x)))."""

    def __init__(self, config: MDMGPT2Config, layer_idx: int):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = MDMGPT2Attention(config, layer_idx)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = MDMGPT2MLP(config)
        self.dropout = nn.Dropout(config.residual_dropout)

    def forward(self, hidden_states, attention_mask=None, cache=None, attn_implementation=None):
        """(batch, seq_len, hidden) -> (batch, seq_len, hidden)."""
        attn_output, _ = self.self_attn(self.input_layernorm(hidden_states), attention_mask, cache, attn_implementation)
        hidden_states = hidden_states + self.dropout(attn_output)
        return hidden_states + self.dropout(self.mlp(self.post_attention_layernorm(hidden_states)))


class MDMGPT2PreTrainedModel(MDMPreTrainedBase):
    config: MDMGPT2Config
    config_class = MDMGPT2Config
    _no_split_modules = ["MDMGPT2Block"]
    _can_record_outputs = {"hidden_states": MDMGPT2Block, "attentions": OutputRecorder(MDMGPT2Attention, index=1)}

    @torch.no_grad()
    def _init_weights(self, module: nn.Module):
        super()._init_weights(module)
        if isinstance(module, nn.LayerNorm):
            init.zeros_(module.bias)


class MDMGPT2Model(MDMGPT2PreTrainedModel):
    """The GPT-2-style backbone: token and position embeddings, blocks and the final LayerNorm, without the head."""

    def __init__(self, config: MDMGPT2Config):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.embed_positions = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.dropout = nn.Dropout(config.embedding_dropout)
        self.layers = nn.ModuleList([MDMGPT2Block(config, i) for i in range(config.num_hidden_layers)])
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
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
                padding (left or right). Padding is never attended to, and positions count real tokens only (unlike
                GPT-2's default, which counts padding: pass `position_ids` to reproduce it).
            timesteps (`torch.Tensor`, *optional*): ignored (the network reads no noise level).
            inputs_embeds, position_ids, cache, clean_input_ids, kwargs: as for `MDMLlamaModel`.

        The last entry of `hidden_states` is `last_hidden_state`, after the final LayerNorm, as in transformers' GPT-2.
        """
        check_kwargs(self, kwargs)
        validate_inputs(self.config, input_ids, inputs_embeds, attention_mask, timesteps, cache, clean_input_ids)
        hidden_states, position_embeddings, mask, implementation = backbone_inputs(
            self, input_ids, inputs_embeds, attention_mask, position_ids, cache, kwargs.get("output_attentions", False),
            clean_input_ids)
        hidden_states = self.dropout(hidden_states + position_embeddings)

        for layer in self.layers:
            hidden_states = layer(hidden_states, mask, cache, implementation)
        if clean_input_ids is not None:
            hidden_states = noisy_half(self.config, hidden_states, attention_mask, position_ids)
        return MDMModelOutput(last_hidden_state=self.norm(hidden_states))


class MDMGPT2ForMaskedDiffusion(MDMHeadMixin, MDMGPT2PreTrainedModel, MDMGenerationMixin):
    """The GPT-2-style backbone plus its output projection (`lm_head`, tied to the token embedding by default).

    With `config.shift_logits` (a model adapted from a causal LM) the logits at position i are computed from the
    hidden state at i - 1, as for Dream: every family returns logits aligned with its input positions.
    `forward` is `MDMHeadMixin.forward`.
    """

    _auto_class = "AutoModel"
    generation_config_class = MDMGenerationConfig
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MDMGPT2Config):
        super().__init__(config)
        self.model = MDMGPT2Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()


__all__ = ["MDMGPT2PreTrainedModel", "MDMGPT2Model", "MDMGPT2ForMaskedDiffusion"]
