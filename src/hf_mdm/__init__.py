"""hf_mdm: masked diffusion language models as first-class Hugging Face citizens.

Importing the package registers every family of `hf_mdm.constants.FAMILIES` (model_types "mdm": MDLM's DiT,
"mdm_llama": LLaDA, Dream, SDAR, Fast-dLLM v2 and the mixtures of experts; "mdm_gpt2": GPT-2 causal LMs adapted into
diffusion) with AutoConfig, AutoModel and AutoModelForMaskedLM, and with AutoModelForCausalLM, which is what transformers' text-generation pipeline loads a folder with (an MDM is not causal; its generate() is the
diffusion sampler). Decoding strategies are classes registered by name: `register_strategy`, `STRATEGIES`.
"""

import importlib

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM

from .configuration_mdm import MDMConfig
from .configuration_mdm_gpt2 import MDMGPT2Config
from .configuration_mdm_llama import MDMLlamaConfig
from .constants import FAMILIES
from .generation_mdm import MDMGenerationConfig, MDMGenerationMixin, MDMGenerationOutput
from .modeling_mdm import MDMForMaskedDiffusion, MDMModel, MDMPreTrainedModel
from .modeling_mdm_common import MASK_LOGIT
from .modeling_mdm_gpt2 import MDMGPT2ForMaskedDiffusion, MDMGPT2Model, MDMGPT2PreTrainedModel
from .modeling_mdm_llama import MDMLlamaForMaskedDiffusion, MDMLlamaModel, MDMLlamaPreTrainedModel
from .pretrained import PRETRAINED, pretrained_path
from .sampling_mdm import STRATEGIES, DecodingStrategy, DiffusionState, StrategySettings, register_strategy


for model_type, (configuration, modeling, model_class) in FAMILIES.items():
    config_class = next(cls for cls in vars(importlib.import_module(f".{configuration}", __name__)).values()
                        if isinstance(cls, type) and getattr(cls, "model_type", None) == model_type)
    model = getattr(importlib.import_module(f".{modeling}", __name__), model_class)
    AutoConfig.register(model_type, config_class, exist_ok=True)
    for auto_class in (AutoModel, AutoModelForMaskedLM, AutoModelForCausalLM):
        auto_class.register(config_class, model, exist_ok=True)

__version__ = "0.2.0"

__all__ = [
    "MASK_LOGIT",
    "MDMConfig",
    "MDMModel",
    "MDMForMaskedDiffusion",
    "MDMPreTrainedModel",
    "MDMLlamaConfig",
    "MDMLlamaModel",
    "MDMLlamaForMaskedDiffusion",
    "MDMLlamaPreTrainedModel",
    "MDMGPT2Config",
    "MDMGPT2Model",
    "MDMGPT2ForMaskedDiffusion",
    "MDMGPT2PreTrainedModel",
    "MDMGenerationConfig",
    "MDMGenerationMixin",
    "MDMGenerationOutput",
    "DecodingStrategy",
    "DiffusionState",
    "StrategySettings",
    "STRATEGIES",
    "register_strategy",
    "PRETRAINED",
    "pretrained_path",
    "__version__",
]
