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

Memory is bounded before anything is materialised (`check_memory_bounds`): a few bytes of pickle can ask for
gigabytes (`bytearray(3 << 30)`, a storage record that decompresses to 2 GiB, a zero-stride view of one number as a
billion-element tensor). The pickle is first unpickled with every storage on the meta device, which costs no
memory, and refused when its storages or tensors need far more memory than the file holds; walking what a pickle
holds visits a bounded number of values, since shared references repeat an object exponentially often.
"""

import io
import json
import pickle
import zipfile
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


# Callables the weights-only unpickler allows that allocate as much memory as their arguments ask for. torch.save
# rebuilds tensors from storages held in the file and never calls them, so a pickle that names one is refused.
ALLOCATING_GLOBALS = ("builtins.bytearray", "torch.storage.UntypedStorage", "torch.storage.TypedStorage",
                      *(f"{cls.__module__}.{cls.__name__}" for cls in torch._tensor_classes))

# What a file may make us hold in memory: its storages (uncompressed, as torch.save writes them) fit in the file;
# the slack covers zip archives re-packed with compression, never a bomb.
MEMORY_PER_FILE_BYTE = 4
MEMORY_SLACK = 64 << 20

# Values visited when walking what a pickle holds, shared references counted each time they are reached.
MAX_VALUES_VISITED = 1_000_000


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


def _refuse_allocating(names, what: str) -> None:
    allocating = sorted(set(names) & set(ALLOCATING_GLOBALS))
    if allocating:
        raise UnsafeCheckpointError(
            f"refusing {what}: its pickle calls {', '.join(allocating)}, which allocate as much memory as the pickle "
            "asks for. torch.save never calls them (tensors are rebuilt from the file's own storages)."
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
    _refuse_allocating(names, "the pickle")
    with torch.serialization.safe_globals(_stand_ins(names)):
        return _weights_only_unpickler.Unpickler(io.BytesIO(data), encoding="utf-8").load()


def _pickle_of(path: str) -> tuple[bytes, bool]:
    """(the pickle that holds the checkpoint's objects, whether the file is in the legacy format), read without
    unpickling anything. A zip archive is refused when its records expand past the memory bound."""
    size = Path(path).stat().st_size
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            records = archive.infolist()
            expanded = sum(record.file_size for record in records)
            if expanded > MEMORY_PER_FILE_BYTE * size + MEMORY_SLACK:
                raise UnsafeCheckpointError(
                    f"refusing {path}: its {size:,}-byte archive expands to {expanded:,} bytes (compressed records; "
                    "torch.save stores them uncompressed). It would need far more memory than the file holds."
                )
            pickles = [record for record in records if record.filename.endswith("data.pkl")
                       and record.filename.count("/") <= 1]
            if not pickles:
                raise ConversionError(f"{path} is a zip archive without data.pkl: not a torch.save checkpoint.")
            return archive.read(pickles[0]), False
    with open(path, "rb") as handle:  # legacy format: magic number, protocol, system info, then the objects
        from torch import _weights_only_unpickler

        for _ in range(3):
            _weights_only_unpickler.Unpickler(handle, encoding="utf-8").load()
        return handle.read(), True


class _MetaStorages:
    """`persistent_load` for a dry run: every storage the pickle asks for is made on the meta device (no memory),
    and its size recorded."""

    def __init__(self, path: str):
        self.path, self.storages = path, {}

    def __call__(self, saved_id):
        if not (isinstance(saved_id, tuple) and len(saved_id) in (5, 6) and saved_id[0] in ("storage", b"storage")):
            raise ConversionError(f"{self.path}: a persistent id that is not a storage ({str(saved_id)[:80]}).")
        storage_type, key, numel = saved_id[1], saved_id[2], saved_id[4]
        if type(numel) is not int or numel < 0:
            raise ConversionError(f"{self.path}: a storage of {numel!r} elements.")
        if key not in self.storages:
            dtype = getattr(storage_type, "dtype", torch.uint8)
            nbytes = numel * torch._utils._element_size(dtype)
            untyped = torch.UntypedStorage(nbytes, device="meta")
            self.storages[key] = torch.storage.TypedStorage(wrap_storage=untyped, dtype=dtype, _internal=True)
        return self.storages[key]

    @property
    def nbytes(self) -> int:
        return sum(storage._untyped_storage.nbytes() for storage in self.storages.values())


def _check_tensor_views(value, path: str) -> None:
    """Refuses tensors that view more elements than their storage holds (zero or overlapping strides): copying one
    materialises every element. torch.save'd weights never do that. Each object is visited once."""
    pending, seen = [value], set()
    while pending:
        item = pending.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if len(seen) > MAX_VALUES_VISITED:
            raise UnsafeCheckpointError(f"refusing {path}: it holds more than {MAX_VALUES_VISITED:,} objects.")
        if isinstance(item, torch.Tensor):
            needed = item.numel() * item.element_size()
            if item.layout == torch.strided and needed > item.untyped_storage().nbytes():
                raise UnsafeCheckpointError(
                    f"refusing {path}: a tensor of shape {tuple(item.shape)} and strides {item.stride()} views "
                    f"{item.untyped_storage().nbytes():,} stored bytes as {needed:,} (zero or overlapping strides); "
                    "copying it would materialise every element. torch.save'd weights never do that."
                )
        elif isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, (list, tuple, set, frozenset)):
            pending.extend(item)
        elif isinstance(item, PickledObject):
            pending.extend((item.args, item.state))


