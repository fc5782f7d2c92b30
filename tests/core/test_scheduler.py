"""The overlapped scheduler builds exactly the groups of the phased Algorithm 2 (`ResetAlgorithm.run`).

A scripted policy gives every request a rollout that depends only on its context and on how many times that
context was asked for before (so both paths see the same draws whatever order they finish in); the stream
finishes requests after random delays, so seeds, localization replies, suffixes and extra draws interleave.
"""

import hashlib
import math
import random
from dataclasses import asdict

import pytest

from trl_resets.localizers import CallableLocalizer, RandomLocalizer, SelfLocalizer
from trl_resets.resets import ResetAlgorithm, Split
from trl_resets.sampling.base import PhasedStream
from trl_resets.scheduler import can_overlap, run_overlapped
from trl_resets.thoughts import Rollout, ThoughtFormat


def _hash(*parts) -> list[int]:
    return list(hashlib.blake2b(repr(parts).encode(), digest_size=16).digest())


class Policy:
    """Rollout ``n`` of a context: 0 thoughts (one time in eight) or 3-4 thoughts of 2 tokens, fixed by a hash."""

    def __init__(self, salt):
        self.salt, self.asked = salt, {}

    def rollout(self, context) -> Rollout:
        key = tuple(context)
        n = self.asked.get(key, 0)
        self.asked[key] = n + 1
        h = _hash(self.salt, key, n)
        if h[0] % 8 == 0:
            return Rollout([], [], "eos")
        thoughts = 3 + h[1] % 2
        ids = [t for i in range(thoughts) for t in (100 + h[2 + i] % 90, 11)]
        return Rollout(ids, [(2 * i, 2 * i + 2) for i in range(thoughts)], "answer")


class Sampler:
    def __init__(self, policy):
        self.policy = policy

    def sample(self, contexts, start_thoughts=None, token_budgets=None):
        return [self.policy.rollout(c) for c in contexts]

    def complete(self, prompts, max_new_tokens, temperature):
        return [list(p) for p in prompts]


class DelayedStream:
    """Finishes each request after 1-6 steps (a rollout's draw is fixed when it is submitted); a reply echoes its
    context. Records, per step, how many phase-1 draws were decoding when each reply or suffix joined."""

    def __init__(self, policy, seed):
        self.policy, self.rng = policy, random.Random(seed)
        self.running, self.handles, self.joined_while_drawing = [], 0, []

    @property
    def busy(self):
        return bool(self.running)

    def submit(self, requests):
        drawing = sum(1 for _, _, r, _ in self.running if not r.is_reply and r.start_thoughts == 0)
        out = []
        for request in requests:
            result = list(request.context) if request.is_reply else self.policy.rollout(request.context)
            if request.is_reply or request.start_thoughts:
                self.joined_while_drawing.append(("reply" if request.is_reply else "suffix", drawing))
            self.running.append([self.rng.randint(1, 6), self.handles, request, result])
            out.append(self.handles)
            self.handles += 1
        return out

    def step(self):
        for job in self.running:
            job[0] -= 1
        done = [(h, result) for left, h, _, result in self.running if left <= 0]
        self.running = [job for job in self.running if job[0] > 0]
        return done


class TextPolicy:
    """Self-localization's policy: the prompt encodes to [9, its length]; a reply names step 2 or 3 by that length."""

    @staticmethod
    def encode(prompts, requests):
        return [[9, len(p)] for p in prompts]

    @staticmethod
    def decode(ids):
        return f"so \\boxed{{{2 + ids[1] % 2}}}"

    def complete(self, prompts, max_new_tokens, temperature):
        return [(self.decode(ids), len(ids)) for ids in self.encode(prompts, None)]


def score(owners, completions):
    """Correct one time in three (by the completion's token sum); a second function is NaN on odd sums."""
    return [[0.0 if sum(c) % 3 == 0 else 1.0, math.nan if sum(c) % 2 else 0.5] for c in completions]


def _plain(groups):
    def clean(value):
        if isinstance(value, float) and math.isnan(value):
            return "nan"
        if isinstance(value, list):
            return [clean(v) for v in value]
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        return value

    return [clean(asdict(g)) for g in groups]


