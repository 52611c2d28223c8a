"""Running a peer's own code beside hf_mdm: placeholders for the packages its files import but a benchmark never
calls (GPU kernels, plotting or training-only libraries), so that the code can be imported where they are missing."""

import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types


class _Placeholder(types.ModuleType):
    """A module a peer's files import but the benchmark never calls: any attribute is a class or callable that
    raises if used."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)

        def unavailable(*args, **kwargs):
            raise RuntimeError(f"{self.__name__}.{name} is a placeholder (the package is not installed).")

        if name[:1].isupper():  # a class: a peer's module may subclass one (MDLM's utils.py: timm's scheduler)
            return type(name, (), {"__init__": unavailable})
        return unavailable


class _PlaceholderFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, roots):
        self.roots = roots

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.roots:
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _Placeholder(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


def install_placeholders(packages) -> tuple[str, ...]:
    """Placeholders for those of `packages` that are not installed; returns their names."""
    missing = tuple(name for name in packages if importlib.util.find_spec(name) is None)
    if missing:
        sys.meta_path.append(_PlaceholderFinder(missing))
    return missing
