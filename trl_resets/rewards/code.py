r"""The code reward: the fraction of a row's tests that the completion's program passes.

The program is the completion's last fenced Python block (or the whole text
when it has none); it runs only through an executor (the local sandbox by
default, see :mod:`trl_resets.sandbox`), one run per test. Two test formats:

* **input/output pairs**, as LiveCodeBench stores them:
  ``{"inputs": [...], "outputs": [...]}`` (or its JSON text), with an optional
  ``"fn_name"``. Without ``fn_name`` the program reads the input on stdin and
  its output is compared line by line as LiveCodeBench compares it: both sides
  stripped, split into lines, each line stripped; the line counts must agree
  and each line must be equal, or else read as whitespace-separated decimals
  with equal values. With ``fn_name`` the program defines that function (or a
  ``Solution`` class with that method); each input holds one JSON argument per
  line, and the return value (a tuple read as a list) must equal the JSON output.
* **a test program** (a string, or a list of strings each one test), as
  HumanEval and MBPP ship them: it runs after the program in the same module
  and passes when it finishes without an error; with an ``entry_point`` column
  and a ``check(candidate)`` function in the test (HumanEval's form), it is
  called with the named function.

A completion passes a test only when the run finishes by reaching the end of
the test (a program that exits early, or fails, does not), and a program past
its overall wall-clock budget fails its remaining tests.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

from ..sandbox import Execution, Executor, LocalSandbox
from .math import check_lengths, completion_text

logger = logging.getLogger(__name__)

_FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)```", re.DOTALL)
# LiveCodeBench's runner gives every solution these names (LeetCode-style code
# uses ``List`` or ``heapq`` without importing them); ours does the same.
PRELUDE = (
    "from typing import *\nfrom collections import *\nfrom itertools import *\nfrom functools import *\n"
    "from heapq import *\nfrom bisect import *\nfrom math import *\n"
    "import array, bisect, collections, copy, datetime, decimal, fractions, functools, heapq, io, itertools, "
    "json, math, operator, random, re, statistics, string, sys\n"
)


def extract_program(text: str) -> str | None:
    """Return the last fenced Python (or untagged) block, or the whole text when it has no fence.

    Returns ``None`` for an empty text, a text that ends inside an unclosed
    fence (a truncated completion), or one whose fences hold no Python.
    """
    if text.count("```") % 2:
        return None
    if "```" not in text:
        return text if text.strip() else None
    blocks = [body for tag, body in _FENCE.findall(text) if tag.lower() in ("", "python", "python3", "py")]
    return blocks[-1] if blocks else None


# ---------------------------------------------------------------------------- tests


@dataclass(frozen=True)
class _Test:
    """One run: the source to execute, its stdin, and how to judge the execution."""

    source: str
    stdin: str
    kind: str  # "stdio", "call" or "program"
    expected: object = None


def parse_tests(tests, entry_point: str | None = None) -> list[_Test] | None:
    """Read one row's ``tests`` value into runs; ``None`` when it follows neither format."""
    if isinstance(tests, str):
        stripped = tests.lstrip()
        if stripped.startswith("{"):
            try:
                tests = json.loads(stripped)
            except json.JSONDecodeError:
                return None
        else:
            return [_Test(_program_test(tests, entry_point), "", "program")]
    if isinstance(tests, (list, tuple)) and tests and all(isinstance(t, str) for t in tests):
        return [_Test(_program_test(t, entry_point), "", "program") for t in tests]
    if isinstance(tests, dict) and "inputs" in tests and "outputs" in tests:
        inputs, outputs = list(tests["inputs"]), list(tests["outputs"])
        if len(inputs) != len(outputs) or not inputs:
            return None
        fn_name = tests.get("fn_name")
        if fn_name:
            try:
                return [_Test(_call_test(fn_name, _json_lines(i)), "", "call", json.loads(o))
                        for i, o in zip(inputs, outputs)]
            except (TypeError, json.JSONDecodeError):
                return None
        return [_Test("", _as_text(i), "stdio", _as_text(o)) for i, o in zip(inputs, outputs)]
    return None


def _as_text(value) -> str:
    """An input or output that a dataset stored as a list of lines joins into one text."""
    return "\n".join(map(str, value)) if isinstance(value, list) else str(value)


def _program_test(test: str, entry_point: str | None) -> str:
    """The test program, calling HumanEval's ``check`` with the entry point when it defines one."""
    if entry_point and re.search(r"^def check\(", test, re.MULTILINE):
        return f"{test}\ncheck({entry_point})\n"
    return test + "\n"


def _json_lines(inputs) -> list:
    """A call-based input: one JSON argument per line."""
    return [json.loads(line) for line in _as_text(inputs).split("\n")]


def _call_test(fn_name: str, args: list) -> str:
    """Source that calls ``fn_name`` (a function, or a ``Solution`` method) with ``args``."""
    return (
        f"_args = __import__('json').loads({json.dumps(args)!r})\n"
        f"_target = getattr(Solution(), {fn_name!r}) if 'Solution' in globals() else globals()[{fn_name!r}]\n"
        "_result = _target(*_args)\n"
        "_result = list(_result) if isinstance(_result, tuple) else _result\n"
    )


def outputs_match(output: str, expected: str) -> bool:
    """LiveCodeBench's standard-input comparison (see the module docstring)."""
    got, want = _lines(output), _lines(expected)
    if len(got) != len(want):
        return False
    return all(a == b or _same_decimals(a, b) for a, b in zip(got, want))


def _lines(text: str) -> list[str]:
    """The stripped lines of the stripped text."""
    return [line.strip() for line in text.strip().split("\n")]


