"""Comparison-based credit (diff, state, repair): hand-built groups with hand-computed per-token advantages."""

from __future__ import annotations

import math
import random
from fractions import Fraction

import pytest
import torch

from trl_resets.advantages import group_advantages
from trl_resets.comparison import (
    Repairer,
    RepairRequest,
    Trajectory,
    diff,
    edited_thoughts,
    parse_repair,
    repair_credit,
    repair_pairs,
    repair_prompt,
    shared_thoughts,
    state,
)
from trl_resets.tasks.arithmetic import thought_value


def _traj(keys, reward, tokens_per_thought=2, active_from=0, tail=0):
    spans = [(h * tokens_per_thought, (h + 1) * tokens_per_thought) for h in range(len(keys))]
    return Trajectory(list(keys), spans, len(keys) * tokens_per_thought + tail, reward, active_from)


def _group():
    return [_traj("abxy", 0.0), _traj("abcd", 1.0), _traj("aqcd", 1.0)]


def test_diff_moves_each_rows_advantage_onto_the_thoughts_no_other_outcome_shares():
    got = diff(_group(), [-2.0, 1.0, 1.0])
    # A shares a, b with B (and a with C): its -2 over 8 tokens lands on the 4 tokens of x, y: -2 * 8 / 4 each
    assert got[0] == pytest.approx([0, 0, 0, 0, -4, -4, -4, -4])
    # B's only reference is A (C has B's outcome): a, b shared
    assert got[1] == pytest.approx([0, 0, 0, 0, 2, 2, 2, 2])
    # C aligned with A shares only a: 1 * 8 / 6 on the other six tokens
    assert got[2] == pytest.approx([0, 0] + [8 / 6] * 6)
    for row, advantage in zip(got, [-2.0, 1.0, 1.0]):
        assert sum(row) == pytest.approx(advantage * 8)  # GRPO's total per row


def test_diff_shared_thought_weight_keeps_some_credit_on_shared_thoughts():
    got = diff(_group(), [-2.0, 1.0, 1.0], shared_thought_weight=0.5)
    scale = -2.0 * 8 / (4 * 0.5 + 4 * 1.0)
    assert got[0] == pytest.approx([0.5 * scale] * 4 + [scale] * 4)
    assert diff(_group(), [-2.0, 1.0, 1.0], shared_thought_weight=1.0)[0] == pytest.approx([-2.0] * 8)
    with pytest.raises(ValueError, match=r"shared_thought_weight=1.5 is outside \[0, 1\]"):
        diff(_group(), [-2.0, 1.0, 1.0], shared_thought_weight=1.5)


def test_diff_normalizes_over_trained_tokens_only():
    group = [_traj("abxy", 0.0, active_from=4), _traj("abcd", 1.0, active_from=4)]
    got = diff(group, [-1.0, 1.0])
    assert got[0] == pytest.approx([0, 0, 0, 0, -1, -1, -1, -1])  # the prefix is masked; x, y unshared: uniform
    # a tail outside every thought belongs to the last thought
    tail = [_traj("ab", 0.0, tail=2), _traj("ac", 1.0)]
    assert diff(tail, [-1.0, 1.0])[0] == pytest.approx([0, 0, -1.5, -1.5, -1.5, -1.5])


