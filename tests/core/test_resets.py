"""Algorithm 2 on a scripted policy with scripted rewards."""

import math
import random
import statistics

import pytest

from trl_resets.localizers import CallableLocalizer, Localization, RandomLocalizer
from trl_resets.resets import ResetAlgorithm, SeedGenerators, Split, choose_seeds, reset_prefix
from trl_resets.thoughts import Rollout, ThoughtFormat


class ScriptedSampler:
    """Draw n gets token ids [1000+n, 11, 1000+n, 12, 1000+n, 13] (three 2-token thoughts)."""

    def __init__(self):
        self.draws = 0
        self.calls = []

    def sample(self, contexts, start_thoughts=None, token_budgets=None):
        self.calls.append((contexts, start_thoughts, token_budgets))
        out = []
        for _ in contexts:
            n, self.draws = self.draws, self.draws + 1
            ids = [1000 + n, 11, 1000 + n, 12, 1000 + n, 13]
            out.append(Rollout(ids, [(0, 2), (2, 4), (4, 6)], "answer"))
        return out


def scripted_score(correct_draws):
    """Reward 1 for draws listed in ``correct_draws``; the draw number sits second to last in a completion."""

    def score(owners, completions):
        return [[1.0 if c[-2] - 1000 in correct_draws else 0.0] for c in completions]

    return score


class FixedLocalizer:
    name = "fixed"

    def __init__(self, index):
        self.index, self.requests = index, []

    def locate(self, requests, policy=None, rng=None):
        self.requests.append(list(requests))
        return [Localization(self.index, tokens=3) for _ in requests]


def run(split, correct, localizer, prompts=1, budget=4, fmt=None, base_group="algorithm2"):
    sampler = ScriptedSampler()
    algo = ResetAlgorithm(split, fmt or ThoughtFormat(max_completion_tokens=100), seed_budget=budget,
                          base_group=base_group)
    contexts = [[7, 7 + p] for p in range(prompts)]
    results = algo.run(contexts, [f"q{p}" for p in range(prompts)], sampler, scripted_score(correct), localizer,
                       describe=lambda r: ["t"] * r.num_thoughts, rng=random.Random(0))
    return results, sampler


def draw_of(row):
    return row.completion_ids[-2] - 1000


@pytest.mark.parametrize("split", [(1, 1, 4), (4, 1, 1), (0, 0, 4), (1, 0, 4)])
def test_a_split_with_a_group_of_one_row_or_no_rows_is_refused(split):
    with pytest.raises(ValueError, match="num_base_generations|num_reset_generations|no rollouts"):
        Split(*split)


def test_choose_seeds_excludes_seed_from_base():
    assert choose_seeds([False, True, False, False, False], Split(4, 1, 4)) == ([1], [0, 2, 3, 4])
    assert choose_seeds([True, False, True, True], Split(2, 2, 4)) == ([0, 2], [1, 3])
    assert choose_seeds([False, False], Split(4, 1, 4)) == ([], [0, 1])


def test_1x4_seed_base_and_reset_prefix_ids():
    # draws 0..4 in phase 1; draw 1 is the first incorrect one -> the seed
    loc = FixedLocalizer(2)
    (res,), sampler = run(Split(4, 1, 4), correct={0, 2, 3, 4, 5, 7}, localizer=loc)
    base, reset = res.rows[:4], res.rows[4:]
    assert [draw_of(r) for r in base] == [0, 2, 3, 4] and all(r.group == 0 and r.prefix_len == 0 for r in base)
    seed_prefix = [1001, 11]  # the seed's first h*-1 = 1 thought, its exact ids
    contexts, starts, budgets = sampler.calls[-1]
    assert contexts == [[7, 7] + seed_prefix] * 4 and starts == [1] * 4 and budgets == [98] * 4
    assert all(r.completion_ids[:2] == seed_prefix and r.prefix_len == 2 and r.group == 1 for r in reset)
    assert [r.reward for r in reset] == [1.0, 0.0, 1.0, 0.0]  # draws 5..8 scored on prefix + suffix
    assert res.resets[0].reset_index == 2 and not res.resets[0].localizer_failed
    assert res.fallbacks == 0 and res.phase1_draws == 5
    assert loc.requests[0][0].question == "q0" and loc.requests[0][0].num_steps == 3


