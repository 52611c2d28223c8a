"""Reading weights files without running code from them.

safetensors files are plain data. Pickle-based files (`pytorch_model.bin`, Lightning `.ckpt`) are read with
`torch.load(weights_only=True)` only. A Lightning checkpoint also pickles objects that are not weights (MDLM saves
its omegaconf config and its tokenizer as hyper-parameters), which `weights_only=True` refuses. For those, the
classes the pickle names (listed by `torch.serialization.get_unsafe_globals_in_checkpoint`, without unpickling)
are replaced by inert stand-ins: `PickledObject`s that record their arguments and state and never import or
call anything from the file. A stand-in where a weight is needed is refused (`require_tensor`), and so is a file
that names code-running functions (`os.system`, `builtins.eval`, ...) or that the weights-only unpickler cannot
read even with the stand-ins.

What omegaconf and hydra pickle, and how each is read (no named object is ever constructed):
- `DictConfig`, `ListConfig`, their nodes (`AnyNode`, ...) and `Metadata` / `ContainerMetadata`: NEWOBJ then BUILD,
  so each becomes a `PickledObject` whose `state` holds `_content` / `_val` (`plain_data` reads them);
- `collections.defaultdict`, which every omegaconf node carries as its resolver cache (hydra registers its `now`
  resolver with `use_cache=True`, so the root's cache is filled when the run directory is resolved): REDUCE then
  SETITEMS, which the weights-only unpickler allows on a plain `dict` only. It is read as a plain `dict` of its
  items (`CONTAINER_STAND_INS`); its default factory is never called;
- type markers (`typing.Any`, `builtins.dict`, ...) and enum members (REDUCE of the enum class with its value):
  `PickledObject`s, the value in `args`.
"""

import io
import json
import pickle
from pathlib import Path

import torch
from safetensors.torch import load_file


class ConversionError(ValueError):
    """A checkpoint that cannot be converted; the message says which file, key or field, and why."""


class UnsafeCheckpointError(ConversionError):
    """A checkpoint that could only be read by running code stored in it (arbitrary unpickling): refused."""


# Modules and builtins that exist to run code or touch the system. No weights file needs them: a pickle that names
# one is refused outright, even though its stand-in would be inert.
CODE_RUNNING_MODULES = (
    "os", "posix", "nt", "sys", "subprocess", "shutil", "socket", "importlib", "runpy", "pickle", "_pickle",
    "marshal", "ctypes", "code", "codeop", "pty", "webbrowser", "multiprocessing", "signal",
)
CODE_RUNNING_BUILTINS = (
    "eval", "exec", "compile", "__import__", "getattr", "setattr", "delattr", "open", "globals", "locals", "vars",
    "breakpoint", "input", "exit", "quit", "help", "apply",
)


class PickledObject:
    """Stand-in for an object a checkpoint pickles but that is never constructed.

    `qualified_name` is the class or function the pickle names; `args` the arguments it would have been called
    with; `state` what `__setstate__` would have received. Nothing from the file is imported or executed.
    """

    qualified_name = "?"

    def __new__(cls, *args, **kwargs):
        instance = object.__new__(cls)
        instance.args, instance.state = args, None
        return instance

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state

    def __repr__(self):
        return f"<{self.qualified_name}, not constructed>"


def _stand_in(qualified_name: str) -> type:
    return type(f"PickledObject[{qualified_name}]", (PickledObject,), {"qualified_name": qualified_name})


def _plain_dict(*unused_arguments) -> dict:
    """Stand-in for a dict-like container that pickles as REDUCE (its class, its constructor arguments) followed by
    SETITEMS (its items): an empty plain `dict` that receives the items. The arguments (a defaultdict's default
    factory) are dropped, never called."""
    return {}


# Containers read as their plain-data equivalent instead of a `PickledObject`, because the weights-only unpickler
# only lets a plain dict (or list) receive items. omegaconf gives every node a `defaultdict(dict)` resolver cache.
CONTAINER_STAND_INS = {"collections.defaultdict": _plain_dict}


def _runs_code(qualified_name: str) -> bool:
    module, _, name = qualified_name.rpartition(".")
    if module in ("builtins", "__builtin__"):
        return name in CODE_RUNNING_BUILTINS
    return module.split(".")[0] in CODE_RUNNING_MODULES


def _refuse_code_running(names, what: str) -> None:
    dangerous = sorted(name for name in names if _runs_code(name))
    if dangerous:
        raise UnsafeCheckpointError(
            f"refusing {what}: its pickle calls {', '.join(dangerous)}, which run code or touch the system. "
            "No weights file needs them; the file may be malicious."
        )


def _stand_ins(names) -> list:
    """(stand-in, qualified name) for every global a pickle names: `torch.serialization.safe_globals`' format."""
    return [(CONTAINER_STAND_INS.get(name) or _stand_in(name), name) for name in names]


