"""Per-step statistics of the reset construction, as sums that can be added across processes.

Every ratio is kept as (numerator, denominator) and every total as a plain sum, so a distributed
run adds the pieces from all processes first and divides once (`finalize`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from trl.trainer.utils import nanmax, nanmin

from .resets import BASE_GROUP, PromptGroups, TrainingRow

RATIOS = (
    "fallback_rate",
    "unscored_rate",
    "parse_failure_rate",
    "reset_index_mean",
    "reset_depth_mean",
    "policy_pass_rate",
    "phase1_pass_rate",
    "base_pass_rate",
    "sp_pass_rate",
    "base_degenerate_rate",
    "sp_degenerate_rate",
    "grad_signal_ratio",
)
TOTALS = ("tokens_base", "tokens_suffix", "tokens_seed", "tokens_localization", "tokens_unused", "empty_seeds")
# the totals that together are every token the policy generated in the step, each once (a reset row's prefix is its
# seed's, counted in tokens_seed)
GENERATED = ("tokens_base", "tokens_suffix", "tokens_seed", "tokens_localization", "tokens_unused")
PREFIX = "resets/"


def _degenerate(rows: Sequence[TrainingRow]) -> bool:
    rewards = [r.reward for r in rows]
    return all(r == rewards[0] or (math.isnan(r) and math.isnan(rewards[0])) for r in rewards)


def _signal(rows: Sequence[TrainingRow], advantages: Sequence[float]) -> float | None:
    """Mean over rows with |A| > 0 of |A| / T (T = the row's active tokens); None when no row has signal.
    ``rows`` are one group's trained rows (fillers are left out before)."""
    values = [abs(a) / max(r.active_tokens, 1) for r, a in zip(rows, advantages) if abs(a) > 0]
    return sum(values) / len(values) if values else None


def step_sums(
    groups: Sequence[PromptGroups], advantages: Sequence[Sequence[float]], success_threshold: float,
    unscored: tuple[int, int] = (0, 0),
) -> list[float]:
    """This process's numerators, denominators and totals, in a fixed order (see `finalize`).

    ``unscored``: (completions that no reward function scored, completions scored) over the step's calls.
    """
    num = dict.fromkeys(RATIOS, 0.0)
    den = dict.fromkeys(RATIOS, 0.0)
    tot = dict.fromkeys(TOTALS, 0.0)
    num["unscored_rate"], den["unscored_rate"] = unscored
    for result, advs in zip(groups, advantages):
        slots = len(result.resets) + result.fallbacks
        num["fallback_rate"] += result.fallbacks
        den["fallback_rate"] += slots
        for record in result.resets:
            num["parse_failure_rate"] += record.localizer_failed
            num["reset_index_mean"] += record.reset_index
            num["reset_depth_mean"] += record.reset_index / record.num_thoughts
            if result.seed_tokens is None:  # a carried reset's seed and reply were generated (counted) before
                tot["tokens_localization"] += record.localization_tokens
                tot["tokens_seed"] += record.seed_tokens
        if result.seed_tokens is not None:
            tot["tokens_seed"] += result.seed_tokens
            tot["tokens_localization"] += result.localization_tokens
        for key in ("parse_failure_rate", "reset_index_mean", "reset_depth_mean"):
            den[key] += len(result.resets)
        tot["tokens_unused"] += result.unused_tokens
        tot["empty_seeds"] += result.empty_seeds
        num["policy_pass_rate"] += result.first_draws_passed
        den["policy_pass_rate"] += result.first_draws
        num["phase1_pass_rate"] += result.phase1_draws_passed
        den["phase1_pass_rate"] += result.phase1_draws

        by_group: dict[int, list[int]] = {}
        for j, row in enumerate(result.rows):
            if row.weight > 0:
                by_group.setdefault(row.group, []).append(j)
        sp_signals = []
        base_signal = None
        for group, members in by_group.items():
            rows = [result.rows[j] for j in members]
            key = "base" if group == BASE_GROUP else "sp"
            passed = sum(r.reward >= success_threshold for r in rows)
            num[f"{key}_pass_rate"] += passed
            den[f"{key}_pass_rate"] += len(rows)
            num[f"{key}_degenerate_rate"] += _degenerate(rows)
            den[f"{key}_degenerate_rate"] += 1
            tot["tokens_base" if group == BASE_GROUP else "tokens_suffix"] += sum(r.active_tokens for r in rows)
            signal = _signal(rows, [advs[j] for j in members])
            if group == BASE_GROUP:
                base_signal = signal
            elif signal is not None:
                sp_signals.append(signal)
        if base_signal is not None and sp_signals:
            num["grad_signal_ratio"] += sum(sp_signals) / len(sp_signals)
            den["grad_signal_ratio"] += base_signal
    return [num[k] for k in RATIOS] + [den[k] for k in RATIOS] + [tot[k] for k in TOTALS]


def finalize(sums: Sequence[float]) -> dict[str, float]:
    """Metric values from (possibly summed across processes) `step_sums`; NaN where nothing was counted."""
    n = len(RATIOS)
    out = {}
    for i, key in enumerate(RATIOS):
        out[PREFIX + key] = sums[i] / sums[n + i] if sums[n + i] else math.nan
    for i, key in enumerate(TOTALS):
        out[PREFIX + key] = float(sums[2 * n + i])
    out[PREFIX + "generated_tokens"] = sum(out[PREFIX + key] for key in GENERATED)
    return out


def zero_std_group_fraction(sums: Sequence[float]) -> float:
    """Share of groups (base groups and shared-prefix groups alike) whose rewards are all equal, from `step_sums`:
    the groups that carry zero advantage, counted as TRL's ``frac_reward_zero_std`` counts prompts in GRPO."""
    n = len(RATIOS)
    keys = [RATIOS.index("base_degenerate_rate"), RATIOS.index("sp_degenerate_rate")]
    groups = sum(sums[n + i] for i in keys)
    return sum(sums[i] for i in keys) / groups if groups else math.nan


def completion_stats(lengths: Sequence[float], terminated: Sequence[bool]) -> dict[str, float]:
    """TRL's ``completions/*`` metrics over the given rows: whole trajectory lengths (a reset row's prefix and
    suffix), the share not terminated (``clipped_ratio``; a rollout that ends at its final answer or EOS has
    terminated), and the terminated rows' lengths (0 when none terminated, as in TRL)."""
    if not lengths:
        return {}
    ended = [n for n, done in zip(lengths, terminated) if done] or [0.0]
    return {
        "completions/mean_length": sum(lengths) / len(lengths),
        "completions/min_length": float(min(lengths)),
        "completions/max_length": float(max(lengths)),
        "completions/clipped_ratio": 1.0 - sum(map(bool, terminated)) / len(lengths),
        "completions/mean_terminated_length": sum(ended) / len(ended),
        "completions/min_terminated_length": float(min(ended)),
        "completions/max_terminated_length": float(max(ended)),
    }


CREDIT_RATIOS = ("shared_state_rate", "repair_parse_rate", "token_advantage_spread")
CREDIT_TOTALS = ("tokens_repair",)
CREDIT_PREFIX = "credit/"


def credit_step_sums(
    shared: int, thoughts: int, repairs_used: int, repairs: int, repair_tokens: int,
    row_token_advantages: Sequence[Sequence[float]],
) -> list[float]:
    """This process's numerators, denominators and totals of the comparison-based credit metrics.

    ``shared`` of ``thoughts``: the trained thoughts of the credited groups that some other rollout of the group
    shares; ``repairs_used`` of ``repairs``: repair replies that parsed and edited something; ``repair_tokens``: the
    replies' tokens; ``row_token_advantages``: each credited row's advantages on its trained tokens, whose spread
    (population standard deviation, 0 for uniform credit) is averaged over rows.
    """
    spreads = [_pstdev(values) for values in row_token_advantages if values]
    num = [float(shared), float(repairs_used), sum(spreads)]
    den = [float(thoughts), float(repairs), float(len(spreads))]
    return num + den + [float(repair_tokens)]


def _pstdev(values: Sequence[float]) -> float:
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))


