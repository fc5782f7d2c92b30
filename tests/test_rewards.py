"""Boxed-answer extraction and the final-answer reward."""

import pytest

from trl_resets.rewards import answers_match, boxed_answer_reward, extract_boxed


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so the answer is \\boxed{32}.", "32"),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("\\boxed{{a}{b{c}}}", "{a}{b{c}}"),
        ("first \\boxed{1}, then \\boxed{2}, finally \\boxed{3}", "3"),
        ("no box here", None),
        ("\\boxed{}", ""),
        ("spaced \\boxed {7}", "7"),
        ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
        ("\\boxed{5} then a truncated \\boxed{12", None),
        ("\\boxed alone and \\boxed{4}", "4"),
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


@pytest.mark.parametrize(
    "predicted, reference, expected",
    [
        ("32", "32", True),
        (" 1,200 ", "1200", True),
        ("32.0", "32", True),
        ("\\frac{1}{2}", "0.5", True),
        ("x = 5", "5", True),
        ("\\text{ 14. }", "14", True),
        ("−3", "-3", True),
        ("31", "32", False),
        ("", "32", False),
        ("}{garbage\\frac{", "32", False),
    ],
)
def test_answers_match(predicted, reference, expected):
    assert answers_match(predicted, reference) is expected


def test_reward_on_plain_strings():
    completions = ["12 * 3 = 36, so \\boxed{36}", "\\boxed{35}", "36", "\\boxed{}"]
    assert boxed_answer_reward(completions, ["36"] * 4) == [1.0, 0.0, 0.0, 0.0]


def test_reward_on_conversational_completions():
    completions = [
        [{"role": "assistant", "content": "It is \\boxed{7}"}],
        [{"role": "assistant", "content": "It is \\boxed{8}"}],
        [{"role": "assistant", "content": [{"type": "text", "text": "\\boxed{7}"}]}],
    ]
    assert boxed_answer_reward(completions, answer=["7", "7", "7"]) == [1.0, 0.0, 1.0]


def test_reward_ignores_extra_columns_and_accepts_int_answers():
    rewards = boxed_answer_reward(["\\boxed{3}"], answer=[3], prompt=["q"], solution_steps=[["1 + 2 = 3"]])
    assert rewards == [1.0]


def test_reward_uses_math_verify_for_latex_when_installed():
    pytest.importorskip("math_verify")
    assert boxed_answer_reward(["\\boxed{\\sqrt{8}}"], ["2\\sqrt{2}"]) == [1.0]
    assert boxed_answer_reward(["\\boxed{\\sqrt{9}}"], ["2\\sqrt{2}"]) == [0.0]


def test_reward_errors_name_the_mistake():
    with pytest.raises(ValueError, match="2 completions but 1 answers"):
        boxed_answer_reward(["\\boxed{1}", "\\boxed{2}"], ["1"])
    with pytest.raises(ValueError, match="answer=None"):
        boxed_answer_reward(["\\boxed{1}"], [None])
    with pytest.raises(TypeError, match="string or a list of chat messages"):
        boxed_answer_reward([42], ["1"])
