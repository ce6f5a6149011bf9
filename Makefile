# Set-up and the two main jobs. Everything lands in .venv; an existing torch there is kept
# (GPU users: install a CUDA build of torch into .venv first, then run make).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
DEMO_QUESTION ?= What does this module do? Answer in one sentence.

.PHONY: demo test lint install dev clean-venv

$(VENV)/.base:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "$(TORCH)"
	touch $@

$(VENV)/.installed: $(VENV)/.base pyproject.toml
	$(PY) -m pip install --quiet -e .
	touch $@

$(VENV)/.dev: $(VENV)/.installed pyproject.toml
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

install: $(VENV)/.installed
dev: $(VENV)/.dev

# Answer a question about a real long file every Python has (argparse.py, ~22 K tokens) with the default model.
demo: $(VENV)/.installed
	$(VENV)/bin/longkv ask "$$($(PY) -c 'import argparse; print(argparse.__file__)')" -q "$(DEMO_QUESTION)"

test: $(VENV)/.dev
	@command -v bwrap >/dev/null || echo "note: bubblewrap (bwrap) is not installed: the agent sandbox tests skip (apt-get install -y bubblewrap)"
	$(PY) -m pytest

lint: $(VENV)/.dev
	$(PY) -m ruff check longkv tests benchmarks
	$(PY) -m mypy longkv

clean-venv:
	rm -rf $(VENV)
