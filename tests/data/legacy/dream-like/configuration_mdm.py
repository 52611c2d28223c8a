"""Configurations of hf_mdm's masked diffusion language models, one per backbone family.

- `MDMConfig` (model_type "mdm"): MDLM's diffusion transformer (DiT, arXiv:2310.07524 / 2409.02908).
- `MDMLlamaConfig` (model_type "mdm_llama"): a bidirectional Llama-family transformer, the architecture of LLaDA
  (Llama/OLMo blocks) and Dream (Qwen2 blocks, whose output at position i predicts token i + 1).

Both carry what generation and training read from any hf_mdm model: `mask_token_id`, `noise_schedule`,
`noise_eps`, `time_conditioning`, `max_position_embeddings` and the special token ids.

This file travels with every saved checkpoint as remote code: it imports only torch/transformers and
same-folder modules, never `hf_mdm`.
"""

from transformers import PreTrainedConfig


NOISE_SCHEDULES = ("loglinear", "linear", "cosine")
# Rotary types whose frequencies are fixed at construction (transformers' ROPE_INIT_FUNCTIONS); the dynamic ones
# rescale with the sequence length seen, which a bidirectional denoiser of fixed-length canvases does not need.
ROPE_TYPES = ("default", "linear", "yarn", "llama3")
SPECIAL_TOKEN_FIELDS = ("mask_token_id", "pad_token_id", "bos_token_id", "eos_token_id")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_positive_ints(config, names) -> None:
    for name in names:
        value = getattr(config, name)
        if not _is_int(value) or value < 1:
            raise ValueError(f"{type(config).__name__}.{name} must be a positive integer, got {value!r}.")


def check_shared_fields(config) -> None:
    """The fields every hf_mdm config has: vocabulary and special ids, rotary settings, noise schedule.

    Raises ValueError naming the field and what is allowed (plain ValueError, not a strict-dataclass error).
    """
    name = type(config).__name__
    if config.vocab_size < 2:
        raise ValueError(f"{name}.vocab_size must be at least 2 (one real token and [MASK]), got {config.vocab_size}.")
    for field in SPECIAL_TOKEN_FIELDS:
        value = getattr(config, field)
        if value is None and field != "mask_token_id":
            continue
        if not _is_int(value) or not 0 <= value < config.vocab_size:
            raise ValueError(f"{name}.{field} must be an integer in [0, vocab_size={config.vocab_size}), got {value!r}.")
    if config.pad_token_id is not None and config.pad_token_id == config.mask_token_id:
        raise ValueError(f"{name}.pad_token_id must differ from mask_token_id ({config.mask_token_id}).")
    rope = config.rope_parameters
    if not isinstance(rope, dict) or rope.get("rope_type") not in ROPE_TYPES:
        raise ValueError(f"{name}.rope_parameters['rope_type'] must be one of {ROPE_TYPES}, got {rope!r}.")
    theta = rope.get("rope_theta")
    if not _is_number(theta) or not theta > 0:
        raise ValueError(f"{name}.rope_parameters['rope_theta'] must be a positive number, got {theta!r}.")
    if rope["rope_type"] != "default" and not (_is_number(rope.get("factor")) and rope["factor"] > 0):
        raise ValueError(f"{name}.rope_parameters['factor'] must be a positive number for rope_type "
                         f"{rope['rope_type']!r}, got {rope.get('factor')!r}.")
    if config.noise_schedule not in NOISE_SCHEDULES:
        raise ValueError(f"{name}.noise_schedule must be one of {NOISE_SCHEDULES}, got {config.noise_schedule!r}.")
    if not _is_number(config.noise_eps) or not 0.0 <= config.noise_eps < 1.0:
        raise ValueError(f"{name}.noise_eps must be a number in [0, 1), got {config.noise_eps!r}.")


