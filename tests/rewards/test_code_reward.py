"""The code reward: program extraction, both test formats, LiveCodeBench's comparison, limits and the parallel bound."""

import json
import logging
import sys
import threading
import time

import pytest

from trl_resets.rewards import CodeReward, extract_program, outputs_match
from trl_resets.sandbox import FINISHED, Execution, LocalSandbox

MiB = 1024 ** 2
FENCE = "```"


@pytest.fixture(scope="module")
def reward(tmp_path_factory):
    if not sys.platform.startswith("linux"):
        pytest.skip("the local sandbox needs Linux")
    sandbox = LocalSandbox(memory_bytes=512 * MiB, tmp_root=str(tmp_path_factory.mktemp("code-runs")))
    return CodeReward(sandbox, max_workers=2, test_timeout_s=3.0)


def fenced(code: str, tag: str = "python") -> str:
    return f"Here is my solution.\n{FENCE}{tag}\n{code}\n{FENCE}\nIt reads the input."


@pytest.mark.parametrize(
    "text, expected",
    [
        (fenced("print(1)"), "print(1)\n"),
        (fenced("print(1)", "py"), "print(1)\n"),
        (fenced("x = 1") + fenced("print(2)", ""), "print(2)\n"),       # the last block
        (fenced("print(1)") + fenced("3 4", "text"), "print(1)\n"),     # the last Python block
        ("print(3)", "print(3)"),                                        # no fence: the whole text
        (fenced("print(1)") + f"\n{FENCE}python\nprint(", None),         # truncated inside a fence
        ("", None),
        ("   \n", None),
        (fenced("1 2", "text"), None),
    ],
)
def test_extract_program(text, expected):
    assert extract_program(text) == expected


@pytest.mark.parametrize(
    "output, expected, match",
    [
        ("3\n", "3", True),
        ("  1 2 3  \n\n", "1 2 3\n", True),
        ("0.50\n1e2\n", "0.5\n100\n", True),      # equal as decimals
        ("1 2\n", "1  2", True),
        ("YES\n", "yes\n", False),
        ("3\n4\n", "3\n", False),                  # line counts differ
        ("1 2\n", "1 2 3\n", False),
        ("0.3333333\n", "0.3333334\n", False),     # decimals are exact
        ("", "0", False),
    ],
)
def test_outputs_match_compares_as_livecodebench(output, expected, match):
    assert outputs_match(output, expected) is match


def test_stdin_tests_score_the_fraction_passed(reward):
    tests = {"inputs": ["1 2\n", "3 4\n", "10 -10\n"], "outputs": ["3\n", "7\n", "0\n"]}
    completions = [
        fenced("a, b = map(int, input().split())\nprint(a + b)"),           # right
        fenced("print(3)"),                                                  # one of three
        fenced("a, b = map(int, input().split())\nprint(a - b)"),           # wrong
        fenced("def main(:\n    pass"),                                      # malformed
        fenced("import sys\nprint(sum(map(int, sys.stdin.read().split())))")[:-30],  # truncated
        "",                                                                  # empty
        [{"role": "assistant", "content": fenced("if __name__ == '__main__':\n    print(sum(map(int, input().split())))")}],
    ]
    scores = reward(completions, [json.dumps(tests)] + [tests] * 6)
    assert scores == [1.0, pytest.approx(1 / 3), 0.0, 0.0, 0.0, 0.0, 1.0]


def test_call_based_tests(reward):
    tests = {"inputs": ["[1, 2]\n3", "[]\n0"], "outputs": ["[1, 2, 3]", "[0]"], "fn_name": "append"}
    completions = [
        "def append(xs, x):\n    return xs + [x]",
        fenced("class Solution:\n    def append(self, xs: List[int], x: int) -> List[int]:\n        return tuple(xs + [x])"),
        "def append(xs, x):\n    return xs",
        "def other(xs, x):\n    return xs + [x]",
        "def append(xs, x):\n    print('[1, 2, 3]')\n    raise SystemExit(0)",   # printing the answer and leaving
    ]
    assert reward(completions, [tests] * 5) == [1.0, 1.0, 0.0, 0.0, 0.0]


def test_test_program_format(reward):
    humaneval = "def check(candidate):\n    assert candidate(2) == 4\n    assert candidate(0) == 0\n"
    completions = ["def double(x):\n    return 2 * x", "def double(x):\n    return x + 2",
                   "import os\ndef double(x):\n    return x\nos._exit(0)", "def double(x):\n    return 2 * x\nexit()"]
    assert reward(completions, [humaneval] * 4, entry_point=["double"] * 4) == [1.0, 0.0, 0.0, 0.0]
    mbpp = ["assert inc(1) == 2", "assert inc(5) == 6", "assert inc(-1) == 1"]
    assert reward(["def inc(x):\n    return x + 1"], [mbpp]) == [pytest.approx(2 / 3)]


