"""Fixed-seed samples of every decoding strategy, pinned so that a refactor cannot move behaviour.

Each case samples one checkpoint with one set of `generate()` kwargs (as today's users write them), from one
generator seed, and records the sequences and the number of network calls. `tests/data/pinned_samples.json` holds
what the release before the house refactor (issue 25) produced; `test_pinned_samples.py` checks that today's code
gives the same tokens, bit for bit.

Checkpoints: the shipped shakespeare-mdm (a DiT) and two tiny Llama-family folders saved by that release
(`tests/data/legacy/`): LLaDA-like, and Dream-like (shifted logits, grouped-query attention, q/k/v biases), the
latter with its own copy of that release's remote code.

    python tests/pinned_samples.py record     # only when behaviour is meant to change, with a note saying why
"""

import json
import sys
from pathlib import Path

import torch


DATA = Path(__file__).resolve().parent / "data"
PINNED = DATA / "pinned_samples.json"
LEGACY = DATA / "legacy"
CHECKPOINTS = ("shakespeare-mdm", "llada-like", "dream-like")

# name -> generate() kwargs, in the pre-refactor spelling (which must keep working).
SETTINGS = {
    "fhs": {},
    "fhs_float32": {"sampling_dtype": "float32"},
    "parallel_k4": {"tokens_per_step": 4},
    "fhs_steps8": {"steps": 8},
    "greedy_fhs": {"temperature": 0},
    "top_p_temperature": {"temperature": 0.8, "top_p": 0.9},
    "top_k": {"top_k": 20},
    "ancestral": {"sampler": "ancestral", "steps": 16},
    "ancestral_float32": {"sampler": "ancestral", "steps": 16, "sampling_dtype": "float32"},
    "ancestral_cache": {"sampler": "ancestral_cache", "steps": 64},
    "noise_removal_mdlm": {"sampler": "ancestral", "steps": 8, "noise_removal": True},
    "noise_removal_last_step_argmax": {"sampler": "ancestral", "steps": 8, "noise_removal": "last_step_argmax"},
    "noise_removal_cache": {"sampler": "ancestral_cache", "steps": 8, "noise_removal": "mdlm"},
    "remdm_cap": {"sampler": "ancestral", "steps": 40, "remasking": "remdm", "remasking_eta": 0.05},
    "remdm_rescale": {"sampler": "ancestral", "steps": 40, "remasking": "remdm", "remasking_schedule": "rescale"},
    "remdm_conf": {"sampler": "ancestral", "steps": 40, "remasking": "remdm", "remasking_schedule": "conf"},
    "remdm_cache": {"sampler": "ancestral_cache", "steps": 40, "remasking": "remdm", "remasking_eta": 0.05},
    "remdm_blocks": {"sampler": "ancestral", "steps": 24, "remasking": "remdm", "block_length": 8,
                     "remasking_eta": 0.05},
    "remdm_noise_removal": {"sampler": "ancestral", "steps": 24, "remasking": "remdm", "noise_removal": True},
    "ancestral_blocks": {"sampler": "ancestral", "steps": 24, "block_length": 8},
    "ancestral_blocks_cache": {"sampler": "ancestral", "steps": 24, "block_length": 8, "use_cache": True},
    "confidence": {"unmasking": "confidence", "steps": 12},
    "margin": {"unmasking": "margin", "steps": 12},
    "entropy": {"unmasking": "entropy", "steps": 12},
    "confidence_k3": {"unmasking": "confidence", "tokens_per_step": 3},
    "threshold": {"unmasking": "confidence", "confidence_threshold": 0.3},
    "greedy_confidence_blocks": {"unmasking": "confidence", "steps": 12, "block_length": 8, "temperature": 0},
    "fhs_blocks": {"block_length": 8},
    "fhs_blocks_steps": {"block_length": 8, "steps": 9},
    "fhs_blocks_cache": {"block_length": 8, "use_cache": True},
    "prefix_cache": {"unmasking": "confidence", "steps": 12, "block_length": 8, "use_cache": True},
    "dual_cache": {"unmasking": "confidence", "steps": 12, "block_length": 8, "use_cache": True,
                   "cache_mode": "dual"},
    "dual_cache_refresh": {"unmasking": "confidence", "steps": 12, "block_length": 8, "use_cache": True,
                           "cache_mode": "dual", "cache_refresh_steps": 2},
    "threshold_dual_cache": {"unmasking": "entropy", "confidence_threshold": 0.3, "block_length": 8,
                             "use_cache": True, "cache_mode": "dual", "temperature": 0.7},
    "two_per_prompt": {"num_return_sequences": 2, "tokens_per_step": 2},
}
# Infilling: [MASK]s inside the given ids, nothing appended.
INFILL_SETTINGS = {
    "infill_fhs": {},
    "infill_confidence": {"unmasking": "confidence", "steps": 6},
    "infill_blocks_cache": {"unmasking": "margin", "steps": 6, "block_length": 4, "use_cache": True},
    "infill_ancestral": {"sampler": "ancestral", "steps": 6},
}
NEW_TOKENS = 24
# generation_config.json as `hf-mdm convert llada` / `convert dream` wrote them before the refactor (the families'
# own decoding): sampled with no kwargs, from a copy of the legacy folder holding this file.
CONVERTED_GENERATION_CONFIGS = {
    "llada-like": {"sampler": "first_hitting", "sampling_dtype": "float64", "max_new_tokens": 16, "bos_token_id": 1,
                   "eos_token_id": 2, "pad_token_id": 0, "unmasking": "confidence", "block_length": 8,
                   "temperature": 0.0, "tokens_per_step": None, "steps": None, "noise_removal": False,
                   "confidence_threshold": None, "remasking": None, "remasking_schedule": "cap",
                   "remasking_eta": None, "use_cache": False, "cache_mode": "prefix", "cache_refresh_steps": None,
                   "top_k": 0, "top_p": 1.0, "do_sample": True, "num_return_sequences": 1,
                   "return_dict_in_generate": False, "output_history": False, "transformers_version": "5.25.0"},
    "dream-like": {"sampler": "first_hitting", "sampling_dtype": "float64", "max_new_tokens": 16, "bos_token_id": 1,
                   "eos_token_id": 2, "pad_token_id": 0, "unmasking": "entropy", "temperature": 0.2, "top_p": 0.95,
                   "transformers_version": "5.25.0"},
}


