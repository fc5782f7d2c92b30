"""Comparison-based per-token credit from one group of rollouts: ``diff``, ``state`` and ``repair``.

Our own instantiation of the description of IBPO (Implicit Behavior Policy Optimization, Ding et al. 2026):
where a group's trajectories for the same input differ, the difference stands in for an alternative decision,
and token-level credit goes to the differing tokens rather than uniformly to the whole rollout. IBPO's exact
estimator is not public; these are ours.

Every rollout is a `Trajectory`: one hashable key per thought (its exact text by default, or a user's state key,
such as the value a math thought computes), the thoughts' token spans, its reward, and where its trained tokens
begin (a reset row's prefix carries no loss). Each estimator returns one advantage per token of each rollout
(0 on tokens before ``active_from``); GRPO's per-row advantage is the case where all of a row's tokens carry the
same value.

* `diff`: a rollout's references are the group's rollouts with another reward. Its thoughts are aligned with each
  reference's (`difflib.SequenceMatcher` over the keys); thoughts some reference shares weigh
  ``shared_thought_weight``, the others 1, and the row's advantage is spread in proportion to those weights so
  that its sum over the row's trained tokens equals GRPO's (credit moves along the rollout, it is not inflated).
* `state`: a trie of the group's rollouts by key. A node's value is the mean reward of the rollouts through it,
  a rollout's last thought leads to its own outcome, and a thought's advantage is the value of the node it leads
  to minus that of the node it leaves, scaled as GRPO scales. Thoughts that lead to a node with the same rollouts
  as the node before (no branching) share the step of the run they belong to, so a run of thoughts between two
  branchings carries one value. With no state shared beyond the prompt every rollout is one run from the root
  (the group mean) to its outcome: exactly GRPO's centered advantage on every token.
* `repair` (compare and correct): the policy sees a failed rollout beside a correct one of its group and writes a
  minimally corrected version (`repair_prompt`, `parse_repair`); the failed rollout's thoughts that the
  correction edits (`edited_thoughts`) weigh 1, the others ``shared_thought_weight``, normalized as in `diff`.
  Replies that do not parse, or that edit nothing, fall back to `diff` for that rollout (counted by the caller).
"""

from __future__ import annotations

import math
import re
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from difflib import SequenceMatcher

import torch

from .localizers import TextPolicy, render_steps

# `state_key` names -> a function from a thought's text to the key thoughts are compared by. A task adds its own
# with `register_state_key` (the arithmetic task registers "arithmetic").
STATE_KEYS: dict = {"text": str.strip}


def register_state_key(name: str, key) -> None:
    """Make ``state_key=name`` compare thoughts by ``key(thought_text)``."""
    if not callable(key):
        raise TypeError(f"state key {name!r} must be a callable (thought text -> hashable key).")
    STATE_KEYS[name] = key


@dataclass(frozen=True)
class Trajectory:
    """One rollout of a group as the estimators see it.

    Args:
        keys: one hashable key per thought (exact text, or a state key).
        spans: ``[start, end)`` token offsets of each thought in the row's completion.
        num_tokens: the row's completion length; tokens outside every thought (a cut-off tail) belong to the last.
        reward: the row's reward; NaN leaves the row out (advantage 0).
        active_from: the first token that carries loss (a reset row's prefix length; 0 for a base row).
    """

    keys: Sequence[Hashable]
    spans: Sequence[tuple[int, int]]
    num_tokens: int
    reward: float
    active_from: int = 0

    def __post_init__(self):
        if len(self.keys) != len(self.spans):
            raise ValueError(f"a trajectory has {len(self.keys)} keys for {len(self.spans)} thought spans.")
        if not 0 <= self.active_from <= self.num_tokens:
            raise ValueError(f"active_from={self.active_from} is outside 0..{self.num_tokens} (the row's tokens).")

    @property
    def valid(self) -> bool:
        return not math.isnan(self.reward)


