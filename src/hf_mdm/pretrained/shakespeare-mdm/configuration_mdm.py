"""Configuration of hf_mdm's masked diffusion language model (MDLM's DiT, arXiv:2310.07524 / 2409.02908).

This file travels with every saved checkpoint as remote code: it imports only torch/transformers and
same-folder modules, never `hf_mdm`.
"""

from transformers import PreTrainedConfig


NOISE_SCHEDULES = ("loglinear", "linear", "cosine")
# Rotary types whose frequencies are fixed at construction (transformers' ROPE_INIT_FUNCTIONS); the dynamic ones
# rescale with the sequence length seen, which a bidirectional denoiser of fixed-length canvases does not need.
ROPE_TYPES = ("default", "linear", "yarn", "llama3")


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

    `output_hidden_states`, `output_attentions` and `return_dict` are the usual `PreTrainedConfig` fields: they set
    the defaults of the model's `forward` arguments of the same names.
    """

    model_type = "mdm"

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

    def __post_init__(self, **kwargs):
        if self.mask_token_id is None and isinstance(self.vocab_size, int):
            self.mask_token_id = self.vocab_size - 1
        # The same three classes are named for every Auto class, so that a saved folder loads through
        # remote code with AutoConfig, AutoModel and AutoModelForMaskedLM alike.
        kwargs.setdefault(
            "auto_map",
            {
                "AutoConfig": "configuration_mdm.MDMConfig",
                "AutoModel": "modeling_mdm.MDMForMaskedDiffusion",
                "AutoModelForMaskedLM": "modeling_mdm.MDMForMaskedDiffusion",
            },
        )
        super().__post_init__(**kwargs)
        self._check_mdm_fields()

    def _check_mdm_fields(self):
        """Raises ValueError naming the field and what is allowed (plain ValueError, not a strict-dataclass error)."""

        def positive_int(name):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"MDMConfig.{name} must be a positive integer, got {value!r}.")

        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "cond_dim"):
            positive_int(name)
        positive_int("max_position_embeddings")
        if self.vocab_size < 2:
            raise ValueError(f"MDMConfig.vocab_size must be at least 2 (one real token and [MASK]), got {self.vocab_size}.")
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
        for name in ("mask_token_id", "pad_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            if value is None and name != "mask_token_id":
                continue
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < self.vocab_size:
                raise ValueError(
                    f"MDMConfig.{name} must be an integer in [0, vocab_size={self.vocab_size}), got {value!r}."
                )
        if self.pad_token_id is not None and self.pad_token_id == self.mask_token_id:
            raise ValueError(f"MDMConfig.pad_token_id must differ from mask_token_id ({self.mask_token_id}).")
        if not isinstance(self.mlp_ratio, (int, float)) or self.mlp_ratio <= 0 or int(self.mlp_ratio * self.hidden_size) < 1:
            raise ValueError(f"MDMConfig.mlp_ratio must be a positive number, got {self.mlp_ratio!r}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"MDMConfig.dropout must be in [0, 1), got {self.dropout!r}.")
        rope = self.rope_parameters
        if not isinstance(rope, dict) or rope.get("rope_type") not in ROPE_TYPES:
            raise ValueError(
                f"MDMConfig.rope_parameters['rope_type'] must be one of {ROPE_TYPES}, got {rope!r}."
            )
        theta = rope.get("rope_theta")
        if not isinstance(theta, (int, float)) or isinstance(theta, bool) or not theta > 0:
            raise ValueError(f"MDMConfig.rope_parameters['rope_theta'] must be a positive number, got {theta!r}.")
        if not isinstance(self.time_conditioning, bool):
            raise ValueError(f"MDMConfig.time_conditioning must be True or False, got {self.time_conditioning!r}.")
        if self.noise_schedule not in NOISE_SCHEDULES:
            raise ValueError(
                f"MDMConfig.noise_schedule must be one of {NOISE_SCHEDULES}, got {self.noise_schedule!r}."
            )
        if not 0.0 <= self.noise_eps < 1.0:
            raise ValueError(f"MDMConfig.noise_eps must be in [0, 1), got {self.noise_eps!r}.")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def intermediate_size(self) -> int:
        return int(self.mlp_ratio * self.hidden_size)


__all__ = ["MDMConfig", "NOISE_SCHEDULES", "ROPE_TYPES"]
