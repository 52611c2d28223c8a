"""The names hf_mdm's modules share, defined once.

This module imports nothing: the console script (`hf_mdm_cli`) loads it by its path, without importing the package
(which imports torch).
"""

# model_type -> (configuration file, modeling file, model class) of each family; `hf_mdm/__init__.py` registers them
# with the Auto classes. A new family adds its line here and its two files.
FAMILIES = {
    "mdm": ("configuration_mdm", "modeling_mdm", "MDMForMaskedDiffusion"),  # MDLM's DiT
    "mdm_llama": ("configuration_mdm_llama", "modeling_mdm_llama", "MDMLlamaForMaskedDiffusion"),  # LLaDA, Dream
    "mdm_gpt2": ("configuration_mdm_gpt2", "modeling_mdm_gpt2", "MDMGPT2ForMaskedDiffusion"),  # GPT-2 adapted
}
MDM_MODEL_TYPES = tuple(FAMILIES)

# What a family's checkpoint carries as remote code, besides its configuration and modeling files: the modules they
# import (save_pretrained writes them all, following relative imports; tests/test_hub.py checks this list).
SHARED_REMOTE_CODE = ("configuration_mdm_common.py", "modeling_mdm_common.py", "generation_mdm.py",
                      "sampling_mdm.py", "cache_mdm.py")


def travelling_files(model_type: str) -> tuple[str, ...]:
    """The remote-code files of a checkpoint of `model_type`."""
    configuration, modeling, _ = FAMILIES[model_type]
    return (f"{configuration}.py", f"{modeling}.py") + SHARED_REMOTE_CODE


# Checkpoints that ship inside the package (hf_mdm/pretrained/).
PRETRAINED = {
    "shakespeare-mdm": "time-agnostic masked diffusion LM, 8.1 M parameters, context 256, Shakespeare BPE (4099)",
    "shakespeare-ar": "GPT-2-style causal LM, 8.2 M parameters, same data and tokenizer: judge and AR baseline",
    "shakespeare-bd3lm": "block-diffusion LM (BD3-LM, blocks of 4), fine-tuned from shakespeare-mdm, exact KV cache",
}
DEFAULT_MDM = "shakespeare-mdm"
# The judge of generative perplexity and MAUVE: the literature's (GPT-2 Large, from the Hub, by its owner/name id)
# by default, and the shipped one for the shipped model and offline work.
DEFAULT_JUDGE = "openai-community/gpt2-large"
SHIPPED_JUDGE = "shakespeare-ar"

# owner/name on the Hugging Face Hub.
HUB_ID_PATTERN = r"^[\w.-]+/[\w.-]+$"
# model_type (lowercased) of peers' own folders -> the `hf-mdm convert` format that converts them.
UNCONVERTED = {"llada": "llada", "dream": "dream"}

# The `hf-mdm` commands and their one-line help (the console script lists them without importing the package).
COMMANDS = {
    "demo": "sample the shipped shakespeare-mdm, from nothing and from a prompt",
    "generate": "sample from a checkpoint (first-hitting, float64 by default)",
    "train": "train an MDM (or an AR baseline) with Accelerate",
    "evaluate": "sample under several sampler settings and judge the samples",
    "convert": "convert a checkpoint from another format into hf_mdm",
    "publish": "push a checkpoint with its model card and remote code to the Hub",
    "lm-eval": "lm-evaluation-harness with the model hf_mdm (lm-eval's own flags; pip install hf_mdm[lm-eval])",
}
# Set to show tracebacks instead of one-line errors (also: `hf-mdm --debug COMMAND ...`).
DEBUG_ENV = "HF_MDM_DEBUG"
