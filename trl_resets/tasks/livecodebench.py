"""LiveCodeBench code generation as a training and evaluation task for :func:`~trl_resets.rewards.code_reward`.

Rows come from ``livecodebench/code_generation_lite`` (its JSON-lines files, as
LiveCodeBench's own loader reads them) and become ``prompt`` (the problem, with
the starter code when there is one), ``tests`` (``{"inputs", "outputs",
"fn_name"}``, the code reward's input/output format) and the problem's
identity. Section 5.3 of the paper trains and evaluates on the same problems
(v6, medium) with each problem's unit tests split in two: ``part="train"``
keeps the tests the training-time reward sees, ``part="eval"`` the held-out
rest. The split is seeded per problem, so the two parts never share a test.
"""

from __future__ import annotations

import base64
import io
import json
import pickle
import random
import zlib
from collections.abc import Mapping
from pathlib import Path

HUB_ID = "livecodebench/code_generation_lite"
# Each release adds one file; release_vN is the first N files (LiveCodeBench's own version tags).
RELEASE_FILES = ("test.jsonl", "test2.jsonl", "test3.jsonl", "test4.jsonl", "test5.jsonl", "test6.jsonl")
PARTS = ("train", "eval", "all")
STDIN_INSTRUCTION = ("Write a Python program that reads the input from standard input and writes the answer to "
                     "standard output. Put the program in one ```python code block.")
CALL_INSTRUCTION = ("Complete the following starter code in Python and put the whole solution in one ```python "
                    "code block:\n\n{starter_code}")


class _TextOnly(pickle.Unpickler):
    """An unpickler that builds strings and containers only: no class is ever looked up, so nothing runs."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a LiveCodeBench test field")


def decode_test_cases(field: str) -> list[dict]:
    """Read a ``public_test_cases`` / ``private_test_cases`` field: JSON, or base64 of zlib of a pickled JSON text."""
    try:
        return json.loads(field)
    except json.JSONDecodeError:
        packed = zlib.decompress(base64.b64decode(field.encode("utf-8")))
        return json.loads(_TextOnly(io.BytesIO(packed)).load())


def problem_tests(row: Mapping) -> dict:
    """All of a problem's tests (public, then private) in the code reward's input/output format."""
    cases = decode_test_cases(row["public_test_cases"]) + decode_test_cases(row["private_test_cases"])
    metadata = json.loads(row.get("metadata") or "{}")
    return {"inputs": [c["input"] for c in cases], "outputs": [c["output"] for c in cases],
            "fn_name": metadata.get("func_name")}


def split_tests(tests: dict, part: str, train_fraction: float, seed: int) -> dict:
    """Keep the ``part`` ("train", "eval" or "all") of a problem's tests; the split is fixed by ``seed``."""
    if part not in PARTS:
        raise ValueError(f"part={part!r}: use one of {PARTS}.")
    count = len(tests["inputs"])
    if part == "all" or count < 2:
        return tests
    order = list(range(count))
    random.Random(seed).shuffle(order)
    cut = min(count - 1, max(1, round(train_fraction * count)))
    keep = sorted(order[:cut] if part == "train" else order[cut:])
    return {"inputs": [tests["inputs"][i] for i in keep], "outputs": [tests["outputs"][i] for i in keep],
            "fn_name": tests["fn_name"]}


def make_prompt(row: Mapping) -> str:
    """The problem statement and how to answer (a stdin program, or the starter code completed)."""
    starter = (row.get("starter_code") or "").strip()
    instruction = CALL_INSTRUCTION.format(starter_code=starter) if starter else STDIN_INSTRUCTION
    return f"{row['question_content'].strip()}\n\n{instruction}"


def to_task_row(row: Mapping, part: str = "train", train_fraction: float = 0.5, seed: int = 0) -> dict:
    """One LiveCodeBench problem as ``prompt``, ``tests``, ``question_id``, ``platform``, ``difficulty``."""
    problem_seed = zlib.crc32(f"{seed}:{row['question_id']}".encode())
    return {"prompt": make_prompt(row), "tests": split_tests(problem_tests(row), part, train_fraction, problem_seed),
            "question_id": row["question_id"], "platform": row["platform"], "difficulty": row["difficulty"]}


def load_livecodebench(part: str = "train", difficulty: str | None = "medium", release: int = 6,
                       train_fraction: float = 0.5, seed: int = 0, data_files=None):
    """LiveCodeBench problems as a ``datasets.Dataset`` for the code reward (see the module docstring).

    Args:
        part: ``"train"`` (the tests the training reward sees), ``"eval"`` (the held-out tests) or ``"all"``.
        difficulty: keep only ``"easy"``, ``"medium"`` or ``"hard"`` problems (``None``: all).
        release: LiveCodeBench's release (``release_v{release}``: its first ``release`` files).
        train_fraction: the share of each problem's tests in the train part.
        seed: fixes every problem's split.
        data_files: local JSON-lines files in the same schema, read instead of the hub.
    """
    import datasets

    if not 1 <= release <= len(RELEASE_FILES):
        raise ValueError(f"release={release}: LiveCodeBench has releases 1..{len(RELEASE_FILES)}.")
    if difficulty not in (None, "easy", "medium", "hard"):
        raise ValueError(f"difficulty={difficulty!r}: use 'easy', 'medium', 'hard' or None.")
    if not 0 < train_fraction < 1:
        raise ValueError(f"train_fraction={train_fraction}: it must lie strictly between 0 and 1.")
    split_tests({"inputs": [], "outputs": [], "fn_name": None}, part, train_fraction, seed)  # refuse a bad part now
    if data_files is not None:
        raw = read_json_lines(data_files)
    else:
        raw = datasets.load_dataset(HUB_ID, data_files=list(RELEASE_FILES[:release]), split="train")
    rows = [to_task_row(row, part, train_fraction, seed) for row in raw
            if difficulty is None or row["difficulty"] == difficulty]
    return datasets.Dataset.from_list(rows)


def read_json_lines(paths) -> list[dict]:
    """Rows of local JSON-lines files (``paths``: one path or several), read directly: no dataset cache is
    written."""
    rows = []
    for path in [paths] if isinstance(paths, (str, Path)) else paths:
        with open(path, encoding="utf-8") as handle:
            rows += [json.loads(line) for line in handle if line.strip()]
    return rows