LOCALIZERS = {
    "callable": lambda: CallableLocalizer(lambda q, thoughts: len(thoughts) - 1),
    "self": lambda: SelfLocalizer(max_new_tokens=5),
}


def _both(split, budget, salt, localizer, prompts=3, stream_seed=0, base_group="algorithm2"):
    algo = ResetAlgorithm(split, ThoughtFormat(max_completion_tokens=64), seed_budget=budget, base_group=base_group)
    contexts = [[7, 7 + p] for p in range(prompts)]
    questions = [f"q{p}" for p in range(prompts)]
    kwargs = {"describe": lambda r: ["t"] * r.num_thoughts, "policy": TextPolicy()}
    phased = algo.run(contexts, questions, Sampler(Policy(salt)), score, LOCALIZERS[localizer](),
                      rng=random.Random(0), **kwargs)
    stream = DelayedStream(Policy(salt), stream_seed)
    overlapped = run_overlapped(algo, contexts, questions, stream, score, LOCALIZERS[localizer](),
                                rng=random.Random(0), **kwargs)
    return phased, overlapped, stream


@pytest.mark.parametrize("localizer", sorted(LOCALIZERS))
@pytest.mark.parametrize("split", [Split(4, 1, 4), Split(0, 2, 4), Split(0, 1, 8), Split(8, 0, 1)],
                         ids=["1x4", "2x4", "1x8", "grpo"])
def test_overlapped_groups_equal_the_phased_ones(split, localizer):
    seen = {"extra draws": 0, "fallbacks": 0, "empty seeds": 0, "resets": 0}
    for salt in range(12):
        for budget in (0, 4):
            phased, overlapped, _ = _both(split, budget, salt, localizer, stream_seed=salt)
            assert _plain(overlapped) == _plain(phased), (salt, budget)
            seen["extra draws"] += sum(g.phase1_draws > g.first_draws for g in phased)
            seen["fallbacks"] += sum(g.fallbacks for g in phased)
            seen["empty seeds"] += sum(g.empty_seeds for g in phased)
            seen["resets"] += sum(len(g.resets) for g in phased)
    if not split.is_grpo:  # the cases compared cover seed search, fallbacks and empty rollouts
        assert all(seen.values()), seen


@pytest.mark.parametrize("localizer", sorted(LOCALIZERS))
@pytest.mark.parametrize("split", [Split(4, 1, 4), Split(4, 2, 2), Split(2, 1, 6), Split(0, 2, 4)],
                         ids=["1x4", "4+2x2", "2+1x6", "2x4"])
def test_overlapped_groups_equal_the_phased_ones_with_the_iid_base_group(split, localizer):
    seen = {"extra draws": 0, "fallbacks": 0, "seed in the first round": 0}
    for salt in range(12):
        for budget in (0, 4):
            phased, overlapped, _ = _both(split, budget, salt, localizer, stream_seed=salt, base_group="iid")
            assert _plain(overlapped) == _plain(phased), (salt, budget)
            seen["extra draws"] += sum(g.phase1_draws > g.first_draws for g in phased)
            seen["fallbacks"] += sum(g.fallbacks for g in phased)
            seen["seed in the first round"] += sum(g.phase1_draws == g.first_draws and g.resets != [] for g in phased)
            assert all(g.first_draws == max(split.num_base_generations, split.num_reset_prefixes) for g in phased)
    assert all(seen.values()), seen


def test_localization_and_suffixes_join_while_phase1_draws_decode():
    joined = []
    for salt in range(6):
        _, _, stream = _both(Split(4, 1, 4), 4, salt, "self", prompts=4, stream_seed=salt)
        joined += stream.joined_while_drawing
    for kind in ("reply", "suffix"):  # both joined while other phase-1 draws were still decoding, many times
        assert sum(n > 0 for k, n in joined if k == kind) >= 5, joined


