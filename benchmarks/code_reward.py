"""Throughput of the code reward: programs per second through the local sandbox, and its overhead.

    python -m benchmarks.code_reward            # 64 programs x 4 tests, max_workers = the machine's cores
    python -m benchmarks.code_reward --quick    # 8 programs x 2 tests, 2 workers (a smoke test)

The same batch of LiveCodeBench-style programs (stdin in, stdout compared) is scored twice by
``CodeReward`` at the same parallel bound: once through ``LocalSandbox`` (process group, rlimits, network
namespace, separate user, fresh directory, audit hook) and once through a bare executor that runs
``python -c`` with nothing else. Both must give the same scores. Each is timed over several rounds (the
machine is shared) and the medians are reported; the last line printed is the headline.

Writes benchmarks/results/code_reward.json (``--quick``: code_reward_quick.json in a new temporary folder).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from trl_resets.rewards import CodeReward
from trl_resets.sandbox import FINISHED, TIMEOUT, Execution, LocalSandbox

RESULTS = Path(__file__).parent / "results"

# Small programs of the kinds a coding task gets: parse, compute, print. Each reads "n" then n numbers.
PROGRAMS = [
    "n = int(input())\nxs = list(map(int, input().split()))\nprint(sum(xs))",
    "import sys\ndata = sys.stdin.read().split()\nprint(sum(map(int, data[1:])))",
    "n = int(input())\nxs = sorted(map(int, input().split()))\nprint(sum(xs[:n]))",
    "from functools import reduce\ninput()\nprint(reduce(lambda a, b: a + b, map(int, input().split()), 0))",
]


class BareExecutor:
    """Runs ``python -c source`` with the input and a timeout, nothing else: the baseline."""

    def describe(self) -> str:
        return "bare python -c (no isolation)"

    def run(self, source: str, stdin: str = "", timeout_s: float = 6.0) -> Execution:
        start = time.perf_counter()
        try:
            done = subprocess.run([sys.executable, "-c", source], input=stdin, capture_output=True, text=True,
                                  timeout=timeout_s, check=False)
        except subprocess.TimeoutExpired:
            return Execution(TIMEOUT, None, "", "", time.perf_counter() - start)
        return Execution(FINISHED, done.returncode, done.stdout, done.stderr, time.perf_counter() - start)


def workload(num_programs: int, num_tests: int) -> tuple[list[str], list[dict]]:
    """``num_programs`` completions, each with ``num_tests`` input/output tests."""
    completions, tests = [], []
    for i in range(num_programs):
        completions.append(f"```python\n{PROGRAMS[i % len(PROGRAMS)]}\n```")
        inputs, outputs = [], []
        for t in range(num_tests):
            xs = [(i * 31 + t * 7 + k) % 97 for k in range(50)]
            inputs.append(f"{len(xs)}\n{' '.join(map(str, xs))}\n")
            outputs.append(f"{sum(xs)}\n")
        tests.append({"inputs": inputs, "outputs": outputs})
    return completions, tests


def timed(reward: CodeReward, completions, tests) -> tuple[float, list]:
    start = time.perf_counter()
    scores = reward(completions, tests)
    return time.perf_counter() - start, scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="8 programs x 2 tests, 2 workers, 2 rounds")
    parser.add_argument("--programs", type=int, default=None)
    parser.add_argument("--tests", type=int, default=None)
    parser.add_argument("--max_workers", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=None)
    args = parser.parse_args()
    programs = args.programs or (8 if args.quick else 64)
    num_tests = args.tests or (2 if args.quick else 4)
    workers = args.max_workers or (2 if args.quick else os.cpu_count() or 1)
    rounds = args.rounds or (2 if args.quick else 3)

    completions, tests = workload(programs, num_tests)
    sandbox = CodeReward(LocalSandbox(), max_workers=workers)
    bare = CodeReward(BareExecutor(), max_workers=workers)
    print(f"sandbox: {sandbox.describe()}", flush=True)
    times = {"sandbox": [], "bare": []}
    for r in range(rounds):
        for name, reward in (("sandbox", sandbox), ("bare", bare)) if r % 2 == 0 else (("bare", bare),
                                                                                       ("sandbox", sandbox)):
            seconds, scores = timed(reward, completions, tests)
            if scores != [1.0] * programs:
                raise SystemExit(f"{name} scored {scores}; every program of the workload is correct.")
            times[name].append(seconds)
            print(f"round {r + 1}/{rounds} {name}: {seconds:.2f} s for {programs} programs", flush=True)

    median = {name: statistics.median(values) for name, values in times.items()}
    result = {
        "programs": programs, "tests_per_program": num_tests, "max_workers": workers, "rounds": rounds,
        "seconds": times, "median_seconds": median,
        "programs_per_s": {name: programs / s for name, s in median.items()},
        "test_runs_per_s": {name: programs * num_tests / s for name, s in median.items()},
        "overhead": median["sandbox"] / median["bare"],
        "isolation": sandbox.describe(),
        "machine": (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, python "
                    f"{platform.python_version()}, load average {os.getloadavg()[0]:.1f} at the end "
                    "(other jobs share the cores)"),
    }
    results = Path(tempfile.mkdtemp(prefix="trl-resets-code-reward-")) if args.quick else RESULTS  # smoke: scratch
    results.mkdir(exist_ok=True)
    path = results / ("code_reward_quick.json" if args.quick else "code_reward.json")
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"bare: {result['programs_per_s']['bare']:.2f} programs/s ({result['test_runs_per_s']['bare']:.1f} "
          f"test runs/s); machine: {result['machine']}; wrote {path}")
    print(f"code_reward: {result['programs_per_s']['sandbox']:.2f} programs/s through the local sandbox at "
          f"max_workers={workers} ({num_tests} tests each, {result['test_runs_per_s']['sandbox']:.1f} test runs/s), "
          f"{result['overhead']:.2f}x the time of the same programs run bare")


if __name__ == "__main__":
    main()
