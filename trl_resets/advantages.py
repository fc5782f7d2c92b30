"""Group-relative advantages, normalized inside each group separately (Algorithm 2, phase 3)."""

from __future__ import annotations

import torch


def group_advantages(
    rewards: torch.Tensor, group_ids: torch.Tensor, scale: bool = True, eps: float = 1e-4
) -> torch.Tensor:
    """``(r - mean(group)) / (std(group) + eps)`` for every row, statistics taken within its own group.

    Rows whose reward is NaN (fallback fillers, unscorable completions) get advantage 0 and are left
    out of their group's statistics. ``std`` is the sample standard deviation (as in TRL's GRPO); a
    group with one valid row has advantage 0. With ``scale=False`` only the mean is removed.

    The statistics are taken in float64: a group whose rewards are all equal then gets exactly 0 (in float32 the
    mean of equal values can miss them by an ulp, which the division by ``std + eps`` blows up to a visible
    advantage), and a group's advantages sum to 0 up to float32 rounding.
    """
    if rewards.shape != group_ids.shape:
        raise ValueError(f"rewards {tuple(rewards.shape)} and group_ids {tuple(group_ids.shape)} differ in shape.")
    rewards = rewards.float()
    advantages = torch.zeros_like(rewards)
    valid = ~torch.isnan(rewards)
    for group in torch.unique(group_ids):
        members = (group_ids == group) & valid
        count = int(members.sum())
        if count < 2:
            continue
        values = rewards[members].double()
        centered = values - values.mean()
        advantages[members] = (centered / (values.std() + eps) if scale else centered).float()
    return advantages
