"""The reset policy-gradient loss (Section 4.3): per row, the mean over active tokens; then the mean over rows.

Active tokens are the whole response for base rows and the suffix for reset rows, so the shared
prefix gets exactly zero gradient. A row with no active token (the filler of an empty seed slot)
carries no loss and does not count in the mean over rows.

Without clipping the per-token loss is the importance-weighted surrogate ``-A * pi / pi_old``, with
``pi_old`` (detached) the policy that sampled the row. On an on-policy step the ratio is 1 and its
gradient is exactly that of ``-A * log pi``; on the later optimizer steps of one generation (or later
iterations over it) the ratio corrects for the policy having moved. With clipping it is PPO's
clipped-ratio surrogate, on the same masks and with the same aggregation.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class LossTerms(NamedTuple):
    """``loss``: what to backpropagate. ``policy_loss``: the policy term alone, averaged over the rows that
    carry loss (no KL). ``kl``: the per-token k3 KL estimate (detached), or None when ``beta`` is 0."""

    loss: torch.Tensor
    policy_loss: torch.Tensor
    kl: torch.Tensor | None


def per_row_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over each row's active tokens (0 for a row with none)."""
    return (values * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)


def rows_with_loss(mask: torch.Tensor) -> torch.Tensor:
    """(B,) True for the rows that have at least one active token."""
    return mask.sum(-1) > 0


def rows_per_micro_batch(
    global_rows: float, num_processes: int, accumulation_steps: int, steps_per_generation: int
) -> float:
    """The denominator that makes the accumulated, process-averaged gradient a mean over rows.

    ``global_rows`` rows carry loss in one generation batch, summed over processes; the batch is trained in
    ``steps_per_generation`` micro-batches, ``accumulation_steps`` per optimizer step, and data-parallel training
    averages the processes' gradients. Dividing each micro-batch's summed row losses by this value makes every
    optimizer step the mean over its rows that carry loss (exact when they spread evenly over the micro-batches).
    """
    return max(float(global_rows), 1.0) / num_processes * accumulation_steps / steps_per_generation


def entropy_bonus(entropies: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mean per-token entropy over the active tokens (GRPO's entropy bonus, whatever the aggregation)."""
    mask = mask.to(entropies.dtype)
    return (entropies * mask).sum() / mask.sum().clamp(min=1.0)


def reset_pg_loss(
    logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    old_logps: torch.Tensor | None = None,
    clip: tuple[float, float] | None = None,
    delta: float | None = None,
    ref_logps: torch.Tensor | None = None,
    beta: float = 0.0,
    kl_bias_correction: bool = False,
    token_weights: torch.Tensor | None = None,
    num_rows: float | None = None,
) -> LossTerms:
    """``sum_rows( mean_active_tokens( surrogate + beta * KL ) ) / num_rows``.

    Args:
        logps: (B, T) log-probabilities of the sampled tokens under the current policy.
        advantages: (B,) one advantage per row, or (B, T) one per token (comparison-based credit).
        mask: (B, T) 1 on tokens that carry loss (suffix for reset rows), 0 elsewhere.
        old_logps: (B, T) log-probabilities under the policy that sampled the rows; None means on-policy
            (``logps`` detached).
        clip: ``(epsilon_low, epsilon_high)`` for PPO's clipped surrogate; None for the unclipped one.
        delta: with ``clip``, the upper bound on the unclipped ratio (two-sided clipping); None for none.
        ref_logps: (B, T) reference log-probabilities, needed when ``beta`` is not 0.
        beta: weight of the k3 KL estimate to the reference policy.
        kl_bias_correction: weight the KL estimate by the importance ratio as well.
        token_weights: optional (B, T) or (B, 1) factors on the policy term (vLLM importance-sampling ratios,
            entropy or off-policy masks).
        num_rows: the denominator of the mean over rows; None: this batch's rows that carry loss.
    """
    if logps.shape != mask.shape:
        raise ValueError(f"logps {tuple(logps.shape)} and mask {tuple(mask.shape)} differ in shape.")
    mask = mask.to(logps.dtype)
    old = logps.detach() if old_logps is None else old_logps.to(logps.dtype)
    ratio = torch.exp(logps - old)
    adv = advantages.to(logps.dtype)
    if adv.dim() == 1:
        adv = adv.unsqueeze(-1)
    elif adv.shape != logps.shape:
        raise ValueError(f"per-token advantages {tuple(adv.shape)} and logps {tuple(logps.shape)} differ in shape.")
    if clip is None:
        policy = -adv * ratio
    else:
        low, high = clip
        unclipped = ratio if delta is None else torch.clamp(ratio, max=delta)
        policy = -torch.min(unclipped * adv, torch.clamp(ratio, 1 - low, 1 + high) * adv)
    if token_weights is not None:
        policy = policy * token_weights
    per_token = policy
    kl = None
    if beta != 0.0:
        if ref_logps is None:
            raise ValueError("beta != 0 needs the reference log-probabilities (ref_logps).")
        diff = ref_logps - logps
        kl = torch.exp(diff) - diff - 1
        if kl_bias_correction:
            kl = kl * ratio
        per_token = policy + beta * kl
    live = rows_with_loss(mask)
    denominator = live.sum().clamp(min=1).to(logps.dtype) if num_rows is None else num_rows
    loss = per_row_mean(per_token, mask).sum() / denominator
    policy_loss = per_row_mean(policy, mask)[live].detach().sum() / live.sum().clamp(min=1)
    return LossTerms(loss, policy_loss, None if kl is None else kl.detach())
