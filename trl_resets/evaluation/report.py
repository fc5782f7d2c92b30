"""The Table 3 report: one row per model, one column per benchmark, mean ± SD over seeds; and its PNG."""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path

from .suite import BENCHMARKS


def _cell(values: Sequence[float]) -> tuple[float, str]:
    """(mean, text) in percent: the value alone for one run, ``mean ± SD`` (sample SD) for several."""
    finite = [100 * v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not finite:
        return math.nan, "–"
    mean = statistics.fmean(finite)
    if len(finite) == 1:
        return mean, f"{mean:.1f}"
    return mean, f"{mean:.1f} ± {statistics.stdev(finite):.1f}"


def benchmark_order(runs: Mapping[str, Sequence[Mapping]]) -> list[str]:
    """The benchmarks any run reports, in the suite's (Table 3's) order."""
    present = {name for results in runs.values() for result in results for name in result}
    return [name for name in BENCHMARKS if name in present]


def markdown_table(runs: Mapping[str, Sequence[Mapping]], metric: str = "accuracy") -> str:
    """Table 3's form: a row per label (its runs: seeds), a column per benchmark, the best mean in bold."""
    names = benchmark_order(runs)
    cells = {label: [_cell([r[n][metric] for r in results if n in r]) for n in names]
             for label, results in runs.items()}
    best = [max((cells[label][j][0] for label in runs if math.isfinite(cells[label][j][0])), default=math.nan)
            for j in range(len(names))]
    lines = ["| Method | " + " | ".join(BENCHMARKS[n].column for n in names) + " |",
             "|---|" + "---|" * len(names)]
    for label, row in cells.items():
        texts = [f"**{text}**" if len(runs) > 1 and mean == best[j] else text for j, (mean, text) in enumerate(row)]
        seeds = len(runs[label])
        lines.append(f"| {label}{f' ({seeds} runs)' if seeds > 1 else ''} | " + " | ".join(texts) + " |")
    return "\n".join(lines) + f"\n\n{metric} in percent" + (", mean ± SD over runs" if any(
        len(r) > 1 for r in runs.values()) else "") + ".\n"


def plot_table(runs: Mapping[str, Sequence[Mapping]], path: str | Path, metric: str = "accuracy") -> Path:
    """Grouped bars: a group per benchmark, a bar per label (error bar: SD over its runs)."""
    from ..app.plots import _pyplot

    plt = _pyplot()
    names = benchmark_order(runs)
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(names) + 2), 3.6))
    width = 0.8 / max(len(runs), 1)
    for i, (label, results) in enumerate(runs.items()):
        means, errors = [], []
        for name in names:
            values = [100 * r[name][metric] for r in results
                      if name in r and isinstance(r[name][metric], (int, float)) and math.isfinite(r[name][metric])]
            means.append(statistics.fmean(values) if values else 0.0)
            errors.append(statistics.stdev(values) if len(values) > 1 else 0.0)
        positions = [j + (i - (len(runs) - 1) / 2) * width for j in range(len(names))]
        ax.bar(positions, means, width, yerr=errors, capsize=2, label=label)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels([BENCHMARKS[n].column for n in names])
    ax.set_ylabel(f"{metric} (%)")
    ax.set_ylim(0, 100)
    ax.legend(loc="best", fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(runs: Mapping[str, Sequence[Mapping]], table_path: str | Path, png_path: str | Path | None,
                 metric: str = "accuracy") -> str:
    """Write the Markdown table (and the PNG when a path is given); returns the table."""
    table = markdown_table(runs, metric)
    Path(table_path).write_text(table, encoding="utf-8")
    if png_path is not None:
        plot_table(runs, png_path, metric)
    return table


def collect_runs(specs: Sequence[str]) -> dict[str, list[dict]]:
    """Runs from ``LABEL=RUN_FOLDER`` (or a bare folder, labelled as its run was) specs; a label given several
    folders (seeds) gets mean ± SD."""
    runs: dict[str, list[dict]] = {}
    for spec in specs:
        label, _, folder = spec.rpartition("=") if "=" in spec else ("", "", spec)
        path = Path(folder) / "results.json"
        if not path.exists():
            raise FileNotFoundError(f"{spec!r}: no {path}; give LABEL=RUN_FOLDER of a finished evaluation run.")
        stored = json.loads(path.read_text())
        runs.setdefault(label or stored["label"], []).append(stored["results"])
    return runs
