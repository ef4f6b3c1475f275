# One venv per clone. torch 2.14.1 + torchvision 0.29.1 come first so that pip never pulls a newer torch.
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup test test-slow lint demo

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

lint: setup
	$(VENV)/bin/ruff check .

test: setup lint
	$(VENV)/bin/pytest -q

test-slow: setup
	$(VENV)/bin/pytest -q -m slow

# The Shapes world end to end on this machine: data, both visual tokenizers, three stages, report.
demo: setup
	$(VENV)/bin/unigen demo --out-dir demo_out
	@echo "open demo_out/index.html"