def default_auto_map(config_class: str, model_class: str) -> dict:
    """The same model class for every Auto class, so that a saved folder loads through remote code with AutoConfig,
    AutoModel and AutoModelForMaskedLM alike."""
    return {
        "AutoConfig": f"configuration_mdm.{config_class}",
        "AutoModel": f"modeling_mdm.{model_class}",
        "AutoModelForMaskedLM": f"modeling_mdm.{model_class}",
    }


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
            `{"rope_type": "default", "rope_theta": 10000.0}` by default; the static scaled types of
            `ROPE_TYPES` are accepted too. A config with the older top-level `rope_theta` still loads.
        time_conditioning (`bool`): whether the network reads the noise level. MDMs are time-agnostic
            (arXiv:2409.02908, section 3), so the default is False and the conditioning input is zero.
        noise_schedule (`str`): one of "loglinear" (MDLM's), "linear", "cosine": alpha_t used in training
            and sampling.
        noise_eps (`float`): the log-linear schedule's eps, alpha_t = 1 - (1 - eps) t.
        initializer_range (`float`): std of the normal initialisation of linear and embedding weights.
        tie_word_embeddings (`bool`): share the token embedding with the output projection's weight (MDLM's DiT
            does not).
        attend_to_padding (`bool`): False (the default): `attention_mask` keeps padding out of attention and rotary
            positions count real tokens only, so a padded row gives the logits it would give alone. True: MDLM's
            DiT, which has no attention mask: the network ignores `attention_mask`, every position attends to
            every position, padding included, at rotary positions 0..L-1 (a converted MDLM model trained on padded
            data, such as LM1B, saw its padding that way). `attention_mask` still says what the loss scores.
        length_extrapolation (`bool`): False (the default): a sequence longer than `max_position_embeddings` is
            refused. True: it runs, with a warning, the rotary positions extrapolating past the training length, as
            MDLM's rotary DiT runs them.

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

    def __post_init__(self, **kwargs):
        if self.mask_token_id is None and _is_int(self.vocab_size):
            self.mask_token_id = self.vocab_size - 1
        kwargs.setdefault("auto_map", default_auto_map("MDMConfig", "MDMForMaskedDiffusion"))
        super().__post_init__(**kwargs)
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
        if not _is_number(self.mlp_ratio) or self.mlp_ratio <= 0 or int(self.mlp_ratio * self.hidden_size) < 1:
            raise ValueError(f"MDMConfig.mlp_ratio must be a positive number, got {self.mlp_ratio!r}.")
        if not _is_number(self.dropout) or not 0.0 <= self.dropout < 1.0:
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


