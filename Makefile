# One venv per clone. torch 2.14.1 + torchvision 0.29.1 come first so that nothing pulls a newer torch.
# uv installs the ~5 GB torch + CUDA wheel set in ~25 s where pip takes ~2 min (it unpacks in parallel),
# which matters for the 15-minute `make demo` on a fresh clone. uv does not read pip's configuration, so it
# is handed the extra indexes and wheel folders this machine's pip is set up with (none on most machines),
# and picks the best version across all of them, as pip does. (Deferred `=`: pip is asked only when installing.)
VENV ?= .venv
PY := $(VENV)/bin/python
UV := $(VENV)/bin/uv
PIP_EXTRA_INDEXES = $(shell python3 -m pip config get global.extra-index-url 2>/dev/null)
PIP_FIND_LINKS = $(shell python3 -m pip config get global.find-links 2>/dev/null)
UV_INSTALL = $(UV) pip install -q --python $(PY) --index-strategy unsafe-best-match \
	$(foreach u,$(PIP_EXTRA_INDEXES),--extra-index-url $(u)) $(foreach d,$(PIP_FIND_LINKS),--find-links $(d))
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup test test-slow lint demo app

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q uv
	$(UV_INSTALL) torch==2.14.1 torchvision==0.29.1
	$(UV_INSTALL) -e '.[dev]'  # dev includes the train extra: the demo and the tests train
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
	$(VENV)/bin/unigen demo --output-dir demo_out
	@echo "open demo_out/index.html"

# The web app (Gradio) on http://127.0.0.1:7860 with the shipped Shapes model; ARGS="--model DIR --port 0" etc.
app: setup
	$(VENV)/bin/unigen app $(ARGS)
