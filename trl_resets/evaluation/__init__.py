"""Evaluation: a model on the paper's benchmark suite (Table 3), and a validation callback for training.

``python -m trl_resets.evaluation`` (or ``trl-resets-evaluate``) runs, re-scores and reports
evaluations; see docs/evaluation.md.
"""

from .callback import ValidationCallback
from .generation import GenerationSettings, make_completer, transformers_completer
from .report import collect_runs, markdown_table, write_report
from .runner import RunSettings, evaluate_model, rescore
from .scoring import score_completions, summarize
from .suite import BENCHMARKS, PAPER_SUITE, Benchmark, resolve_suite, select_items

__all__ = [
    "BENCHMARKS",
    "PAPER_SUITE",
    "Benchmark",
    "GenerationSettings",
    "RunSettings",
    "ValidationCallback",
    "collect_runs",
    "evaluate_model",
    "make_completer",
    "markdown_table",
    "rescore",
    "resolve_suite",
    "score_completions",
    "select_items",
    "summarize",
    "transformers_completer",
    "write_report",
]
