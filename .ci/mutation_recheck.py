"""Runs each mutant that `mutmut run` left surviving (or found no test for) against whole test files, and prints
its verdict.

For each mutant, mutmut runs only the tests it saw call the mutated function. A module-scoped fixture calls the
trainer's hooks once, inside the first test that uses it, so the later tests that check the fixture's results
are never run against the hooks' mutants, and a mutant they would kill is reported as surviving. Here every
given test file runs against each survivor (``MUTANT_UNDER_TEST`` selects it in ``mutants/``), stopping at the
first failure.

The test dependencies are imported once; each mutant's pytest run is a fork of this process (as mutmut runs its
own), so it does not pay for importing torch and TRL again.

    python .ci/mutation_recheck.py 'trl_resets.trainer.*' -- tests/trainer/test_trainer_wiring.py tests/core/test_metrics.py
"""

from __future__ import annotations

import fnmatch
import importlib
import os
import subprocess
import sys
from pathlib import Path

# imported before forking: what the test files import that is slow to import (never trl_resets: the mutated copy
# in mutants/ is imported by each run)
PRELOADED = ("pytest", "torch", "transformers", "datasets", "trl", "peft", "accelerate")


def survivors(patterns: list[str]) -> list[str]:
    mutmut = Path(sys.executable).with_name("mutmut")
    listed = subprocess.run([str(mutmut), "results"], capture_output=True, text=True, check=True).stdout
    names = [line.rsplit(": ", 1)[0].strip() for line in listed.splitlines()
             if line.rstrip().endswith((": survived", ": no tests"))]
    return [name for name in names if any(fnmatch.fnmatch(name, pattern) for pattern in patterns)]


def verdict(name: str, tests: list[str]) -> str:
    child = os.fork()
    if child == 0:
        os.environ["MUTANT_UNDER_TEST"] = name
        quiet = os.open(os.devnull, os.O_WRONLY)
        os.dup2(quiet, 1)
        os.dup2(quiet, 2)
        import pytest

        os._exit(int(pytest.main(["-x", "-q", "-p", "no:cacheprovider", *tests])))
    _, status = os.waitpid(child, 0)
    code = os.waitstatus_to_exitcode(status)
    return {0: "survived", 1: "killed"}.get(code, f"error (pytest exit {code})")


def main(argv: list[str]) -> None:
    if "--" not in argv:
        sys.exit(__doc__)
    split = argv.index("--")
    patterns, tests = argv[:split], argv[split + 1:]
    names = survivors(patterns)
    mutants = Path("mutants").resolve()
    os.chdir(mutants)
    sys.path.insert(0, str(mutants))
    os.environ["PYTHONPATH"] = str(mutants)  # for the processes the tests start
    for module in PRELOADED:
        importlib.import_module(module)
    for name in names:
        print(f"{verdict(name, tests)} on recheck: {name}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
