"""Property-based tests (hypothesis): thought segmentation, localization parsing, Algorithm 2, advantages.

The policy here is a byte-level vocabulary with hostile pieces in it: the delimiter as one token and split
across tokens, boxes, blank lines, EOS, and the two halves of a multi-byte character (so decoding sees
invalid UTF-8 mid-rollout). Any sequence of these must segment within the caps and build well-formed groups.
"""

from __future__ import annotations

import math
import random

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from trl_resets.advantages import group_advantages
from trl_resets.localizers import Localization, parse_step_index, resolve_reset_index
from trl_resets.resets import BASE_GROUP, ResetAlgorithm, Split
from trl_resets.thoughts import (
    STOP_ANSWER,
    STOP_EOS,
    STOP_MAX_THOUGHTS,
    STOP_MAX_TOKENS,
    STOP_NONE,
    Rollout,
    ThoughtFormat,
    contains_final_answer,
    segment_thoughts,
)

EOS = 0
PIECES = [b"<eos>", b"a", b"1", b" ", b"+", b"=", b"</thought>", b"</th", b"ought>", b"\\boxed{", b"}", b"\n\n",
          b"\n", "é".encode()[:1], "é".encode()[1:], "€".encode(), b"\xff", b"step "]


def decode(ids) -> str:
    return b"".join(PIECES[i] for i in ids).decode("utf-8", errors="replace")


tokens = st.lists(st.integers(1, len(PIECES) - 1), max_size=80)
formats = st.builds(
    ThoughtFormat,
    split=st.sampled_from(["delimiter", "paragraph"]),
    max_thoughts=st.integers(1, 6),
    max_thought_tokens=st.integers(1, 12),
    max_completion_tokens=st.integers(1, 60),
)
STOPS = {STOP_ANSWER, STOP_EOS, STOP_MAX_THOUGHTS, STOP_MAX_TOKENS, STOP_NONE}


def check_rollout(r: Rollout, given_ids, fmt: ThoughtFormat, start: int, budget: int) -> None:
    assert r.token_ids == list(given_ids[: len(r.token_ids)])  # exactly the sampled ids, cut where it stopped
    assert len(r.token_ids) <= budget
    assert r.stop_reason in STOPS
    ends = [0] + [end for _, end in r.thought_spans]
    assert [s for s, _ in r.thought_spans] == ends[:-1] and ends[-1] == len(r.token_ids)  # contiguous cover
    for s, e in r.thought_spans:
        assert e > s
        # a thought holds at most the cap, plus the EOS that closes the rollout right after it
        assert e - s <= fmt.max_thought_tokens or (e - s == fmt.max_thought_tokens + 1 and r.token_ids[e - 1] == EOS)
    assert start + r.num_thoughts <= max(fmt.max_thoughts, start + 1)
    if r.stop_reason == STOP_ANSWER:
        assert contains_final_answer(decode(r.thought_ids(r.num_thoughts - 1)))


@settings(max_examples=300, deadline=None)
@given(ids=tokens, eos_at=st.one_of(st.none(), st.integers(0, 80)), fmt=formats, start=st.integers(0, 3),
       budget=st.integers(1, 60))
def test_segmentation_stays_within_every_cap_on_any_token_sequence(ids, eos_at, fmt, start, budget):
    if eos_at is not None:
        ids = ids[:eos_at] + [EOS] + ids[eos_at:]
    budget = min(budget, fmt.max_completion_tokens)
    r = segment_thoughts(ids, decode, fmt, [EOS], start_thoughts=start, token_budget=budget)
    check_rollout(r, ids, fmt, start, budget)
    again = segment_thoughts(r.token_ids, decode, fmt, [EOS], start_thoughts=start, token_budget=budget)
    assert again.thought_spans == r.thought_spans  # segmenting what was kept gives the same thoughts


@settings(max_examples=300, deadline=None)
@given(reply=st.one_of(st.none(), st.text(max_size=60)), num_steps=st.integers(1, 30))
def test_any_localization_reply_gives_a_step_in_range_or_none(reply, num_steps):
    index = parse_step_index(reply, num_steps)
    assert index is None or 1 <= index <= num_steps
    h, failed = resolve_reset_index(Localization(index), num_steps, random.Random(0))
    assert 1 <= h <= num_steps and failed == (index is None)


@given(prose=st.text(alphabet=st.characters(blacklist_characters="\\"), max_size=40), num_steps=st.integers(1, 30),
       index=st.integers(1, 30))
def test_the_last_box_holding_a_step_number_is_read(prose, num_steps, index):
    reply = f"{prose} \\boxed{{{num_steps + 1}}} then \\boxed{{{index}}}"
    assert parse_step_index(reply, num_steps) == (index if index <= num_steps else None)