def test_reset_to_prompt_when_h_star_is_one():
    (res,), sampler = run(Split(4, 1, 4), correct=set(), localizer=FixedLocalizer(1))
    contexts, starts, _ = sampler.calls[-1]
    assert contexts == [[7, 7]] * 4 and starts == [0] * 4
    assert all(r.prefix_len == 0 for r in res.rows[4:])
    assert reset_prefix(Rollout([1, 2, 3], [(0, 1), (1, 3)], "eos"), 1) == []
    with pytest.raises(ValueError):
        reset_prefix(Rollout([1, 2, 3], [(0, 1), (1, 3)], "eos"), 3)


def test_fallback_when_no_incorrect_rollout_within_budget():
    (res,), sampler = run(Split(4, 1, 4), correct=set(range(100)), localizer=FixedLocalizer(2), budget=3)
    assert res.fallbacks == 1 and res.resets == []
    assert res.phase1_draws == 5 + 3  # the first G1+k draws, then the whole seed budget
    fillers = res.rows[4:]
    assert len(res.rows) == 8
    assert all(r.weight == 0.0 and math.isnan(r.reward) and r.prefix_len == len(r.completion_ids) for r in fillers)
    assert sampler.calls[-1][0] == []  # nothing to resample


def test_seed_budget_finds_a_late_seed():
    correct = set(range(100)) - {6}
    (res,), _ = run(Split(4, 1, 4), correct=correct, localizer=FixedLocalizer(3), budget=8)
    assert res.fallbacks == 0 and res.phase1_draws == 10  # second round of 5 draws holds draw 6
    assert [draw_of(r) for r in res.rows[:4]] == [0, 1, 2, 3]
    assert res.rows[4].completion_ids[:4] == [1006, 11, 1006, 12]
    assert res.unused_tokens == 5 * 6  # draws 4, 5, 7, 8, 9 were drawn but not used


def test_2x4_two_seeds_two_groups():
    (res,), _ = run(Split(0, 2, 4), correct={1}, localizer=FixedLocalizer(2))
    assert len(res.rows) == 8 and [r.group for r in res.rows] == [1] * 4 + [2] * 4
    assert res.rows[0].completion_ids[:2] == [1000, 11] and res.rows[4].completion_ids[:2] == [1002, 11]
    assert res.phase1_draws == 4  # 2 drawn, one seed short, 2 more


def test_1x8_single_prefix_eight_suffixes():
    (res,), sampler = run(Split(0, 1, 8), correct=set(), localizer=FixedLocalizer(3))
    assert len(res.rows) == 8 and all(r.group == 1 for r in res.rows) and res.phase1_draws == 1
    assert len(sampler.calls[-1][0]) == 8


def test_localizer_answers_are_validated_and_counted():
    for garbage in (None, 0, -1, 4, "x"):
        (res,), _ = run(Split(4, 1, 4), correct=set(), localizer=CallableLocalizer(lambda q, t, g=garbage: g))
        record = res.resets[0]
        assert record.localizer_failed and 1 <= record.reset_index <= 3
    (res,), _ = run(Split(4, 1, 4), correct=set(), localizer=CallableLocalizer(lambda q, t: "2"))
    assert res.resets[0].reset_index == 2 and not res.resets[0].localizer_failed


def test_localization_is_batched_across_prompts():
    loc = FixedLocalizer(2)
    results, _ = run(Split(4, 1, 4), correct=set(), localizer=loc, prompts=3)
    assert len(loc.requests) == 1 and len(loc.requests[0]) == 3
    assert [len(r.rows) for r in results] == [8, 8, 8]


def test_random_localizer_is_uniform_over_thoughts():
    rng = random.Random(1)
    from trl_resets.localizers import LocalizationRequest

    picks = [a.index for a in RandomLocalizer().locate([LocalizationRequest("q", ["a", "b", "c"])] * 3000, None, rng)]
    assert set(picks) == {1, 2, 3}
    assert all(abs(picks.count(i) / 3000 - 1 / 3) < 0.04 for i in (1, 2, 3))


def test_k0_is_plain_grpo_without_seed_search_or_localization():
    loc = FixedLocalizer(2)
    (res,), sampler = run(Split(8, 0, 1), correct=set(), localizer=loc)
    assert len(res.rows) == 8 and all(r.group == 0 and r.prefix_len == 0 for r in res.rows)
    assert [draw_of(r) for r in res.rows] == list(range(8))
    assert res.phase1_draws == 8 and len(sampler.calls) == 1 and loc.requests == [] and res.fallbacks == 0


