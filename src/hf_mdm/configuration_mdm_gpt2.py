"""Configuration of the GPT-2-style transformer (learned positions, LayerNorm, GELU MLP) as a bidirectional or
block-causal denoiser, model_type "mdm_gpt2": what a GPT-2 causal LM becomes when it is adapted into (block)
diffusion (`hf-mdm train --init-from shakespeare-ar --diffusion-block-size 4`).

This file travels with every saved checkpoint as remote code: it imports only transformers and same-folder
modules, never `hf_mdm`.
"""

from transformers import PreTrainedConfig
from transformers.activations import ACT2FN

from .configuration_mdm_common import auto_map, check_positive_ints, check_shared_fields, is_int, is_number


class MDMGPT2Config(PreTrainedConfig):
    r"""
    Configuration of [`MDMGPT2Model`] and [`MDMGPT2ForMaskedDiffusion`]: GPT-2's transformer (learned absolute
    positions, pre-LayerNorm blocks with biases, fused query/key/value projection, GELU MLP, tied output projection)
    without its causal mask: bidirectional, or block-causal with `diffusion_block_size`.

    The defaults are GPT-2 small's shapes (12 layers of width 768, 12 heads, context 1024, vocabulary 50257 plus
    [MASK]). The fields have transformers' generic names; GPT-2's own are in the comments (`n_embd` is
    `hidden_size`, ...).

    Args:
        vocab_size (`int`): rows of the embedding and of the output projection, [MASK] included.
        mask_token_id (`int`, *optional*): the [MASK] id; defaults to `vocab_size - 1`.
        pad_token_id, bos_token_id, eos_token_id (`int`, *optional*): special token ids.
        hidden_size (`int`): width of the residual stream (`n_embd`).
        num_hidden_layers (`int`): number of blocks (`n_layer`).
        num_attention_heads (`int`): attention heads (`n_head`); must divide `hidden_size`.
        intermediate_size (`int`, *optional*): width of the MLP (`n_inner`); defaults to `4 * hidden_size`.
        activation_function (`str`): the MLP's activation, a name of transformers' `ACT2FN` (GPT-2: "gelu_new",
            the tanh approximation).
        layer_norm_eps (`float`): epsilon of every LayerNorm (`layer_norm_epsilon`).
        max_position_embeddings (`int`): rows of the learned position embedding (`n_positions`): the longest
            sequence the model can read at all.
        embedding_dropout, residual_dropout, attention_dropout (`float`): GPT-2's `embd_pdrop`, `resid_pdrop` and
            `attn_pdrop` (training only).
        shift_logits (`bool`): True for a network adapted from an autoregressive model, whose output at position i
            predicts token i + 1: the model shifts internally, so its logits at position i are always the
            distribution of token i (see `MDMLlamaConfig.shift_logits`).
        tie_word_embeddings (`bool`): share the token embedding with the output projection (GPT-2 does).
        noise_schedule (`str`), noise_eps (`float`): the schedule of training and sampling.
        diffusion_block_size (`int`, *optional*): None: bidirectional. An int B: block diffusion, bidirectional
            inside blocks of B positions (counted from each row's first real token), causal across them.
        initializer_range (`float`): std of the normal initialisation of linear and embedding weights.
        source_family (`str`, *optional*): where the weights came from ("gpt2"); informational.
    """

    model_type = "mdm_gpt2"
    # The network reads no noise level (time-agnostic, as the theory allows); generation and training read this.
    time_conditioning = False

    vocab_size: int = 50258
    mask_token_id: int | None = None
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int | None = None
    activation_function: str = "gelu_new"
    layer_norm_eps: float = 1e-5
    max_position_embeddings: int = 1024
    embedding_dropout: float | int = 0.0
    residual_dropout: float | int = 0.0
    attention_dropout: float | int = 0.0
    shift_logits: bool = False
    tie_word_embeddings: bool = True
    noise_schedule: str = "linear"
    noise_eps: float = 1e-3
    initializer_range: float = 0.02
    diffusion_block_size: int | None = None
    source_family: str | None = None

    def __post_init__(self, **kwargs):
        if self.mask_token_id is None and is_int(self.vocab_size):
            self.mask_token_id = self.vocab_size - 1
        if self.intermediate_size is None and is_int(self.hidden_size):
            self.intermediate_size = 4 * self.hidden_size
        if kwargs.get("time_conditioning"):
            raise ValueError("MDMGPT2Config.time_conditioning must be False: this backbone reads no noise level.")
        kwargs.pop("time_conditioning", None)
        super().__post_init__(**kwargs)
        self.auto_map = auto_map(type(self), "modeling_mdm_gpt2", "MDMGPT2ForMaskedDiffusion")
        self._check_fields()

    def _check_fields(self):
        check_positive_ints(self, ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                                   "intermediate_size", "max_position_embeddings"))
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(f"MDMGPT2Config.num_attention_heads ({self.num_attention_heads}) must divide hidden_size "
                             f"({self.hidden_size}).")
        if self.activation_function not in ACT2FN:
            raise ValueError(f"MDMGPT2Config.activation_function must be one of {sorted(ACT2FN)}, got "
                             f"{self.activation_function!r}.")
        if not is_number(self.layer_norm_eps) or not self.layer_norm_eps > 0:
            raise ValueError(f"MDMGPT2Config.layer_norm_eps must be a positive number, got {self.layer_norm_eps!r}.")
        for field in ("embedding_dropout", "residual_dropout", "attention_dropout"):
            value = getattr(self, field)
            if not is_number(value) or not 0.0 <= value < 1.0:
                raise ValueError(f"MDMGPT2Config.{field} must be a number in [0, 1), got {value!r}.")
        for field in ("shift_logits", "tie_word_embeddings"):
            if not isinstance(getattr(self, field), bool):
                raise ValueError(f"MDMGPT2Config.{field} must be True or False, got {getattr(self, field)!r}.")
        check_shared_fields(self)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


__all__ = ["MDMGPT2Config"]