class RandomPolicy:
    """Samples token sequences from PIECES with a seeded generator and cuts them as a backend does."""

    def __init__(self, fmt: ThoughtFormat, seed: int):
        self.fmt, self.rng = fmt, random.Random(seed)
        self.produced: list[Rollout] = []

    def sample(self, contexts, start_thoughts=None, token_budgets=None):
        out = []
        for i, _ in enumerate(contexts):
            start = start_thoughts[i] if start_thoughts else 0
            budget = token_budgets[i] if token_budgets else self.fmt.max_completion_tokens
            ids = [self.rng.randrange(len(PIECES)) for _ in range(self.rng.randint(0, 40))]
            r = segment_thoughts(ids, decode, self.fmt, [EOS], start_thoughts=start, token_budget=max(budget, 1))
            check_rollout(r, ids, self.fmt, start, max(budget, 1))
            out.append(r)
        self.produced += out
        return out


class AnyAnswerLocalizer:
    """Answers with whatever the test drew: in range, out of range, None, a bool, a float, a string."""

    name = "any"

    def __init__(self, answers):
        self.answers = answers

    def locate(self, requests, policy=None, rng=None):
        return [Localization(self.answers[i % len(self.answers)]) for i in range(len(requests))]


splits = st.sampled_from([Split(4, 1, 4), Split(2, 2, 4), Split(0, 1, 8), Split(4, 0, 4), Split(2, 1, 2)])
answers = st.lists(st.one_of(st.none(), st.integers(-3, 12), st.booleans(), st.floats(allow_nan=True)), min_size=1)


@settings(max_examples=120, deadline=None)
@given(split=splits, fmt=formats, seed=st.integers(0, 10_000), prompts=st.integers(1, 3),
       budget=st.integers(0, 6), answers=answers, threshold=st.sampled_from([0.5, 1.0, 2.0]))
def test_algorithm_2_builds_well_formed_groups_for_any_policy_and_localizer(
        split, fmt, seed, prompts, budget, answers, threshold):
    rng = random.Random(seed)

    def score(owners, completions):  # a random verdict per completion; some are unscorable (NaN)
        return [[rng.choice([0.0, 1.0, math.nan])] for _ in completions]

    policy = RandomPolicy(fmt, seed)
    contexts = [[100 + p] for p in range(prompts)]
    results = ResetAlgorithm(split, fmt, seed_budget=budget, success_threshold=threshold).run(
        contexts, [f"q{p}" for p in range(prompts)], policy, score, AnyAnswerLocalizer(answers),
        describe=lambda r: [decode(r.thought_ids(h)) for h in range(r.num_thoughts)], rng=random.Random(seed))
    assert len(results) == prompts
    for result in results:
        assert result.phase1_draws <= split.num_base_generations + split.num_reset_prefixes + budget
        base = [row for row in result.rows if row.group == BASE_GROUP]
        assert all(row.prefix_len == 0 and row.weight == 1.0 for row in base)
        assert len(result.resets) + result.fallbacks == split.num_reset_prefixes
        for group in range(1, split.num_reset_prefixes + 1):
            rows = [row for row in result.rows if row.group == group]
            assert len(rows) == split.num_reset_generations
            if group <= len(result.resets):
                record = result.resets[group - 1]
                assert 1 <= record.reset_index <= record.num_thoughts
                prefix = rows[0].completion_ids[: rows[0].prefix_len]
                assert all(row.completion_ids[: row.prefix_len] == prefix and row.weight == 1.0 for row in rows)
                # the reset state is a drawn rollout's first h*-1 thoughts, cut on its thought boundary
                assert any(r.num_thoughts == record.num_thoughts
                           and prefix == r.token_ids[: r.thought_spans[record.reset_index - 1][0]]
                           for r in policy.produced)
                assert all(row.active_tokens >= 0 for row in rows)
                assert len(prefix) + max(row.active_tokens for row in rows) <= fmt.max_completion_tokens
            else:  # a fallback slot: filler rows that train nothing
                assert all(row.weight == 0.0 and row.prefix_len == len(row.completion_ids) for row in rows)
                assert all(math.isnan(row.reward) for row in rows)
        assert len(result.rows) == split.num_generations  # phase 1 draws G1 + k, so the base group is always full


@settings(max_examples=200, deadline=None)
@given(rewards=st.lists(st.one_of(st.sampled_from([0.0, 1.0, 0.5]), st.floats(-5, 5), st.just(math.nan)),
                        min_size=1, max_size=24),
       groups=st.lists(st.integers(0, 3), min_size=24, max_size=24), scale=st.booleans())
def test_each_groups_advantages_sum_to_zero_or_are_all_zero(rewards, groups, scale):
    r = torch.tensor(rewards, dtype=torch.float64)
    g = torch.tensor(groups[: len(rewards)])
    a = group_advantages(r, g, scale=scale)
    assert torch.isfinite(a).all()
    assert (a[torch.isnan(r)] == 0).all()
    for group in torch.unique(g):
        members = (g == group) & ~torch.isnan(r)
        values = a[members]
        assert abs(float(values.sum())) < 1e-4 * max(1, len(values))
        if members.sum() < 2 or float(r[members].max() - r[members].min()) == 0:
            assert (values == 0).all()