def load_pickle_inertly(data: bytes):
    """A bare pickle (not a torch.save archive) read like `torch_load_weights_only` reads one: the weights-only
    unpickler with inert stand-ins for every global it names; code-running globals are refused."""
    from torch import _weights_only_unpickler

    names = sorted(_weights_only_unpickler.get_globals_in_pkl(io.BytesIO(data)))
    _refuse_code_running(names, "the pickle")
    with torch.serialization.safe_globals(_stand_ins(names)):
        return _weights_only_unpickler.Unpickler(io.BytesIO(data), encoding="utf-8").load()


def torch_load_weights_only(path: str | Path):
    """`torch.load(path, weights_only=True)` on CPU; objects that are not tensors or plain containers come back as
    `PickledObject` stand-ins instead of failing (see the module docstring). Raises `UnsafeCheckpointError` when the
    file could only be read by arbitrary unpickling."""
    path = str(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        first_error = str(error).strip().splitlines()[0]
    except (RuntimeError, EOFError, OSError) as error:
        raise ConversionError(f"{path} is not a readable PyTorch checkpoint: {error}") from error

    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception as error:  # the legacy (non-zip) format cannot be inspected without unpickling it
        raise UnsafeCheckpointError(
            f"refusing {path}: torch.load(weights_only=True) cannot read it ({first_error}), and it is not in "
            "torch.save's zip format, whose pickle can be inspected without running it. Reading it would need "
            "arbitrary unpickling, which runs any code stored in the file. Re-save its weights with safetensors "
            "(or torch.save of a plain dict of tensors) from a trusted environment."
        ) from error
    _refuse_code_running(names, path)
    try:
        with torch.serialization.safe_globals(_stand_ins(names)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise UnsafeCheckpointError(
            f"refusing {path}: torch.load(weights_only=True) cannot read it even with the objects of "
            f"{', '.join(names)} left unconstructed ({str(error).strip().splitlines()[0]}). Reading it would need "
            "arbitrary unpickling, which runs any code stored in the file."
        ) from error


def require_tensor(value, where: str) -> torch.Tensor:
    """`value` as a tensor, or a clear error naming `where` it was found."""
    if isinstance(value, PickledObject):
        raise UnsafeCheckpointError(
            f"{where} is a pickled {value.qualified_name} object, not a tensor: building it would run code from "
            "the file (arbitrary unpickling); refused."
        )
    if type(value) not in (torch.Tensor, torch.nn.Parameter):
        raise ConversionError(f"{where} must be a tensor, got {type(value).__name__}.")
    return value.detach()


def plain_data(value, depth: int = 0):
    """Plain Python data out of stand-ins: an omegaconf container pickled by MDLM's Lightning checkpoint becomes a
    dict or list (its `_content`), an omegaconf value node its `_val`. Anything else is returned unchanged."""
    if depth > 64:
        return None
    if isinstance(value, PickledObject):
        state = value.state if isinstance(value.state, dict) else {}
        if "_content" in state:
            return plain_data(state["_content"], depth + 1)
        if "_val" in state:
            return plain_data(state["_val"], depth + 1)
        return value
    if isinstance(value, dict):
        return {key: plain_data(item, depth + 1) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_data(item, depth + 1) for item in value]
    return value


def read_weights_file(path: Path) -> dict[str, torch.Tensor]:
    """A flat state dict from `*.safetensors` (safetensors) or `*.bin` (torch.load, weights only)."""
    if path.suffix == ".safetensors":
        return load_file(str(path), device="cpu")
    state = torch_load_weights_only(path)
    if not isinstance(state, dict):
        raise ConversionError(f"{path} must hold a dict of tensors, got {type(state).__name__}.")
    return {key: require_tensor(value, f"{path.name}: {key}") for key, value in state.items()}


def read_weights_folder(folder: Path) -> tuple[dict[str, torch.Tensor], list[Path]]:
    """The weights of a Hub-layout folder: safetensors first, then `pytorch_model.bin`, either possibly sharded.

    Returns the state dict and the files it was read from.
    """
    for single, index in (("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        if (folder / single).is_file():
            return read_weights_file(folder / single), [folder / single]
        if (folder / index).is_file():
            weight_map = json.loads((folder / index).read_text()).get("weight_map", {})
            shards = [folder / name for name in sorted(set(weight_map.values()))]
            state = {}
            for shard in shards:
                if shard.parent != folder or not shard.is_file():
                    raise ConversionError(f"{index} names the shard {shard.name}, which is not in {folder}.")
                state.update(read_weights_file(shard))
            return state, shards
    raise ConversionError(
        f"{folder} has no weights: expected model.safetensors or pytorch_model.bin (or a sharded index of either)."
    )


__all__ = [
    "ConversionError",
    "UnsafeCheckpointError",
    "PickledObject",
    "torch_load_weights_only",
    "load_pickle_inertly",
    "require_tensor",
    "plain_data",
    "read_weights_file",
    "read_weights_folder",
]
