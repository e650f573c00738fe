# The two README commands: `make run` (train the default model end to end, then sample) and `make test`.
# Both create .venv on first use and reinstall only when pyproject.toml changes.
# The first of python3, python3.12, python3.11 that is 3.11 or 3.12 (the lanes CI tests, each with its own lock)
PYTHON ?= $(shell for p in python3 python3.12 python3.11; do $$p -c 'import sys; sys.exit(not (3, 11) <= sys.version_info[:2] < (3, 13))' 2>/dev/null && { echo $$p; break; }; done)
VENV ?= .venv
PY := $(VENV)/bin/python
# Two installs: `run` needs the package alone (plus OpenBLAS, which its CPU kernels link where they are on); `test`
# and `bench` add torch, the test tools and the server. Each is redone when pyproject.toml changes.
RUN_STAMP := $(VENV)/.installed-run
TEST_STAMP := $(VENV)/.installed-test
CONFIG ?= configs/shakespeare_char.py
WORKDIR ?= runs/shakespeare_char
ARGS ?=
# TORCH_CPU=1: take torch from PyTorch's CPU-only wheel index (on Linux PyPI's torch brings GBs of CUDA packages)
TORCH_CPU ?=
PIP_TORCH := $(if $(TORCH_CPU),--extra-index-url https://download.pytorch.org/whl/cpu)
# The lane: the venv's Python once it exists (the lock must match the interpreter that installs), else $(PYTHON)'s.
# Each lane has its own pins (pyproject.toml's markers) and locks: every transitive version, made by `make lock`.
PYVER := $(shell py=$(PY); [ -x "$$py" ] || py='$(PYTHON)'; $$py -c 'import sys; print(*sys.version_info[:2], sep="")' 2>/dev/null)
# (an unsupported interpreter: the 3.11 names, so make gets to the interpreter check and its one-line error)
LANE := $(or $(filter 311 312,$(PYVER)),311)
LOCK_RUN := constraints/py$(LANE)-run.txt
LOCK_TEST := constraints/py$(LANE)-test.txt
comma := ,
# What `make test` installs. The 3.12 lane leaves torch out: PyPI's torch for 3.12 on Linux is a multi-GB CUDA
# download; the torch tests skip there. Override with make TEST_EXTRAS=torch,dev,blas,serve TORCH_CPU=1.
TEST_EXTRAS ?= $(if $(filter 311,$(LANE)),torch$(comma))dev$(comma)blas$(comma)serve
# Without torch, pytest leaves out the test modules that import it (or its test helpers) at the top, and the
# tests that run torch_compat or bench in a subprocess: they need torch and do not skip themselves yet.
TORCH_TEST_MODULES = $(shell grep -lE '^(import torch|from torch|from (test_sample|torch_fixtures) import)' tests/*.py)
TORCH_SUBPROCESS_TESTS := tests/test_train.py::test_imported_weights_continue_training \
  tests/test_train.py::test_damaged_checkpoint_is_one_line_naming_an_older_step \
  tests/test_bench.py::test_quick_smoke tests/test_bench.py::test_serve_quick_smoke
NO_TORCH_ARGS = $(if $(filter torch,$(subst $(comma), ,$(TEST_EXTRAS))),,$(addprefix --ignore=,$(TORCH_TEST_MODULES)) \
  $(addprefix --deselect=,$(TORCH_SUBPROCESS_TESTS)))
export HF_DATASETS_OFFLINE ?= 1
export HF_HUB_OFFLINE ?= 1

.PHONY: setup run test test-all bench clean lock

setup: $(RUN_STAMP)

$(VENV)/bin/python:
	@test -n "$(PYTHON)" || { echo "error: no Python 3.11 or 3.12 found (python3 is $$(python3 --version 2>/dev/null || echo missing)); install one (pyenv install 3.11, brew install python@3.11, apt install python3.11) or pass make PYTHON=/path/to/python3.11" >&2; exit 2; }
	@$(PYTHON) -c 'import sys; sys.exit(not (3, 11) <= sys.version_info[:2] < (3, 13))' \
	  || { echo "error: $(PYTHON) is $$($(PYTHON) --version 2>/dev/null || echo not runnable); this project needs Python 3.11 or 3.12 (make PYTHON=python3.11 ...)" >&2; exit 2; }
	@[ "$(PYTHON)" = python3 ] || [ "$(origin PYTHON)" != file ] || echo "note: python3 is not 3.11/3.12; using $(PYTHON)"
	$(PYTHON) -m venv $(VENV)

$(RUN_STAMP): pyproject.toml $(LOCK_RUN) | $(VENV)/bin/python
	$(PY) -m pip install --quiet -c $(LOCK_RUN) -e '.[blas]'
	touch $(RUN_STAMP)

$(TEST_STAMP): pyproject.toml $(LOCK_TEST) | $(VENV)/bin/python
	$(PY) -m pip install --quiet $(PIP_TORCH) -c $(LOCK_TEST) -e '.[$(TEST_EXTRAS)]'
	touch $(TEST_STAMP) $(RUN_STAMP)

run: $(RUN_STAMP)
	$(PY) -m minillm_jax.train --config=$(CONFIG) --workdir=$(WORKDIR) $(ARGS)

test: $(TEST_STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q -n 2 $(NO_TORCH_ARGS) $(ARGS)

test-all: $(TEST_STAMP)
	$(PY) -m pytest -q -n 2 -m '' $(NO_TORCH_ARGS) $(ARGS)

bench: $(TEST_STAMP)
	$(PY) -m minillm_jax.bench $(ARGS)

# Re-pins every transitive version of $(PYTHON)'s lane after a change to pyproject.toml's pins: a fresh venv, then
# pip freeze (local version labels such as torch's +cpu dropped: ==2.13.0 matches the CPU wheel and the plain one
# alike). One lane per call: make lock PYTHON=python3.11, make lock PYTHON=python3.12.
LOCK_PYVER = $(shell $(PYTHON) -c 'import sys; print(*sys.version_info[:2], sep="")')
LOCK_PYDOT = $(shell $(PYTHON) -c 'import sys; print(*sys.version_info[:2], sep=".")')
LOCK_EXTRAS = $(if $(filter 311,$(LOCK_PYVER)),torch$(comma))dev$(comma)blas$(comma)serve
lock:
	@$(PYTHON) -c 'import sys; sys.exit(not (3, 11) <= sys.version_info[:2] < (3, 13))' \
	  || { echo "error: make lock needs PYTHON=python3.11 or python3.12 (got $(PYTHON))" >&2; exit 2; }
	mkdir -p constraints
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/pip install --quiet $(PIP_TORCH) -e '.[blas]'
	{ echo '# make lock: every transitive version of pip install -e .[blas] (Python $(LOCK_PYDOT))'; \
	  .lock-venv/bin/pip freeze --exclude-editable | grep -v '^-e ' | sed 's/+[a-z0-9.]*$$//'; } > constraints/py$(LOCK_PYVER)-run.txt
	.lock-venv/bin/pip install --quiet $(PIP_TORCH) -e '.[$(LOCK_EXTRAS)]'
	{ echo '# make lock: every transitive version of pip install -e .[$(LOCK_EXTRAS)] (Python $(LOCK_PYDOT))'; \
	  .lock-venv/bin/pip freeze --exclude-editable | grep -v '^-e ' | sed 's/+[a-z0-9.]*$$//'; } > constraints/py$(LOCK_PYVER)-test.txt
	rm -rf .lock-venv

clean:
	rm -rf $(VENV) data/cache .pytest_cache bench_out tests/artifacts  # never runs/: your trained models