class MDMLlamaConfig(PreTrainedConfig):
    r"""
    Configuration of [`MDMLlamaModel`] and [`MDMLlamaForMaskedDiffusion`]: a bidirectional Llama-family transformer
    (RMSNorm, SwiGLU MLP, rotary attention with grouped-query heads, no causal mask, no time input), the
    architecture of LLaDA and Dream.

    The defaults are LLaDA-8B's shapes (32 layers of width 4096, 32 heads, MLP 12288, vocabulary 126464, rotary
    base 500000, RMSNorm eps 1e-5); `hf-mdm convert llada` and `hf-mdm convert dream` set every field from the
    source checkpoint.

    Args:
        vocab_size (`int`): rows of the embedding and of the output projection ([MASK] and any padding rows
            included).
        mask_token_id (`int`, *optional*): the [MASK] id; defaults to `vocab_size - 1` (LLaDA's is 126336,
            Dream's 151666: the converters set them).
        pad_token_id, bos_token_id, eos_token_id (`int`, *optional*): special token ids.
        hidden_size (`int`): width of the residual stream.
        intermediate_size (`int`): width of the SwiGLU MLP.
        num_hidden_layers (`int`): number of blocks.
        num_attention_heads (`int`): query heads.
        num_key_value_heads (`int`, *optional*): key/value heads (grouped-query attention); defaults to
            `num_attention_heads`. Must divide it.
        head_dim (`int`, *optional*): width of a head; defaults to `hidden_size // num_attention_heads`. Even.
        rms_norm_eps (`float`): epsilon of every RMSNorm (LLaDA 1e-5, Dream 1e-6).
        attention_bias (`bool`): bias on the query, key and value projections (Qwen2/Dream: True; LLaDA: False).
            The output projection and the MLP never have one.
        attention_dropout (`float`): dropout on attention weights (training only).
        max_position_embeddings (`int`): longest sequence the model accepts.
        rope_parameters (`dict`, *optional*): transformers 5's rotary settings; default `{"rope_type": "default",
            "rope_theta": 500000.0}`. A config with a top-level `rope_theta` still loads.
        shift_logits (`bool`): True for networks initialised from an autoregressive model whose output at
            position i predicts token i + 1 (Dream). The model shifts internally, so its logits at position i are
            always the distribution of token i; the first position of a sequence then has no prediction and must
            not be masked (`generate()` checks it).
        tie_word_embeddings (`bool`): share the token embedding with the output projection.
        noise_schedule (`str`), noise_eps (`float`): the schedule used in training and sampling (default
            "linear", LLaDA's and Dream's).
        initializer_range (`float`): std of the normal initialisation of linear and embedding weights.
        source_family (`str`, *optional*): where the weights came from ("llada", "dream"); informational.
    """

    model_type = "mdm_llama"
    default_theta = 500000.0
    # These networks read no noise level (LLaDA and Dream are time-agnostic); generation and training read this.
    time_conditioning = False

    vocab_size: int = 126464
    mask_token_id: int | None = None
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    hidden_size: int = 4096
    intermediate_size: int = 12288
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-5
    attention_bias: bool = False
    attention_dropout: float | int = 0.0
    max_position_embeddings: int = 4096
    rope_parameters: dict | None = None
    shift_logits: bool = False
    tie_word_embeddings: bool = False
    noise_schedule: str = "linear"
    noise_eps: float = 1e-3
    initializer_range: float = 0.02
    source_family: str | None = None

    def __post_init__(self, **kwargs):
        if self.mask_token_id is None and _is_int(self.vocab_size):
            self.mask_token_id = self.vocab_size - 1
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None and _is_int(self.hidden_size) and _is_int(self.num_attention_heads) \
                and self.num_attention_heads > 0:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if kwargs.get("time_conditioning"):
            raise ValueError("MDMLlamaConfig.time_conditioning must be False: this backbone reads no noise level.")
        kwargs.pop("time_conditioning", None)
        kwargs.setdefault("auto_map", default_auto_map("MDMLlamaConfig", "MDMLlamaForMaskedDiffusion"))
        super().__post_init__(**kwargs)
        self._check_fields()

    def _check_fields(self):
        check_positive_ints(self, ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                   "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings"))
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"MDMLlamaConfig.num_key_value_heads ({self.num_key_value_heads}) must divide num_attention_heads "
                f"({self.num_attention_heads})."
            )
        if self.head_dim % 2 != 0:
            raise ValueError(f"MDMLlamaConfig.head_dim must be even for rotary embeddings, got {self.head_dim}.")
        if not _is_number(self.rms_norm_eps) or not self.rms_norm_eps > 0:
            raise ValueError(f"MDMLlamaConfig.rms_norm_eps must be a positive number, got {self.rms_norm_eps!r}.")
        if not _is_number(self.attention_dropout) or not 0.0 <= self.attention_dropout < 1.0:
            raise ValueError(f"MDMLlamaConfig.attention_dropout must be a number in [0, 1), got {self.attention_dropout!r}.")
        for field in ("attention_bias", "shift_logits", "tie_word_embeddings"):
            if not isinstance(getattr(self, field), bool):
                raise ValueError(f"MDMLlamaConfig.{field} must be True or False, got {getattr(self, field)!r}.")
        check_shared_fields(self)


__all__ = ["MDMConfig", "MDMLlamaConfig", "NOISE_SCHEDULES", "ROPE_TYPES"]