def finalize_credit(sums: Sequence[float]) -> dict[str, float]:
    """Metric values from (possibly summed across processes) `credit_step_sums`; NaN where nothing was counted."""
    n = len(CREDIT_RATIOS)
    out = {CREDIT_PREFIX + key: sums[i] / sums[n + i] if sums[n + i] else math.nan
           for i, key in enumerate(CREDIT_RATIOS)}
    for i, key in enumerate(CREDIT_TOTALS):
        out[CREDIT_PREFIX + key] = float(sums[2 * n + i])
    return out


def clip_ratios(logps: torch.Tensor, old_logps: torch.Tensor | None, advantages: torch.Tensor, mask: torch.Tensor,
                epsilon_low: float, epsilon_high: float, reduce_sum: Callable, gather: Callable) -> dict[str, float]:
    """GRPO's ``clip_ratio/*`` metrics (the definitions of TRL 1.16's ``_compute_loss``): the share of active tokens
    whose ratio is clipped below (negative advantage) or above (positive), summed over processes by ``reduce_sum``,
    and the extreme per-row shares over the rows ``gather`` collects."""
    ratio = torch.exp(logps.detach() - (logps.detach() if old_logps is None else old_logps))
    advantages = advantages if advantages.dim() == 2 else advantages.unsqueeze(1)
    low = ((ratio < 1 - epsilon_low) & (advantages < 0)).float()
    high = ((ratio > 1 + epsilon_high) & (advantages > 0)).float()

    def share(flags):
        totals = reduce_sum(torch.stack([(flags * mask).sum(), mask.sum().float()]))
        return (totals[0] / totals[1].clamp(min=1.0)).item()

    def per_row(flags):
        return gather((flags * mask).sum(-1) / mask.sum(-1))

    return {
        "clip_ratio/low_mean": share(low),
        "clip_ratio/high_mean": share(high),
        "clip_ratio/region_mean": share(torch.maximum(low, high)),
        "clip_ratio/low_min": nanmin(per_row(low)).item(),
        "clip_ratio/high_max": nanmax(per_row(high)).item(),
    }
