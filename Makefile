# Fresh machine: `make demo` (set up, then train/score/analyse on generated data) or `make test`.
# Set-up makes .venv and installs torch only if the venv cannot import it yet: on a CPU-only machine that is
# TORCH_INSTALL (the CPU build here); GPU users install their CUDA build of torch into .venv first (README).
PYTHON ?= python3
VENV ?= .venv
TORCH_INSTALL ?= torch==2.13.0
BIN := $(VENV)/bin
export HF_HUB_OFFLINE ?= 1

.PHONY: setup test lint demo

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q $(TORCH_INSTALL)
	$(BIN)/python -m pip install -q -r requirements-dev.txt
	touch $@

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: setup lint
	$(BIN)/python -m pytest
