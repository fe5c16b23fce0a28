# `make test` and `make demo` work on a fresh machine: they create .venv on first use.
# torch is installed first with an exact pin so that a machine with a local CPU wheel of that
# version (see pip's find-links) uses it instead of pulling the CUDA build; override with
# `make TORCH_SPEC="torch>=2.5" test` elsewhere.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test lint demo clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

# notebooks are excluded from the style rules but not from the import rules (one top-level name)
lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff check --select TID notebooks
	$(PY) -m ruff format --check .

test: lint
	$(PY) -m pytest

# glibc would return every large freed tensor to the OS and page-fault it back in (README, attention modes)
demo: $(STAMP)
	MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=2147483647 $(PY) -m cascade_vsr.cli demo --output-dir outputs/demo

clean:
	rm -rf $(VENV) outputs .pytest_cache