def test_unreadable_tests_give_none(reward, caplog):
    rows = [{"inputs": ["1"]}, {"inputs": ["1"], "outputs": []}, "{not json", 42,
            {"inputs": ["not json"], "outputs": ["1"], "fn_name": "f"}]
    assert reward(["print(1)"] * 5, rows) == [None] * 5
    assert "follow neither format" in caplog.text


def test_hostile_programs_score_zero_and_the_run_goes_on(reward, monkeypatch):
    monkeypatch.setenv("TRL_RESETS_TEST_SECRET", "hunter2")
    tests = {"inputs": ["\n"], "outputs": ["hunter2\n"]}
    completions = [
        "while True:\n    pass",
        "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass",
        "x = []\nwhile True:\n    x.append(bytearray(2**24))",
        "import socket\nsocket.socket().connect(('127.0.0.1', 9))\nprint('hunter2')",
        "import os\nprint(os.environ.get('TRL_RESETS_TEST_SECRET'))",
        "import os\nos.remove('/etc/hostname')\nprint('hunter2')",
        "print('hunter2')",  # the control: this one passes
    ]
    assert reward(completions, [tests] * len(completions)) == [0.0] * 6 + [1.0]


def test_program_budget_fails_the_tests_it_leaves(tmp_path):
    sandbox = CountingExecutor(LocalSandbox(memory_bytes=512 * MiB, tmp_root=str(tmp_path)))
    reward = CodeReward(sandbox, test_timeout_s=1.0, program_timeout_s=1.5)
    tests = {"inputs": ["1", "2", "3", "4"], "outputs": ["1", "2", "3", "4"]}
    assert reward(["while True:\n    pass"], [tests]) == [0.0]
    assert sandbox.calls == 2  # the budget ran out during the second test; the last two never ran


class CountingExecutor:
    """Wraps an executor, counting runs and the most that ran at once."""

    def __init__(self, inner=None, pause_s: float = 0.0):
        self.inner, self.pause_s = inner, pause_s
        self.calls = self.running = self.most = 0
        self.lock = threading.Lock()

    def run(self, source, stdin="", timeout_s=6.0):
        with self.lock:
            self.calls += 1
            self.running += 1
            self.most = max(self.most, self.running)
        try:
            if self.inner is not None:
                return self.inner.run(source, stdin, timeout_s)
            time.sleep(self.pause_s)
            return Execution(FINISHED, 0, "1\n", "", self.pause_s)
        finally:
            with self.lock:
                self.running -= 1

    def describe(self):
        return "counting" if self.inner is None else self.inner.describe()


def test_programs_run_in_parallel_within_the_bound(caplog):
    executor = CountingExecutor(pause_s=0.05)
    reward = CodeReward(executor, max_workers=3)
    tests = {"inputs": ["", ""], "outputs": ["1", "1"]}
    with caplog.at_level(logging.INFO, logger="trl_resets.rewards.code"):
        assert reward(["print(1)"] * 12, [tests] * 12) == [1.0] * 12
        reward(["print(1)"], [tests])
    assert executor.calls == 26 and executor.most == 3
    assert caplog.text.count("code_reward runs programs in: counting") == 1


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="max_workers=0"):
        CodeReward(CountingExecutor(), max_workers=0)
    with pytest.raises(ValueError, match="test_timeout_s=0"):
        CodeReward(CountingExecutor(), test_timeout_s=0)
    with pytest.raises(TypeError, match="executor must have run"):
        CodeReward(executor=object())
    with pytest.raises(ValueError, match="2 completions but 1 values in `tests`"):
        CodeReward(CountingExecutor())(["a", "b"], [{"inputs": [""], "outputs": [""]}])


def test_code_max_workers_bounds_a_copy_of_each_code_reward():
    """bound_code_rewards (the main job's code_max_workers): the copy of a CodeReward runs at most that many programs
    at once, and the object passed in keeps its own bound."""
    from trl_resets.app import harness
    from trl_resets.rewards import bound_code_rewards

    executor = CountingExecutor(pause_s=0.05)
    passed = CodeReward(executor, max_workers=6)
    tests = {"inputs": [""], "outputs": ["1"]}
    (bounded,) = bound_code_rewards([passed], 2)
    assert isinstance(bounded, CodeReward) and bounded is not passed and passed.max_workers == 6
    assert bounded(["print(1)"] * 8, [tests] * 8) == [1.0] * 8 and executor.most == 2
    assert bound_code_rewards([passed], None)[0] is passed
    with pytest.raises(ValueError, match="code_max_workers=0"):
        harness.task_reward(harness.TaskArguments(dataset_name="livecodebench/code_generation_lite",
                                                  code_max_workers=0))
