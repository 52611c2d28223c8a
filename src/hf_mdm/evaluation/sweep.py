"""Sampler settings for a sweep, and batched sample generation split across Accelerate processes.

A `SamplerSetting` is validated when it is made (through `MDMGenerationConfig`, so the errors name the field and
the allowed values), which lets `hf-mdm evaluate` reject a bad sweep before it generates anything.
"""

import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..generation_mdm import LEGACY_STRATEGY_FIELDS, MDMGenerationConfig, strategy_fields
from ..generation_options import parse_options
from ..sampling_mdm import get_strategy, setting_names


# The generation fields a sweep varies besides the strategy and its settings.
SWEEP_FIELDS = ("sampling_dtype", "temperature", "block_length", "use_cache", "cache_mode")


class SamplerSetting:
    """One point of a sweep: a registered decoding strategy (`sampler`), its settings, and the generation fields of
    `SWEEP_FIELDS`, validated when it is made (through `MDMGenerationConfig`, so the errors name the field and the
    allowed values).

        SamplerSetting("ancestral", steps=256, sampling_dtype="float32")
        SamplerSetting("confidence", order="margin", steps=64, block_length=32, use_cache=True)

    Earlier releases' spelling (`sampler="first_hitting", unmasking="margin"`) maps onto today's. Two settings are
    equal when they sample the same way.
    """

    def __init__(self, sampler: str = "first_hitting", **fields):
        unknown = sorted(set(fields) - set(SWEEP_FIELDS) - set(strategy_fields()) - set(LEGACY_STRATEGY_FIELDS))
        if unknown:
            raise ValueError(f"SamplerSetting: {unknown} are not sweep fields; allowed: {SWEEP_FIELDS} and the "
                             "settings of the registered strategies.")
        config = MDMGenerationConfig(sampler=sampler, **fields)  # raises ValueError naming the field
        self.sampler, self.settings = config.sampler, config.sampler_config
        self.fields = {name: getattr(config, name) for name in SWEEP_FIELDS}

    def _key(self) -> tuple:
        return (self.sampler, tuple(sorted(self.settings.to_dict().items(), key=str)),
                tuple(sorted(self.fields.items())))

    def __eq__(self, other) -> bool:
        return isinstance(other, SamplerSetting) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return f"SamplerSetting({self.generation_kwargs()})"

    def generation_kwargs(self) -> dict:
        """The fields to pass to `model.generate`: the strategy, its settings and the sweep fields, unset ones left
        out."""
        kwargs = {"sampler": self.sampler, **self.settings.to_dict(), **self.fields}
        return {key: value for key, value in kwargs.items() if value is not None}

    @property
    def label(self) -> str:
        """A short name for tables and plots, e.g. "FHS k=1 float64", "ancestral 256 steps float32 T=0.9" or
        "confidence 64 calls blocks 32 cache float64": the strategy's own description, then the sweep fields."""
        return self.describe()

    def describe(self, block_diffusion: bool = False) -> str:
        """`label`, for a model of the given kind: a block-diffusion model's cache is its exact block cache, not
        Fast-dLLM's prefix or dual approximation."""
        name = get_strategy(self.sampler).describe(self.settings)
        if self.fields["block_length"]:
            name += f" blocks {self.fields['block_length']}"
        if self.fields["use_cache"]:
            name += " block cache" if block_diffusion else f" {self.fields['cache_mode'] or 'prefix'} cache"
        name += f" {self.fields['sampling_dtype']}"
        temperature = self.fields["temperature"]
        return name + (f" T={temperature:g}" if temperature != 1.0 else "")


def expand_settings(samplers: Sequence[str], steps: Sequence[int | None] = (None,),
                    tokens_per_step: Sequence[int] = (1,), sampling_dtypes: Sequence[str] = ("float64",),
                    temperatures: Sequence[float] = (1.0,)) -> list[SamplerSetting]:
    """The cross product of the given values, meaningful combinations only: `tokens_per_step` varies the strategies
    that have it (first_hitting), `steps` the others that have it (the ancestral ones). Duplicates are dropped,
    order kept."""
    settings = []
    for sampler, dtype, temperature in itertools.product(samplers, sampling_dtypes, temperatures):
        own = setting_names(sampler)
        variants = ([dict(tokens_per_step=k) for k in tokens_per_step] if "tokens_per_step" in own
                    else [dict(steps=s) for s in steps] if "steps" in own else [{}])
        for variant in variants:
            setting = SamplerSetting(sampler, sampling_dtype=dtype, temperature=float(temperature), **variant)
            if setting not in settings:
                settings.append(setting)
    return settings


def parse_setting(text: str) -> SamplerSetting:
    """"sampler=ancestral,steps=256,sampling_dtype=float32" -> a validated `SamplerSetting`."""
    return SamplerSetting(**parse_options(text, "setting"))


