# The two commands a newcomer needs: `make demo` and `make test`. Both set everything up
# from a fresh clone (system packages when root, .venv, the package) and are idempotent.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.rapha-installed

.PHONY: demo test lint bench sysdeps setup clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Rapha needs Python >= 3.11; set PYTHON=python3.11")'
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and pinned exactly: the CPU wheel, never a multi-GB CUDA build.
	$(PY) -m pip install --quiet 'torch==2.13.0'
	$(PY) -m pip install --quiet -e '.[all]'
	@touch $(STAMP)

sysdeps:
	@./scripts/install-system-deps

setup: sysdeps $(STAMP)

demo: setup
	$(VENV)/bin/rapha demo

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench
	$(VENV)/bin/mypy

# scripts/run-pytest fails on a failing test but not on pytest's "collected nothing" (5).
test: setup lint
	PY=$(PY) ./scripts/run-pytest $(PYTEST_ARGS)

bench: setup
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
