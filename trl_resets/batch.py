"""From Algorithm 2's groups to the batch TRL trains on: rewards, per-group advantages (per token with
comparison-based credit), metric sums, and the per-row inputs TRL's generation step expects."""

from __future__ import annotations

import math

import torch

from . import metrics as reset_metrics
from .advantages import group_advantages
from .checks import is_conversational
from .comparison import Trajectory, batch_credit
from .thoughts import STOP_ANSWER, STOP_EOS


def question_text(prompt) -> str:
    return prompt[-1]["content"] if is_conversational(prompt) else prompt


def logprobs_or_none(per_row: list) -> list | None:
    """Sampling logprobs for TRL (vLLM importance-sampling correction), or None when any row lacks them."""
    if not per_row or any(lps is None for lps in per_row):
        return None
    return [list(lps) for lps in per_row]



def padded(values: list[list[float]], like: torch.Tensor) -> torch.Tensor:
    """Per-token values as a (B, T) tensor shaped like the completion ids (0 on padding)."""
    out = torch.zeros(like.shape, dtype=torch.float32, device=like.device)
    for b, row in enumerate(values):
        width = min(len(row), like.size(1))
        out[b, :width] = torch.tensor(row[:width], dtype=torch.float32)
    return out


def stats_of_rows(rows, device) -> torch.Tensor:
    """(length, terminated, trained) per row: a rollout that ends at its final answer or at EOS has terminated."""
    return torch.tensor([[n, stop in (STOP_EOS, STOP_ANSWER), weight > 0] for n, stop, weight in rows],
                        dtype=torch.float32, device=device)


def summarize(groups, split, args, unscored: tuple[int, int], device, credit=None) -> dict:
    """Rewards, per-group advantages and metric sums of one process's rows; with ``credit(rows, group_ids,
    advantages) -> BatchCredit`` also per-token advantages and the credit metric sums."""
    groups_per_prompt = split.num_reset_prefixes + 1
    rows = [(p, row) for p, g in enumerate(groups) for row in g.rows]
    rewards = torch.tensor([row.reward for _, row in rows], dtype=torch.float32)
    group_ids = torch.tensor([p * groups_per_prompt + row.group for p, row in rows])
    weights = torch.tensor([row.weight for _, row in rows], dtype=torch.float32)
    advantages = group_advantages(rewards, group_ids, scale=args.scale_rewards != "none") * weights
    per_prompt = advantages.split([len(g.rows) for g in groups])
    sums = reset_metrics.step_sums(groups, [a.tolist() for a in per_prompt], args.success_threshold,
                                   unscored=unscored)
    state = {
        "rewards_per_func": torch.tensor([row.rewards for _, row in rows], dtype=torch.float32, device=device),
        "advantages": advantages.to(device),
        "metric_sums": torch.tensor(sums, dtype=torch.float64, device=device),
    }
    if credit is not None:
        result = credit(rows, group_ids.tolist(), advantages.tolist())
        state["token_advantages"] = result.token_advantages
        credited = [result.token_advantages[i][rows[i][1].prefix_len:] for i in result.credited_rows
                    if rows[i][1].weight > 0]
        credit_sums = reset_metrics.credit_step_sums(result.shared, result.thoughts, result.repairs_used,
                                                     result.repairs, result.repair_tokens, credited)
        state["credit_sums"] = torch.tensor(credit_sums, dtype=torch.float64, device=device)
    return state


def token_credit(rows: list, group_ids: list[int], advantages: list[float], texts: list[list[str]],
                 questions: list[str], args, key, repairer, policy):
    """The comparison-based estimator (``args.credit``) on the base groups, or every group with
    ``credit_groups='all'``; ``texts`` are each row's thoughts as text, ``key`` maps a thought to its state key."""
    trajectories = [Trajectory([key(t) for t in thought_texts], row.thought_spans, len(row.completion_ids),
                               row.reward if row.weight > 0 else math.nan, row.prefix_len)
                    for (_, row), thought_texts in zip(rows, texts)]
    members: dict[int, list[int]] = {}
    for i, ((_, row), group) in enumerate(zip(rows, group_ids)):
        if args.credit_groups == "all" or row.group == 0:
            members.setdefault(group, []).append(i)
    return batch_credit(
        args.credit, trajectories, advantages, list(members.values()),
        shared_thought_weight=args.shared_thought_weight, scale=args.scale_rewards != "none", texts=texts,
        questions=[questions[p] for p, _ in rows], key=key, repairer=repairer, policy=policy,
        success_threshold=args.success_threshold,
    )