def _token_thoughts(traj: Trajectory) -> list[int]:
    """The thought (0-based) each token belongs to; tokens outside every thought belong to the nearest one before
    them (the first thought for leading ones); -1 for every token of a rollout with no thought."""
    owner = [-1] * traj.num_tokens
    for h, (start, end) in enumerate(traj.spans):
        for t in range(start, min(end, traj.num_tokens)):
            owner[t] = h
    last = 0 if traj.spans else -1
    for t in range(traj.num_tokens):
        if owner[t] == -1:
            owner[t] = last
        last = owner[t]
    return owner


def matched_thoughts(keys: Sequence[Hashable], other: Sequence[Hashable]) -> list[bool]:
    """For each of ``keys``, whether the alignment of the two key sequences (``SequenceMatcher``) matches it."""
    shared = [False] * len(keys)
    for block in SequenceMatcher(None, list(keys), list(other), autojunk=False).get_matching_blocks():
        for h in range(block.a, block.a + block.size):
            shared[h] = True
    return shared


def shared_with_any(group: Sequence[Trajectory], index: int, references: Sequence[int]) -> list[bool]:
    """For each thought of ``group[index]``, whether the alignment with some reference matches it."""
    shared = [False] * len(group[index].keys)
    for j in references:
        shared = [a or b for a, b in zip(shared, matched_thoughts(group[index].keys, group[j].keys))]
    return shared


def spread(traj: Trajectory, advantage: float, thought_weights: Sequence[float]) -> list[float]:
    """``advantage`` spread over the row's trained tokens in proportion to their thought's weight, so that the sum
    over those tokens is ``advantage`` times their number (GRPO's total). All weights 0 (or no thought): uniform."""
    owner = _token_thoughts(traj)
    active = range(traj.active_from, traj.num_tokens)
    weights = [thought_weights[owner[t]] if owner[t] >= 0 else 1.0 for t in active]
    total = sum(weights)
    if total <= 0:
        weights, total = [1.0] * len(weights), float(len(weights))
    scale = advantage * len(weights) / total if total else 0.0
    return [0.0] * traj.active_from + [w * scale for w in weights]


def uniform(traj: Trajectory, advantage: float) -> list[float]:
    """GRPO's credit: ``advantage`` on every trained token."""
    return [0.0] * traj.active_from + [float(advantage)] * (traj.num_tokens - traj.active_from)


def _check(group: Sequence[Trajectory], advantages: Sequence[float], shared_thought_weight: float) -> None:
    if len(group) != len(advantages):
        raise ValueError(f"{len(group)} trajectories and {len(advantages)} advantages: give one advantage per row.")
    if not 0.0 <= shared_thought_weight <= 1.0:
        raise ValueError(f"shared_thought_weight={shared_thought_weight} is outside [0, 1].")


def diff_references(group: Sequence[Trajectory], index: int) -> list[int]:
    """The rollouts of the group whose reward differs from ``group[index]``'s (the other outcome)."""
    me = group[index]
    return [j for j, other in enumerate(group) if j != index and other.valid and other.reward != me.reward]


def diff(group: Sequence[Trajectory], advantages: Sequence[float], shared_thought_weight: float = 0.0) -> list[list[float]]:
    """Per-token advantages: each row's advantage (GRPO's, given) moved onto the thoughts that no rollout with
    the other outcome shares; shared thoughts weigh ``shared_thought_weight``."""
    _check(group, advantages, shared_thought_weight)
    out = []
    for i, (traj, advantage) in enumerate(zip(group, advantages)):
        references = diff_references(group, i) if traj.valid else []
        if not references or advantage == 0:
            out.append(uniform(traj, advantage if traj.valid else 0.0))
            continue
        shared = shared_with_any(group, i, references)
        out.append(spread(traj, advantage, [shared_thought_weight if s else 1.0 for s in shared]))
    return out