def test_rows_reach_the_localizer_with_each_request():
    loc = FixedLocalizer(2)
    sampler = ScriptedSampler()
    algo = ResetAlgorithm(Split(4, 1, 4), ThoughtFormat(max_completion_tokens=100), seed_budget=4)
    algo.run([[7], [8]], ["q0", "q1"], sampler, scripted_score(set()), loc, describe=lambda r: ["t"] * 3,
             rng=random.Random(0), rows=[{"answer": 1}, {"answer": 2}])
    assert [r.row["answer"] for r in loc.requests[0]] == [1, 2]


def test_split_validation():
    with pytest.raises(ValueError, match=r"invalid split Split\(num_base_generations=4, num_reset_prefixes=-1, "
                                         r"num_reset_generations=4\): need num_base_generations >= 0"):
        Split(4, -1, 4)
    with pytest.raises(ValueError, match=r"^num_base_generations=1 makes a group of one row, whose advantage is always "
                                         r"0: its rollouts cost compute and teach nothing\. Use 2 or more rows per "
                                         r"group \(num_base_generations may be 0: no base group\)\.$"):
        Split(1, 0, 4)
    with pytest.raises(ValueError, match="advantage"):
        Split(1, 2, 1)
    assert Split(4, 1, 4).num_generations == 8 and Split(0, 2, 4).num_generations == 8


def test_per_prompt_generators_make_each_prompts_resets_independent_of_the_others():
    """With one generator per prompt, a prompt's random resets (and the random fallback of an unusable answer)
    depend on its own generator only: the same whether it runs alone or after other prompts."""

    def resets(keys, localizer):
        algo = ResetAlgorithm(Split(0, 2, 2), ThoughtFormat(max_completion_tokens=100), seed_budget=0)
        results = algo.run([[7, k] for k in keys], [f"q{k}" for k in keys], ScriptedSampler(), scripted_score(set()),
                           localizer, describe=lambda r: ["t"] * r.num_thoughts,
                           rng=[random.Random(f"prompt {k}") for k in keys])
        return [[r.reset_index for r in g.resets] for g in results]

    for localizer in (RandomLocalizer(), FixedLocalizer(99)):  # 99: out of range, so a random reset instead
        together = resets(range(6), localizer)
        assert [resets([k], localizer)[0] for k in range(6)] == together
        assert len({tuple(r) for r in together}) > 1
    with pytest.raises(ValueError, match="2 generators for 3 prompts"):
        ResetAlgorithm(Split(0, 2, 2), ThoughtFormat(max_completion_tokens=100)).run(
            [[7]] * 3, ["q"] * 3, ScriptedSampler(), scripted_score(set()), RandomLocalizer(),
            describe=lambda r: ["t"] * r.num_thoughts, rng=[random.Random(0)] * 2)


def test_pass_rates_of_the_first_draws_and_of_every_phase1_draw():
    """Prompt 0 solves its first 5 draws (0..4), so the seed search draws 5 more (10..14) and finds its one failure
    (12); prompt 1 fails its first 5 draws (5..9) and has its seed at once."""
    from trl_resets.metrics import PREFIX, finalize, step_sums

    correct = {0, 1, 2, 3, 4, 10, 11, 13, 14}
    results, sampler = run(Split(4, 1, 4), correct=correct, localizer=FixedLocalizer(2), prompts=2, budget=8)
    phase1 = [d for contexts, _, _ in sampler.calls[:2] for d in contexts]  # the two phase-1 rounds
    assert len(phase1) == 10 + 5 and [r.phase1_draws for r in results] == [10, 5]
    assert [(r.first_draws, r.first_draws_passed, r.phase1_draws_passed) for r in results] == [(5, 5, 9), (5, 0, 0)]
    values = finalize(step_sums(results, [[0.0] * len(r.rows) for r in results], success_threshold=1.0))
    assert values[PREFIX + "policy_pass_rate"] == pytest.approx(5 / 10)  # each prompt's first 5 draws
    # the 5 extra draws come from the prompt that passed: over every draw, the rate leans toward it
    assert values[PREFIX + "phase1_pass_rate"] == pytest.approx(9 / 15)


def test_a_seed_budget_of_one_draws_one_more_rollout():
    (res,), _ = run(Split(4, 1, 4), correct=set(range(100)) - {5}, localizer=FixedLocalizer(2), budget=1)
    assert res.phase1_draws == 6 and res.fallbacks == 0
    assert res.rows[4].completion_ids[:2] == [1005, 11]  # draw 5, the one extra draw, is the seed


