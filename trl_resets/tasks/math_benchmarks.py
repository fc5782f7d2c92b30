r"""The paper's math evaluation benchmarks as ``prompt`` / ``answer`` / ``id`` rows for ``boxed_answer_reward``.

Each benchmark is a :class:`MathBenchmark`: its hub id, split, the column that
holds the problem, and where its reference answer lives (a column, or the
``\boxed{}`` of a worked solution). Rows whose solution has no readable box are
dropped and counted in a warning. ``data_files`` reads local JSON-lines files in
the source's schema instead of the hub (no dataset cache is written).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from ..rewards import extract_boxed
from .livecodebench import read_json_lines

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MathBenchmark:
    """Where one benchmark's rows come from and how to read them.

    Attributes:
        hub_id, config, split: the dataset on the hub.
        question: the column with the problem.
        answer: the column with the reference answer.
        boxed_answer: the answer is the last ``\boxed{}`` of that column (a worked solution).
        keep: rows to keep (e.g. one source, one level); ``None`` keeps all.
        id_column: the column naming each row (``None``: its position).
    """

    hub_id: str
    split: str
    question: str
    answer: str
    config: str | None = None
    boxed_answer: bool = False
    keep: Callable[[Mapping], bool] | None = None
    id_column: str | None = None


BENCHMARKS = {
    "numinamath_olympiads": MathBenchmark("AI-MO/NuminaMath-CoT", "test", "problem", "solution", boxed_answer=True,
                                          keep=lambda row: row["source"] == "olympiads"),
    "hmmt_nov_2025": MathBenchmark("MathArena/hmmt_nov_2025", "train", "problem", "answer", id_column="problem_idx"),
    "math_level5": MathBenchmark("DigitalLearningGmbH/MATH-lighteval", "test", "problem", "solution",
                                 boxed_answer=True, keep=lambda row: row["level"] == "Level 5"),
    "acereason_math": MathBenchmark("nvidia/AceReason-Math", "train", "problem", "answer"),
}


def load_math_benchmark(name: str, data_files=None):
    """One benchmark of :data:`BENCHMARKS` as a ``datasets.Dataset`` with ``prompt``, ``answer`` and ``id``."""
    import datasets

    if name not in BENCHMARKS:
        raise ValueError(f"unknown math benchmark {name!r}; choose one of {sorted(BENCHMARKS)}.")
    spec = BENCHMARKS[name]
    if data_files is None:
        raw = list(datasets.load_dataset(spec.hub_id, spec.config, split=spec.split))
    else:
        raw = read_json_lines(data_files)
    rows, dropped = [], 0
    for position, row in enumerate(raw):
        if spec.keep is not None and not spec.keep(row):
            continue
        answer = row[spec.answer]
        if spec.boxed_answer:
            answer = extract_boxed(answer or "")
        if answer is None or not str(answer).strip():
            dropped += 1
            continue
        identity = row[spec.id_column] if spec.id_column else position
        rows.append({"prompt": row[spec.question].strip(), "answer": str(answer), "id": str(identity)})
    if dropped:
        logger.warning("%s: dropped %d of %d rows with no readable reference answer.", name, dropped,
                       dropped + len(rows))
    return datasets.Dataset.from_list(rows)



NUMINAMATH = "AI-MO/NuminaMath-CoT"


def load_boxed_problems(hub_id: str, split: str = "train", config: str | None = None, source: str | None = None,
                        question: str = "problem", answer: str = "solution", num_problems: int = 400, seed: int = 0,
                        skip: int = 0, data_files=None):
    r"""Training problems whose ``answer`` column ends in a ``\boxed{}`` answer (NuminaMath-CoT's form).

    Rows of ``source`` (when given) with a readable box, shuffled with ``seed``; returns rows
    ``skip .. skip + num_problems`` of that order (``skip=num_problems`` gives a held-out set disjoint from
    the first call's) as ``prompt`` (the question) and ``answer`` (the boxed answer).
    ``data_files`` reads local JSON-lines files in the same schema instead of ``hub_id``.
    """
    import datasets

    if num_problems < 1 or skip < 0:
        raise ValueError(f"num_problems={num_problems}, skip={skip}: need num_problems >= 1 and skip >= 0.")
    if data_files is None:
        data = datasets.load_dataset(hub_id, config, split=split)
    else:
        data = datasets.Dataset.from_list(read_json_lines(data_files))
    for column in (question, answer):
        if column not in data.column_names:
            raise ValueError(f"{hub_id} has no column {column!r}; its columns are {data.column_names}. "
                             "Set question_column / answer_column.")
    if source is not None:
        if "source" not in data.column_names:
            raise ValueError(f"dataset_source={source!r} needs a 'source' column, which {hub_id} lacks.")
        data = data.filter(lambda row: row["source"] == source)
    data = data.map(lambda row: {"_boxed": extract_boxed(row[answer] or "")})
    data = data.filter(lambda row: row["_boxed"] is not None)
    if len(data) == 0:
        raise ValueError(f"no row of {hub_id} (source={source!r}) has a boxed answer.")
    if skip >= len(data):
        return datasets.Dataset.from_dict({"prompt": [], "answer": []})
    data = data.shuffle(seed=seed).select(range(skip, min(skip + num_problems, len(data))))
    return data.map(lambda row: {"prompt": row[question], "answer": row["_boxed"]},
                    remove_columns=data.column_names)


def load_numinamath_training(num_problems: int = 400, source: str | None = "olympiads", seed: int = 0,
                             skip: int = 0, data_files=None):
    """The paper's training set: ``num_problems`` NuminaMath-CoT train rows of ``source`` (400 olympiads problems),
    with the solution's boxed answer (see :func:`load_boxed_problems`)."""
    return load_boxed_problems(NUMINAMATH, "train", source=source, num_problems=num_problems, seed=seed, skip=skip,
                               data_files=data_files)