def _runs(group: Sequence[Trajectory], index: int) -> list[tuple[int, int, frozenset]]:
    """The rollout's thoughts cut where its trie node's members change: (first, end, members) per run."""
    keys = group[index].keys
    members = frozenset(j for j, t in enumerate(group) if t.valid)
    runs: list[tuple[int, int, frozenset]] = []
    for h in range(len(keys)):
        members = frozenset(j for j in members if len(group[j].keys) > h and group[j].keys[h] == keys[h])
        if runs and runs[-1][2] == members:
            runs[-1] = (runs[-1][0], h + 1, members)
        else:
            runs.append((h, h + 1, members))
    return runs


def state(group: Sequence[Trajectory], scale: bool = True, eps: float = 1e-4) -> list[list[float]]:
    """Per-token advantages from the group's trie by thought key (see the module docstring), normalized by the
    group's sample std plus ``eps`` as `group_advantages` normalizes (``scale=False``: centered only)."""
    valid = [t.reward for t in group if t.valid]
    if len(valid) < 2:
        return [uniform(t, 0.0) for t in group]
    values = torch.tensor(valid, dtype=torch.float32)
    factor = 1.0 / (float(values.std()) + eps) if scale else 1.0
    root = float(values.mean())
    out = []
    for i, traj in enumerate(group):
        if not traj.valid:
            out.append(uniform(traj, 0.0))
            continue
        runs = _runs(group, i)
        if not runs:
            out.append(uniform(traj, (traj.reward - root) * factor))
            continue
        steps, before = [], root
        for n, (_, _, members) in enumerate(runs):
            value = traj.reward if n == len(runs) - 1 else sum(group[j].reward for j in members) / len(members)
            steps.append((value - before) * factor)
            before = value
        run_of = [n for n, (first, end, _) in enumerate(runs) for _ in range(first, end)]
        owner = _token_thoughts(traj)
        out.append([0.0] * traj.active_from + [steps[run_of[owner[t]]] for t in range(traj.active_from, traj.num_tokens)])
    return out


def shared_thoughts(group: Sequence[Trajectory]) -> list[list[bool]]:
    """For each thought of each valid rollout, whether the alignment with some other valid rollout of the group
    matches it (the quantity the comparison estimators live on); invalid rows: all False."""
    valid = [j for j, t in enumerate(group) if t.valid]
    return [shared_with_any(group, i, [j for j in valid if j != i]) if t.valid else [False] * len(t.keys)
            for i, t in enumerate(group)]


# ---------------------------------------------------------------------------------------------- repair

# Our own wording of a compare-and-correct instruction.
DEFAULT_REPAIR_TEMPLATE = (
    "Below is a problem, a correct solution to it and a wrong solution to it.\n\n"
    "Problem: {question}\n\n"
    "Correct solution:\n{reference}\n\n"
    "Wrong solution:\n{steps}\n\n"
    "Rewrite the wrong solution with as few changes as possible so that it is correct. Copy every step that is "
    "right word for word, fix the first wrong step and what depends on it, and keep the wrong solution's own "
    "wording. Write every step of the corrected solution as `Step N: ...` on its own line, numbered from 1, and "
    "nothing else."
)
_STEP_LINE = re.compile(r"^\s*Step\s+(\d+)\s*:\s?(.*?)\s*$", re.IGNORECASE)


@dataclass
class RepairRequest:
    """A failed rollout (its thoughts' text) shown beside a correct reference from its group."""

    question: str
    thoughts: list[str]
    reference: list[str]


@dataclass
class Repair:
    """The policy's correction: its thoughts (None when the reply did not parse), the reply and its length."""

    thoughts: list[str] | None
    tokens: int = 0
    reply: str | None = None