def test_phased_stream_reproduces_the_phased_run():
    algo = ResetAlgorithm(Split(2, 2, 2), ThoughtFormat(max_completion_tokens=64), seed_budget=4)
    contexts, questions = [[7, 7], [7, 8]], ["q0", "q1"]
    phased = algo.run(contexts, questions, Sampler(Policy(3)), score, LOCALIZERS["self"](),
                      describe=lambda r: ["t"] * r.num_thoughts, policy=TextPolicy(), rng=random.Random(0))
    stream = PhasedStream(Sampler(Policy(3)))
    overlapped = run_overlapped(algo, contexts, questions, stream, score, LOCALIZERS["self"](),
                                describe=lambda r: ["t"] * r.num_thoughts, policy=TextPolicy(), rng=random.Random(0))
    assert _plain(overlapped) == _plain(phased)


def test_random_resets_come_from_each_seeds_own_generator():
    algo = ResetAlgorithm(Split(4, 1, 4), ThoughtFormat(max_completion_tokens=64), seed_budget=4)
    contexts, questions = [[7, p] for p in range(6)], [f"q{p}" for p in range(6)]

    def run(stream_seed):
        return run_overlapped(algo, contexts, questions, DelayedStream(Policy(1), stream_seed), score,
                              RandomLocalizer(), describe=lambda r: ["t"] * r.num_thoughts, rng=random.Random(5))

    first, second = run(0), run(1)  # other finishing orders, same resets
    assert _plain(first) == _plain(second)
    records = [r for g in first for r in g.resets]
    assert records and all(1 <= r.reset_index <= r.num_thoughts for r in records)


def test_a_localizer_that_needs_the_policy_in_a_batch_is_refused():
    class Batched:
        name = "batched"

        def locate(self, requests, policy=None, rng=None):
            return []

    assert not can_overlap(Batched(), TextPolicy())
    assert can_overlap(SelfLocalizer(), TextPolicy()) and can_overlap(RandomLocalizer(), None)
    algo = ResetAlgorithm(Split(4, 1, 4), ThoughtFormat(max_completion_tokens=64))
    with pytest.raises(ValueError, match="'batched' can be neither streamed"):
        run_overlapped(algo, [[7]], ["q"], PhasedStream(Sampler(Policy(0))), score, Batched(),
                       describe=lambda r: ["t"] * r.num_thoughts)


def test_a_process_with_nothing_left_keeps_joining_collective_steps():
    """Another process is still busy for 3 steps after this one is done: this one keeps calling its sampler (empty
    calls, which a collective backend turns into dummy decodes); a stream of its own never waits for the others."""

    class Recording(Sampler):
        def __init__(self, policy):
            super().__init__(policy)
            self.calls = []

        def sample(self, contexts, start_thoughts=None, token_budgets=None):
            self.calls.append(len(contexts))
            return super().sample(contexts)

    others_busy = [True, True, True]
    asked = []

    def sync_any(flag):
        asked.append(flag)
        return flag or bool(others_busy and others_busy.pop())

    algo = ResetAlgorithm(Split(4, 1, 4), ThoughtFormat(max_completion_tokens=64), seed_budget=4, sync_any=sync_any)
    sampler = Recording(Policy(2))
    alone = run_overlapped(algo, [[7, 7]], ["q"], PhasedStream(sampler), score, LOCALIZERS["callable"](),
                           describe=lambda r: ["t"] * r.num_thoughts)
    assert sampler.calls[-3:] == [0, 0, 0] and asked.count(False) == 4

    own = DelayedStream(Policy(2), 0)
    own.collective = False
    asked.clear()
    overlapped = run_overlapped(algo, [[7, 7]], ["q"], own, score, LOCALIZERS["callable"](),
                                describe=lambda r: ["t"] * r.num_thoughts)
    assert asked == [] and _plain(overlapped) == _plain(alone)


