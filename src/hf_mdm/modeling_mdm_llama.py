"""A bidirectional Llama-family transformer as a transformers model: the network of LLaDA (Llama/OLMo blocks) and
Dream (Qwen2 blocks with q/k/v biases and grouped-query attention, whose output at position i predicts token i + 1:
the model shifts it back inside, so that no sampler ever knows). What every hf_mdm family shares (the head's
`forward`, the loss, the [MASK] logit, rotary embeddings, masks) is in `modeling_mdm_common.py`.

This file travels with every saved checkpoint as remote code: it imports only torch/transformers and same-folder
modules, never `hf_mdm`.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping
from transformers.integrations.moe import use_experts_implementation
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .configuration_mdm_llama import MDMLlamaConfig
from .generation_mdm import MDMGenerationConfig, MDMGenerationMixin
from .modeling_mdm_common import (
    MDMHeadMixin,
    MDMModelOutput,
    MDMPreTrainedBase,
    MDMRotaryEmbedding,
    apply_rotary_pos_emb,
    backbone_inputs,
    check_kwargs,
    eager_attention_forward,
    noisy_half,
    upcast,
    validate_inputs,
)


# On disk each expert's projections are separate tensors (mlp.experts.{e}.{gate,up,down}_proj.weight: LLaDA-MoE's,
# LLaDA 2.x's and RND1's layout, and what transformers saves); in memory they are stacked. transformers' own
# Qwen2/3-MoE rule stacks them when a folder loads and splits them when it is saved, so a converter copies experts
# tensor by tensor, never holding a layer's experts twice.
if get_checkpoint_conversion_mapping("mdm_llama") is None:
    register_checkpoint_conversion_mapping("mdm_llama", get_checkpoint_conversion_mapping("qwen2_moe"))


class MDMRMSNorm(nn.Module):
    """RMSNorm as Llama, LLaDA and Dream compute it: normalised in float32 (float64 in a float64 model), cast back,
    then scaled by the weight."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x = upcast(hidden_states)
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
        if config.qk_norm:  # Qwen3: each head's query and key normalised before the rotary embedding
            self.q_norm = MDMRMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = MDMRMSNorm(self.head_dim, config.rms_norm_eps)

    def forward(self, hidden_states, position_embeddings, attention_mask=None, cache=None, attn_implementation=None):
        """(batch, seq_len, hidden) -> (batch, seq_len, hidden) and the attention weights (eager only, else None)."""
        batch_size, seq_len, _ = hidden_states.shape
        query = self.q_proj(hidden_states).view(batch_size, seq_len, -1, self.head_dim)
        key = self.k_proj(hidden_states).view(batch_size, seq_len, -1, self.head_dim)
        if self.config.qk_norm:
            query, key = self.q_norm(query), self.k_norm(key)
        query, key = query.transpose(1, 2), key.transpose(1, 2)
        value = self.v_proj(hidden_states).view(batch_size, seq_len, -1, self.head_dim).transpose(1, 2)
        query, key = apply_rotary_pos_emb(query, key, *position_embeddings)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)

        # The backbone passes the implementation it resolved (eager when attention weights are asked for).
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            attn_implementation or self.config._attn_implementation, eager_attention_forward)
        dropout = self.config.attention_dropout if self.training else 0.0
        attn_output, attn_weights = attention_interface(
            self, query, key, value, attention_mask, dropout=dropout, scaling=self.scaling, is_causal=False
        )
        return self.o_proj(attn_output.reshape(batch_size, seq_len, -1)), attn_weights


class MDMLlamaMLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)) (LLaDA's ff_proj is the gate, up_proj the up, ff_out the down)."""

    def __init__(self, config: MDMLlamaConfig, intermediate_size: int | None = None):
        super().__init__()
        intermediate_size = intermediate_size or config.intermediate_size
        self.gate_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, config.hidden_size, bias=False)

    def forward(self, hidden_states):
        return self.down_proj(F.silu(self.gate_proj(hidden_states)) * self.up_proj(hidden_states))