def check_memory_bounds(path: str | Path, stand_ins=()) -> None:
    """Refuses a torch.save file that would make `torch.load` (or what is done with its tensors) hold far more memory
    than the file's size: archives that expand, pickles calling allocating constructors, storages larger than the
    file, tensors that view one stored number as many. The check unpickles with meta storages: nothing is
    materialised. `stand_ins` are the safe globals the real load will use (`torch.serialization.safe_globals`)."""
    from torch import _weights_only_unpickler

    path = str(path)
    size = Path(path).stat().st_size
    try:
        data, _ = _pickle_of(path)
        names = _weights_only_unpickler.get_globals_in_pkl(io.BytesIO(data))
        _refuse_code_running(names, path)
        _refuse_allocating(names, path)
        storages = _MetaStorages(path)
        unpickler = _weights_only_unpickler.Unpickler(io.BytesIO(data), encoding="utf-8")
        unpickler.persistent_load = storages
        with torch.serialization.safe_globals(list(stand_ins)):
            loaded = unpickler.load()
    except ConversionError:
        raise
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as error:
        raise ConversionError(f"{path} is not a readable PyTorch checkpoint: {str(error).strip().splitlines()[0]}") from None
    if storages.nbytes > MEMORY_PER_FILE_BYTE * size + MEMORY_SLACK:
        raise UnsafeCheckpointError(
            f"refusing {path}: its pickle asks for {storages.nbytes:,} bytes of storage, and the file holds "
            f"{size:,} bytes. It would need far more memory than the file holds."
        )
    _check_tensor_views(loaded, path)


def torch_load_weights_only(path: str | Path):
    """`torch.load(path, weights_only=True)` on CPU; objects that are not tensors or plain containers come back as
    `PickledObject` stand-ins instead of failing (see the module docstring). Raises `UnsafeCheckpointError` when the
    file could only be read by arbitrary unpickling, or would need far more memory than it holds."""
    from torch import _weights_only_unpickler

    path = str(path)
    if not Path(path).is_file():
        raise ConversionError(f"{path} is not a file.")
    try:
        data, legacy = _pickle_of(path)
        names = sorted(_weights_only_unpickler.get_globals_in_pkl(io.BytesIO(data)))
    except ConversionError:
        raise
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as error:
        raise ConversionError(f"{path} is not a readable PyTorch checkpoint: {str(error).strip().splitlines()[0]}") from None
    _refuse_code_running(names, path)
    allowed = _weights_only_unpickler._get_allowed_globals()
    unknown = [name for name in names if name not in allowed]
    if legacy and unknown:
        raise UnsafeCheckpointError(
            f"refusing {path}: torch.load(weights_only=True) cannot read its objects of {', '.join(unknown)}, and it "
            "is not in torch.save's zip format, which is the only one read with them left unconstructed. Reading "
            "it would need arbitrary unpickling, which runs any code stored in the file. Re-save its weights with "
            "safetensors (or torch.save of a plain dict of tensors) from a trusted environment."
        )
    stand_ins = _stand_ins(unknown)
    check_memory_bounds(path, stand_ins)
    try:
        with torch.serialization.safe_globals(stand_ins):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise UnsafeCheckpointError(
            f"refusing {path}: torch.load(weights_only=True) cannot read it even with the objects of "
            f"{', '.join(unknown)} left unconstructed ({str(error).strip().splitlines()[0]}). Reading it would need "
            "arbitrary unpickling, which runs any code stored in the file."
        ) from error
    except (RuntimeError, EOFError, OSError) as error:
        raise ConversionError(f"{path} is not a readable PyTorch checkpoint: {error}") from error


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


