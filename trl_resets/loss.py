"""The reset policy-gradient loss (Section 4.3): per row, the mean over active tokens; then the mean over rows.

Active tokens are the whole response for base rows and the suffix for reset rows, so the shared
prefix gets exactly zero gradient. Without clipping the per-token loss is ``-A * log pi``.
"""

from __future__ import annotations

import torch


def per_row_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over each row's active tokens (0 for a row with none)."""
    return (values * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)


def reset_pg_loss(
    logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    ref_logps: torch.Tensor | None = None,
    beta: float = 0.0,
    token_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """``mean_rows( mean_active_tokens( -A * log pi + beta * KL ) )``.

    Args:
        logps: (B, T) log-probabilities of the sampled tokens under the current policy.
        advantages: (B,) one advantage per row.
        mask: (B, T) 1 on tokens that carry loss (suffix for reset rows), 0 elsewhere.
        ref_logps: (B, T) reference log-probabilities, needed when ``beta`` is not 0.
        beta: weight of the k3 KL estimate to the reference policy.
        token_weights: optional (B, T) per-token factors (e.g. vLLM importance-sampling ratios).
    """
    if logps.shape != mask.shape:
        raise ValueError(f"logps {tuple(logps.shape)} and mask {tuple(mask.shape)} differ in shape.")
    mask = mask.to(logps.dtype)
    per_token = -advantages.to(logps.dtype).unsqueeze(-1) * logps
    if token_weights is not None:
        per_token = per_token * token_weights
    if beta != 0.0:
        if ref_logps is None:
            raise ValueError("beta != 0 needs the reference log-probabilities (ref_logps).")
        diff = ref_logps - logps
        per_token = per_token + beta * (torch.exp(diff) - diff - 1)
    return per_row_mean(per_token, mask).mean()
