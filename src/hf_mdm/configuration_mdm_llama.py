"""Configuration of the bidirectional Llama-family transformer of LLaDA and Dream, model_type "mdm_llama".

This file travels with every saved checkpoint as remote code: it imports only transformers and same-folder
modules, never `hf_mdm`.
"""

from transformers import PreTrainedConfig

from .configuration_mdm_common import auto_map, check_positive_ints, check_shared_fields, is_int, is_number


ROUTER_SCORE_FUNCTIONS = ("softmax", "sigmoid")


class MDMLlamaConfig(PreTrainedConfig):
    r"""
    Configuration of [`MDMLlamaModel`] and [`MDMLlamaForMaskedDiffusion`]: a bidirectional (or block-causal)
    Llama-family transformer (RMSNorm, SwiGLU MLP, rotary attention with grouped-query heads, no time input), the
    architecture of LLaDA and Dream, and with `diffusion_block_size` of SDAR / TraDo (Qwen3 blocks, `qk_norm`) and
    Fast-dLLM v2 (Qwen2.5 blocks, shifted logits).

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
        qk_norm (`bool`): an RMSNorm over each head's query and key before the rotary embedding (Qwen3, SDAR).
        attention_dropout (`float`): dropout on attention weights (training only).
        max_position_embeddings (`int`): longest sequence the model accepts.
        rope_parameters (`dict`, *optional*): transformers 5's rotary settings; default `{"rope_type": "default",
            "rope_theta": 500000.0}`. A config with a top-level `rope_theta` still loads. Its
            `partial_rotary_factor` (a top-level one moves there, as transformers does) is the fraction of each
            head's dimensions the rotary embedding turns, the first ones (LLaDA 2.x: 0.5); the rest pass unrotated.
        shift_logits (`bool`): True for networks initialised from an autoregressive model whose output at
            position i predicts token i + 1 (Dream). The model shifts internally, so its logits at position i are
            always the distribution of token i; the first position of a sequence then has no prediction and must
            not be masked (`generate()` checks it).
        tie_word_embeddings (`bool`): share the token embedding with the output projection.
        noise_schedule (`str`), noise_eps (`float`): the schedule used in training and sampling (default
            "linear", LLaDA's and Dream's); "cosine" is alpha_t = cos(pi t / 2), not md4's 1 - sin(pi t / 2).
        diffusion_block_size (`int`, *optional*): None (the default): a bidirectional denoiser, every position
            attends to every position. An int B: block diffusion (BD3-LM, SDAR, Fast-dLLM v2): the sequence is cut
            into blocks of B positions counted from each row's first real token, attention is bidirectional inside
            a block and causal across blocks, so a finished block never changes and its keys and values are cached
            exactly. `generate()` then decodes block by block.
        num_experts (`int`, *optional*): None: every MLP is dense. An int: a mixture of experts (LLaDA-MoE, LLaDA
            2.x, RND1): each MoE layer routes every token to `num_experts_per_tok` of `num_experts` SwiGLU experts of
            width `moe_intermediate_size`, plus `num_shared_experts` always-on experts (one SwiGLU MLP of width
            `num_shared_experts * moe_intermediate_size`); the first `first_k_dense_replace` layers stay dense
            (width `intermediate_size`). The experts run through transformers' experts implementations
            (`config._experts_implementation`: "grouped_mm" where the device has it, "batched_mm", or "eager", the
            plain path).
        router_score_function (`str`): "softmax" (scores over all experts, then top-k: LLaDA-MoE, RND1) or
            "sigmoid" (independent scores: LLaDA 2.x, DeepSeek-V3).
        norm_topk_prob (`bool`): renormalise the chosen experts' scores to sum to one.
        routed_scaling_factor (`float`): multiplies the routed experts' weights (LLaDA 2.x: 2.5).
        n_group, topk_group (`int`, *optional*): group-limited routing: the experts are cut into `n_group` groups,
            each scored by the sum of its two best scores, and experts are chosen from the best `topk_group` groups.
        router_expert_bias (`bool`): a per-expert bias (`gate.expert_bias`) added to the scores for choosing experts
            only, not for weighting them (auxiliary-loss-free balancing).
        router_aux_loss_coef (`float`): weight of the load-balancing loss (Switch Transformer's, over the softmax
            of the router logits) that training adds when `output_router_logits` is on (LLaDA-MoE: 0.01).
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
    qk_norm: bool = False
    attention_dropout: float | int = 0.0
    max_position_embeddings: int = 4096
    rope_parameters: dict | None = None
    shift_logits: bool = False
    tie_word_embeddings: bool = False
    noise_schedule: str = "linear"
    noise_eps: float = 1e-3
    initializer_range: float = 0.02
    diffusion_block_size: int | None = None
    num_experts: int | None = None
    num_experts_per_tok: int | None = None
    moe_intermediate_size: int | None = None
    num_shared_experts: int = 0
    first_k_dense_replace: int = 0
    router_score_function: str = "softmax"
    norm_topk_prob: bool = False
    routed_scaling_factor: float | int = 1.0
    n_group: int | None = None
    topk_group: int | None = None
    router_expert_bias: bool = False
    router_aux_loss_coef: float | int = 0.0
    source_family: str | None = None

    def __post_init__(self, **kwargs):
        if self.mask_token_id is None and is_int(self.vocab_size):
            self.mask_token_id = self.vocab_size - 1
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None and is_int(self.hidden_size) and is_int(self.num_attention_heads) \
                and self.num_attention_heads > 0:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if kwargs.get("time_conditioning"):
            raise ValueError("MDMLlamaConfig.time_conditioning must be False: this backbone reads no noise level.")
        kwargs.pop("time_conditioning", None)
        super().__post_init__(**kwargs)
        self.auto_map = auto_map(type(self), "modeling_mdm_llama", "MDMLlamaForMaskedDiffusion")
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
        if not is_number(self.rms_norm_eps) or not self.rms_norm_eps > 0:
            raise ValueError(f"MDMLlamaConfig.rms_norm_eps must be a positive number, got {self.rms_norm_eps!r}.")
        if not is_number(self.attention_dropout) or not 0.0 <= self.attention_dropout < 1.0:
            raise ValueError(f"MDMLlamaConfig.attention_dropout must be a number in [0, 1), got {self.attention_dropout!r}.")
        for field in ("attention_bias", "qk_norm", "shift_logits", "tie_word_embeddings", "norm_topk_prob",
                      "router_expert_bias"):
            if not isinstance(getattr(self, field), bool):
                raise ValueError(f"MDMLlamaConfig.{field} must be True or False, got {getattr(self, field)!r}.")
        partial = self.rope_parameters.get("partial_rotary_factor", 1.0) if isinstance(self.rope_parameters, dict) else 1
        if not is_number(partial) or not 0 < partial <= 1 or int(self.head_dim * partial) % 2 != 0:
            raise ValueError(f"MDMLlamaConfig.rope_parameters['partial_rotary_factor'] must be a number in (0, 1] that "
                             f"turns an even number of the head's {self.head_dim} dimensions, got {partial!r}.")
        if self.num_experts is not None:
            self._check_experts()
        check_shared_fields(self)

    def _check_experts(self):
        check_positive_ints(self, ("num_experts", "num_experts_per_tok", "moe_intermediate_size"))
        if self.num_experts_per_tok > self.num_experts:
            raise ValueError(f"MDMLlamaConfig.num_experts_per_tok ({self.num_experts_per_tok}) must be at most "
                             f"num_experts ({self.num_experts}).")
        for field in ("num_shared_experts", "first_k_dense_replace"):
            if not is_int(getattr(self, field)) or getattr(self, field) < 0:
                raise ValueError(f"MDMLlamaConfig.{field} must be a non-negative integer, got {getattr(self, field)!r}.")
        if self.router_score_function not in ROUTER_SCORE_FUNCTIONS:
            raise ValueError(f"MDMLlamaConfig.router_score_function must be one of {ROUTER_SCORE_FUNCTIONS}, got "
                             f"{self.router_score_function!r}.")
        for field in ("routed_scaling_factor", "router_aux_loss_coef"):
            if not is_number(getattr(self, field)) or getattr(self, field) < 0:
                raise ValueError(f"MDMLlamaConfig.{field} must be a non-negative number, got {getattr(self, field)!r}.")
        if (self.n_group is None) != (self.topk_group is None):
            raise ValueError("MDMLlamaConfig.n_group and topk_group go together (group-limited routing): set both or "
                             f"neither, got n_group={self.n_group!r}, topk_group={self.topk_group!r}.")
        if self.n_group is not None:
            check_positive_ints(self, ("n_group", "topk_group"))
            group_size = self.num_experts // self.n_group
            if self.num_experts % self.n_group or self.topk_group > self.n_group or group_size < 2 \
                    or self.topk_group * group_size < self.num_experts_per_tok:
                raise ValueError(
                    f"MDMLlamaConfig.n_group ({self.n_group}) must divide num_experts ({self.num_experts}) into groups "
                    f"of at least 2, and topk_group ({self.topk_group}) groups, at most n_group, must hold "
                    f"num_experts_per_tok ({self.num_experts_per_tok}) experts.")


__all__ = ["MDMLlamaConfig", "ROUTER_SCORE_FUNCTIONS"]