def _same_decimals(got: str, want: str) -> bool:
    """Say whether two lines read as whitespace-separated decimals hold the same values."""
    try:
        return [Decimal(token) for token in got.split()] == [Decimal(token) for token in want.split()]
    except InvalidOperation:
        return False


# ---------------------------------------------------------------------------- the reward


class CodeReward:
    """A TRL reward function: the fraction of each row's tests passed (see the module docstring).

    Args:
        executor: where programs run (default: a :class:`~trl_resets.sandbox.LocalSandbox`).
        max_workers: programs of a batch run in parallel, at most this many at once.
        test_timeout_s: wall-clock limit of one test run.
        program_timeout_s: wall-clock budget of all of one program's tests; tests
            not started within it fail.
    """

    __name__ = "code_reward"

    def __init__(self, executor: Executor | None = None, max_workers: int = 4, test_timeout_s: float = 6.0,
                 program_timeout_s: float = 60.0):
        if max_workers < 1:
            raise ValueError(f"max_workers={max_workers}: at least one program must run at a time.")
        if test_timeout_s <= 0 or program_timeout_s <= 0:
            raise ValueError(f"test_timeout_s={test_timeout_s}, program_timeout_s={program_timeout_s}: "
                             "both limits must be positive.")
        if executor is not None and not isinstance(executor, Executor):
            raise TypeError(f"executor must have run(source, stdin, timeout_s) and describe(); got "
                            f"{type(executor).__name__}.")
        self.executor = executor if executor is not None else LocalSandbox()
        self.max_workers = max_workers
        self.test_timeout_s = test_timeout_s
        self.program_timeout_s = program_timeout_s
        self._described = False

    def __call__(self, completions: Sequence, tests: Sequence, entry_point: Sequence | None = None,
                 **kwargs) -> list[float | None]:
        """Score each completion on its row's tests; a row whose tests follow no format gives ``None``."""
        check_lengths("code_reward", completions, "tests", tests)
        if entry_point is not None:
            check_lengths("code_reward", completions, "entry_point", entry_point)
        else:
            entry_point = [None] * len(completions)
        if not self._described:
            logger.info("code_reward runs programs in: %s", self.executor.describe())
            self._described = True
        jobs = [(completion_text(c), t, e) for c, t, e in zip(completions, tests, entry_point)]
        with ThreadPoolExecutor(max_workers=min(self.max_workers, max(1, len(jobs)))) as pool:
            return list(pool.map(lambda job: self.score(*job), jobs))

    def score(self, text: str, tests, entry_point: str | None = None) -> float | None:
        """The fraction of ``tests`` that the program in ``text`` passes."""
        runs = parse_tests(tests, entry_point)
        if runs is None:
            logger.warning("code_reward: the tests %.120r follow neither format (input/output pairs, or a test "
                           "program); the row gets None.", tests)
            return None
        program = extract_program(text)
        if program is None or not _compiles(program):
            return 0.0
        deadline = time.monotonic() + self.program_timeout_s
        nonce = secrets.token_hex(16)
        passed = 0
        for run in runs:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            source = _source(program, run, nonce)
            execution = self.executor.run(source, run.stdin, min(self.test_timeout_s, left))
            passed += _passed(execution, run, nonce)
        return passed / len(runs)

    def describe(self) -> str:
        """The executor's isolation line."""
        return self.executor.describe()

    def with_max_workers(self, max_workers: int) -> CodeReward:
        """A copy of this reward (same executor and limits) that runs at most ``max_workers`` programs at once."""
        return CodeReward(self.executor, max_workers, self.test_timeout_s, self.program_timeout_s)


def bound_code_rewards(reward_funcs, max_workers: int | None):
    """``reward_funcs`` (one or a list) with every :class:`CodeReward` among them replaced by a copy bounded to
    ``max_workers`` programs at once (``None``: unchanged); the objects passed in are not modified."""
    if max_workers is None:
        return reward_funcs
    if isinstance(reward_funcs, (list, tuple)):
        return [bound_code_rewards(f, max_workers) for f in reward_funcs]
    return reward_funcs.with_max_workers(max_workers) if isinstance(reward_funcs, CodeReward) else reward_funcs


def _compiles(program: str) -> bool:
    """Say whether the program is valid Python (compiling runs nothing of it)."""
    try:
        compile(program, "solution.py", "exec")
    except (SyntaxError, ValueError, RecursionError, MemoryError, OverflowError):
        return False
    return True


def _source(program: str, run: _Test, nonce: str) -> str:
    """The module one test runs: prelude, program, test, then a line only reaching the end prints."""
    if run.kind == "stdio":
        return f"{PRELUDE}\n{program}\n"
    end = f"'\\n' + {nonce!r}"
    report = f"print({end} + __import__('json').dumps(_result))" if run.kind == "call" else f"print({end})"
    return f"{PRELUDE}\n{program}\n\n{run.source}{report}\n"


def _passed(execution: Execution, run: _Test, nonce: str) -> bool:
    """Judge one execution against its test."""
    if not execution.ok:
        return False
    if run.kind == "stdio":
        return outputs_match(execution.stdout, run.expected)
    last = execution.stdout.rstrip("\n").rsplit("\n", 1)[-1]
    if not last.startswith(nonce):
        return False
    if run.kind == "program":
        return last == nonce
    try:
        return json.loads(last[len(nonce):]) == run.expected
    except json.JSONDecodeError:
        return False


code_reward = CodeReward()
"""The code reward with the default local sandbox (``max_workers=4``); build a
:class:`CodeReward` to choose the executor or the limits."""
