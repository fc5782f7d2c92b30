"""Hostile and degenerate model output: each case has a defined, counted outcome and nothing crashes.

Segmentation cases run through `segment_thoughts` (the same tracker the samplers run while decoding) on a
byte-level vocabulary; localization replies and group patterns run through Algorithm 2 with a scripted
sampler.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from tests.core.test_properties import EOS, PIECES, decode
from trl_resets.advantages import group_advantages
from trl_resets.localizers import SelfLocalizer, parse_step_index
from trl_resets.metrics import PREFIX, finalize, step_sums
from trl_resets.resets import ResetAlgorithm, Split
from trl_resets.thoughts import (
    STOP_ANSWER,
    STOP_EOS,
    STOP_MAX_THOUGHTS,
    STOP_MAX_TOKENS,
    STOP_NONE,
    Rollout,
    ThoughtFormat,
    segment_thoughts,
)

FMT = ThoughtFormat(max_thoughts=4, max_thought_tokens=6, max_completion_tokens=30)


def ids_of(*pieces: bytes) -> list[int]:
    return [PIECES.index(p) for p in pieces]


def texts(r: Rollout) -> list[str]:
    return [decode(r.thought_ids(h)) for h in range(r.num_thoughts)]


CASES = {
    # name: (token pieces, expected thoughts' text, expected stop reason)
    "empty completion": ((), [], STOP_NONE),
    "EOS only": ((b"<eos>",), ["<eos>"], STOP_EOS),
    "no delimiter ever": ((b"a",) * 40, ["aaaaaa"] * 4, STOP_MAX_THOUGHTS),
    "a delimiter every token": ((b"</thought>",) * 10, ["</thought>"] * 4, STOP_MAX_THOUGHTS),
    "a thought longer than its cap": ((b"1",) * 8 + (b"</thought>", b"<eos>"), ["111111", "11</thought><eos>"],
                                      STOP_EOS),
    "several boxes": ((b"\\boxed{", b"1", b"}", b"\\boxed{", b"a", b"}"), ["\\boxed{1}\\boxed{a}"], STOP_ANSWER),
    "an answer outside any thought": ((b"a", b"</thought>", b"\\boxed{", b"1", b"}", b"<eos>"),
                                      ["a</thought>", "\\boxed{1}<eos>"], STOP_EOS),
    "text after the final answer": ((b"\\boxed{", b"1", b"}", b"</thought>", b"a", b"a"), ["\\boxed{1}</thought>"],
                                    STOP_ANSWER),
    "a delimiter split across tokens": ((b"a", b"</th", b"ought>", b"1", b"<eos>"), ["a</thought>", "1<eos>"],
                                        STOP_EOS),
    "invalid UTF-8 and a split character": ((b"\xff", "é".encode()[:1], b"</thought>", "é".encode()[1:], b"<eos>"),
                                            ["\ufffd\ufffd</thought>", "\ufffd<eos>"], STOP_EOS),
}


@pytest.mark.parametrize("name", list(CASES))
def test_degenerate_rollouts_segment_to_a_defined_outcome(name):
    pieces, expected, stop = CASES[name]
    r = segment_thoughts(ids_of(*pieces), decode, FMT, [EOS])
    assert (texts(r), r.stop_reason) == (expected, stop)


def test_the_token_budget_cuts_a_rollout_that_never_stops():
    r = segment_thoughts(ids_of(*[b"a", b"</thought>"] * 40), decode, ThoughtFormat(max_thoughts=99,
                                                                                    max_completion_tokens=7), [EOS])
    assert len(r.token_ids) == 7 and r.stop_reason == STOP_MAX_TOKENS and r.num_thoughts == 4


REPLIES = {
    "empty": ("", None),
    "prose": ("The third step is where it goes wrong.", None),
    "a number in words": ("\\boxed{three}", None),
    "out of range": ("\\boxed{9}", None),
    "zero": ("\\boxed{0}", None),
    "many boxes, the last one counts": ("\\boxed{1} no, \\boxed{2}", 2),
    "cut at its token cap": ("Step 2 is wrong, so \\boxed{", None),
    "a step label": ("\\boxed{Step 3}", 3),
}


@pytest.mark.parametrize("name", list(REPLIES))
def test_localization_replies_parse_or_count_as_failures(name):
    reply, expected = REPLIES[name]
    assert parse_step_index(reply, 3) == expected


class ScriptedSampler:
    """Phase-1 draws follow ``rollouts`` in turn; every suffix is the same two-thought continuation."""

    def __init__(self, rollouts):
        self.rollouts, self.draws = rollouts, 0

    def sample(self, contexts, start_thoughts=None, token_budgets=None):
        out = []
        for _ in contexts:
            if start_thoughts is None:
                pieces = self.rollouts[self.draws % len(self.rollouts)]
                self.draws += 1
            else:
                pieces = (b"1", b"</thought>", b"\\boxed{", b"1", b"}", b"</thought>")
            out.append(segment_thoughts(ids_of(*pieces), decode, FMT, [EOS]))
        return out


class ReplyPolicy:
    """The policy as a text function that always gives the same localization reply."""

    def __init__(self, reply):
        self.reply, self.prompts = reply, []

    def complete(self, prompts, max_new_tokens, temperature):
        self.prompts += prompts
        return [(self.reply, 5) for _ in prompts]


SPLIT = Split(4, 1, 4)


def run(rollouts, score, reply="\\boxed{1}", split=SPLIT, budget=2):
    algo = ResetAlgorithm(split, FMT, seed_budget=budget)
    policy = ReplyPolicy(reply)
    (result,) = algo.run([[1]], ["q"], ScriptedSampler(rollouts), score, SelfLocalizer(), texts, policy=policy,
                         rng=random.Random(0))
    return result, policy


WRONG = (b"a", b"</thought>", b"a", b"</thought>", b"\\boxed{", b"a", b"}", b"</thought>")
RIGHT = (b"1", b"</thought>", b"\\boxed{", b"1", b"}", b"</thought>")


def by_answer(owners, completions):
    return [[1.0 if "\\boxed{1}" in decode(c) else 0.0] for c in completions]


@pytest.mark.parametrize("name", list(REPLIES))
def test_an_unusable_localization_reply_becomes_a_counted_random_reset(name):
    reply, expected = REPLIES[name]
    result, policy = run([WRONG, RIGHT], by_answer, reply=reply)
    (record,) = result.resets
    assert len(policy.prompts) == 1 and record.reply == reply
    assert record.localizer_failed == (expected is None)
    assert 1 <= record.reset_index <= record.num_thoughts == 3
    assert len(result.rows) == 8


def test_every_rollout_correct_falls_back_to_grpo_on_the_base_group():
    result, policy = run([RIGHT], by_answer, budget=3)
    assert result.fallbacks == 1 and result.resets == [] and policy.prompts == []
    assert result.phase1_draws == 5 + 3  # G1 + k, then the whole seed budget
    assert [r.weight for r in result.rows] == [1.0] * 4 + [0.0] * 4


def test_every_rollout_wrong_resets_and_identical_suffixes_carry_no_advantage():
    result, _ = run([WRONG], by_answer)
    assert result.fallbacks == 0 and len(result.resets) == 1
    base, reset = result.rows[:4], result.rows[4:]
    assert all(r.reward == 0.0 for r in base)
    rewards = torch.tensor([r.reward for r in result.rows])
    groups = torch.tensor([r.group for r in result.rows])
    advantages = group_advantages(rewards, groups)
    assert torch.equal(advantages, torch.zeros(8))  # all-equal groups: zero advantage, no NaN
    assert len({tuple(r.completion_ids[r.prefix_len:]) for r in reset}) == 1


def test_an_empty_failed_rollout_is_never_a_seed_and_is_counted():
    result, _ = run([(), WRONG, RIGHT], by_answer, budget=0)
    assert result.empty_seeds >= 1 and len(result.resets) == 1 and result.resets[0].num_thoughts == 3
    only_empty, _ = run([()], by_answer, budget=2)
    assert only_empty.fallbacks == 1 and only_empty.resets == [] and only_empty.empty_seeds == 7
    assert not any(math.isnan(r.reward) for r in only_empty.rows if r.weight)
    logged = finalize(step_sums([only_empty], [[0.0] * len(only_empty.rows)], 1.0))
    assert logged[PREFIX + "empty_seeds"] == 7 and logged[PREFIX + "fallback_rate"] == 1.0


# --------------------------------------------------------------------------- rewards from a user's function
def _trainer(tmp_path, char_tokenizer, reward_funcs, **overrides):
    from datasets import Dataset

    from tests.conftest import make_tiny_llama
    from trl_resets import SRPOConfig, SRPOTrainer

    settings = {"output_dir": str(tmp_path), "per_device_train_batch_size": 8, "max_steps": 1, "max_completion_length": 12,
                    "max_thought_tokens": 4, "max_thoughts": 4, "learning_rate": 1e-3, "logging_steps": 1, "report_to": "none",
                    "use_cpu": True, "bf16": False, "save_strategy": "no", "seed_budget": 1, "temperature": 1.0, "seed": 0,
                    "localization_max_tokens": 4}
    settings.update(overrides)
    data = Dataset.from_dict({"prompt": ["2+5?", "3+4?"], "answer": ["7", "7"]})
    return SRPOTrainer(model=make_tiny_llama(char_tokenizer), reward_funcs=reward_funcs, args=SRPOConfig(**settings),
                       train_dataset=data, processing_class=char_tokenizer, localizer="random")


def test_unscorable_rewards_are_left_out_counted_and_never_corrupt_the_other_rows(tmp_path, char_tokenizer):
    calls = []

    def half_unscorable(completions, **kwargs):  # None, NaN, and rewards outside [0, 1], in turn
        calls.append(len(completions))
        pattern = [None, math.nan, 3.0, -2.0, 0.5]
        return [pattern[(len(calls) + i) % len(pattern)] for i in range(len(completions))]

    trainer = _trainer(tmp_path, char_tokenizer, half_unscorable)
    advantages = []
    summarize = trainer._summarize
    trainer._summarize = lambda groups, *rest: advantages.append(summarize(groups, *rest)) or advantages[-1]
    trainer.train()
    (log,) = [e for e in trainer.state.log_history if "loss" in e]
    assert 0.3 < log["resets/unscored_rate"] < 0.5  # two in five rewards are None or NaN
    state = advantages[0]
    assert torch.isfinite(state["advantages"]).all() and math.isfinite(log["loss"])
    unscored = torch.isnan(state["rewards_per_func"][:, 0])
    assert unscored.any() and (state["advantages"][unscored.cpu()] == 0).all()
    assert (state["advantages"][~unscored.cpu()] != 0).any()  # outside [0, 1] is a reward like any other


@pytest.mark.parametrize("returned, error, match", [
    (math.inf, ValueError, "returned inf for completion 0: rewards must be finite"),
    ("0.5 points", TypeError, "returned '0.5 points' for completion 0"),
    ("short", ValueError, "returned 1 rewards for"),
    ("raise", RuntimeError, "'bad_reward' raised ZeroDivisionError"),
])
def test_a_broken_reward_function_fails_naming_itself_and_the_value(tmp_path, char_tokenizer, returned, error, match):
    def bad_reward(completions, **kwargs):
        if returned == "raise":
            return [1 / 0]
        if returned == "short":
            return [0.0]
        return [returned] + [0.0] * (len(completions) - 1)

    trainer = _trainer(tmp_path, char_tokenizer, bad_reward)
    with pytest.raises(error, match=match):
        trainer.train()


# --------------------------------------------------------------------------- configuration and data
def test_a_delimiter_the_tokenizer_cannot_reproduce_fails_at_construction(tmp_path, char_tokenizer):
    with pytest.raises(ValueError, match="thought_delimiter='→'.*does not reproduce"):
        _trainer(tmp_path, char_tokenizer, lambda completions, **kw: [0.0] * len(completions),
                 thought_delimiter="→")  # not in the character tokenizer's vocabulary: it decodes as <unk>


def test_an_empty_dataset_or_a_missing_reward_column_fails_at_construction(tmp_path, char_tokenizer):
    from datasets import Dataset

    def needs_solution(completions, solution, **kwargs):
        return [0.0] * len(completions)

    with pytest.raises(ValueError, match=r"'needs_solution' needs the column\(s\) \['solution'\]"):
        _trainer(tmp_path, char_tokenizer, needs_solution)
    trainer = _trainer(tmp_path, char_tokenizer, lambda completions, answer=None, **kw: [0.0] * len(completions))
    assert trainer.train_dataset.num_rows == 2  # a parameter with a default is not required
    from tests.conftest import make_tiny_llama
    from trl_resets import SRPOConfig, SRPOTrainer

    with pytest.raises(ValueError, match="train_dataset is empty"):
        SRPOTrainer(model=make_tiny_llama(char_tokenizer), reward_funcs=needs_solution,
                    args=SRPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none",
                                    per_device_train_batch_size=8),
                    train_dataset=Dataset.from_dict({"prompt": []}), processing_class=char_tokenizer)


def test_prompts_too_long_for_the_model_context_are_warned_once_with_the_count(tmp_path, char_tokenizer):
    import warnings

    def warned(limit_over_fit):
        trainer = _trainer(tmp_path, char_tokenizer, lambda completions, **kw: [0.0] * len(completions), max_steps=2)
        (length,) = {len(ids) for ids in trainer._tokenize_prompts([trainer._wrap(p) for p in ["2+5?", "3+4?"]])[0]}
        limit = length + trainer.args.max_completion_length + limit_over_fit
        trainer.model.config.max_position_embeddings = limit  # the rotary tiny model runs on past it
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.train()
        return [str(w.message) for w in caught if "too long for the model's context" in str(w.message)], length, limit

    told, length, limit = warned(-1)  # one token short of room for the longest completion
    assert len(told) == 1  # once per run, not once per step
    assert told[0].startswith("1 of the 1 distinct prompts of this batch are too long")  # 8 rows of one prompt
    assert f"max_completion_length=12 > max_position_embeddings={limit}" in told[0]
    assert f"the longest prompt has {length} tokens" in told[0]
    assert warned(0)[0] == []  # prompt + max_completion_length fits exactly
