"""What every hf_mdm model family shares: the head contract, the [MASK] logit, rotary embeddings, attention masks
and input checks.

A family's modeling file (`modeling_mdm.py` for MDLM's DiT, `modeling_mdm_llama.py` for LLaDA and Dream) defines its
blocks, its backbone and its head; the head subclasses `MDMHeadMixin`, which gives every family one `forward`:
logits aligned with the input positions, the [MASK] logit set to `MASK_LOGIT`, `output_positions` to run the output
projection only where asked, `labels` for a masked-token loss, and the hidden states and attentions transformers
users expect (recorded by transformers' output capturing from `_can_record_outputs`). Attention goes through
transformers' attention interface, and masks through `transformers.masking_utils`, so a new attention pattern
(block-causal attention) is a mask function, not a new forward.

A forward reads no tensor values on the host: it can be compiled with `torch.compile(fullgraph=True)`, exported
with `torch.export`, and called once per sampling step without forcing a device synchronisation. The checks that
need values (ids in range, positions in range) run only for CPU tensors outside compilation; `generate()` makes
them once per call on any device.

This file travels with every saved checkpoint as remote code: it imports only torch/transformers and same-folder
modules, never `hf_mdm`.
"""

import copy
import re
from collections.abc import Callable
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.masking_utils import (
    ALL_MASK_ATTENTION_FUNCTIONS,
    and_masks,
    bidirectional_mask_function,
    create_bidirectional_mask,
)
from transformers.modeling_outputs import MaskedLMOutput
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update
from transformers.processing_utils import Unpack
from transformers.utils import ModelOutput, TransformersKwargs, can_return_tuple, is_torchdynamo_compiling, logging

from .configuration_mdm_common import uses_rotary


logger = logging.get_logger(__name__)

# The logit the model returns for [MASK] (MDLM's SUBS parameterisation: the denoiser never predicts [MASK]). It is
# finite so that no downstream arithmetic turns it into NaN (-inf - -inf in a difference of logits, 0 * -inf in an
# entropy, a float32 -> float16 cast of finfo.min), and low enough that its probability is exactly 0 in float16,
# bfloat16, float32 and float64 for any logits above -9000. It is exactly representable in float16 and float32.
# Samplers do not rely on it: the categorical sampler removes [MASK] itself.
MASK_LOGIT = -1.0e4



# ----------------------------------------------------------------------------------------------------------------
# Rotary embedding and attention.
# ----------------------------------------------------------------------------------------------------------------


def upcast(x: torch.Tensor) -> torch.Tensor:
    """x in float32 at least: half precisions go up to float32, a float64 model stays in float64 (the norms, rotary
    embeddings and routers of a float64 model are not computed in float32)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin):
    """Rotary embedding in the rotate-half form, computed in float32 (as MDLM and LLaDA do; float64 for a float64
    model) and cast back. With
    partial rotary embeddings (cos/sin narrower than a head: LLaDA 2.x) the first dimensions turn and the rest pass.

    q, k: (batch, heads, seq_len, head_dim); cos, sin: (batch, seq_len, rotary_dim), float32.
    """
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    rotary_dim = cos.shape[-1]

    def turn(x):
        turned = upcast(x[..., :rotary_dim]) * cos + rotate_half(upcast(x[..., :rotary_dim])) * sin
        return torch.cat([turned.to(x.dtype), x[..., rotary_dim:]], dim=-1) if rotary_dim < x.shape[-1] \
            else turned.to(x.dtype)

    return turn(q), turn(k)


class MDMRotaryEmbedding(nn.Module):
    """cos/sin tables for rotary attention, with transformers' `forward(x, position_ids)` and its rope types
    (`config.rope_parameters`): the plain rotary embedding of base `rope_theta` for "default", transformers' own
    initialisation functions for the scaled types, and its dynamic update (frequencies rescaled once the length
    passes `max_position_embeddings`). Unlike Llama's, cos and sin stay in float32 whatever x's dtype: every hf_mdm
    family rotates q and k in float32."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.max_seq_len_cached = config.max_position_embeddings
        self.original_max_seq_len = config.max_position_embeddings
        self.rope_type = config.rope_parameters["rope_type"]
        inv_freq, self.attention_scaling = self.compute_parameters()
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("original_inv_freq", inv_freq.clone(), persistent=False)

    @staticmethod
    def compute_default_rope_parameters(config, device=None, seq_len=None, **kwargs) -> tuple[torch.Tensor, float]:
        """(rotary_dim / 2,) float32 inverse frequencies 1 / theta^(2i / rotary_dim), and no scaling; rotary_dim is
        head_dim times the rope settings' `partial_rotary_factor` (1 by default)."""
        rotary_dim = int(config.head_dim * config.rope_parameters.get("partial_rotary_factor", 1.0))
        exponents = torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim
        return 1.0 / (float(config.rope_parameters["rope_theta"]) ** exponents), 1.0

    def compute_parameters(self) -> tuple[torch.Tensor, float]:
        """The inverse frequencies and the factor applied to cos/sin (1 but for scaled types such as yarn)."""
        if self.rope_type == "default":
            return self.compute_default_rope_parameters(self.config)
        inv_freq, attention_scaling = ROPE_INIT_FUNCTIONS[self.rope_type](self.config, None)
        return inv_freq.float(), float(attention_scaling)

    @torch.no_grad()
    @dynamic_rope_update
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids (batch, seq_len) -> cos, sin of shape (batch, seq_len, head_dim), float32 (x gives the
        device)."""
        freqs = position_ids.float()[..., None] * self.inv_freq.float().to(position_ids.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos() * self.attention_scaling, emb.sin() * self.attention_scaling


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
    or additive, broadcastable to (batch, heads, q_len, kv_len)."""
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


