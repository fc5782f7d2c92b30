"""Pipelined resets on the scripted policy of test_scheduler: a lagged run builds Algorithm 2's groups, one or two
generations later (same seeds, h*, suffix contexts, rewards and advantages), phased or overlapped; the queue keeps
its order, drops old states, survives a checkpoint, and refuses what it cannot do."""

import copy
import dataclasses
import math
import random

import pytest
import torch

from tests.core.test_scheduler import LOCALIZERS, DelayedStream, Policy, Sampler, TextPolicy, _plain, score
from trl_resets.advantages import group_advantages
from trl_resets.localizers import RandomLocalizer, SelfLocalizer
from trl_resets.pipeline import ResetQueue, process_slice
from trl_resets.resets import LagStep, Origin, ResetAlgorithm, Split
from trl_resets.sampling.base import StepCounter
from trl_resets.scheduler import run_overlapped
from trl_resets.thoughts import Rollout, ThoughtFormat

LOCALIZERS = {**LOCALIZERS, "random": RandomLocalizer}
PROMPTS = 4


def _contexts(generation):
    return [[7 + generation, 7 + p] for p in range(PROMPTS)]


def _algo(split, base_group="algorithm2"):
    return ResetAlgorithm(split, ThoughtFormat(max_completion_tokens=64), seed_budget=0, base_group=base_group)


def _run(algo, generation, policy, localizer, lag=None, overlapped=True, stream_seed=0):
    contexts = _contexts(generation)
    kwargs = {"describe": lambda r: ["t"] * r.num_thoughts, "policy": TextPolicy(),
              "rng": [random.Random(f"{generation}/{p}") for p in range(PROMPTS)],
              "rows": [{"answer": f"a{generation}/{p}"} for p in range(PROMPTS)], "lag": lag}
    questions = [f"q{generation}/{p}" for p in range(PROMPTS)]
    if overlapped:
        return run_overlapped(algo, contexts, questions, DelayedStream(policy, stream_seed), score,
                              LOCALIZERS[localizer](), **kwargs)
    return algo.run(contexts, questions, Sampler(policy), score, LOCALIZERS[localizer](), **kwargs)


def _lagged(algo, lag, generations, salt, localizer, overlapped=True, queue=None, max_age=2, policy=None):
    """A lagged run over ``generations``, all sampled by one scripted policy; returns each generation's groups, its
    LagStep and the queue."""
    policy, queue = policy or Policy(salt), queue or ResetQueue(lag, max_age)
    out = []
    for t in generations:
        step, _ = queue.step(t, PROMPTS * algo.split.num_reset_prefixes, generations_left=None)
        groups = _run(algo, t, policy, localizer, step, overlapped, stream_seed=salt + t)
        queue.put(step.localized, step.found, step.discarded)
        out.append((groups, step))
    return out, queue


def _reset_groups(groups):
    """The trained reset groups of a batch, in order: (rows without their origin fields, rewards, advantages)."""
    out = []
    for g in groups:
        rows = g.rows
        ids = torch.tensor([r.group for r in rows])
        rewards = torch.tensor([r.reward for r in rows])
        advantages = group_advantages(rewards, ids) * torch.tensor([r.weight for r in rows])
        for group in sorted({r.group for r in rows if r.group and r.weight}):
            members = [i for i, r in enumerate(rows) if r.group == group]
            plain = [dataclasses.replace(rows[i], origin=None, context=None, group=0) for i in members]  # any slot
            out.append((_plain([type(g)(plain)]), [advantages[i].item() for i in members], rows[members[0]].origin,
                        rows[members[0]].context))
    return out


def _base_rows(groups):
    return [_plain([type(g)([r for r in g.rows if r.group == 0])]) for g in groups]


@pytest.mark.parametrize("localizer", sorted(LOCALIZERS))
@pytest.mark.parametrize("split", [Split(4, 1, 4), Split(0, 2, 4), Split(0, 1, 8)], ids=["1x4", "2x4", "1x8"])
@pytest.mark.parametrize("lag", [1, 2])
def test_a_lagged_run_builds_algorithm_2s_groups_lag_generations_later(split, localizer, lag):
    _check_lagged_run(split, localizer, lag, "algorithm2")


@pytest.mark.parametrize("lag", [1, 2])
def test_with_the_iid_base_group_too(lag):
    _check_lagged_run(Split(4, 1, 4), "callable", lag, "iid")


