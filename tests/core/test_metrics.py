"""metrics.py value by value: every ratio's numerator and denominator, every total, on hand-built groups."""

import math

import pytest

from trl_resets.metrics import PREFIX, RATIOS, TOTALS, completion_stats, finalize, step_sums, zero_std_group_fraction
from trl_resets.resets import PromptGroups, ResetRecord, TrainingRow

NAN = math.nan


def row(length, group, reward, prefix=0, weight=1.0):
    return TrainingRow(completion_ids=[1] * length, prefix_len=prefix, group=group, rewards=[reward], reward=reward,
                       weight=weight)


def prompts():
    """Three prompts' groups and advantages; the expected values below are worked out by hand from them."""
    a = PromptGroups(
        rows=[row(4, 0, 1.0), row(6, 0, 0.0), row(2, 0, 1.0),  # base group, active 4, 6, 2
              row(10, 1, 0.0, prefix=4), row(10, 1, 0.0, prefix=4),  # a degenerate shared-prefix group, active 6
              row(8, 2, 1.0, prefix=3), row(8, 2, 0.5, prefix=3),  # active 5
              row(8, 2, 0.0, prefix=3, weight=0.0)],  # a filler row: no statistics
        resets=[ResetRecord(num_thoughts=4, reset_index=2, localizer_failed=False, localization_tokens=7,
                            seed_tokens=10),
                ResetRecord(num_thoughts=5, reset_index=5, localizer_failed=True, localization_tokens=3,
                            seed_tokens=8)],
        fallbacks=1, unused_tokens=11, empty_seeds=2, first_draws=5, first_draws_passed=2, phase1_draws=7,
        phase1_draws_passed=3,
    )
    b = PromptGroups(rows=[row(3, 0, NAN), row(3, 0, NAN)], first_draws=2, phase1_draws=2)  # unscored alike: degenerate
    c = PromptGroups(
        rows=[row(1, 0, 1.0), row(0, 0, 0.0), row(5, 1, 1.0, prefix=2), row(5, 1, 0.0, prefix=2)],
        resets=[ResetRecord(num_thoughts=3, reset_index=1, localizer_failed=False, seed_tokens=5)],
        first_draws=3, first_draws_passed=1, phase1_draws=3, phase1_draws_passed=1,
    )
    advantages = [[0.5, -1.0, 0.5, 0.0, 0.0, 0.4, -0.4, 0.0], [0.0, 0.0], [1.0, -1.0, 0.6, -0.6]]
    return [a, b, c], advantages


def test_every_metric_equals_its_value_worked_out_by_hand():
    groups, advantages = prompts()
    sums = step_sums(groups, advantages, success_threshold=1.0, unscored=(2, 9))
    assert len(sums) == 2 * len(RATIOS) + len(TOTALS)
    # gradient signal: mean |A| / active tokens over rows with signal, per group; a 0-token row counts as 1 token
    base_a = (0.5 / 4 + 1.0 / 6 + 0.5 / 2) / 3
    sp_a, base_c, sp_c = 0.4 / 5, (1.0 / 1 + 1.0 / 1) / 2, 0.6 / 3
    expected = {
        "fallback_rate": (1, 4),
        "unscored_rate": (2, 9),
        "parse_failure_rate": (1, 3),
        "reset_index_mean": (2 + 5 + 1, 3),
        "reset_depth_mean": (2 / 4 + 5 / 5 + 1 / 3, 3),
        "policy_pass_rate": (3, 10),
        "phase1_pass_rate": (3 + 0 + 1, 7 + 2 + 3),
        "base_pass_rate": (2 + 0 + 1, 3 + 2 + 2),
        "sp_pass_rate": (0 + 1 + 1, 2 + 2 + 2),
        "base_degenerate_rate": (1, 3),
        "sp_degenerate_rate": (1, 3),
        "grad_signal_ratio": (sp_a + sp_c, base_a + base_c),
    }
    n = len(RATIOS)
    for i, key in enumerate(RATIOS):
        assert (sums[i], sums[n + i]) == pytest.approx(expected[key], abs=1e-12), key
    totals = {"tokens_base": 4 + 6 + 2 + 3 + 3 + 1 + 0, "tokens_suffix": 6 + 6 + 5 + 5 + 3 + 3,
              "tokens_seed": 10 + 8 + 5, "tokens_localization": 7 + 3, "tokens_unused": 11, "empty_seeds": 2}
    assert dict(zip(TOTALS, sums[2 * n:])) == totals
    values = finalize(sums)
    assert set(values) == {PREFIX + k for k in (*RATIOS, *TOTALS, "generated_tokens")}
    assert values[PREFIX + "generated_tokens"] == 19 + 28 + 23 + 10 + 11  # every total but empty_seeds
    for key, (num, den) in expected.items():
        assert values[PREFIX + key] == pytest.approx(num / den, abs=1e-12), key
    assert all(isinstance(values[PREFIX + k], float) and values[PREFIX + k] == v for k, v in totals.items())
    assert zero_std_group_fraction(sums) == pytest.approx((1 + 1) / (3 + 3))


