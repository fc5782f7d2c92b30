"""Localization prompt and reply parsing against garbage."""

import random

import pytest

from trl_resets.localizers import (
    Localization,
    LocalizationRequest,
    SelfLocalizer,
    as_localizer,
    localization_prompt,
    parse_step_index,
    resolve_reset_index,
)


@pytest.mark.parametrize(
    "reply, expected",
    [
        ("\\boxed{2}", 2),
        ("Step 3 looks wrong.\n\\boxed{3}", 3),
        ("\\boxed{ Step 4 }", 4),
        ("no box here, step 2", None),
        ("\\boxed{two}", None),
        ("\\boxed{-1}", None),
        ("\\boxed{0}", None),
        ("\\boxed{6}", None),  # only 5 steps
        ("\\boxed{1} then \\boxed{5}", 5),  # the last box counts
        ("\\boxed{}", None),
        ("", None),
        (None, None),
        ("\\boxed{2.5}", None),
    ],
)
def test_parse_step_index(reply, expected):
    assert parse_step_index(reply, num_steps=5) == expected


def test_unparsed_answers_fall_back_to_random_and_are_flagged():
    rng = random.Random(0)
    seen = set()
    for _ in range(200):
        index, failed = resolve_reset_index(Localization(None), 4, rng)
        assert failed and 1 <= index <= 4
        seen.add(index)
    assert seen == {1, 2, 3, 4}
    assert resolve_reset_index(Localization(3), 4, rng) == (3, False)
    assert resolve_reset_index(Localization(5), 4, rng)[1] is True
    assert resolve_reset_index(Localization(True), 4, rng)[1] is True


class EchoPolicy:
    def __init__(self, replies):
        self.replies, self.prompts = replies, []

    def complete(self, prompts, max_new_tokens, temperature):
        self.prompts.append(prompts)
        return [(r, 7) for r in self.replies]


def test_self_localizer_batches_and_parses():
    policy = EchoPolicy(["\\boxed{2}", "I think step three", "\\boxed{9}"])
    reqs = [LocalizationRequest("What is 2+3?", ["2+3=6", "so \\boxed{6}"])] * 3
    answers = SelfLocalizer().locate(reqs, policy, random.Random(0))
    assert len(policy.prompts) == 1 and len(policy.prompts[0]) == 3  # one batched call
    assert [a.index for a in answers] == [2, None, None] and all(a.tokens == 7 for a in answers)
    prompt = policy.prompts[0][0]
    assert "What is 2+3?" in prompt and "Step 1: 2+3=6\nStep 2: so \\boxed{6}" in prompt and "1 and 2" in prompt


def test_templates_and_names_are_checked():
    with pytest.raises(ValueError, match="placeholder"):
        SelfLocalizer(template="{problem}")
    with pytest.raises(ValueError, match="unknown localizer"):
        as_localizer("prm")
    assert as_localizer("oracle").name == "oracle"
    assert as_localizer(None, default="random").name == "random"
    assert as_localizer(lambda q, t: 1).locate([LocalizationRequest("q", ["a"])])[0].index == 1
    text = localization_prompt(LocalizationRequest("Q", ["a", "b", "c"]))
    assert "Step 3: c" in text and "between 1 and 3" in text


def _problem_row():
    from trl_resets.tasks import make_arithmetic_dataset

    return make_arithmetic_dataset(1, num_steps=3, seed=5)[0]


def test_oracle_localizer_points_at_the_checkers_first_wrong_step():
    from trl_resets.localizers import OracleLocalizer

    row = _problem_row()
    good = list(row["solution_steps"])
    assert len(good) == 3  # three operations, the last one boxes the answer
    wrong_second = [good[0], "90 + 3 = 94", "94 + 6 = 100, so the answer is \\boxed{100}"]
    assert good[0].startswith("18 * 5 = 90")
    requests = [
        LocalizationRequest("q", wrong_second, row),
        LocalizationRequest("q", ["I am not sure.", *good[1:]], row),
        LocalizationRequest("q", good[:2], row),  # right so far, stopped early: reset at its last thought
        LocalizationRequest("q", good, row),  # the checker finds no error: no answer, random reset
    ]
    answers = OracleLocalizer().locate(requests, None, random.Random(0))
    assert [a.index for a in answers] == [2, 1, 2, None]
    assert resolve_reset_index(answers[3], 3, random.Random(0))[1] is True


def test_oracle_localizer_needs_rows_and_accepts_a_custom_checker():
    from trl_resets.localizers import OracleLocalizer

    with pytest.raises(ValueError, match="dataset row"):
        OracleLocalizer().locate([LocalizationRequest("q", ["a"])])
    seen = []
    custom = OracleLocalizer(lambda row, thoughts: seen.append((row, thoughts)) or "3")
    assert custom.locate([LocalizationRequest("q", ["a", "b", "c"], {"k": 1})])[0].index == 3
    assert seen == [({"k": 1}, ["a", "b", "c"])]
    with pytest.raises(TypeError):
        OracleLocalizer(checker=5)
