"""PNG plots of a run: reward and pass rates per step, the histogram of reset indices, and validation curves."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from ..metrics import PREFIX
from ..model_card import finite_number

CURVES = (
    ("reward", "reward (mean over rows)"),
    (PREFIX + "base_pass_rate", "base group pass rate"),
    (PREFIX + "sp_pass_rate", "shared-prefix group pass rate"),
)


def _pyplot():
    try:
        import matplotlib
    except ModuleNotFoundError:
        raise ModuleNotFoundError(
            "plots need matplotlib: `pip install matplotlib` (or `pip install trl-resets[plots]`), or run with "
            "--plots false."
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot_curves(log_entries: Sequence[Mapping], curves, path: str | Path, title: str, empty: str) -> Path:
    """One line per (key, label) of ``curves`` against the step (an entry without one counts by position); a curve
    with no finite value is left out, and an empty plot says ``empty``."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    drawn = 0
    for key, label in curves:
        points = [(e.get("step"), e.get(key)) for e in log_entries if finite_number(e.get(key))]
        if not points:
            continue
        steps = [s if s is not None else i + 1 for i, (s, _) in enumerate(points)]
        ax.plot(steps, [v for _, v in points], marker="o", label=label)
        drawn += 1
    if drawn:
        ax.legend(loc="best", fontsize=8)
    else:
        ax.text(0.5, 0.5, empty, ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("step")
    ax.set_ylim(-0.05, 1.05)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_rewards(log_entries: Sequence[Mapping], path: str | Path, title: str = "reward and pass rates") -> Path:
    """Reward and base / shared-prefix pass rates against the step; a curve with no finite value is left out."""
    return _plot_curves(log_entries, CURVES, path, title, "no training step logged")


VALIDATION_CURVES = (
    ("validation/pass_rate", "held-out pass rate (greedy)"),
    ("validation/reward", "held-out mean reward (greedy)"),
)


def plot_validation(log_entries: Sequence[Mapping], path: str | Path, title: str = "validation") -> Path:
    """The held-out pass rate and mean reward against the step (the entries that ``ValidationCallback`` logged)."""
    return _plot_curves(log_entries, VALIDATION_CURVES, path, title, "no validation logged")


def plot_reset_index(resets: Sequence[Mapping], path: str | Path, title: str = "reset index h*") -> Path:
    """Histogram of h* over every reset of the run, split by whether the localizer's answer was used."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    if resets:
        top = max(max(r["reset_index"] for r in resets), max(r["num_thoughts"] for r in resets))
        bins = [b - 0.5 for b in range(1, top + 2)]
        used = [r["reset_index"] for r in resets if not r.get("localizer_failed")]
        fallback = [r["reset_index"] for r in resets if r.get("localizer_failed")]
        ax.hist([used, fallback], bins=bins, stacked=True,
                label=[f"localized ({len(used)})", f"random after a failed localization ({len(fallback)})"])
        ax.set_xticks(range(1, top + 1))
        ax.legend(loc="best", fontsize=8)
    else:
        ax.text(0.5, 0.5, "no resets in this run", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("reset index h* (1 = restart from the prompt)")
    ax.set_ylabel("resets")
    ax.set_title(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
