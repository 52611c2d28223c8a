"""Checkpoint conversion into hf_mdm: `convert_mdlm` for MDLM's Hub layout and Lightning checkpoints.

    from hf_mdm.convert import convert_mdlm
    convert_mdlm("kuleshov-group/mdlm-owt", "mdlm-owt-hf")

Command line: `hf-mdm convert mdlm SRC DST` (see `hf_mdm.convert.cli`).
"""

from .mdlm import ConversionResult, MDLMSource, convert_mdlm, load_mdlm_weights, parameter_map, read_mdlm_source
from .safe_load import ConversionError, UnsafeCheckpointError, torch_load_weights_only


__all__ = [
    "convert_mdlm",
    "read_mdlm_source",
    "load_mdlm_weights",
    "parameter_map",
    "MDLMSource",
    "ConversionResult",
    "ConversionError",
    "UnsafeCheckpointError",
    "torch_load_weights_only",
]