class _CharPolicy:
    """Self-localization's policy over a real tokenizer: prompts encode to their token ids."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def encode(self, prompts, requests):
        return [self.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]

    def decode(self, ids):
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def _sampled_groups(char_tokenizer, model, prompts, sampling_seeds):
    """SRPO's groups for ``prompts`` of a 4-prompt batch, sampled at temperature 1 (the localization reply too) by
    the compact decoder, all in one stream; ``sampling_seeds`` for the whole batch, or None."""
    import torch
    from transformers import GenerationConfig

    from trl_resets.sampling import TransformersThoughtSampler

    fmt = ThoughtFormat(max_completion_tokens=12, max_thought_tokens=4, max_thoughts=3)
    sampler = TransformersThoughtSampler(model, char_tokenizer, fmt, GenerationConfig(do_sample=True, top_k=0),
                                         eos_ids=[char_tokenizer.eos_token_id])
    algo = ResetAlgorithm(Split(2, 1, 2), fmt, seed_budget=2)
    contexts = [char_tokenizer(f"Q{p}:", add_special_tokens=False)["input_ids"] for p in range(4)]
    torch.manual_seed(0)  # each process starts from the run's seed
    return run_overlapped(
        algo, [contexts[p] for p in prompts], [f"q{p}" for p in prompts], sampler.stream(),
        lambda owners, completions: [[len(set(c)) / 16] for c in completions],
        SelfLocalizer(max_new_tokens=3, temperature=1.0), describe=lambda r: ["t"] * r.num_thoughts,
        policy=_CharPolicy(char_tokenizer), rng=[random.Random(p) for p in prompts],
        sampling_seeds=None if sampling_seeds is None else [sampling_seeds[p] for p in prompts])


def test_seeded_rows_sample_the_same_tokens_whatever_else_the_stream_decodes(char_tokenizer, tiny_model):
    """The batch of 4 prompts decoded at once, or split in two halves as two processes would decode it: with a
    sampling seed per prompt every row, localization reply and reset come out the same; without, they do not."""
    seeds = [11, 12, 13, 14]
    whole = _sampled_groups(char_tokenizer, tiny_model, range(4), seeds)
    halves = _sampled_groups(char_tokenizer, tiny_model, [0, 1], seeds) + \
        _sampled_groups(char_tokenizer, tiny_model, [2, 3], seeds)
    assert _plain(whole) == _plain(halves)
    rows = [tuple(row.completion_ids) for g in whole for row in g.rows]
    assert len(set(rows)) > len(rows) // 2 and sum(len(g.resets) for g in whole) >= 2
    assert all(r.reply for g in whole for r in g.resets)  # sampled replies, decoded in the stream
    unseeded = _sampled_groups(char_tokenizer, tiny_model, range(4), None)
    unseeded_halves = _sampled_groups(char_tokenizer, tiny_model, [0, 1], None) + \
        _sampled_groups(char_tokenizer, tiny_model, [2, 3], None)
    assert _plain(unseeded) != _plain(unseeded_halves)
    assert _plain(_sampled_groups(char_tokenizer, tiny_model, range(4), [21, 12, 13, 14]))[0] != _plain(whole)[0]


def test_a_stream_that_cannot_seed_rows_refuses_seeded_requests(char_tokenizer, tiny_model):
    from transformers import GenerationConfig

    from trl_resets.sampling import TransformersThoughtSampler
    from trl_resets.sampling.base import DecodeRequest

    fmt = ThoughtFormat(max_completion_tokens=8)
    seeded = [DecodeRequest([5, 6], 0, 8, seed=3)]
    with pytest.raises(ValueError, match="phased stream.*seed would be ignored"):
        PhasedStream(Sampler(Policy(0))).submit(seeded)
    plain = TransformersThoughtSampler(tiny_model, char_tokenizer, fmt, compact=False)
    assert "generate" in plain.row_seed_refusal()
    penalized = TransformersThoughtSampler(tiny_model, char_tokenizer, fmt,
                                           GenerationConfig(do_sample=True, repetition_penalty=1.3))
    assert "RepetitionPenaltyLogitsProcessor" in penalized.row_seed_refusal()
    stream = penalized.stream()
    stream.submit(seeded)
    with pytest.raises(ValueError, match="seed of its own needs transformers' generate"), pytest.warns(UserWarning):
        stream.step()
    assert TransformersThoughtSampler(tiny_model, char_tokenizer, fmt).row_seed_refusal() is None