def repair_prompt(request: RepairRequest, template: str = DEFAULT_REPAIR_TEMPLATE) -> str:
    try:
        return template.format(question=request.question, steps=render_steps(request.thoughts),
                               reference=render_steps(request.reference), num_steps=len(request.thoughts))
    except (KeyError, IndexError) as err:
        raise ValueError(
            f"repair template has an unknown placeholder {err}; it may use {{question}}, {{reference}}, {{steps}} "
            "and {num_steps} (write literal braces as {{ and }})."
        ) from None


def parse_repair(reply: str | None) -> list[str] | None:
    """The corrected thoughts: the reply's ``Step N: ...`` lines, which must be numbered 1, 2, ... in order; None
    when there are none or the numbering skips (other lines are ignored)."""
    if not reply:
        return None
    steps = []
    for line in reply.splitlines():
        match = _STEP_LINE.match(line)
        if match:
            if int(match.group(1)) != len(steps) + 1:
                return None
            steps.append(match.group(2))
    return steps or None


def edited_thoughts(failed: Sequence[Hashable], corrected: Sequence[Hashable]) -> list[bool] | None:
    """Which thoughts of the failed rollout the correction edits (replaced or deleted in the alignment of the
    keys; a step the correction inserts marks the failed thought at that place, or the last one at the end).
    None when the correction edits nothing."""
    if not failed:
        return None
    edited = [False] * len(failed)
    for tag, a0, a1, _, _ in SequenceMatcher(None, list(failed), list(corrected), autojunk=False).get_opcodes():
        if tag in ("replace", "delete"):
            for h in range(a0, a1):
                edited[h] = True
        elif tag == "insert":
            edited[min(a0, len(failed) - 1)] = True
    return edited if any(edited) else None


def repair_pairs(group: Sequence[Trajectory], success_threshold: float) -> list[tuple[int, int]]:
    """(failed, reference) per failed rollout of a group that has a correct one: the reference is the correct
    rollout most similar to it (``SequenceMatcher.ratio`` over the keys; the first on ties)."""
    correct = [j for j, t in enumerate(group) if t.valid and t.reward >= success_threshold]
    pairs = []
    for i, traj in enumerate(group):
        if not correct or not traj.valid or traj.reward >= success_threshold or not traj.keys:
            continue
        ratios = [SequenceMatcher(None, list(traj.keys), list(group[j].keys), autojunk=False).ratio()
                  for j in correct]
        pairs.append((i, correct[ratios.index(max(ratios))]))
    return pairs


class Repairer:
    """Asks the policy, in one batched call, for the minimal correction of each failed rollout."""

    def __init__(self, template: str = DEFAULT_REPAIR_TEMPLATE, max_new_tokens: int = 256, temperature: float = 0.0):
        repair_prompt(RepairRequest("q", ["s"], ["r"]), template)  # fail early on a broken template
        if max_new_tokens < 1:
            raise ValueError(f"repair max_new_tokens must be at least 1, got {max_new_tokens}.")
        self.template, self.max_new_tokens, self.temperature = template, max_new_tokens, temperature

    def repair(self, requests: Sequence[RepairRequest], policy: TextPolicy) -> list[Repair]:
        """One reply per request. The policy is called even with no request: under data parallelism its call may be
        collective (every process must take part in each one)."""
        replies = policy.complete([repair_prompt(r, self.template) for r in requests], self.max_new_tokens,
                                  self.temperature)
        if len(replies) != len(requests):
            raise ValueError(f"the policy answered {len(replies)} of {len(requests)} repair prompts.")
        return [Repair(parse_repair(text), tokens, text) for text, tokens in replies]


def repair_credit(group: Sequence[Trajectory], advantages: Sequence[float], edits: dict[int, list[bool] | None],
                  shared_thought_weight: float = 0.0) -> list[list[float]]:
    """Per-token advantages: `diff` for every row, except the failed rows in ``edits`` with a usable correction
    (a list of edited thoughts), whose advantage goes to the edited thoughts (unedited ones weigh
    ``shared_thought_weight``), normalized as in `diff`. An entry of None (unparsed, nothing edited) keeps `diff`."""
    out = diff(group, advantages, shared_thought_weight)
    for i, edited in edits.items():
        if edited is None or not group[i].valid:
            continue
        if len(edited) != len(group[i].keys):
            raise ValueError(f"row {i}: {len(edited)} edit flags for {len(group[i].keys)} thoughts.")
        out[i] = spread(group[i], advantages[i], [1.0 if e else shared_thought_weight for e in edited])
    return out