class MDMRouter(nn.Module):
    """Scores the experts for each token and picks `num_experts_per_tok` of them: softmax over all experts then top-k
    (LLaDA-MoE, RND1), or independent sigmoid scores with group-limited choice and a choice-only bias (LLaDA 2.x,
    DeepSeek-V3's rule). Scores are computed in float32 (float64 in a float64 model), so that near ties route the
    same way in every half precision."""

    def __init__(self, config: MDMLlamaConfig):
        super().__init__()
        self.config = config
        self.weight = nn.Parameter(torch.zeros(config.num_experts, config.hidden_size))
        if config.router_expert_bias:
            self.register_buffer("expert_bias", torch.zeros(config.num_experts, dtype=torch.float32))

    def forward(self, hidden_states: torch.Tensor):
        """(tokens, hidden) -> router logits (tokens, experts), float32 or float64; the chosen experts' weights
        (tokens, k), in the hidden states' dtype; their ids (tokens, k)."""
        config = self.config
        logits = F.linear(upcast(hidden_states), upcast(self.weight))
        scores = logits.softmax(dim=-1) if config.router_score_function == "softmax" else logits.sigmoid()
        choice = scores + self.expert_bias if config.router_expert_bias else scores
        if config.n_group is not None:
            by_group = choice.view(-1, config.n_group, config.num_experts // config.n_group)
            best_groups = by_group.topk(2, dim=-1).values.sum(dim=-1).topk(config.topk_group, dim=-1).indices
            kept = torch.zeros_like(by_group[..., 0], dtype=torch.bool).scatter_(1, best_groups, True)
            choice = by_group.masked_fill(~kept.unsqueeze(-1), float("-inf")).flatten(1)
        chosen = choice.topk(config.num_experts_per_tok, dim=-1).indices
        weights = scores.gather(1, chosen)
        if config.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return logits, (weights * config.routed_scaling_factor).to(hidden_states.dtype), chosen


@use_experts_implementation
class MDMExperts(nn.Module):
    """The routed SwiGLU experts, stored as transformers stores them (`gate_up_proj` (experts, 2 * width, hidden),
    gate rows first; `down_proj` (experts, hidden, width)), so that its grouped and batched matmul kernels run them
    (`config._experts_implementation`). This forward is the plain path ("eager"), one expert at a time."""

    def __init__(self, config: MDMLlamaConfig):
        super().__init__()
        self.num_experts = config.num_experts
        self.hidden_dim = config.hidden_size
        self.intermediate_dim = config.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(self.num_experts, 2 * self.intermediate_dim, self.hidden_dim))
        self.down_proj = nn.Parameter(torch.empty(self.num_experts, self.hidden_dim, self.intermediate_dim))
        self.act_fn = F.silu

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        """(tokens, hidden), the chosen experts (tokens, k) and their weights (tokens, k) -> (tokens, hidden)."""
        output = torch.zeros_like(hidden_states)
        for expert in range(self.num_experts):
            token, slot = (top_k_index == expert).nonzero(as_tuple=True)
            if token.numel() == 0:
                continue
            gate, up = F.linear(hidden_states[token], self.gate_up_proj[expert]).chunk(2, dim=-1)
            expert_output = F.linear(self.act_fn(gate) * up, self.down_proj[expert])
            output.index_add_(0, token, (expert_output * top_k_weights[token, slot, None]).to(output.dtype))
        return output


class MDMSparseMoE(nn.Module):
    """A mixture-of-experts MLP: the router's chosen experts, weighted, plus the shared experts every token uses."""

    def __init__(self, config: MDMLlamaConfig):
        super().__init__()
        self.gate = MDMRouter(config)
        self.experts = MDMExperts(config)
        self.shared_experts = MDMLlamaMLP(config, config.moe_intermediate_size * config.num_shared_experts) \
            if config.num_shared_experts else None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        tokens = hidden_states.reshape(-1, hidden_states.shape[-1])
        _, weights, chosen = self.gate(tokens)
        if tokens.dtype == torch.float64:  # transformers' grouped-matmul kernel has no float64 path: the plain one
            output = type(self.experts).forward.__wrapped__(self.experts, tokens, chosen, weights)
        else:
            output = self.experts(tokens, chosen, weights)
        output = output.view_as(hidden_states)
        if self.shared_experts is not None:
            output = output + self.shared_experts(hidden_states)
        return output


