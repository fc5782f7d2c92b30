"""Algorithm 2's output written out field by field for one scripted batch (two prompts, split 2 + 2x2).

Prompt 0 finds both seeds in its first draws; prompt 1 finds one seed within its budget and fills the other
slot with zero-weight rows. One localizer answer is missing (a random index, counted as failed), one suffix has
no sampling logprobs, and the second reward function is NaN on odd draws (left out of the sum).
"""

import math
import random
from dataclasses import asdict

import pytest

from trl_resets.localizers import Localization
from trl_resets.resets import ResetAlgorithm, ResetRecord, Split, TrainingRow, reset_prefix
from trl_resets.thoughts import Rollout, ThoughtFormat

SPANS = [(0, 2), (2, 4), (4, 6)]
NO_LOGPROBS = {17}


def ids(n):
    return [1000 + n, 11, 1000 + n, 12, 1000 + n, 13]


def logprobs(n):
    return None if n in NO_LOGPROBS else [-(n + 1) / 10 - j / 100 for j in range(6)]


class Sampler:
    """Draw n is ``ids(n)``: three 2-token thoughts, stop reason ``s<n>``."""

    def __init__(self):
        self.draws, self.calls = 0, []

    def sample(self, contexts, start_thoughts=None, token_budgets=None):
        self.calls.append(([list(c) for c in contexts], start_thoughts, token_budgets))
        out = []
        for _ in contexts:
            n, self.draws = self.draws, self.draws + 1
            out.append(Rollout(ids(n), list(SPANS), f"s{n}", logprobs(n)))
        return out


# Phase 1: draws 0-3 are prompt 0's (1 and 3 incorrect: its seeds), 4-7 prompt 1's (4 incorrect), then 8-11 a
# second round for prompt 1, all correct: one seed only, one fallback. Draws 12-17 are the suffixes.
CORRECT = {0, 2, 5, 6, 7, 8, 9, 10, 11, 12, 15}


def rewards(n):
    return [1.0 if n in CORRECT else 0.0, math.nan if n % 2 else 0.25]


def reward(n):
    return sum(r for r in rewards(n) if not math.isnan(r))


class Score:
    """Rewards by draw number (second to last token); records who asked and what was scored."""

    def __init__(self):
        self.calls = []

    def __call__(self, owners, completions):
        self.calls.append((list(owners), [list(c) for c in completions]))
        return [rewards(c[-2] - 1000) for c in completions]


class Localizer:
    name = "scripted"

    def __init__(self):
        self.requests, self.seen = [], []

    def locate(self, requests, policy=None, rng=None):
        self.requests.extend(requests)
        self.seen.append((policy, rng))
        return [Localization(2, tokens=3, reply="two"), Localization(2, tokens=3, reply="two"), None][: len(requests)]


def _plain(row):
    return {k: ("nan" if isinstance(v, float) and math.isnan(v) else
                [("nan" if isinstance(x, float) and math.isnan(x) else x) for x in v] if isinstance(v, list) else v)
            for k, v in asdict(row).items()}


def _base(n):
    return TrainingRow(ids(n), 0, 0, rewards(n), reward(n), 1.0, 3, f"s{n}", logprobs(n), list(SPANS))


def _reset(seed, index, n, group):
    prefix = ids(seed)[: SPANS[index - 1][0]]
    lps = None if logprobs(n) is None else logprobs(seed)[: len(prefix)] + logprobs(n)
    spans = SPANS[: index - 1] + [(a + len(prefix), b + len(prefix)) for a, b in SPANS]  # the seed's, then the suffix's
    return TrainingRow(prefix + ids(n), len(prefix), group, rewards(n), reward(n), 1.0, index - 1 + 3, f"s{n}", lps,
                       spans)


def _filler(n, group):
    return TrainingRow(ids(n), 6, group, [math.nan, math.nan], math.nan, 0.0, 3, "", logprobs(n), list(SPANS))