def attention_implementation(model: nn.Module, output_attentions: bool) -> str:
    """The configured attention, or eager (with transformers' kind of warning) when attention weights are asked."""
    implementation = model.config._attn_implementation
    if output_attentions and implementation != "eager":
        logger.warning_once(
            f"{type(model).__name__} uses attn_implementation={implementation!r}, which cannot return attention "
            "weights (output_attentions=True): falling back to eager attention for these calls. Load the model with "
            "attn_implementation='eager' to remove this warning."
        )
        return "eager"
    return implementation


def attention_mask_function(config, block_ids: torch.Tensor | None = None,
                            clean_start: int | None = None) -> Callable | None:
    """The attention pattern beyond padding, as a `masking_utils` mask function `(batch, head, q, kv) -> bool`
    intersected with full bidirectional attention: None for a bidirectional denoiser.

    For block diffusion (`config.diffusion_block_size`), `block_ids` (batch, kv_len) holds each key position's block,
    counted from its row's first real token (so a padded row sees the blocks it sees alone): a query attends to its
    own block and every earlier one. With `clean_start` the input is BD3-LM's training pair [x_t ; x_0] (x_0 from
    `clean_start` on, at the same positions): a noisy query sees its own noisy block and the clean copies of earlier
    blocks, a clean query the clean copies of its block and earlier ones, so one pass gives every block's loss
    with the context generation will give it."""
    if getattr(config, "diffusion_block_size", None) is None:
        return None
    if clean_start is None:
        def block_causal(batch_idx, head_idx, q_idx, kv_idx):
            return block_ids[batch_idx, q_idx] >= block_ids[batch_idx, kv_idx]

        return block_causal

    def noisy_and_clean_blocks(batch_idx, head_idx, q_idx, kv_idx):
        q_block, kv_block = block_ids[batch_idx, q_idx], block_ids[batch_idx, kv_idx]
        q_clean, kv_clean = q_idx >= clean_start, kv_idx >= clean_start
        own_block_own_copy = (q_block == kv_block) & (q_clean == kv_clean)
        noisy_reads_earlier_clean = (q_block > kv_block) & ~q_clean & kv_clean
        clean_block_causal = (q_block >= kv_block) & q_clean & kv_clean
        return own_block_own_copy | noisy_reads_earlier_clean | clean_block_causal

    return noisy_and_clean_blocks


