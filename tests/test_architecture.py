"""The layering of docs/architecture.md, checked on the source: imports read with `ast`, cycles found by search."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from hf_mdm.constants import FAMILIES, SHARED_REMOTE_CODE, travelling_files


SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "hf_mdm"
TRAVELLING = sorted({name for model_type in FAMILIES for name in travelling_files(model_type)})
CONSOLE = {"hf_mdm_cli", "hf_mdm.cli", "hf_mdm.console", "hf_mdm.training.cli", "hf_mdm.evaluation.cli",
           "hf_mdm.convert.cli"}
# What travelling files may import besides each other: the standard library, torch, numpy and transformers.
TRAVELLING_ALLOWED = {"torch", "numpy", "transformers"} | set(sys.stdlib_module_names)


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """The modules a file imports, absolute (relative imports resolved against its package), top-level or not."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            found.add(target)
            found |= {f"{target}.{alias.name}" for alias in node.names}  # `from . import x` names a module
    return found


MODULES = {module_name(path): path for path in [*PACKAGE.rglob("*.py"), SRC / "hf_mdm_cli.py"]
           if "pretrained/shakespeare" not in path.as_posix()}
GRAPH = {name: {target for target in imports(path) if target in MODULES} for name, path in MODULES.items()}


def test_the_travelling_files_are_the_package_files_and_flat():
    assert set(SHARED_REMOTE_CODE) <= set(TRAVELLING)
    for name in TRAVELLING:
        path = PACKAGE / name
        assert path.is_file(), name
        own = {target.split(".")[0] for target in imports(path)}
        assert own <= TRAVELLING_ALLOWED | {"hf_mdm"}, (name, own - TRAVELLING_ALLOWED)
        for target in imports(path):
            if target.startswith("hf_mdm."):
                assert f"{target.split('.')[1]}.py" in TRAVELLING, (name, target)
        text = path.read_text()
        assert "import hf_mdm" not in text and "from hf_mdm" not in text, name  # flat relative imports only


def test_models_samplers_and_configs_keep_apart():
    def deps(module):
        return {target.split(".")[1] for target in GRAPH[f"hf_mdm.{module}"] if target.count(".") >= 1}
    assert not {d for d in deps("sampling_mdm") if d.startswith(("modeling", "generation", "configuration", "cache"))}
    for model_type, (configuration, modeling, _) in FAMILIES.items():
        assert not {d for d in deps(configuration) if d.startswith(("modeling", "generation", "sampling"))}
        assert "sampling_mdm" not in deps(modeling), f"{modeling} imports a sampler"
    assert not {d for d in deps("cache_mdm") if d.startswith(("modeling", "generation", "sampling"))}


def test_constants_import_nothing():
    assert imports(PACKAGE / "constants.py") == set()


def test_no_library_module_imports_the_console():
    for name, targets in GRAPH.items():
        if name in CONSOLE:
            continue
        assert not targets & CONSOLE, f"{name} (a library module) imports {sorted(targets & CONSOLE)}"


def test_no_import_cycles():
    visiting, done, cycles = [], set(), []

    def visit(node):
        if node in done:
            return
        if node in visiting:
            cycles.append(visiting[visiting.index(node):] + [node])
            return
        visiting.append(node)
        for target in sorted(GRAPH[node]):
            # A package's __init__ is imported before its submodules; an arrow to the package itself from one of
            # its own submodules is Python's package mechanics, not a design dependency.
            if target == node or node.startswith(target + "."):
                continue
            visit(target)
        visiting.pop()
        done.add(node)

    for node in sorted(GRAPH):
        visit(node)
    assert not cycles, f"import cycles: {cycles[:3]}"


@pytest.mark.parametrize("module", ["hf_mdm", "hf_mdm.evaluation.judge", "hf_mdm.evaluation"])
def test_importing_the_library_loads_no_console_module_and_no_training_loop(module):
    code = (f"import sys, {module}\n"
            "bad = [m for m in sys.modules if m in ('hf_mdm_cli', 'hf_mdm.cli', 'hf_mdm.console', "
            "'hf_mdm.training.loop', 'hf_mdm.training.cli')]\nprint(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
