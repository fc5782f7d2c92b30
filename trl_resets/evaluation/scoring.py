"""Scores of completions (each benchmark's reward) and their summary through the `evaluate` metric module."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from .suite import Benchmark

METRIC_PATH = Path(__file__).with_name("pass_at_k.py")
_metric = None


def pass_at_k_metric():
    """The local `evaluate` module (loaded by path once per process: nothing comes from a hub)."""
    global _metric
    if _metric is None:
        import evaluate

        _metric = evaluate.load(str(METRIC_PATH), keep_in_memory=True)
    return _metric


def score_completions(benchmark: Benchmark, completions: Sequence[str], rows: Sequence[Mapping]) -> list:
    """The benchmark's reward for each completion against its row (``None``: the row cannot be scored)."""
    if not completions:
        return []
    columns = {name: [row[name] for row in rows] for name in benchmark.columns}
    scores = benchmark.reward(completions=list(completions), **columns)
    return [None if s is None or (isinstance(s, float) and math.isnan(s)) else float(s) for s in scores]


def summarize(records: Sequence[Mapping], ks: Sequence[int] = (1,)) -> dict:
    """One benchmark's metrics from its records (``id``, ``sample``, ``score``): accuracy, mean score, pass@k,
    the items scored, and the items left out because a sample could not be scored."""
    by_item: dict[str, list] = {}
    for record in records:
        by_item.setdefault(record["id"], []).append(record["score"])
    scored = [scores for scores in by_item.values() if all(s is not None for s in scores)]
    result = pass_at_k_metric().compute(predictions=scored, k=list(ks))
    result["unscored_items"] = len(by_item) - len(scored)
    return result