def test_every_row_and_record_of_a_batch():
    sampler, localizer, score, policy, rng = Sampler(), Localizer(), Score(), object(), random.Random(0)
    algo = ResetAlgorithm(Split(2, 2, 2), ThoughtFormat(max_completion_tokens=100), seed_budget=4)
    results = algo.run([[7], [8]], ["q0", "q1"], sampler, score, localizer,
                       describe=lambda r: [f"t{h}" for h in range(r.num_thoughts)], policy=policy, rng=rng)
    # each seed draws from its own generator: "{its prompt's 64 random bits}/{the seed's number}", the bits drawn
    # from the prompts' generator (one shared here), prompt by prompt
    shared = random.Random(0)
    bases = [shared.getrandbits(64) for _ in range(2)]
    missing = random.Random(f"{bases[1]}/0").randint(1, 3)  # the index drawn for the unanswered request

    first, second = results
    assert [_plain(r) for r in first.rows] == [_plain(r) for r in [
        _base(0), _base(2), _reset(1, 2, 12, 1), _reset(1, 2, 13, 1), _reset(3, 2, 14, 2), _reset(3, 2, 15, 2)]]
    assert [_plain(r) for r in second.rows] == [_plain(r) for r in [
        _base(5), _base(6), _reset(4, missing, 16, 1), _reset(4, missing, 17, 1), _filler(4, 2), _filler(5, 2)]]
    assert first.resets == [ResetRecord(3, 2, False, 3, "two", seed_tokens=6)] * 2
    assert second.resets == [ResetRecord(3, missing, True, 0, None, seed_tokens=6)]
    assert (first.fallbacks, first.phase1_draws, first.unused_tokens) == (0, 4, 0)
    assert (second.fallbacks, second.phase1_draws, second.unused_tokens) == (1, 8, 5 * 6)  # draws 7-11 unused
    assert (first.first_draws, second.first_draws, first.empty_seeds, second.empty_seeds) == (4, 4, 0, 0)

    assert [(r.question, r.thoughts) for r in localizer.requests] == [("q0", ["t0", "t1", "t2"])] * 2 + [
        ("q1", ["t0", "t1", "t2"])]
    fresh = [random.Random(f"{bases[p]}/{g}") for p, g in ((0, 0), (0, 1), (1, 0))]
    fresh[2].randint(1, 3)  # the unanswered request's generator has drawn its random reset
    assert [r.rng.getstate() for r in localizer.requests] == [f.getstate() for f in fresh]
    assert localizer.seen == [(policy, localizer.requests[0].rng)]
    prefix = ids(4)[: SPANS[missing - 1][0]]
    # the score function hears which prompt each completion belongs to, and scores reset rows as prefix + suffix
    assert score.calls == [
        ([0] * 4 + [1] * 4, [ids(n) for n in range(8)]),
        ([1] * 4, [ids(n) for n in range(8, 12)]),
        ([0] * 4 + [1] * 2, [ids(1)[:2] + ids(12), ids(1)[:2] + ids(13), ids(3)[:2] + ids(14), ids(3)[:2] + ids(15),
                            prefix + ids(16), prefix + ids(17)]),
    ]
    assert sampler.calls == [
        ([[7]] * 4 + [[8]] * 4, None, None),
        ([[8]] * 4, None, None),
        ([[7, 1001, 11]] * 2 + [[7, 1003, 11]] * 2 + [[8, *prefix]] * 2,
         [1] * 4 + [missing - 1] * 2, [98] * 4 + [100 - len(prefix)] * 2),
    ]


def test_a_rollout_whose_rewards_are_all_nan_is_never_a_seed():
    algo = ResetAlgorithm(Split(2, 1, 2), ThoughtFormat(max_completion_tokens=100), seed_budget=0)
    results = algo.run([[7]], ["q"], Sampler(), lambda owners, completions: [[math.nan, math.nan]] * len(completions),
                       Localizer(), describe=lambda r: ["t"] * 3, rng=random.Random(0))
    (only,) = results
    assert only.fallbacks == 1 and only.resets == []
    assert all(math.isnan(r.reward) for r in only.rows)


def test_error_messages_name_the_values_seen():
    rollout = Rollout(ids(0), list(SPANS), "s0")
    with pytest.raises(ValueError, match=r"reset index 4 is outside 1\.\.3 \(the seed's thoughts\)"):
        reset_prefix(rollout, 4)
    algo = ResetAlgorithm(Split(2, 1, 2), ThoughtFormat(max_completion_tokens=100))
    with pytest.raises(ValueError, match="score function returned 1 results for 3 completions"):
        algo.run([[7]], ["q"], Sampler(), lambda owners, completions: [[0.0]], Localizer(),
                 describe=lambda r: ["t"] * 3)

    class Silent:
        name = "silent"

        def locate(self, requests, policy=None, rng=None):
            return []

    with pytest.raises(ValueError, match="localizer 'silent' answered 0 of 1 requests"):
        algo.run([[7]], ["q"], Sampler(), Score(), Silent(), describe=lambda r: ["t"] * 3)


def test_smallest_valid_splits():
    assert Split(0, 1, 2).num_generations == 2  # one shared-prefix group of two
    assert Split(2, 0, 4).num_generations == 2  # plain GRPO on two rollouts