def test_an_empty_rollout_is_never_a_seed_and_a_one_thought_rollout_is():
    class EmptyThenOneThought(ScriptedSampler):
        """Draw 0 is empty, draw 1 has one thought; the others have three."""

        def sample(self, contexts, start_thoughts=None, token_budgets=None):
            first = self.draws
            out = super().sample(contexts, start_thoughts, token_budgets)
            shapes = {0: Rollout([], [], "eos"), 1: Rollout([1001, 11], [(0, 2)], "answer")}
            return [shapes.get(first + j, rollout) for j, rollout in enumerate(out)]

    loc = FixedLocalizer(1)
    algo = ResetAlgorithm(Split(2, 1, 2), ThoughtFormat(max_completion_tokens=100), seed_budget=0)
    (res,) = algo.run([[7]], ["q"], EmptyThenOneThought(), lambda owners, completions: [
        [1.0 if len(c) == 6 else 0.0] for c in completions], loc, describe=lambda r: ["t"] * r.num_thoughts,
        rng=random.Random(0))
    assert [r.completion_ids for r in res.rows[:2]] == [[], [1002, 11, 1002, 12, 1002, 13]]  # the empty one in base
    assert res.empty_seeds == 1 and res.fallbacks == 0
    assert [(r.num_thoughts, r.reset_index) for r in res.resets] == [(1, 1)] and loc.requests[0][0].num_steps == 1


def test_the_score_function_is_never_called_with_no_completions():
    """No prompt finds a seed, so there are no suffixes to score: the reward functions are not called for them."""
    sizes = []

    def score(owners, completions):
        sizes.append(len(completions))
        return scripted_score(set(range(100)))(owners, completions)

    algo = ResetAlgorithm(Split(4, 1, 4), ThoughtFormat(max_completion_tokens=100), seed_budget=0)
    results = algo.run([[7], [8]], ["q0", "q1"], ScriptedSampler(), score, FixedLocalizer(2),
                       describe=lambda r: ["t"] * r.num_thoughts, rng=random.Random(0))
    assert sizes == [10] and [r.fallbacks for r in results] == [1, 1]


def test_each_seed_of_a_prompt_draws_from_its_own_generator():
    loc = FixedLocalizer(1)  # a valid answer: the generators are handed over untouched
    algo = ResetAlgorithm(Split(0, 3, 2), ThoughtFormat(max_completion_tokens=100), seed_budget=0)
    algo.run([[7]], ["q"], ScriptedSampler(), scripted_score(set()), loc, describe=lambda r: ["t"] * r.num_thoughts,
             rng=random.Random(5))
    expected = SeedGenerators(random.Random(5), 1)
    assert [r.rng.getstate() for r in loc.requests[0]] == [expected(0, g).getstate() for g in range(3)]


def test_without_a_generator_the_resets_are_those_of_random_0():
    def resets(rng):
        algo = ResetAlgorithm(Split(0, 2, 2), ThoughtFormat(max_completion_tokens=100), seed_budget=0)
        results = algo.run([[7, k] for k in range(6)], ["q"] * 6, ScriptedSampler(), scripted_score(set()),
                           RandomLocalizer(), describe=lambda r: ["t"] * r.num_thoughts, rng=rng)
        return [[r.reset_index for r in g.resets] for g in results]

    assert resets(None) == resets(None) == resets(random.Random(0))
    fallback, zero = SeedGenerators(None, 3), SeedGenerators(random.Random(0), 3)
    assert [fallback(p, g).random() for p in range(3) for g in range(2)] == [
        zero(p, g).random() for p in range(3) for g in range(2)]


# ---------------------------------------------------------------------------------------------- the iid base group
def test_iid_base_group_is_the_first_g1_draws_with_the_seed_among_them():
    (res,), sampler = run(Split(4, 1, 4), correct={0, 2, 3, 5, 7}, localizer=FixedLocalizer(2), base_group="iid")
    assert [draw_of(r) for r in res.rows[:4]] == [0, 1, 2, 3]  # draw 1, the seed, stays a base row
    assert res.phase1_draws == 4 and len(sampler.calls[0][0]) == 4  # G1 draws, no (G1 + k)-th
    assert res.rows[4].completion_ids[:2] == [1001, 11] and res.unused_tokens == 0
    assert (res.first_draws, res.first_draws_passed) == (4, 3)
    assert choose_seeds([False, True, False, False, False], Split(4, 1, 4), iid_base=True) == ([1], [0, 1, 2, 3])