def _check_lagged_run(split, localizer, lag, base_group):
    algo = _algo(split, base_group)
    seen = {"resets": 0, "ended searches": 0}
    for salt in range(4):
        reference = _run(algo, 0, Policy(salt), localizer)  # Algorithm 2 on generation 0, suffixes included
        runs, _ = _lagged(algo, lag, range(lag + 1), salt, localizer)
        (first, _), (later, _) = runs[0], runs[lag]
        assert _base_rows(first) == _base_rows(reference)  # the same draws, the same base groups
        assert all(r.weight == 0 for g in first for r in g.rows if r.group)  # no state yet: zero-weight fillers
        assert all(g.fallbacks == split.num_reset_prefixes and not g.resets for g in first)
        expected = _reset_groups(reference)
        carried = _reset_groups(later)
        assert [c[:2] for c in carried] == [e[:2] for e in expected]  # rows, rewards, advantages
        origins = [(p, g) for p, groups in enumerate(reference) for g in range(len(groups.resets))]
        assert [c[2] for c in carried] == [Origin(0, p) for p, _ in origins]
        assert [c[3] for c in carried] == [_contexts(0)[p] for p, _ in origins]
        records = [dataclasses.replace(r, origin=None) for g in reference for r in g.resets]
        assert [dataclasses.replace(r, origin=None) for g in later for r in g.resets] == records
        assert all(r.origin is not None for g in later for r in g.resets)
        assert [g.seeds_found for g in first] == [len(g.resets) for g in reference]
        seen["resets"] += len(records)
        seen["ended searches"] += sum(g.searches_ended for g in first)
    assert seen["resets"] and (seen["ended searches"] or split.num_base_generations), seen  # 1x4's 5 draws: seeds


@pytest.mark.parametrize("localizer", sorted(LOCALIZERS))
@pytest.mark.parametrize("lag", [1, 2])
def test_the_phased_and_the_overlapped_lagged_runs_agree(localizer, lag):
    algo = _algo(Split(2, 2, 2))
    for salt in range(3):
        phased, _ = _lagged(algo, lag, range(3), salt, localizer, overlapped=False)
        overlapped, _ = _lagged(algo, lag, range(3), salt, localizer)
        for (pg, ps), (og, os_) in zip(phased, overlapped):
            assert _plain(pg) == _plain(og)
            assert _plain(ps.localized) == _plain(os_.localized) and _plain(ps.found) == _plain(os_.found)
        assert any(step.localized for _, step in phased)


class FirstWave(DelayedStream):
    def submit(self, requests):
        if not hasattr(self, "first"):
            self.first = [("reply" if r.is_reply else "rollout") for r in requests]
        return super().submit(requests)


def test_carried_suffixes_and_replies_join_the_first_wave():
    """Under a lag, the carried suffixes (and lag 2's localization replies) are submitted with the first draws."""
    algo = _algo(Split(4, 1, 4))
    for lag in (1, 2):
        queue, policy = ResetQueue(lag, 2), Policy(1)
        for t in range(4):
            step, _ = queue.step(t, PROMPTS)
            stream = FirstWave(policy, t)
            groups = run_overlapped(algo, _contexts(t), ["q"] * PROMPTS, stream, score, LOCALIZERS["self"](),
                                    describe=lambda r: ["t"] * r.num_thoughts, policy=TextPolicy(), lag=step)
            queue.put(step.localized, step.found)
            # the tokens generated now: this generation's seeds and localization replies, not the carried ones'
            replies = sum(s.outcome.record.localization_tokens for s in step.localized)
            assert sum(g.localization_tokens for g in groups) == replies and (replies > 0) == bool(step.localized)
            assert sum(g.seed_tokens for g in groups) == sum(len(s.seed.rollout.token_ids) for s in step.found) \
                if lag == 2 else sum(g.seed_tokens for g in groups) > 0
            assert stream.first.count("rollout") == PROMPTS * algo.first_round + 4 * len(step.ready)
            assert stream.first.count("reply") == len(step.seeds)
            if t >= lag:
                assert step.ready and (lag == 1 or step.seeds)


