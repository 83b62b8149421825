# The two commands a newcomer needs: `make demo` and `make test`. Both set everything up
# from a fresh clone (system packages when root, .venv, the package) and are idempotent.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.rapha-installed
# anvil, the JSON-RPC dev node the ledger suite also runs on, pinned in package.json.
ANVIL := node_modules/.bin/anvil

.PHONY: demo test lint bench sysdeps setup clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Rapha needs Python >= 3.11; set PYTHON=python3.11")'
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and pinned exactly: the CPU wheel, never a multi-GB CUDA build.
	$(PY) -m pip install --quiet 'torch==2.13.0'
	$(PY) -m pip install --quiet -e '.[all]'
	@touch $(STAMP)

# Only with npm on PATH; without it the ledger tests skip their anvil variant (and fail
# under CI=true, so CI cannot lose the JSON-RPC path). .npmrc keeps npm from writing a
# package-lock.json; touch marks the binary newer than package.json once installed.
$(ANVIL): package.json .npmrc
	@if command -v npm >/dev/null 2>&1; then \
	  npm install --no-progress --loglevel=error || exit 1; \
	  test -x $(ANVIL) || { echo "make: npm install gave no $(ANVIL)" >&2; exit 1; }; \
	  touch $(ANVIL); \
	else \
	  echo "make: npm not found; skipping anvil (ledger tests on JSON-RPC will skip)" >&2; \
	fi

sysdeps:
	@./scripts/install-system-deps

setup: sysdeps $(STAMP) $(ANVIL)

demo: setup
	$(VENV)/bin/rapha demo

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench
	$(VENV)/bin/mypy

# scripts/run-pytest fails on a failing test but not on pytest's "collected nothing" (5).
# Two pytest-xdist workers by default; `make test PYTEST_ARGS=...` replaces them. Whole
# modules go to one worker (loadscope): a module's fixture (an archive, a marketplace) is
# built once, not once per worker.
PYTEST_ARGS ?= -n 2 --dist loadscope
test: setup lint
	PY=$(PY) ./scripts/run-pytest $(PYTEST_ARGS)

bench: setup
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) node_modules .mypy_cache .ruff_cache .pytest_cache