def test_state_values_the_trie_nodes_by_the_mean_outcome_through_them():
    group = [_traj([1, 2, 9], 0.0, 1), _traj([1, 2, 3], 1.0, 1), _traj([1, 5, 6], 1.0, 1), _traj([7, 8, 9], 0.0, 1)]
    got = state(group, scale=False)
    # root 0.5; node [1] holds A, B, C (2/3); node [1, 2] holds A, B (1/2); then each rollout's own outcome
    assert got[0] == pytest.approx([1 / 6, -1 / 6, -1 / 2])
    assert got[1] == pytest.approx([1 / 6, -1 / 6, 1 / 2])
    assert got[2] == pytest.approx([1 / 6, 1 / 3, 1 / 3])  # C branches off after [1]: one run to its outcome
    assert got[3] == pytest.approx([-1 / 2] * 3)  # D shares nothing: GRPO's centered advantage on every token
    std = math.sqrt(1 / 3)  # sample std of 0, 1, 1, 0
    assert state(group)[0] == pytest.approx([v / (std + 1e-4) for v in got[0]], rel=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_with_nothing_shared_beyond_the_prompt_state_and_diff_are_grpo(seed):
    rng = random.Random(seed)
    rewards = [rng.choice([0.0, 1.0, 0.5, math.nan]) for _ in range(6)] + [0.0, 1.0]
    group = [_traj([(i, h) for h in range(rng.randint(1, 4))], r, tokens_per_thought=rng.randint(1, 3),
                   tail=rng.randint(0, 2)) for i, r in enumerate(rewards)]
    grpo = group_advantages(torch.tensor(rewards), torch.zeros(len(rewards), dtype=torch.long)).tolist()
    for scaled_state, row, advantage in zip(state(group), group, grpo):
        assert scaled_state == pytest.approx([advantage] * row.num_tokens, rel=1e-5, abs=1e-6)
    for diffed, row, advantage in zip(diff(group, grpo), group, grpo):
        assert diffed == pytest.approx([advantage] * row.num_tokens, rel=1e-5, abs=1e-6)


def test_shared_thoughts_counts_alignment_with_any_other_rollout():
    got = shared_thoughts(_group() + [_traj("zz", math.nan)])
    assert got == [[True, True, False, False], [True, True, True, True], [True, False, True, True], [False, False]]


def test_the_arithmetic_state_key_is_the_value_a_thought_computes():
    assert thought_value("so 12 * 3 = 36") == thought_value("then 12 * 3 = 36") == ("value", Fraction(36))
    assert thought_value("7 + 5 = 12 * 3 = 36") == ("value", Fraction(36))
    assert thought_value(r"the answer is \boxed{36}") == ("boxed", "36")
    assert thought_value("  let me think ") == ("text", "let me think")
    correct = ["so 3 + 4 = 7", r"then 7 * 2 = 14, so the answer is \boxed{14}"]
    failed = ["next 3 + 4 = 7", r"now 7 * 2 = 15, so the answer is \boxed{15}"]
    by_text = [_traj(correct, 1.0), _traj(failed, 0.0)]
    by_value = [_traj([thought_value(t) for t in correct], 1.0), _traj([thought_value(t) for t in failed], 0.0)]
    assert shared_thoughts(by_text) == [[False, False], [False, False]]  # the filler words differ
    assert shared_thoughts(by_value) == [[True, False], [True, False]]
    got = state(by_value, scale=False)
    assert got[1] == pytest.approx([0, 0, -0.5, -0.5])  # the shared first step is the group mean: no credit


class ScriptedPolicy:
    def __init__(self, replies):
        self.replies, self.prompts, self.calls = list(replies), [], 0

    def complete(self, prompts, max_new_tokens, temperature):
        self.calls += 1
        self.prompts += prompts
        return [(self.replies.pop(0), 9) for _ in prompts]


def test_a_scripted_repair_reply_puts_the_failed_rows_credit_on_its_edited_thoughts():
    correct = ["3 + 4 = 7", "7 * 2 = 14", r"14 - 1 = 13, so the answer is \boxed{13}"]
    failed = ["3 + 4 = 7", "7 * 2 = 15", r"15 - 1 = 14, so the answer is \boxed{14}"]
    reply = "Sure.\nStep 1: 3 + 4 = 7\nStep 2: 7 * 2 = 14\nStep 3: 14 - 1 = 13, so the answer is \\boxed{13}\n"
    group = [_traj(failed, 0.0), _traj(correct, 1.0), _traj(["9 - 1 = 8", "8 + 1 = 9"], 0.0)]
    assert repair_pairs(group, 1.0) == [(0, 1), (2, 1)]
    policy = ScriptedPolicy([reply, "I cannot"])
    repairs = Repairer(max_new_tokens=50).repair(
        [RepairRequest("Take 3.", failed, correct), RepairRequest("Take 3.", group[2].keys, correct)], policy)
    assert "Step 2: 7 * 2 = 15" in policy.prompts[0] and "Step 2: 7 * 2 = 14" in policy.prompts[0]
    assert repairs[0].thoughts == correct and repairs[0].tokens == 9
    assert repairs[1].thoughts is None
    edits = {0: edited_thoughts(failed, repairs[0].thoughts), 2: None}
    assert edits[0] == [False, True, True]
    advantages = [-1.0, 2.0, -1.0]
    got = repair_credit(group, advantages, edits)
    assert got[0] == pytest.approx([0, 0, -1.5, -1.5, -1.5, -1.5])
    assert got[2] == diff(group, advantages)[2]  # unparsed: diff
    assert got[1] == diff(group, advantages)[1]  # the correct row: diff


def test_repair_calls_the_policy_even_with_nothing_to_repair():
    policy = ScriptedPolicy([])
    assert Repairer().repair([], policy) == []
    assert policy.calls == 1  # a process with no failed row still takes part in a collective policy call


def test_repair_parsing_and_edits():
    assert parse_repair("Step 1: a\nnoise\nStep 2: b") == ["a", "b"]
    assert parse_repair("Step 1: a\nStep 3: b") is None  # numbering skips
    assert parse_repair("no steps") is None and parse_repair(None) is None
    assert edited_thoughts(["a", "b", "c"], ["a", "b", "c"]) is None  # nothing edited: no usable correction
    assert edited_thoughts(["a", "b", "c"], ["a", "c"]) == [False, True, False]  # deleted
    assert edited_thoughts(["a", "c"], ["a", "b", "c"]) == [False, True]  # inserted before c
    assert edited_thoughts(["a", "b"], ["a", "b", "d"]) == [False, True]  # appended: the last thought
    assert "Step 1: w" in repair_prompt(RepairRequest("Q", ["w"], ["r"]))
    with pytest.raises(ValueError, match="unknown placeholder"):
        Repairer(template="{oops}")