def build_attention_mask(config, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None, cache,
                         implementation: str, mask_function: Callable | None = None):
    """The attention mask in the form the attention implementation takes, from the (batch, kv_len) padding mask,
    through `masking_utils.create_bidirectional_mask` (with the family's mask function, if any).

    The mask is built without reading its values on the host: transformers' shortcut that drops an all-ones mask
    checks `attention_mask.all()`, which would synchronise the device on every sampling step. Pass
    `attention_mask=None` when nothing is padded (`generate()` does): SDPA then gets no mask and its fastest kernel.
    With a cache, queries are a segment of the canvas and the padding mask covers the whole canvas.
    """
    if attention_mask is None and mask_function is None and implementation in ("sdpa", "eager"):
        return None  # every query attends to every key: no mask at all (what masking_utils would return, sooner)
    if mask_function is not None and implementation in ("sdpa", "eager"):
        # hf_mdm's mask functions only index tensors, so masking_utils' broadcast expansion evaluates them in one call;
        # create_bidirectional_mask vmaps any custom function (it cannot know), ~10 ms per call on a CPU: half of a
        # cached block-diffusion step.
        q_length = inputs_embeds.shape[1]
        q_offset, (kv_length, kv_offset) = (0, (q_length, 0)) if cache is None else (
            cache.get_query_offset(), cache.get_mask_sizes(q_length, 0))
        padding = attention_mask.to(device=inputs_embeds.device, dtype=torch.bool) if attention_mask is not None else None
        return ALL_MASK_ATTENTION_FUNCTIONS[implementation](
            batch_size=inputs_embeds.shape[0], q_length=q_length, kv_length=kv_length, q_offset=q_offset,
            kv_offset=kv_offset, mask_function=and_masks(bidirectional_mask_function, mask_function),
            attention_mask=padding, allow_is_causal_skip=False, allow_is_bidirectional_skip=False,
            dtype=inputs_embeds.dtype, config=config,
            use_vmap=False, device=inputs_embeds.device)
    if implementation != config._attn_implementation:
        config = copy.copy(config)
        config._attn_implementation = implementation
    return create_bidirectional_mask(config, inputs_embeds, attention_mask, cache=cache,
                                     and_mask_function=mask_function,
                                     allow_is_bidirectional_skip=attention_mask is None and mask_function is None)


def position_ids_from_mask(attention_mask: torch.Tensor | None, batch_size: int, seq_len: int, device) -> torch.Tensor:
    """Rotary positions that count real tokens only, so that a padded row sees the positions it would see alone."""
    if attention_mask is None:
        return torch.arange(seq_len, device=device).expand(batch_size, -1)
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def input_position_ids(attention_mask, batch_size: int, seq_len: int, device, cache=None) -> torch.Tensor:
    """The rotary positions of the input: the whole canvas's, or those of the segment a cache runs it on (queries
    start at `cache.get_query_offset()`, and the padding mask covers the whole canvas)."""
    start = cache.get_query_offset() if cache is not None else 0
    if start == 0 and (attention_mask is None or attention_mask.shape[1] == seq_len):
        return position_ids_from_mask(attention_mask, batch_size, seq_len, device)
    length = attention_mask.shape[1] if attention_mask is not None else start + seq_len
    return position_ids_from_mask(attention_mask, batch_size, length, device)[:, start : start + seq_len]