def test_the_queue_is_ordered_drops_old_states_and_counts_the_last_generations():
    algo = _algo(Split(4, 1, 4))
    queue = ResetQueue(1, 1)
    _lagged(algo, 1, range(1), 2, "callable", queue=queue)
    states = list(queue.ready)
    assert states and [s.origin for s in states] == sorted(s.origin for s in states)
    queue.put(list(reversed(states)), [])  # gathered in another order: put in the fixed order
    assert queue.ready == states + states
    step, dropped = queue.step(2, 1)  # age 2 > max_age 1: all dropped, counted
    assert dropped == 2 * len(states) and step.ready == [] and queue.dropped == dropped
    last = LagStep(1, 3, generations_left=0)  # the last generation localizes nothing
    _run(algo, 3, Policy(2), "self", last)
    assert last.localized == [] and last.discarded > 0
    two = LagStep(2, 3, seeds=[], generations_left=1)  # lag 2, one generation left: new seeds are not kept
    _run(algo, 3, Policy(2), "self", two)
    assert two.found == [] and two.discarded == last.discarded


def test_a_queue_saved_at_a_generation_boundary_resumes_the_same_run():
    algo = _algo(Split(0, 2, 4))
    for lag in (1, 2):
        whole, _ = _lagged(algo, lag, range(4), 5, "random")
        policy = Policy(5)
        first, queue = _lagged(algo, lag, range(2), 5, "random", policy=policy)
        saved = torch.load(_saved(queue.state_dict()), weights_only=False)
        resumed_queue = ResetQueue(lag, 2)
        resumed_queue.load_state_dict(saved)
        assert resumed_queue.ready or resumed_queue.seeds
        # the scripted policy is restored as it was (a real run restores its model from the checkpoint)
        rest, _ = _lagged(algo, lag, range(2, 4), 5, "random", queue=resumed_queue, policy=copy.deepcopy(policy))
        assert [_plain(g) for g, _ in first + rest] == [_plain(g) for g, _ in whole]
    with pytest.raises(ValueError, match="resume with the same values"):
        ResetQueue(1, 3).load_state_dict(queue.state_dict())


def _saved(state):
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return buffer


