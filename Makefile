# The two README commands: `make run` (train the default model end to end, then sample) and `make test`.
# Both create .venv on first use and reinstall only when pyproject.toml changes.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CONFIG ?= configs/shakespeare_char.py
WORKDIR ?= runs/shakespeare_char
ARGS ?=
# TORCH_CPU=1: take torch from PyTorch's CPU-only wheel index (on Linux PyPI's torch brings GBs of CUDA packages)
TORCH_CPU ?=
PIP_TORCH := $(if $(TORCH_CPU),--extra-index-url https://download.pytorch.org/whl/cpu)
export HF_DATASETS_OFFLINE ?= 1
export HF_HUB_OFFLINE ?= 1

.PHONY: setup run test test-all bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python >= 3.11 needed"' \
	  || { echo "error: need Python 3.11+ as $(PYTHON) (make PYTHON=python3.11 ...)"; exit 2; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(PIP_TORCH) -e '.[torch,dev,blas,serve]'
	touch $(STAMP)

run: $(STAMP)
	$(PY) -m minillm_jax.train --config=$(CONFIG) --workdir=$(WORKDIR) $(ARGS)

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q -n 2 $(ARGS)

test-all: $(STAMP)
	$(PY) -m pytest -q -n 2 -m '' $(ARGS)

bench: $(STAMP)
	$(PY) -m minillm_jax.bench $(ARGS)

clean:
	rm -rf $(VENV) data/cache .pytest_cache bench_out tests/artifacts  # never runs/: your trained models
