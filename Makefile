# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# GPU users: make test TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu128"
PYTHON ?= python3
VENV ?= .venv
# The CPU build by default; on these machines this resolves to a local wheel, never a CUDA download.
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast docs clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, so that the package's own `torch` requirement is already satisfied.
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m hf_mdm_cli demo

test: $(STAMP)
	$(PY) -m pytest -q tests --durations=10

# Everything but the tests marked slow (statistical tests with many samples, multi-process runs).
test-fast: $(STAMP)
	$(PY) -m pytest -q tests -m "not slow"

# The documentation site, built strictly: a broken link, a page missing from the navigation or an API reference
# that does not resolve fails the build. Output in site/.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict

clean:
	rm -rf $(VENV) build dist site src/*.egg-info .pytest_cache
