"""The benchmark suite: the paper's ten evaluation sets (Table 3) and LiveCodeBench, each with its reward.

A :class:`Benchmark` knows its Table 3 column, how to load its rows (from the hub, or from a local
JSON-lines file in the source's schema), the reward that scores a completion, and the dataset columns
that reward reads. :func:`select_items` draws the seeded random subset a run evaluates.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from ..rewards import boxed_answer_reward, code_reward, multiple_choice_reward, yes_no_reward
from ..tasks.choice import load_commonsense_qa, load_sciknoweval, load_strategyqa
from ..tasks.livecodebench import load_livecodebench
from ..tasks.math_benchmarks import load_math_benchmark


@dataclass(frozen=True)
class Benchmark:
    """One evaluation set.

    Attributes:
        name: the suite's name for it (``--benchmarks``).
        column: its column in the Table 3 report.
        load: ``data_files -> datasets.Dataset`` with ``prompt``, an identity column and ``columns``;
            ``data_files=None`` loads the hub dataset.
        reward: a TRL-style reward function (``completions, **columns -> scores``).
        columns: the dataset columns the reward reads.
        data_file: the file name that holds its rows in a ``--data-dir`` folder (the source's schema).
        id_column: the column that names each item.
        answer_format: ``"boxed"`` or ``"code"`` (programs): what ends a completion, and the template it gets.
    """

    name: str
    column: str
    load: Callable
    reward: Callable
    columns: tuple[str, ...]
    data_file: str
    id_column: str = "id"
    answer_format: str = "boxed"


def _math(name: str, column: str) -> Benchmark:
    return Benchmark(name, column, partial(load_math_benchmark, name), boxed_answer_reward, ("answer",),
                     f"{name}.jsonl")


def _sciknoweval(domain: str, column: str) -> Benchmark:
    return Benchmark(f"sciknoweval_{domain}", column, partial(load_sciknoweval, domain), multiple_choice_reward,
                     ("answer",), "sciknoweval.jsonl")


# Table 3's columns, in its order, then the coding benchmark of Section 5.3 (its held-out tests).
BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in (
    _math("numinamath_olympiads", "oly"),
    _math("hmmt_nov_2025", "hmmt"),
    _math("math_level5", "lvl5"),
    Benchmark("strategyqa", "stra", load_strategyqa, yes_no_reward, ("answer",), "strategyqa.jsonl"),
    _math("acereason_math", "ace"),
    _sciknoweval("chemistry", "chem"),
    _sciknoweval("biology", "bio"),
    Benchmark("commonsense_qa", "csqa", load_commonsense_qa, multiple_choice_reward, ("answer",),
              "commonsense_qa.jsonl"),
    _sciknoweval("materials", "mat"),
    _sciknoweval("physics", "phys"),
    Benchmark("livecodebench", "lcb", partial(load_livecodebench, "eval"), code_reward, ("tests",),
              "livecodebench.jsonl", id_column="question_id", answer_format="code"),
)}
PAPER_SUITE = tuple(list(BENCHMARKS)[:10])
"""The ten benchmarks of the paper's Table 3."""


def resolve_suite(names) -> list[Benchmark]:
    """Benchmarks by name (``"paper"``: the ten of Table 3; ``"all"``: those and LiveCodeBench)."""
    chosen = []
    for name in names:
        expanded = PAPER_SUITE if name == "paper" else tuple(BENCHMARKS) if name == "all" else (name,)
        for each in expanded:
            if each not in BENCHMARKS:
                raise ValueError(f"unknown benchmark {each!r}; choose from {list(BENCHMARKS)}, 'paper' or 'all'.")
            if BENCHMARKS[each] not in chosen:
                chosen.append(BENCHMARKS[each])
    if not chosen:
        raise ValueError("no benchmark chosen; name at least one (or 'paper').")
    return chosen


def load_benchmark(benchmark: Benchmark, data_dir: str | Path | None = None):
    """The benchmark's rows: its hub dataset, or ``data_dir / benchmark.data_file`` when a folder is given."""
    if data_dir is None:
        return benchmark.load(data_files=None)
    path = Path(data_dir) / benchmark.data_file
    if not path.is_file():
        raise FileNotFoundError(f"{benchmark.name}: no file {path}; the data folder must hold {benchmark.data_file} "
                                "(JSON lines in the source's schema), or leave --data-dir unset to load the hub.")
    return benchmark.load(data_files=str(path))


def select_items(num_rows: int, num_items: int, seed: int) -> list[int]:
    """The row indices a run evaluates: ``num_items`` drawn at random with ``seed`` (all rows when fewer), in
    row order."""
    if num_items < 1:
        raise ValueError(f"num_items={num_items}: evaluate at least one item per benchmark.")
    if num_rows <= num_items:
        return list(range(num_rows))
    return sorted(random.Random(seed).sample(range(num_rows), num_items))
