"""Runs each mutant that `mutmut run` left surviving against whole test files, and prints its verdict.

For each mutant, mutmut runs only the tests it saw call the mutated function. A module-scoped fixture calls the
trainer's hooks once, inside the first test that uses it, so the later tests that check the fixture's results
are never run against the hooks' mutants, and a mutant they would kill is reported as surviving. Here every
given test file runs against each survivor (``MUTANT_UNDER_TEST`` selects it in ``mutants/``).

    python .ci/mutation_recheck.py 'trl_resets.trainer.*' -- tests/test_trainer_wiring.py tests/test_metrics.py
"""

from __future__ import annotations

import fnmatch
import os
import subprocess
import sys
from pathlib import Path


def survivors(patterns: list[str]) -> list[str]:
    mutmut = Path(sys.executable).with_name("mutmut")
    listed = subprocess.run([str(mutmut), "results"], capture_output=True, text=True, check=True).stdout
    names = [line.rsplit(": ", 1)[0].strip() for line in listed.splitlines() if line.rstrip().endswith(": survived")]
    return [name for name in names if any(fnmatch.fnmatch(name, pattern) for pattern in patterns)]


def verdict(name: str, tests: list[str]) -> str:
    mutants = Path("mutants").resolve()
    env = dict(os.environ, MUTANT_UNDER_TEST=name, PYTHONPATH=str(mutants))
    done = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests],
                          cwd=mutants, env=env, capture_output=True, text=True, check=False)
    return {0: "survived", 1: "killed"}.get(done.returncode, f"error (pytest exit {done.returncode})")


def main(argv: list[str]) -> None:
    if "--" not in argv:
        sys.exit(__doc__)
    split = argv.index("--")
    patterns, tests = argv[:split], argv[split + 1:]
    for name in survivors(patterns):
        print(f"{verdict(name, tests)} on recheck: {name}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