def backbone_inputs(model: nn.Module, input_ids, inputs_embeds, attention_mask, position_ids, cache,
                    output_attentions: bool = False, clean_input_ids=None):
    """What every backbone computes before its blocks: the embeddings (batch, seq_len, hidden), the position
    embeddings at the positions (counted over the real tokens, or those of a cached segment): rotary cos/sin, or the
    learned vectors of a backbone with `embed_positions` (GPT-2), which it adds itself; the attention implementation
    (eager when attention weights are asked for) and the mask in its form.

    With `clean_input_ids` (block-diffusion training), the clean sequence follows the noisy one at the same
    positions, under BD3-LM's vectorised mask: the returned embeddings have 2 * seq_len positions."""
    hidden_states = model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
    batch_size, seq_len = hidden_states.shape[:2]
    if position_ids is None:
        position_ids = input_position_ids(attention_mask, batch_size, seq_len, hidden_states.device, cache)
    block_size = getattr(model.config, "diffusion_block_size", None)
    clean_start = None
    if clean_input_ids is not None:
        clean_start = seq_len
        hidden_states = torch.cat([hidden_states, model.embed_tokens(clean_input_ids)], dim=1)
        position_ids = torch.cat([position_ids, position_ids], dim=1)
        attention_mask = torch.cat([attention_mask, attention_mask], dim=1) if attention_mask is not None else None
    if uses_rotary(model.config):
        position_embeddings = model.rotary_emb(hidden_states, position_ids)
    else:  # learned positions (GPT-2): the vectors the backbone adds to its token embeddings
        position_embeddings = model.embed_positions(position_ids)
    implementation = attention_implementation(model, output_attentions)
    block_ids = None
    if block_size is not None:
        # Every key's block: over the whole canvas with a cache (the input is a segment of it).
        key_positions = position_ids if cache is None else position_ids_from_mask(
            attention_mask, batch_size, cache.get_mask_sizes(seq_len, 0)[0], hidden_states.device)
        block_ids = torch.div(key_positions, block_size, rounding_mode="floor")
    mask_function = attention_mask_function(model.config, block_ids, clean_start)
    mask = build_attention_mask(model.config, hidden_states, attention_mask, cache, implementation, mask_function)
    return hidden_states, position_embeddings, mask, implementation


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
            weights, of shape `(batch, heads, seq_len, kv_len)`.
        router_logits (`tuple(torch.FloatTensor)`, *optional*): with `output_router_logits` (mixtures of experts),
            every MoE layer's router logits, float32, of shape `(batch * seq_len, num_experts)`.
    """

    last_hidden_state: torch.FloatTensor | None = None
    conditioning: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    router_logits: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class MDMMaskedLMOutput(MaskedLMOutput):
    """
    `MaskedLMOutput` plus, for a mixture of experts asked for `output_router_logits`:

    Args:
        aux_loss (`torch.FloatTensor`, *optional*): the load-balancing loss (Switch Transformer's: num_experts times
            the sum over experts of the fraction of routed tokens and the mean router probability), unweighted.
        router_logits (`tuple(torch.FloatTensor)`, *optional*): every MoE layer's router logits.
    """

    aux_loss: torch.FloatTensor | None = None
    router_logits: tuple[torch.FloatTensor, ...] | None = None


# ----------------------------------------------------------------------------------------------------------------
# Input checks.
# ----------------------------------------------------------------------------------------------------------------


# The keyword arguments every forward takes beyond its own: transformers' (output flags, attention-kernel inputs).
ACCEPTED_KWARGS = frozenset(TransformersKwargs.__annotations__) | {"return_dict"}


def check_kwargs(module: nn.Module, kwargs: dict) -> None:
    """A misspelt or foreign keyword argument (token_type_ids, use_cache) is a TypeError, as for a plain function,
    not silently ignored."""
    unknown = sorted(set(kwargs) - ACCEPTED_KWARGS)
    if unknown:
        raise TypeError(f"{type(module).__name__}.forward() got unexpected keyword arguments {unknown}.")


# Set while generate() runs: it checked the ids once, and its denoiser asks only for positions it chose.
_VALUES_CHECKED = ContextVar("hf_mdm_values_checked", default=False)


@contextmanager
def values_checked():
    """Within it, forward skips the range checks that read tensor values (generate() has made them once)."""
    token = _VALUES_CHECKED.set(True)
    try:
        yield
    finally:
        _VALUES_CHECKED.reset(token)


def noisy_half(config, hidden_states: torch.Tensor, attention_mask, position_ids) -> torch.Tensor:
    """The x_t half of a block-diffusion training pass over [x_t ; x_0], as the heads read it.

    A shifted network (`shift_logits`) predicts position p from the hidden state at p - 1. For the first position of
    a block that state lies in the previous block, which the sampler has committed by then: it is the clean copy's
    state, so the last position of every block takes its hidden state from the x_0 half."""
    seq_len = hidden_states.shape[1] // 2
    noisy, clean = hidden_states[:, :seq_len], hidden_states[:, seq_len:]
    if not getattr(config, "shift_logits", False):
        return noisy
    if position_ids is None:
        position_ids = input_position_ids(attention_mask, noisy.shape[0], seq_len, noisy.device)
    ends_a_block = (position_ids + 1) % config.diffusion_block_size == 0
    return torch.where(ends_a_block.unsqueeze(-1), clean, noisy)


def _first_bad_value(name: str, values: torch.Tensor, low: int, high: int):
    """Range check on values, made only where it costs no device synchronisation: on the CPU, outside compilation,
    outside generate() (`values_checked`)."""
    if values.numel() == 0 or values.device.type != "cpu" or is_torchdynamo_compiling() or _VALUES_CHECKED.get():
        return
    smallest, largest = int(values.min()), int(values.max())
    if smallest < low or largest >= high:
        raise ValueError(f"{name} must lie in [{low}, {high}), got values in [{smallest}, {largest}].")


def validate_inputs(config, input_ids, inputs_embeds, attention_mask, timesteps, cache=None, clean_input_ids=None):
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
    # With a cache, the inputs are a segment of the canvas and the mask covers the whole canvas.
    total = cache.get_mask_sizes(seq_len, 0)[0] if cache is not None else seq_len
    check_length(config, total)
    if input_ids is not None:
        _first_bad_value(f"input_ids (vocab_size={config.vocab_size})", input_ids, 0, config.vocab_size)
    if clean_input_ids is not None:
        if getattr(config, "diffusion_block_size", None) is None:
            raise ValueError("clean_input_ids is block-diffusion training (BD3-LM's pair of noisy and clean copies); "
                             "this model is bidirectional (config.diffusion_block_size is None).")
        if cache is not None:
            raise ValueError("clean_input_ids is for training: it cannot be combined with a cache.")
        if not isinstance(clean_input_ids, torch.Tensor) or tuple(clean_input_ids.shape) != (batch_size, seq_len) \
                or clean_input_ids.dtype not in (torch.int64, torch.int32):
            got = tuple(clean_input_ids.shape) if isinstance(clean_input_ids, torch.Tensor) else type(clean_input_ids).__name__
            raise ValueError(f"clean_input_ids must be integer ids of the shape of the input, ({batch_size}, {seq_len}), "
                             f"got {got}.")
        _first_bad_value(f"clean_input_ids (vocab_size={config.vocab_size})", clean_input_ids, 0, config.vocab_size)
    mask_shape = (batch_size, total)
    if attention_mask is not None and tuple(attention_mask.shape) != mask_shape:
        raise ValueError(
            f"attention_mask must have the shape (batch, seq_len) = {mask_shape}, got {tuple(attention_mask.shape)}."
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


def check_length(config, seq_len: int) -> None:
    """A sequence longer than `max_position_embeddings` runs, as in transformers' models. With the default rotary
    type its positions lie past those the model was trained on: a warning says so (generate() refuses such canvases
    unless `config.length_extrapolation`). A scaled type (linear, dynamic, yarn, llama3) is what extends the context.
    Learned positions (GPT-2) end there: a longer sequence is refused."""
    if seq_len <= config.max_position_embeddings:
        return
    if not uses_rotary(config):
        raise ValueError(f"seq_len {seq_len} is longer than max_position_embeddings ({config.max_position_embeddings}):"
                         " this model's positions are learned and end there.")
    if config.rope_parameters["rope_type"] != "default":
        return
    logger.warning_once(
        f"seq_len {seq_len} is longer than max_position_embeddings ({config.max_position_embeddings}): running "
        "anyway, with rotary positions past those the model was trained on (a scaled rope type extends the context; "
        "generate() refuses such canvases unless config.length_extrapolation)."
    )


# ----------------------------------------------------------------------------------------------------------------
# Pretrained base: capability flags, loading, initialisation.
# ----------------------------------------------------------------------------------------------------------------

LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")


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
        """transformers' `from_pretrained`: a missing weight is initialised and an unexpected one ignored, both
        named in transformers' load report (a warning). One mismatch is refused instead: weights whose layer count
        contradicts the config (a whole layer the checkpoint lacks, or layers past `num_hidden_layers`), since
        sampling from a model with random layers is silent nonsense."""
        wants_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        check_layer_count(model, info)
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
        elif isinstance(module, MDMRotaryEmbedding):
            inv_freq = module.compute_parameters()[0]
            init.copy_(module.inv_freq, inv_freq)
            init.copy_(module.original_inv_freq, inv_freq)
        elif hasattr(module, "weight") and type(module).__name__.endswith("Norm"):
            init.ones_(module.weight)


def check_layer_count(model: nn.Module, info: dict) -> None:
    """Raises ValueError when the loaded weights hold other layers than the config's `num_hidden_layers`: layers past
    it, or some layers but not all (a checkpoint with no layer weights at all is a partial one, initialised and
    reported like any missing weight)."""
    layers_of = lambda keys: {int(match.group(1)) for key in keys if (match := LAYER_INDEX.search(key))}
    expected = model.config.num_hidden_layers
    extra = sorted(index for index in layers_of(info.get("unexpected_keys", ())) if index >= expected)
    missing = set(info.get("missing_keys", ()))
    by_layer: dict[int, list[str]] = {}
    for key in model.state_dict():
        if match := LAYER_INDEX.search(key):
            by_layer.setdefault(int(match.group(1)), []).append(key)
    absent = sorted(index for index, keys in by_layer.items() if all(key in missing for key in keys))
    if len(absent) == len(by_layer):
        absent = []  # no layer at all in the weights: nothing contradicts the layer count
    if extra or absent:
        problems = ([f"weights for layers {extra} the config does not have"] if extra else []) + (
            [f"no weights for layers {absent}"] if absent else [])
        raise ValueError(
            f"the weights do not match the config ({type(model.config).__name__}, num_hidden_layers={expected}): "
            f"{'; '.join(problems)}. Fix config.json (or pass the config the weights were saved with)."
        )


# ----------------------------------------------------------------------------------------------------------------
# The head contract shared by every family.
# ----------------------------------------------------------------------------------------------------------------


class MDMHeadMixin:
    """`forward`, the loss and the embedding-resize guard of every hf_mdm head: `self.model` is the backbone and
    `compute_logits(backbone_outputs, output_positions, cache)` the output projection (`lm_head` by default). The
    embedding accessors are transformers' defaults (`model.embed_tokens`, `lm_head`)."""

    # Trainer would pass num_items_in_batch = the count of labels != -100, which is not the count of scored (masked)
    # positions when labels are the clean ids everywhere: the loss normalises itself per batch instead, and Trainer
    # averages over accumulation steps.
    accepts_loss_kwargs = False

    def compute_logits(self, outputs: MDMModelOutput, output_positions: torch.LongTensor | None,
                       cache=None) -> torch.Tensor:
        """The output projection `lm_head` on the backbone's last hidden states (at `output_positions` only). With
        `config.shift_logits` (Dream, AR-adapted models), token i is predicted from the hidden state at i - 1:
        every family returns logits aligned with its input positions, and samplers never know. A family with
        another head (the DiT's adaLN output layer) overrides this."""
        hidden_states = outputs.last_hidden_state
        if getattr(self.config, "shift_logits", False):
            hidden_states = shift_hidden_states(hidden_states, cache)
        if output_positions is not None:
            hidden_states = gather_positions(hidden_states, output_positions)
        return self.lm_head(hidden_states)

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        timesteps: torch.Tensor | None = None,
        output_positions: torch.LongTensor | None = None,
        labels: torch.LongTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        num_items_in_batch: int | torch.Tensor | None = None,
        clean_input_ids: torch.LongTensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> "MDMMaskedLMOutput":
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
            position_ids (`torch.LongTensor` of shape `(batch, seq_len)`, *optional*): rotary positions; default:
                counted over the real tokens of `attention_mask`.
            cache (`MDMCanvasCache`, *optional*): a transformers `Cache` holding keys and values over whole canvases
                (generate()'s block cache): `input_ids` are then a segment of the canvas starting at
                `cache.get_query_offset()`, `attention_mask` covers the whole canvas, and positions in the output
                are relative to the segment.
            num_items_in_batch (`int` or `torch.Tensor`, *optional*): divisor of the summed loss.
            clean_input_ids (`torch.LongTensor` of shape `(batch, seq_len)`, *optional*): block-diffusion training:
                the clean sequence of `input_ids`, run beside it in the same pass (see the backbone's `forward`).
            kwargs: `output_attentions`, `output_hidden_states`, `return_dict`, as in every transformers model
                (defaults from the config), and `output_router_logits` for a mixture of experts. Attention weights
                come from eager attention: with another implementation the call falls back to eager, with a warning.

        Returns:
            `MDMMaskedLMOutput` (a `MaskedLMOutput`; with `output_router_logits`, also the router logits and the
            Switch Transformer load-balancing `aux_loss`, added to `loss` times `config.router_aux_loss_coef`) with
            `loss` (with `labels`), `logits` of shape `(batch, seq_len, vocab)`, or
            `(batch, k, vocab)` with `output_positions`, and the hidden states and attentions when asked. The logits
            at position i are the distribution of the token at position i, for every family. The [MASK] logit is
            `MASK_LOGIT` (-1e4): finite, and of probability exactly zero (MDLM's SUBS: [MASK] is never predicted).
        """
        check_kwargs(self, kwargs)
        reference = input_ids if input_ids is not None else inputs_embeds
        seq_len = reference.shape[1] if isinstance(reference, torch.Tensor) and reference.dim() >= 2 else None
        if output_positions is not None:
            output_positions = self._validate_output_positions(output_positions, reference, seq_len)
        if labels is not None and seq_len is not None:
            if not isinstance(labels, torch.Tensor) or tuple(labels.shape) != tuple(reference.shape[:2]):
                got = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
                raise ValueError(f"labels must have the shape (batch, seq_len) = {tuple(reference.shape[:2])}, got {got}.")

        outputs = self.model(input_ids, attention_mask, timesteps, inputs_embeds=inputs_embeds,
                             position_ids=position_ids, cache=cache, clean_input_ids=clean_input_ids,
                             return_dict=True, **kwargs)
        if cache is not None and hasattr(cache, "record_hidden"):
            cache.record_hidden(outputs.last_hidden_state)
        logits = self.compute_logits(outputs, output_positions, cache)
        logits[..., self.config.mask_token_id] = MASK_LOGIT

        loss = None
        if labels is not None:
            loss = self.masked_token_loss(logits, labels, input_ids, attention_mask, output_positions, num_items_in_batch)
        aux_loss = None
        if outputs.router_logits is not None:
            padding = attention_mask if clean_input_ids is None or attention_mask is None else \
                torch.cat([attention_mask, attention_mask], dim=1)
            aux_loss = load_balancing_loss_func(outputs.router_logits, self.config.num_experts,
                                                self.config.num_experts_per_tok, padding)
            if loss is not None:
                loss = loss + self.config.router_aux_loss_coef * aux_loss
        return MDMMaskedLMOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states,
                                 attentions=outputs.attentions, aux_loss=aux_loss, router_logits=outputs.router_logits)

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
        total = F.cross_entropy(upcast(logits).flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")
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


def shift_hidden_states(hidden_states: torch.Tensor, cache=None) -> torch.Tensor:
    """The hidden states a shifted head (`config.shift_logits`: Dream, AR-adapted models) reads at each position: the
    one at i - 1. The first position of a cached segment reads the recorded hidden state before it; the first of the
    sequence its own (Dream's convention: it has no prediction)."""
    before = cache.hidden_before_segment() if cache is not None and cache.get_query_offset() > 0 else None
    before = hidden_states[:, :1] if before is None else before.to(hidden_states.dtype)
    return torch.cat([before, hidden_states[:, :-1]], dim=1)


def first_real_position(like: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.BoolTensor:
    """(batch, seq_len) True at each row's first real (non-padding) position."""
    first = torch.zeros(like.shape, dtype=torch.bool, device=like.device)
    index = attention_mask.long().argmax(dim=1, keepdim=True) if attention_mask is not None else \
        torch.zeros(like.shape[0], 1, dtype=torch.long, device=like.device)
    return first.scatter_(1, index, True)


def gather_positions(hidden_states: torch.Tensor, positions: torch.LongTensor) -> torch.Tensor:
    """(batch, seq_len, hidden), (batch, k) -> (batch, k, hidden)."""
    return hidden_states.gather(1, positions.unsqueeze(-1).expand(-1, -1, hidden_states.shape[-1]))


__all__ = ["MASK_LOGIT", "MDMHeadMixin", "MDMMaskedLMOutput", "MDMModelOutput", "MDMPreTrainedBase",
           "MDMRotaryEmbedding"]