def load(name: str):
    from transformers import AutoModel

    import hf_mdm

    folder = hf_mdm.pretrained_path(name) if name == "shakespeare-mdm" else LEGACY / name
    return AutoModel.from_pretrained(folder).eval()


def inputs(model):
    """Two prompts of different lengths, right-padded (generate() moves them to the left), and an infilling canvas."""
    mask, vocab = model.config.mask_token_id, model.config.vocab_size
    first = 3 if model.config.bos_token_id is None else model.config.bos_token_id
    ids = torch.tensor([[first, 5, 9, 14, 20], [first, 7, 11, 0, 0]]) % vocab
    ids[ids == mask] = 4
    attention_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    infill = torch.tensor([[first, 6, mask, mask, 12, mask, 17, mask, mask, 3],
                           [first, mask, mask, 8, mask, 10, mask, 13, mask, mask]])
    return ids, attention_mask, infill


def converted_folder(name: str, destination: Path) -> Path:
    """A copy of a legacy folder whose generation_config.json is the one its conversion wrote."""
    import shutil

    shutil.copytree(LEGACY / name, destination)
    (destination / "generation_config.json").write_text(json.dumps(CONVERTED_GENERATION_CONFIGS[name], indent=2))
    return destination


def sample(model, kwargs: dict, infill: bool, seed: int = 1234) -> dict:
    ids, attention_mask, infill_ids = inputs(model)
    generator = torch.Generator().manual_seed(seed)
    if infill is None:  # the folder's own defaults, prompts only
        out = model.generate(ids, attention_mask=attention_mask, generator=generator, return_dict_in_generate=True)
    elif infill:
        out = model.generate(infill_ids, max_new_tokens=0, generator=generator, return_dict_in_generate=True, **kwargs)
    else:
        out = model.generate(ids, attention_mask=attention_mask, max_new_tokens=NEW_TOKENS, generator=generator,
                             return_dict_in_generate=True, **kwargs)
    return {"sequences": out.sequences.tolist(), "nfe": int(out.nfe),
            "nfe_per_sequence": out.nfe_per_sequence.tolist()}


def cases():
    for checkpoint in CHECKPOINTS:
        for name, kwargs in SETTINGS.items():
            yield checkpoint, name, kwargs, False
        for name, kwargs in INFILL_SETTINGS.items():
            yield checkpoint, name, kwargs, True


def save_legacy_checkpoints() -> None:
    """The two tiny Llama-family folders, as the release before the refactor saved them (run once, then frozen)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from conftest import tiny_llama_model

    for name, dream in (("llada-like", False), ("dream-like", True)):
        model = tiny_llama_model(seed=7, dream=dream, hidden_size=32, intermediate_size=48, max_position_embeddings=48)
        model.generation_config.eos_token_id = 2
        model.save_pretrained(LEGACY / name)


def record() -> None:
    torch.set_num_threads(1)
    results, models = {}, {}
    for checkpoint, name, kwargs, infill in cases():
        model = models.setdefault(checkpoint, load(checkpoint))
        results[f"{checkpoint}/{name}"] = sample(model, kwargs, infill)
    import tempfile
    from transformers import AutoModel

    for name in CONVERTED_GENERATION_CONFIGS:
        with tempfile.TemporaryDirectory() as scratch:
            model = AutoModel.from_pretrained(converted_folder(name, Path(scratch) / name)).eval()
            results[f"{name}/converted_defaults"] = sample(model, {}, None)
    PINNED.write_text(json.dumps(results, indent=None, separators=(",", ":")) + "\n")
    print(f"recorded {len(results)} cases into {PINNED}")


if __name__ == "__main__":
    if sys.argv[1:] == ["legacy"]:
        save_legacy_checkpoints()
    elif sys.argv[1:] == ["record"]:
        record()
    else:
        sys.exit("usage: python tests/pinned_samples.py legacy|record")
