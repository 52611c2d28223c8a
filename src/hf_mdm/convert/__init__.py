"""Checkpoint conversion into hf_mdm: `convert_mdlm` for MDLM's Hub layout and Lightning checkpoints,
`convert_llada`, `convert_dream`, `convert_sdar` (SDAR and TraDo), `convert_fast_dllm_v2`, `convert_llada_moe`,
`convert_llada2` and `convert_rnd1` for those families' Hub layouts (streamed shard by shard), `convert_bd3lm` for
BD3-LM's.

    from hf_mdm.convert import convert_dream, convert_llada, convert_mdlm
    convert_mdlm("kuleshov-group/mdlm-owt", "mdlm-owt-hf")
    convert_llada("GSAI-ML/LLaDA-8B-Instruct", "llada-8b-instruct-hf")
    convert_dream("Dream-org/Dream-v0-Instruct-7B", "dream-7b-instruct-hf")

Command line: `hf-mdm convert {mdlm,bd3lm,llada,dream,sdar,fast-dllm-v2,llada-moe,llada2,rnd1} SRC DST` (see
`hf_mdm.convert.cli`).
"""

from .llama_family import (
    LlamaFamilyConversion,
    LlamaFamilySource,
    convert_dream,
    convert_fast_dllm_v2,
    convert_llada,
    convert_llada2,
    convert_llada_moe,
    convert_llama_family,
    convert_rnd1,
    convert_sdar,
    read_llama_family_source,
)
from .mdlm import (
    ConversionResult,
    MDLMSource,
    convert_bd3lm,
    convert_mdlm,
    load_mdlm_weights,
    parameter_map,
    read_mdlm_source,
)
from .safe_load import ConversionError, UnsafeCheckpointError, torch_load_weights_only


__all__ = [
    "convert_mdlm",
    "convert_bd3lm",
    "convert_llada",
    "convert_dream",
    "convert_sdar",
    "convert_fast_dllm_v2",
    "convert_llada_moe",
    "convert_rnd1",
    "convert_llada2",
    "convert_llama_family",
    "read_llama_family_source",
    "LlamaFamilySource",
    "LlamaFamilyConversion",
    "read_mdlm_source",
    "load_mdlm_weights",
    "parameter_map",
    "MDLMSource",
    "ConversionResult",
    "ConversionError",
    "UnsafeCheckpointError",
    "torch_load_weights_only",
]
