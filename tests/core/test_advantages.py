"""Per-group advantages: the exact normalization, its guard, and groups that are too small."""

import math

import pytest
import torch

from trl_resets.advantages import group_advantages


def test_advantage_is_the_centered_reward_over_sample_std_plus_eps():
    rewards = torch.tensor([0.0, 1.0, 3.0, 5.0])
    groups = torch.tensor([0, 0, 1, 1])
    std = math.sqrt(0.5)  # sample std of {0, 1}; {3, 5} has twice it
    for eps in (1e-4, 0.5):
        want = [-0.5 / (std + eps), 0.5 / (std + eps), -1.0 / (2 * std + eps), 1.0 / (2 * std + eps)]
        assert group_advantages(rewards, groups, eps=eps).tolist() == pytest.approx(want, abs=1e-6)
    default = [-0.5 / (std + 1e-4), 0.5 / (std + 1e-4), -1.0 / (2 * std + 1e-4), 1.0 / (2 * std + 1e-4)]
    assert group_advantages(rewards, groups).tolist() == pytest.approx(default, abs=1e-6)


def test_a_group_too_small_is_skipped_and_later_groups_still_normalized():
    rewards = torch.tensor([4.0, 1.0, 2.0, float("nan"), 7.0])
    got = group_advantages(rewards, torch.tensor([0, 1, 1, 2, 2]), scale=False)
    assert got.tolist() == [0.0, -0.5, 0.5, 0.0, 0.0]  # group 0 has one row, group 2 one valid row


def test_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"rewards \(3,\) and group_ids \(2,\) differ in shape"):
        group_advantages(torch.zeros(3), torch.zeros(2, dtype=torch.long))


@pytest.mark.parametrize("scale", [True, False])
def test_a_group_of_equal_rewards_gets_exactly_zero(scale):
    """In float32 the mean of three rewards of 3.2603650815828322 misses them by an ulp, which the division by
    std + eps turned into advantages of -0.0024."""
    rewards = torch.tensor([3.2603650815828322] * 3 + [0.0, 1.0])
    advantages = group_advantages(rewards, torch.tensor([0, 0, 0, 1, 1]), scale=scale)
    assert advantages[:3].tolist() == [0.0, 0.0, 0.0] and advantages[3] < 0 < advantages[4]