def test_sums_add_across_processes_and_divide_once():
    groups, advantages = prompts()
    whole = step_sums(groups, advantages, 1.0, unscored=(2, 9))
    parts = [step_sums(groups[:1], advantages[:1], 1.0, unscored=(2, 4)),
             step_sums(groups[1:], advantages[1:], 1.0, unscored=(0, 5))]
    assert [x + y for x, y in zip(*parts)] == pytest.approx(whole)
    assert finalize([x + y for x, y in zip(*parts)]) == pytest.approx(finalize(whole))


def test_the_success_threshold_decides_what_passes():
    groups, advantages = prompts()
    values = finalize(step_sums(groups, advantages, success_threshold=0.5))
    assert values[PREFIX + "base_pass_rate"] == pytest.approx(3 / 7)
    assert values[PREFIX + "sp_pass_rate"] == pytest.approx(3 / 6)  # the 0.5 reward passes now
    values = finalize(step_sums(groups, advantages, success_threshold=1.5))
    assert values[PREFIX + "base_pass_rate"] == 0.0 and values[PREFIX + "sp_pass_rate"] == 0.0


def test_what_was_never_counted_is_nan_and_totals_are_zero():
    groups, advantages = prompts()
    values = finalize(step_sums(groups[1:2], advantages[1:2], 1.0))
    for key in ("fallback_rate", "unscored_rate", "parse_failure_rate", "reset_index_mean", "reset_depth_mean",
                "sp_pass_rate", "sp_degenerate_rate", "grad_signal_ratio"):
        assert math.isnan(values[PREFIX + key]), key
    assert values[PREFIX + "base_degenerate_rate"] == 1.0 and values[PREFIX + "policy_pass_rate"] == 0.0
    assert values[PREFIX + "tokens_base"] == 6.0 and values[PREFIX + "tokens_suffix"] == 0.0
    assert math.isnan(zero_std_group_fraction([0.0] * (2 * len(RATIOS) + len(TOTALS))))


def test_no_signal_ratio_without_a_base_group_with_signal_or_a_shared_prefix_group_with_signal():
    only_base = PromptGroups(rows=[row(2, 0, 1.0), row(2, 0, 0.0)])
    only_sp = PromptGroups(rows=[row(4, 1, 1.0, prefix=1), row(4, 1, 0.0, prefix=1)])
    flat_base = PromptGroups(rows=[row(2, 0, 1.0), row(2, 0, 1.0), row(4, 1, 1.0, prefix=1), row(4, 1, 0.0, prefix=1)])
    sums = step_sums([only_base, only_sp, flat_base], [[1.0, -1.0], [1.0, -1.0], [0.0, 0.0, 1.0, -1.0]], 1.0)
    assert math.isnan(finalize(sums)[PREFIX + "grad_signal_ratio"])


def test_the_signal_ratio_averages_a_prompts_shared_prefix_groups_before_dividing_by_its_base_group():
    groups = PromptGroups(rows=[row(2, 0, 1.0), row(2, 0, 0.0), row(4, 1, 1.0, prefix=2), row(4, 1, 0.0, prefix=2),
                                row(5, 2, 1.0, prefix=1), row(5, 2, 0.0, prefix=1)])
    sums = step_sums([groups], [[1.0, -1.0, 0.5, -0.5, 0.8, -0.8]], 1.0)
    sp = (0.5 / 2 + 0.8 / 4) / 2  # the mean of the two groups' signals
    assert finalize(sums)[PREFIX + "grad_signal_ratio"] == pytest.approx(sp / (1.0 / 2))


def test_a_group_is_degenerate_only_when_all_its_rewards_are_equal_or_all_unscored():
    def degenerate(rewards):
        sums = step_sums([PromptGroups(rows=[row(1, 0, r) for r in rewards])], [[0.0] * len(rewards)], 1.0)
        return finalize(sums)[PREFIX + "base_degenerate_rate"]

    assert degenerate([0.3, 0.3, 0.3]) == 1.0 and degenerate([NAN, NAN]) == 1.0
    assert degenerate([0.3, 0.3, 0.4]) == 0.0 and degenerate([NAN, 1.0]) == 0.0 and degenerate([1.0, NAN]) == 0.0


def test_completion_stats_over_whole_trajectories():
    stats = completion_stats([3, 5, 10], [True, False, True])
    assert stats == {
        "completions/mean_length": 6.0, "completions/min_length": 3.0, "completions/max_length": 10.0,
        "completions/clipped_ratio": pytest.approx(1 / 3), "completions/mean_terminated_length": 6.5,
        "completions/min_terminated_length": 3.0, "completions/max_terminated_length": 10.0,
    }
    none_ended = completion_stats([4, 6], [False, False])
    assert none_ended["completions/clipped_ratio"] == 1.0
    assert [none_ended[f"completions/{k}_terminated_length"] for k in ("mean", "min", "max")] == [0.0, 0.0, 0.0]
    assert completion_stats([], []) == {}
