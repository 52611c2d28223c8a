"""`generate()`'s settings as text: the `hf-mdm generate` flags and the `hf-mdm evaluate --setting` fields, read
from the strategy registry, so that a registered strategy's settings are flags and sweep fields with no other code.

    hf-mdm generate --sampler confidence --order margin --steps 64 --block-length 32 --use-cache
    hf-mdm evaluate CKPT --setting sampler=remdm,steps=512,remasking_schedule=rescale
"""

import argparse
import types
import typing
from dataclasses import fields

from .generation_mdm import LEGACY_STRATEGY_FIELDS, strategy_fields
from .sampling_mdm import SAMPLING_DTYPES, STRATEGIES


def boolean(text: str) -> bool:
    value = text.strip().lower()
    if value not in ("true", "false", "1", "0", "yes", "no"):
        raise ValueError(text)
    return value in ("true", "1", "yes")


def boolean_or_text(text: str) -> bool | str:
    """A setting that is a flag or a mode (noise_removal: false, true, "mdlm", ...)."""
    try:
        return boolean(text)
    except ValueError:
        return text.strip()


# MDMGenerationConfig fields that are not a strategy's settings: how each reads from text.
GENERATION_OPTIONS = {
    "sampler": str, "sampling_dtype": str, "temperature": float, "top_k": int, "top_p": float,
    "block_length": int, "use_cache": boolean, "cache_mode": str, "cache_refresh_steps": int,
}


def converter(annotation) -> typing.Callable[[str], object]:
    """How a settings field of this type annotation reads from text."""
    options = [arg for arg in typing.get_args(annotation) if arg is not type(None)] \
        if typing.get_origin(annotation) in (typing.Union, types.UnionType) else [annotation]
    if bool in options:
        return boolean_or_text if str in options else boolean
    for kind in (int, float, str):
        if kind in options:
            return kind
    return str


def option_types() -> dict[str, typing.Callable[[str], object]]:
    """Every option -> how its value reads from text: the generation fields, each registered strategy's settings,
    and the flat fields of earlier releases (`unmasking`, `remasking`)."""
    types_ = dict(GENERATION_OPTIONS)
    for strategy in STRATEGIES.values():
        hints = typing.get_type_hints(strategy.Settings)
        for field in fields(strategy.Settings):
            types_.setdefault(field.name, converter(hints[field.name]))
    types_.update({name: str for name in LEGACY_STRATEGY_FIELDS})
    return types_


def parse_options(text: str, where: str) -> dict:
    """"sampler=ancestral,steps=256,sampling_dtype=float32" -> {"sampler": "ancestral", "steps": 256, ...}."""
    known = option_types()
    values = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in known:
            raise ValueError(f"{where} {text!r}: {item!r} is not FIELD=VALUE with FIELD one of {tuple(known)}.")
        try:
            values[key] = known[key](value.strip())
        except ValueError:
            raise ValueError(f"{where} {text!r}: {key} must be {getattr(known[key], '__name__', 'a value')}, got "
                             f"{value!r}.") from None
    return values


def add_generation_flags(parser: argparse.ArgumentParser) -> None:
    """`--sampler` and the other generation fields, then every registered strategy's settings, as flags that default
    to None (the checkpoint's generation_config decides)."""
    owners = strategy_fields()
    group = parser.add_argument_group("decoding (any registered strategy and its settings; docs: generate and decode)")
    group.add_argument("--sampler", default=None,
                       help=f"the decoding strategy, one of {', '.join(STRATEGIES)} (default: the checkpoint's "
                       "generation config, else first_hitting)")
    group.add_argument("--sampling-dtype", default=None,
                       help=f"dtype of the categorical draws, one of {', '.join(SAMPLING_DTYPES)} (default float64)")
    for name, kind, text in (("temperature", float, "0 is greedy"), ("top_k", int, "0 keeps every token"),
                             ("top_p", float, "1.0 keeps every token"),
                             ("block_length", int, "semi-autoregressive blocks (LLaDA)"),
                             ("cache_mode", str, "prefix (default) or dual"),
                             ("cache_refresh_steps", int, "refresh the block cache every this many calls")):
        group.add_argument("--" + name.replace("_", "-"), type=kind, default=None, help=text)
    group.add_argument("--use-cache", action="store_const", const=True, default=None,
                       help="with --block-length: the block KV cache (an approximation for a bidirectional model)")
    types_ = option_types()
    for name, strategies in owners.items():
        flag = "--" + name.replace("_", "-")
        kind = types_[name]
        group.add_argument(flag, type=kind, default=None, metavar=name.upper(),
                           help=f"a setting of {', '.join(strategies)}")
    for name in LEGACY_STRATEGY_FIELDS:  # earlier releases' spelling, mapped onto the strategies (with a warning)
        group.add_argument("--" + name, default=None, help=argparse.SUPPRESS)


def generation_kwargs(args: argparse.Namespace) -> dict:
    """The flags given on the command line (not None), as `generate()` keywords."""
    names = list(GENERATION_OPTIONS) + list(strategy_fields()) + list(LEGACY_STRATEGY_FIELDS)
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}