def test_two_processes_build_the_rows_of_one():
    """The batch on one process, or split in halves over two with each half's new states gathered into both
    queues: the same rows, the same queue."""
    algo, k = _algo(Split(0, 2, 4)), 2
    for lag in (1, 2):
        one, one_queue = _lagged(algo, lag, range(3), 7, "self")
        queues, policy = [ResetQueue(lag, 2), ResetQueue(lag, 2)], Policy(7)
        for t in range(3):
            steps = [q.step(t, PROMPTS * k)[0] for q in queues]
            halves, localized, found = [], [], []
            for rank in (0, 1):
                part = process_slice(steps[rank], rank, PROMPTS // 2, k)
                prompts = list(part.prompt_indices)
                halves += run_overlapped(
                    algo, [_contexts(t)[p] for p in prompts], [f"q{t}/{p}" for p in prompts],
                    DelayedStream(policy, rank), score, LOCALIZERS["self"](),
                    describe=lambda r: ["t"] * r.num_thoughts, policy=TextPolicy(),
                    rng=[random.Random(f"{t}/{p}") for p in prompts],
                    rows=[{"answer": f"a{t}/{p}"} for p in prompts], lag=part)
                localized, found = localized + part.localized, found + part.found
            for q in queues:
                q.put(list(reversed(localized)), list(reversed(found)))  # gathered in either order
            assert _plain(halves) == _plain(one[t][0])
            assert queues[0].state_dict() == queues[1].state_dict()
        assert _plain(queues[0].ready + queues[0].seeds) == _plain(one_queue.ready + one_queue.seeds)
        assert one_queue.ready or one_queue.seeds


def test_refusals_name_the_fix():
    with pytest.raises(ValueError, match="Set seed_budget=0"):
        run_overlapped(ResetAlgorithm(Split(4, 1, 4), ThoughtFormat(max_completion_tokens=64)), [[7]], ["q"],
                       DelayedStream(Policy(0), 0), score, LOCALIZERS["callable"](), describe=len, lag=LagStep(1, 0))
    with pytest.raises(ValueError, match="num_reset_prefixes >= 1"):
        _algo(Split(8, 0, 1)).run([[7]], ["q"], Sampler(Policy(0)), score, RandomLocalizer(), describe=len,
                                  lag=LagStep(1, 0))
    with pytest.raises(ValueError, match="Set reset_max_age >= 2"):
        ResetQueue(2, 1)
    with pytest.raises(ValueError, match="1 or 2"):
        LagStep(3, 0)


def test_the_trainers_pipeline_metrics_over_a_run_of_known_length():
    """Three generations at lag 1: ages, queue fill, and at the last generation no localization, and the seeds
    found there counted unused."""
    from trl_resets.pipeline import Pipeline

    algo, policy, pipeline = _algo(Split(0, 2, 4)), Policy(3), Pipeline(1, 1, 2)
    logged, found = [], []
    for t in range(3):
        step = pipeline.begin(t, PROMPTS, generations_left=2 - t)
        groups = _run(algo, t, policy, "callable", step)
        logged.append(pipeline.end(step, groups))
        found.append(sum(g.seeds_found for g in groups))
        assert sum(len(g.resets) for g in groups) == (found[t - 1] if t else 0)  # every state of t-1 is used
    assert math.isnan(logged[0]["resets/reset_age"]) and logged[1]["resets/reset_age"] == 1.0
    assert [m["resets/queue_fill"] for m in logged] == [found[0], found[1], 0] and found[2] > 0
    assert logged[2]["resets/unused_states"] == found[2] and step.localized == []
    assert sum(m["resets/searches_ended"] for m in logged) > 0


class TokenStream:
    """Decodes one token per running request and step, as the compact decoder does: a request submitted after step
    n draws its first token in step n + 1. A prompt's draw n has ``lengths[n]`` tokens (draw 0 ends in 50: the
    incorrect one, the seed; the others in 60), a suffix ``suffix`` tokens, a localization reply ``reply``."""

    def __init__(self, lengths, reply, suffix):
        self.lengths, self.reply, self.suffix = lengths, reply, suffix
        self.running, self.handles, self.asked = [], 0, {}

    @property
    def busy(self):
        return bool(self.running)

    def _result(self, request):
        if request.is_reply:  # TextPolicy reads the reply's second token
            return list(request.context) + [0] * (self.reply - len(request.context))
        if request.start_thoughts:
            return _rollout([60] * self.suffix)
        n = self.asked.get(tuple(request.context), 0)
        self.asked[tuple(request.context)] = n + 1
        return _rollout([60] * (self.lengths[n] - 1) + [50 if n == 0 else 60])

    def submit(self, requests):
        handles = list(range(self.handles, self.handles + len(requests)))
        self.handles += len(requests)
        for handle, request in zip(handles, requests):
            result = self._result(request)
            tokens = len(result) if isinstance(result, list) else len(result.token_ids)
            self.running.append([tokens, handle, result])
        return handles

    def step(self):
        for job in self.running:
            job[0] -= 1
        done = [(handle, result) for left, handle, result in self.running if left <= 0]
        self.running = [job for job in self.running if job[0] > 0]
        return done


def _rollout(ids):
    return Rollout(ids, [(i, min(i + 2, len(ids))) for i in range(0, len(ids), 2)], "answer")


def _score_last_token(owners, completions):
    return [[0.0 if c[-1] == 50 else 1.0] for c in completions]


@pytest.mark.parametrize("lag, expected", [
    (0, [30, 30, 30]),  # every generation: the seed (10 tokens), then its reply (14), then its suffixes (6)
    (1, [24, 24, 24]),  # the seed, then its reply; the carried suffixes decode beside the draws
    (2, [12, 14, 14]),  # the longest draw; from generation 1 the carried seed's reply, beside the draws
])
def test_the_counted_decoding_steps_are_each_generations_longest_chain(lag, expected):
    """The steps a `StepCounter` counts on the stream (the trainer's ``resets/decode_steps``) are the generation's
    longest dependency chain: Algorithm 2 waits for a seed, its localization reply and its suffixes; a lag takes the
    suffixes (lag 1), then the reply too (lag 2), out of the chain."""
    algo = _algo(Split(4, 1, 4))
    queue = ResetQueue(lag, 2) if lag else None
    counted = []
    for t in range(3):
        step = queue.step(t, 1, generations_left=None)[0] if lag else None
        stream = StepCounter(TokenStream(lengths=[10, 4, 6, 12, 8], reply=14, suffix=6))
        groups = run_overlapped(algo, [[7 + t, 7]], [f"q{t}"], stream, _score_last_token, SelfLocalizer(max_new_tokens=16),
                                describe=lambda r: ["t"] * r.num_thoughts, policy=TextPolicy(),
                                rng=[random.Random(t)], rows=[{"answer": "a"}], lag=step)
        if lag:
            queue.put(step.localized, step.found, step.discarded)
        counted.append(stream.steps)
        assert [len(g.resets) for g in groups] == [1 if t >= lag else 0]  # generation t trains a reset from t - lag
    assert counted == expected
