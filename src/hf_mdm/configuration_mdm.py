"""Configuration of MDLM's diffusion transformer (DiT), model_type "mdm".

This file travels with every saved checkpoint as remote code: it imports only transformers and same-folder
modules, never `hf_mdm`.
"""

from transformers import PreTrainedConfig

from .configuration_mdm_common import (
    NOISE_SCHEDULES,
    ROPE_TYPES,  # noqa: F401  (re-exported)
    auto_map,
    check_positive_ints,
    check_shared_fields,
    is_int,
    is_number,
)


class MDMConfig(PreTrainedConfig):
    r"""
    Configuration of [`MDMModel`] and [`MDMForMaskedDiffusion`]: a diffusion transformer (DiT) with adaLN
    conditioning, rotary attention and an absorbing [MASK] token.

    The defaults are MDLM's OpenWebText model (`kuleshov-group/mdlm-owt`): GPT-2's 50257 tokens plus
    [MASK] = 50257, 12 blocks of width 768, context 1024, log-linear schedule, no time input.

    Args:
        vocab_size (`int`): number of token ids the network reads and scores, [MASK] included.
        mask_token_id (`int`, *optional*): the absorbing [MASK] id; defaults to `vocab_size - 1`.
        pad_token_id, bos_token_id, eos_token_id (`int`, *optional*): special token ids.
        hidden_size (`int`): width d of the residual stream.
        num_hidden_layers (`int`): number of DiT blocks.
        num_attention_heads (`int`): attention heads; must divide `hidden_size` into an even head size.
        cond_dim (`int`): width of the timestep conditioning vector that drives adaLN.
        mlp_ratio (`int` or `float`): MLP hidden width is `mlp_ratio * hidden_size`.
        dropout (`float`): dropout on the attention and MLP branches (training only).
        max_position_embeddings (`int`): longest sequence the model accepts.
        rope_parameters (`dict`, *optional*): rotary embedding settings in transformers 5's convention,
            `{"rope_type": "default", "rope_theta": 10000.0}` by default; the scaled types of `ROPE_TYPES` are
            accepted too ("dynamic" and "yarn" may run past `max_position_embeddings`). A config with the older
            top-level `rope_theta` still loads.
        time_conditioning (`bool`): whether the network reads the noise level. MDMs are time-agnostic
            (arXiv:2409.02908, section 3), so the default is False and the conditioning input is zero.
        noise_schedule (`str`): one of "loglinear" (MDLM's), "linear", "cosine": alpha_t used in training
            and sampling. "cosine" is alpha_t = cos(pi t / 2) (MDLM's cosine, without its eps), not md4's
            1 - sin(pi t / 2) (0.71 against 0.29 at t = 0.5; see docs/concepts/time-agnostic.md).
        noise_eps (`float`): the log-linear schedule's eps, alpha_t = 1 - (1 - eps) t.
        initializer_range (`float`): std of the normal initialisation of linear and embedding weights.
        tie_word_embeddings (`bool`): share the token embedding with the output projection's weight (MDLM's DiT
            does not).
        attend_to_padding (`bool`): False (the default): `attention_mask` keeps padding out of attention and rotary
            positions count real tokens only, so a padded row gives the logits it would give alone. True: MDLM's
            DiT, which has no attention mask: the network ignores `attention_mask`, every position attends to
            every position, padding included, at rotary positions 0..L-1 (a converted MDLM model trained on padded
            data, such as LM1B, saw its padding that way). `attention_mask` still says what the loss scores.
        diffusion_block_size (`int`, *optional*): None (the default): a bidirectional denoiser, every position
            attends to every position. An int B: block diffusion (BD3-LM, SDAR, Fast-dLLM v2): the sequence is cut
            into blocks of B positions counted from each row's first real token, attention is bidirectional inside
            a block and causal across blocks, so a finished block never changes and its keys and values are cached
            exactly. `generate()` then decodes block by block.
        length_extrapolation (`bool`): False (the default): `generate()` refuses a canvas longer than
            `max_position_embeddings`. True: it generates one, with a warning, the rotary positions extrapolating past
            the training length, as MDLM's rotary DiT runs them. (`forward` runs any length, as transformers' models
            do, warning past `max_position_embeddings`.)

    `output_hidden_states`, `output_attentions` and `return_dict` are the usual `PreTrainedConfig` fields: they set
    the defaults of the model's `forward` arguments of the same names.
    """

    model_type = "mdm"
    # The DiT reads position i's own output at position i (no shift, unlike Dream's `MDMLlamaConfig`).
    shift_logits = False

    vocab_size: int = 50258
    mask_token_id: int | None = None
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    cond_dim: int = 128
    mlp_ratio: int | float = 4
    dropout: float | int = 0.1
    max_position_embeddings: int = 1024
    rope_parameters: dict | None = None
    time_conditioning: bool = False
    noise_schedule: str = "loglinear"
    noise_eps: float = 1e-3
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False
    attend_to_padding: bool = False
    length_extrapolation: bool = False
    diffusion_block_size: int | None = None

    def __post_init__(self, **kwargs):
        if self.mask_token_id is None and is_int(self.vocab_size):
            self.mask_token_id = self.vocab_size - 1
        super().__post_init__(**kwargs)
        self.auto_map = auto_map(type(self), "modeling_mdm", "MDMForMaskedDiffusion")
        self._check_mdm_fields()

    def _check_mdm_fields(self):
        """Raises ValueError naming the field and what is allowed."""
        check_positive_ints(self, ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "cond_dim",
                                   "max_position_embeddings"))
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"MDMConfig.hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads})."
            )
        if (self.hidden_size // self.num_attention_heads) % 2 != 0:
            raise ValueError(
                f"MDMConfig: the head size hidden_size / num_attention_heads = "
                f"{self.hidden_size // self.num_attention_heads} must be even for rotary embeddings."
            )
        if not is_number(self.mlp_ratio) or self.mlp_ratio <= 0 or int(self.mlp_ratio * self.hidden_size) < 1:
            raise ValueError(f"MDMConfig.mlp_ratio must be a positive number, got {self.mlp_ratio!r}.")
        if not is_number(self.dropout) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"MDMConfig.dropout must be a number in [0, 1), got {self.dropout!r}.")
        for field in ("time_conditioning", "attend_to_padding", "length_extrapolation"):
            if not isinstance(getattr(self, field), bool):
                raise ValueError(f"MDMConfig.{field} must be True or False, got {getattr(self, field)!r}.")
        check_shared_fields(self)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def intermediate_size(self) -> int:
        return int(self.mlp_ratio * self.hidden_size)


__all__ = ["MDMConfig", "NOISE_SCHEDULES", "ROPE_TYPES"]