def test_iid_base_group_draws_more_only_when_its_draws_hold_no_seed():
    (res,), sampler = run(Split(4, 1, 4), correct={0, 1, 2, 3, 4}, localizer=FixedLocalizer(2), budget=8,
                          base_group="iid")
    assert [len(c) for c, _, _ in sampler.calls[:2]] == [4, 4]  # a second round of G1 draws finds draw 5
    assert [draw_of(r) for r in res.rows[:4]] == [0, 1, 2, 3] and res.rows[4].completion_ids[:2] == [1005, 11]
    assert res.phase1_draws == 8 and res.unused_tokens == 3 * 6 and res.fallbacks == 0
    (res,), _ = run(Split(4, 1, 4), correct=set(range(100)), localizer=FixedLocalizer(2), budget=3, base_group="iid")
    assert res.phase1_draws == 4 + 3 and res.fallbacks == 1  # the budget counts from the G1 draws


def test_iid_base_group_with_two_seeds_and_without_a_base_group():
    (res,), _ = run(Split(4, 2, 2), correct={0, 2, 3}, localizer=FixedLocalizer(2), budget=8, base_group="iid")
    assert [draw_of(r) for r in res.rows[:4]] == [0, 1, 2, 3] and res.phase1_draws == 8  # seed 2 is draw 4
    assert [r.completion_ids[:2] for r in res.rows[4::2]] == [[1001, 11], [1004, 11]]
    for split in (Split(0, 2, 4), Split(0, 1, 8)):  # G1 = 0: nothing to change, the same rows as Algorithm 2
        same = [run(split, correct={1}, localizer=FixedLocalizer(2), base_group=mode)[0] for mode in ("algorithm2",
                                                                                                     "iid")]
        assert same[0] == same[1]
    with pytest.raises(ValueError, match="base_group='uniform'.*'iid'"):
        ResetAlgorithm(Split(4, 1, 4), ThoughtFormat(), base_group="uniform")


class BernoulliSampler(ScriptedSampler):
    """Every draw passes with probability ``p`` (decided when it is drawn), three thoughts each."""

    def __init__(self, p, rng):
        super().__init__()
        self.p, self.rng, self.passed = p, rng, set()

    def sample(self, contexts, start_thoughts=None, token_budgets=None):
        out = super().sample(contexts, start_thoughts, token_budgets)
        self.passed |= {r.token_ids[0] - 1000 for r in out if self.rng.random() < self.p}
        return out

    def score(self, owners, completions):
        return [[1.0 if c[-2] - 1000 in self.passed else 0.0] for c in completions]


def algorithm2_base_pass_rate(p: float, base: int, prefixes: int) -> float:
    """Algorithm 2's expected base-group pass rate for a per-draw pass rate p: with F ~ Binomial(G1 + k, 1 - p)
    failures among the first G1 + k draws, the base group holds max(0, F - k) of them, so the rate is
    1 - E[max(0, F - k)] / G1 (at 1x4: (5p - p^5) / 4)."""
    n, q = base + prefixes, 1 - p
    excess = sum(max(0, f - prefixes) * math.comb(n, f) * q**f * p ** (n - f) for f in range(n + 1))
    return 1 - excess / base


@pytest.mark.parametrize("split", [Split(4, 1, 4), Split(4, 2, 2), Split(2, 1, 6)], ids=["1x4", "4+2x2", "2+1x6"])
@pytest.mark.parametrize("p", [0.35, 0.6])
def test_base_group_pass_rate_algorithm2_is_biased_and_iid_is_not(split, p):
    assert algorithm2_base_pass_rate(0.35, 4, 1) == pytest.approx((5 * 0.35 - 0.35**5) / 4)
    prompts = 2000
    rates = {}
    for mode in ("algorithm2", "iid"):
        sampler = BernoulliSampler(p, random.Random(f"{mode}/{split}/{p}"))
        algo = ResetAlgorithm(split, ThoughtFormat(max_completion_tokens=100), seed_budget=4, base_group=mode)
        results = algo.run([[7, i] for i in range(prompts)], ["q"] * prompts, sampler, sampler.score,
                           FixedLocalizer(2), describe=lambda r: ["t"] * r.num_thoughts)
        per_prompt = [sum(r.reward for r in g.rows if r.group == 0) / split.num_base_generations for g in results]
        mean = statistics.fmean(per_prompt)
        rates[mode] = (mean, 4 * statistics.stdev(per_prompt) / math.sqrt(prompts))  # mean and 4 standard errors
    expected = {"algorithm2": algorithm2_base_pass_rate(p, split.num_base_generations, split.num_reset_prefixes), "iid": p}
    for mode, (mean, tolerance) in rates.items():
        assert abs(mean - expected[mode]) < tolerance, (mode, mean, expected[mode], tolerance)
    assert expected["algorithm2"] - p > 2 * rates["algorithm2"][1]  # the bias is far larger than the noise