# ---------------------------------------------------------------------------------------------- a batch

ESTIMATORS = ("uniform", "diff", "state", "repair")


@dataclass
class BatchCredit:
    """Per-token advantages of every row of a batch, and what the metrics count (see `metrics.credit_step_sums`)."""

    token_advantages: list[list[float]]
    credited_rows: list[int]
    shared: int = 0
    thoughts: int = 0
    repairs_used: int = 0
    repairs: int = 0
    repair_tokens: int = 0


def batch_credit(
    method: str,
    rows: Sequence[Trajectory],
    advantages: Sequence[float],
    groups: Sequence[Sequence[int]],
    shared_thought_weight: float = 0.0,
    scale: bool = True,
    texts: Sequence[Sequence[str]] | None = None,
    questions: Sequence[str] | None = None,
    key=None,
    repairer: Repairer | None = None,
    policy: TextPolicy | None = None,
    success_threshold: float = 1.0,
) -> BatchCredit:
    """The estimator ``method`` on each of ``groups`` (lists of row indices); rows outside them keep uniform credit.

    ``repair`` needs each row's thought ``texts``, its ``questions``, the ``key`` that turns a corrected thought's
    text into the key its rows were built with, a ``repairer`` and the ``policy``; all failed rows of the batch go
    to the policy in one call.
    """
    if method not in ESTIMATORS:
        raise ValueError(f"unknown credit estimator {method!r}; use one of {list(ESTIMATORS)}.")
    if len(rows) != len(advantages):
        raise ValueError(f"{len(rows)} rows and {len(advantages)} advantages: give one advantage per row.")
    out = BatchCredit([uniform(r, a) for r, a in zip(rows, advantages)], sorted(i for g in groups for i in g))
    if method == "uniform":
        return out
    members = [[rows[i] for i in g] for g in groups]
    edits: list[dict[int, list[bool] | None]] = [{} for _ in groups]
    if method == "repair":
        if texts is None or questions is None or key is None or repairer is None or policy is None:
            raise ValueError("credit='repair' needs the rows' thought texts, questions, a key, a repairer and a policy.")
        jobs = [(n, a, b) for n, group in enumerate(members) for a, b in repair_pairs(group, success_threshold)]
        requests = [RepairRequest(questions[groups[n][a]], list(texts[groups[n][a]]), list(texts[groups[n][b]]))
                    for n, a, b in jobs]
        for (n, a, _), result in zip(jobs, repairer.repair(requests, policy)):
            edited = None if result.thoughts is None else edited_thoughts(members[n][a].keys,
                                                                          [key(t) for t in result.thoughts])
            edits[n][a] = edited
            out.repairs += 1
            out.repairs_used += edited is not None
            out.repair_tokens += result.tokens
    for n, (group, trajs) in enumerate(zip(groups, members)):
        advs = [advantages[i] for i in group]
        if method == "diff":
            credit = diff(trajs, advs, shared_thought_weight)
        elif method == "state":
            credit = state(trajs, scale=scale)
        else:
            credit = repair_credit(trajs, advs, edits[n], shared_thought_weight)
        for i, values in zip(group, credit):
            out.token_advantages[i] = values
        for traj, flags in zip(trajs, shared_thoughts(trajs)):
            trained = [s for (start, _), s in zip(traj.spans, flags) if start >= traj.active_from]
            out.shared += sum(trained)
            out.thoughts += len(trained) if traj.valid else 0
    return out