def plain_data(value, where: str = "the pickle"):
    """Plain Python data out of stand-ins: an omegaconf container pickled by MDLM's Lightning checkpoint becomes a
    dict or list (its `_content`), an omegaconf value node its `_val`. Anything else is returned unchanged.

    Copying follows shared references each time they are reached, so a few hundred bytes of pickle could ask for
    2**40 copies: more than `MAX_VALUES_VISITED` values (or 64 levels) is refused, naming `where`."""
    visited = 0

    def copy(value, depth):
        nonlocal visited
        visited += 1
        if visited > MAX_VALUES_VISITED or depth > 64:
            raise UnsafeCheckpointError(
                f"refusing {where}: copying it reaches more than {MAX_VALUES_VISITED:,} values or 64 levels (shared "
                "references repeat one object many times); no run's settings are that large."
            )
        if isinstance(value, PickledObject):
            state = value.state if isinstance(value.state, dict) else {}
            if "_content" in state:
                return copy(state["_content"], depth + 1)
            if "_val" in state:
                return copy(state["_val"], depth + 1)
            return value
        if isinstance(value, dict):
            return {key: copy(item, depth + 1) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [copy(item, depth + 1) for item in value]
        return value

    return copy(value, 0)


def read_weights_file(path: Path) -> dict[str, torch.Tensor]:
    """A flat state dict from `*.safetensors` (safetensors) or `*.bin` (torch.load, weights only)."""
    if path.suffix == ".safetensors":
        return load_file(str(path), device="cpu")
    state = torch_load_weights_only(path)
    if not isinstance(state, dict):
        raise ConversionError(f"{path} must hold a dict of tensors, got {type(state).__name__}.")
    return {key: require_tensor(value, f"{path.name}: {key}") for key, value in state.items()}


def read_weight_map(index: Path) -> dict[str, str]:
    """The `weight_map` of a sharded checkpoint's index (`*.index.json`): weight name -> shard file name, checked to
    be strings naming files in the index's own folder."""
    try:
        data = json.loads(Path(index).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as error:
        raise ConversionError(f"{index} cannot be read as JSON: {str(error)[:200]}") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ConversionError(f"{index} has no weight_map (a JSON object: weight name -> shard file name).")
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not shard or Path(shard).name != shard or shard in (".", ".."):
            raise ConversionError(f"{index}: weight_map[{name!r}] must be the file name of a shard in the same folder "
                                  f"(a string such as 'model-00001-of-00002.safetensors'), got {shard!r}.")
    return weight_map


def read_weights_folder(folder: Path) -> tuple[dict[str, torch.Tensor], list[Path]]:
    """The weights of a Hub-layout folder: safetensors first, then `pytorch_model.bin`, either possibly sharded.

    Returns the state dict and the files it was read from.
    """
    for single, index in (("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        if (folder / single).is_file():
            return read_weights_file(folder / single), [folder / single]
        if (folder / index).is_file():
            shards = [folder / name for name in sorted(set(read_weight_map(folder / index).values()))]
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
    "check_memory_bounds",
    "plain_data",
    "read_weights_file",
    "read_weight_map",
    "read_weights_folder",
]
