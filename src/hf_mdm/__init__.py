"""hf_mdm: masked diffusion language models as first-class Hugging Face citizens.

Importing the package registers model_types "mdm" (MDLM's DiT) and "mdm_llama" (LLaDA, Dream) with AutoConfig,
AutoModel and AutoModelForMaskedLM, and with AutoModelForCausalLM, which is what transformers' text-generation pipeline
loads a folder with (an MDM is not causal; its generate() is the diffusion sampler).
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM

from .configuration_mdm import MDMConfig, MDMLlamaConfig
from .generation_mdm import MDMGenerationConfig, MDMGenerationMixin, MDMGenerationOutput
from .modeling_mdm import (
    MASK_LOGIT,
    MDMForMaskedDiffusion,
    MDMLlamaForMaskedDiffusion,
    MDMLlamaModel,
    MDMLlamaPreTrainedModel,
    MDMModel,
    MDMPreTrainedModel,
)
from .pretrained import PRETRAINED, pretrained_path


AutoConfig.register("mdm", MDMConfig, exist_ok=True)
AutoModel.register(MDMConfig, MDMForMaskedDiffusion, exist_ok=True)
AutoModelForMaskedLM.register(MDMConfig, MDMForMaskedDiffusion, exist_ok=True)
AutoModelForCausalLM.register(MDMConfig, MDMForMaskedDiffusion, exist_ok=True)
AutoConfig.register("mdm_llama", MDMLlamaConfig, exist_ok=True)
AutoModel.register(MDMLlamaConfig, MDMLlamaForMaskedDiffusion, exist_ok=True)
AutoModelForMaskedLM.register(MDMLlamaConfig, MDMLlamaForMaskedDiffusion, exist_ok=True)
AutoModelForCausalLM.register(MDMLlamaConfig, MDMLlamaForMaskedDiffusion, exist_ok=True)

__version__ = "0.1.0"

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
    "MDMGenerationConfig",
    "MDMGenerationMixin",
    "MDMGenerationOutput",
    "PRETRAINED",
    "pretrained_path",
    "__version__",
]
