"""TRL's own GRPOTrainer tests, pointed at the reset trainers: the yardstick of parity with GRPO.

Runs ``tests/test_grpo_trainer.py`` from a TRL checkout three ways, each in its own pytest process with the
`trl_yardstick_plugin` loaded (offline stand-ins for the hub models and datasets, see that module):

* ``trl``: TRL's `GRPOTrainer`, the baseline: what passes for TRL itself with this TRL version;
* ``grpo``: `trl_resets.GRPOBaselineTrainer` (``num_reset_prefixes=0``, G1 = the test's num_generations);
* ``resets``: `trl_resets.RRPOTrainer` with a split G1 + 1 x G2 = num_generations (not applicable when none
  has groups of 2 or more rows).

Then it prints each test's three outcomes and the counts, and writes them to
``benchmarks/results/trl_yardstick.md`` (``--output``). Vision-language, GPU-only and slow tests are deselected;
vLLM, liger and other optional-dependency tests skip through their own markers.

    python -m benchmarks.trl_yardstick --trl-tests PATH_TO_TRL_CHECKOUT/tests [--mode grpo|resets|both] [-k EXPR]

``--mode both`` (the default) runs all three; ``trl``, ``grpo`` or ``resets`` runs that one only.
``--quick`` runs a handful of tests (``-k`` overrides it). Results of earlier runs of the same mode are kept in
``--work`` and merged, so a long run can be done subset by subset.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
MODES = ("trl", "grpo", "resets")
DESELECT = ("TestGRPOTrainerVLM", "TestGRPOTrainerSlow")
QUICK = "test_init_minimal or test_train_dataset_format or test_train_loss_types or test_no_reward_source_raises"
LABELS = {"trl": "TRL GRPOTrainer", "grpo": "ours, GRPO (k=0)", "resets": "ours, resets (RRPO)"}


def run_mode(mode: str, tests: Path, keyword: str | None, work: Path) -> dict[str, dict]:
    """One pytest process over TRL's test file in ``mode``; returns its outcomes merged into earlier ones."""
    results = work / f"{mode}.jsonl"
    fresh = work / f"{mode}.new.jsonl"
    env = dict(
        os.environ, TRL_YARDSTICK_MODE=mode, TRL_YARDSTICK_RESULTS=str(fresh), HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1", TRL_YARDSTICK_STANDINS=str(work / "standins"),
        PYTHONPATH=os.pathsep.join([str(HERE), str(REPO), os.environ.get("PYTHONPATH", "")]),
    )
    env.setdefault("OMP_NUM_THREADS", "1")
    test_file = Path(tests.name) / "test_grpo_trainer.py"  # as pytest names it from the checkout (cwd below)
    command = [sys.executable, "-m", "pytest", "-p", "trl_yardstick_plugin", "-p", "no:cacheprovider", "-q",
               str(test_file), *[arg for name in DESELECT for arg in ("--deselect", f"{test_file}::{name}")]]
    if keyword:
        command += ["-k", keyword]
    start = time.time()
    subprocess.run(command, cwd=tests.parent, env=env, check=False)
    print(f"[{mode}] {time.time() - start:.0f} s", flush=True)
    merged = load(results)
    merged.update(load(fresh))
    with open(results, "w") as f:
        f.writelines(json.dumps(entry) + "\n" for entry in merged.values())
    fresh.unlink(missing_ok=True)
    return merged


def load(path: Path) -> dict[str, dict]:
    if not path.exists():
        return {}
    entries = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {entry["test"]: entry for entry in entries}


def cell(entry: dict | None) -> str:
    if entry is None:
        return "not run"
    text = entry["outcome"]
    if entry["reason"]:
        text += f": {entry['reason']}"
    return text.replace("|", "\\|")


LEGEND = (
    "Outcomes: `passed`; `failed` (pytest's one-line reason); `refused` (trl_resets refused the test's settings "
    "while building its config or trainer, with the message shown); `not applicable` (resets mode: the test's "
    "num_generations has no split into groups of 2 or more rows); `skipped` and `xfailed` (the test's own "
    "markers: an optional dependency such as liger-kernel or vLLM is missing, or TRL expects the failure); "
    "`not run` (outside the subsets run). The vision-language (`TestGRPOTrainerVLM`) and GPU-only "
    "(`TestGRPOTrainerSlow`) classes are deselected."
)


def report(outcomes: dict[str, dict[str, dict]], command: str, source: str = "") -> str:
    modes = [m for m in MODES if outcomes.get(m)]
    tests = sorted({name for m in modes for name in outcomes[m]})
    counts = {m: {} for m in modes}
    for m in modes:
        for entry in outcomes[m].values():
            counts[m][entry["outcome"]] = counts[m].get(entry["outcome"], 0) + 1
    kinds = sorted({kind for m in modes for kind in counts[m]})
    lines = [
        "# TRL's GRPOTrainer tests on the reset trainers",
        "",
        (f"Command: `{command}` (2-core CPU, shared with other jobs; offline stand-ins for the hub models and "
        "datasets, see `benchmarks/trl_yardstick_plugin.py`)."),
        "",
        *([f"TRL's tests: {source}.", ""] if source else []),
        LEGEND,
        "",
        "| outcome | " + " | ".join(LABELS[m] for m in modes) + " |",
        "|---|" + "---|" * len(modes),
    ]
    lines += [f"| {kind} | " + " | ".join(str(counts[m].get(kind, 0)) for m in modes) + " |" for kind in kinds]
    lines += ["", "| test | " + " | ".join(LABELS[m] for m in modes) + " |", "|---|" + "---|" * len(modes)]
    for name in tests:
        short = name.split("::", 1)[-1]
        lines.append(f"| `{short}` | " + " | ".join(cell(outcomes[m].get(name)) for m in modes) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trl-tests", type=Path, required=True, help="the tests/ folder of a TRL checkout")
    parser.add_argument("--mode", choices=["trl", "grpo", "resets", "both"], default="both",
                        help="both: all three; trl, grpo or resets: that one (the table shows every mode in --work)")
    parser.add_argument("-k", dest="keyword", default=None, help="pytest -k expression selecting tests")
    parser.add_argument("--quick", action="store_true", help=f"only: {QUICK}")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "trl_yardstick",
                        help="per-mode outcomes, merged across runs")
    parser.add_argument("--output", type=Path, default=HERE / "results" / "trl_yardstick.md")
    parser.add_argument("--trl-revision", default="", help="where the TRL tests come from, for the table's header")
    parser.add_argument("--command", default=None, help="the command line(s) to state in the table's header")
    parser.add_argument("--report-only", action="store_true", help="write the table from --work without running")
    args = parser.parse_args(argv)
    tests = args.trl_tests.resolve()
    if not (tests / "test_grpo_trainer.py").exists():
        parser.error(f"--trl-tests {tests} has no test_grpo_trainer.py: give the tests/ folder of a TRL checkout")
    args.work.mkdir(parents=True, exist_ok=True)
    keyword = args.keyword or (QUICK if args.quick else None)
    if not args.report_only:
        for mode in MODES if args.mode == "both" else [args.mode]:
            run_mode(mode, tests, keyword, args.work)
    outcomes = {mode: {**load(args.work / f"{mode}.jsonl"), **load(args.work / f"{mode}.new.jsonl")}
                for mode in MODES}  # with the tests done so far by a run still in progress
    command = args.command or " ".join(["python -m benchmarks.trl_yardstick", *(argv or sys.argv[1:])])
    text = report(outcomes, command, args.trl_revision)
    print(text)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)


if __name__ == "__main__":
    main()