class MDMLlamaBlock(GradientCheckpointingLayer):
    """Pre-norm block: x = x + attention(norm(x)); x = x + mlp(norm(x))."""

    def __init__(self, config: MDMLlamaConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = MDMRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = MDMLlamaAttention(config, layer_idx)
        self.post_attention_layernorm = MDMRMSNorm(config.hidden_size, config.rms_norm_eps)
        is_moe = config.num_experts is not None and layer_idx >= config.first_k_dense_replace
        self.mlp = MDMSparseMoE(config) if is_moe else MDMLlamaMLP(config)

    def forward(self, hidden_states, position_embeddings, attention_mask=None, cache=None, attn_implementation=None):
        """(batch, seq_len, hidden) -> (batch, seq_len, hidden)."""
        attn_output, _ = self.self_attn(self.input_layernorm(hidden_states), position_embeddings, attention_mask, cache,
                                        attn_implementation)
        hidden_states = hidden_states + attn_output
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class MDMLlamaPreTrainedModel(MDMPreTrainedBase):
    config: MDMLlamaConfig
    config_class = MDMLlamaConfig
    _no_split_modules = ["MDMLlamaBlock"]
    _can_record_outputs = {"hidden_states": MDMLlamaBlock, "attentions": OutputRecorder(MDMLlamaAttention, index=1),
                           "router_logits": OutputRecorder(MDMRouter, index=0)}

    @torch.no_grad()
    def _init_weights(self, module: nn.Module):
        super()._init_weights(module)
        if isinstance(module, MDMExperts):
            init.normal_(module.gate_up_proj, mean=0.0, std=self.config.initializer_range)
            init.normal_(module.down_proj, mean=0.0, std=self.config.initializer_range)
        elif isinstance(module, MDMRouter):
            init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
            if self.config.router_expert_bias:
                init.zeros_(module.expert_bias)


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
                padding (left or right). Padding is never attended to, and rotary positions count real tokens only.
            timesteps (`torch.Tensor`, *optional*): ignored (the network reads no noise level); accepted so that
                every hf_mdm backbone takes the same arguments.
            inputs_embeds, position_ids, cache, kwargs: as for `MDMModel`.
            clean_input_ids (`torch.LongTensor` of shape `(batch, seq_len)`, *optional*): block-diffusion training
                (BD3-LM): the clean sequence x_0 of the partly masked `input_ids` x_t. The network runs both in one
                pass, x_0 at the same positions, so that each block of x_t sees its own noisy block and the clean
                earlier blocks; the output covers x_t only. Needs `config.diffusion_block_size`.

        The last entry of `hidden_states` is `last_hidden_state`, after the final norm, as in transformers' Llama.
        """
        check_kwargs(self, kwargs)
        validate_inputs(self.config, input_ids, inputs_embeds, attention_mask, timesteps, cache,
                        clean_input_ids)
        hidden_states, position_embeddings, mask, implementation = backbone_inputs(
            self, input_ids, inputs_embeds, attention_mask, position_ids, cache, kwargs.get("output_attentions", False),
            clean_input_ids)

        for layer in self.layers:
            hidden_states = layer(hidden_states, position_embeddings, mask, cache, implementation)
        if clean_input_ids is not None:
            hidden_states = noisy_half(self.config, hidden_states, attention_mask, position_ids)
        return MDMModelOutput(last_hidden_state=self.norm(hidden_states))


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


__all__ = ["MDMLlamaPreTrainedModel", "MDMLlamaModel", "MDMLlamaForMaskedDiffusion"]