@dataclass
class Samples:
    """`sequences`: `(num_samples, length)` token ids on the CPU; `nfe`: network calls each sample took part in;
    `seconds`: wall time of the generation, all processes together."""

    sequences: torch.Tensor
    nfe: torch.Tensor
    seconds: float


def generate_samples(sample_batch: Callable[[int, int], tuple[torch.Tensor, torch.Tensor]], num_samples: int,
                     batch_size: int, accelerator, seed: int, desc: str = "sampling") -> Samples:
    """Draws `num_samples` samples in batches, split across the Accelerate processes, gathered on every process.

    Args:
        sample_batch: `(size, seed) -> (sequences (size, length), nfe per sequence (size,))`.
        num_samples: in total, over all processes (process r draws samples r, r + P, r + 2P, ...).
        seed: batch b of process r is drawn with seed `seed + 1_000_003 * r + b`; samples depend on the seed, the
            batch size and the number of processes.
    """
    from accelerate.utils import gather_object

    rank, world = accelerator.process_index, accelerator.num_processes
    mine = len(range(rank, num_samples, world))
    sequences, nfe = [], []
    accelerator.wait_for_everyone()
    start = time.perf_counter()
    sizes = [min(batch_size, mine - i) for i in range(0, mine, batch_size)]
    for b, size in enumerate(tqdm(sizes, desc=desc, leave=False, disable=not accelerator.is_main_process)):
        batch, batch_nfe = sample_batch(size, seed + 1_000_003 * rank + b)
        sequences += batch.cpu().tolist()
        nfe += batch_nfe.cpu().tolist()
    sequences, nfe = gather_object(sequences), gather_object(nfe)
    seconds = time.perf_counter() - start
    return Samples(torch.tensor(sequences, dtype=torch.long), torch.tensor(nfe, dtype=torch.long), seconds)


class UnmaskingProgress:
    """A diffusion streamer that shows how many tokens of a batch are unmasked, as a tqdm bar: one batch of a
    many-step ancestral setting takes minutes on a CPU, longer than anyone should wait without a sign of life.
    It only counts; it draws no random numbers, so samples are the same with or without it."""

    def __init__(self, mask_token_id: int, total: int, desc: str):
        self.mask_token_id = mask_token_id
        self.bar = tqdm(total=total, desc=desc, unit="token", leave=False, mininterval=1.0)

    def put(self, value) -> None:  # the prompt (empty here) and the final tokens: put_draft has counted them
        pass

    def put_draft(self, value) -> None:
        self.bar.update(int((value != self.mask_token_id).sum()) - self.bar.n)

    def end(self) -> None:
        self.bar.close()


def mdm_sampler(model, setting: SamplerSetting, length: int, show_progress: bool = True) -> Callable:
    """`sample_batch` for `generate_samples`: unconditional MDM samples of `length` tokens under `setting`, with a
    progress bar of unmasked tokens per batch unless `show_progress` is False (then no streamer at all: it would
    copy the tokens to the CPU after every step for nothing)."""

    def sample_batch(size: int, seed: int):
        generator = torch.Generator(device=model.device).manual_seed(seed)
        progress = (UnmaskingProgress(model.config.mask_token_id, size * length, f"batch of {size}")
                    if show_progress else None)
        # From neutral settings, not the folder's generation_config: a row is exactly what its label says (a converted
        # Dream folder's top_p=0.95 must not leak into every setting of a sweep).
        neutral = MDMGenerationConfig.from_model_config(model.config)
        out = model.generate(max_new_tokens=length, num_return_sequences=size, generator=generator,
                             generation_config=neutral, return_dict_in_generate=True, streamer=progress,
                             **setting.generation_kwargs())
        return out.sequences, out.nfe_per_sequence

    return sample_batch


def ar_sampler(model, start_token_id: int, temperature: float, length: int) -> Callable:
    """`sample_batch` for `generate_samples`: `length` tokens from a causal LM's own `generate`, starting from
    `start_token_id` (kept as the first token, as MDLM's AR baseline does), pure sampling at `temperature`
    (no top-k / top-p; 0 is greedy), never stopped by EOS. NFE = length - 1 (one call per new token)."""
    model.generation_config.eos_token_id = None  # fixed-length samples: EOS does not end a sample

    def sample_batch(size: int, seed: int):
        torch.manual_seed(seed)  # transformers' generate draws from the global RNG
        prompt = torch.full((size, 1), start_token_id, dtype=torch.long, device=model.device)
        sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0 else dict(do_sample=False)
        sequences = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=length - 1,
                                   pad_token_id=start_token_id, **sampling)
        return sequences, torch.full((size,), length - 1, dtype=torch.long)

    return sample_batch
