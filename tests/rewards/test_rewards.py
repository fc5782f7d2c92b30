"""Boxed-answer extraction and the math, arithmetic, multiple-choice and yes/no rewards."""

import threading

import pytest

from trl_resets.rewards import (
    answers_match,
    arithmetic_reward,
    boxed_answer_reward,
    extract_boxed,
    multiple_choice_reward,
    read_choice,
    read_yes_no,
    yes_no_reward,
)

pytest.importorskip("math_verify")


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


# ---------------------------------------------------------------------------- math (math-verify)

@pytest.mark.parametrize(
    "completion, reference, expected",
    [
        ("12 * 3 = 36, so \\boxed{36}", "36", 1.0),                      # right
        ("\\boxed{\\sqrt{8}}", "2\\sqrt{2}", 1.0),                       # symbolic equality
        ("\\boxed{0.5}", "\\frac{1}{2}", 1.0),
        ("\\boxed{x = 5}", "5", 1.0),
        ("\\boxed{1,200}", "1200", 1.0),
        ("\\boxed{\\sqrt{9}}", "2\\sqrt{2}", 0.0),                       # wrong
        ("\\boxed{35}", "36", 0.0),
        ("\\boxed{}{garbage\\frac{}", "36", 0.0),                        # malformed
        ("\\boxed{36} wait, recheck: \\boxed{3", "36", 0.0),            # truncated last box
        ("36", "36", 0.0),                                               # no box
        ("", "36", 0.0),                                                 # empty
        ("\\boxed{}", "36", 0.0),
        ("\\boxed{7}", "Adding, $3 + 4 = 7$, so the answer is $\\boxed{7}$.", 1.0),  # worked-solution gold
    ],
)
def test_math_reward(completion, reference, expected):
    assert boxed_answer_reward([completion], [reference]) == [expected]


def test_math_reward_unparseable_gold_is_none_not_zero(caplog):
    rewards = boxed_answer_reward(["\\boxed{1}", "\\boxed{1}", "\\boxed{1}"], ["", None, "1"])
    assert rewards == [None, None, 1.0]
    assert "cannot parse the reference answer" in caplog.text


def test_math_reward_parses_each_gold_once(monkeypatch):
    import trl_resets.rewards.math as math_rewards

    seen = []
    real = math_rewards.parse_gold
    monkeypatch.setattr(math_rewards, "parse_gold", lambda ref: seen.append(ref) or real(ref))
    boxed_answer_reward(["\\boxed{2}", "\\boxed{3}", "\\boxed{2}", "\\boxed{4}"], ["2", "2", "2", "4"])
    assert seen == ["2", "4"]


def test_math_reward_on_conversational_completions():
    completions = [
        [{"role": "assistant", "content": "It is \\boxed{7}"}],
        [{"role": "assistant", "content": "It is \\boxed{8}"}],
        [{"role": "assistant", "content": [{"type": "text", "text": "\\boxed{7}"}]}],
    ]
    assert boxed_answer_reward(completions, answer=["7", "7", "7"]) == [1.0, 0.0, 1.0]


def test_math_reward_works_off_the_main_thread():
    out = []
    worker = threading.Thread(target=lambda: out.append(boxed_answer_reward(["\\boxed{\\frac{2}{4}}"], ["0.5"])))
    worker.start()
    worker.join()
    assert out == [[1.0]]


def test_reward_errors_name_the_mistake():
    with pytest.raises(ValueError, match="2 completions but 1 values in `answer`"):
        boxed_answer_reward(["\\boxed{1}", "\\boxed{2}"], ["1"])
    with pytest.raises(TypeError, match="string or a list of chat messages"):
        boxed_answer_reward([42], ["1"])


# ---------------------------------------------------------------------------- arithmetic (exact integers)

@pytest.mark.parametrize(
    "predicted, reference, expected",
    [
        ("32", "32", True),
        (" 1,200 ", "1200", True),
        ("32.0", "32", True),
        ("x = 5", "5", True),
        ("\\text{ 14. }", "14", True),
        ("−3", "-3", True),
        ("31", "32", False),
        ("64/2", "32", True),
        ("", "32", False),
        ("}{garbage\\frac{", "32", False),
        ("2^5", "32", False),
    ],
)
def test_answers_match_is_an_exact_literal_check(predicted, reference, expected):
    assert answers_match(predicted, reference) is expected


def test_arithmetic_reward():
    completions = ["12 * 3 = 36, so \\boxed{36}", "\\boxed{35}", "36", "\\boxed{}", "", "\\boxed{3"]
    assert arithmetic_reward(completions, [36] * 6) == [1.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert arithmetic_reward(["\\boxed{3}"], answer=[3], prompt=["q"], solution_steps=[["1 + 2 = 3"]]) == [1.0]
    with pytest.raises(ValueError, match="answer=None"):
        arithmetic_reward(["\\boxed{1}"], [None])


# ---------------------------------------------------------------------------- multiple choice and yes/no

@pytest.mark.parametrize(
    "boxed, expected",
    [
        ("B", "B"), ("(B)", "B"), ("\\text{B}", "B"), ("\\textbf{(B)}", "B"), ("B. a bank", "B"),
        ("B) a bank", "B"), ("Answer: B", "B"), ("b", "B"), ("(c)", "C"), ("$D$", "D"),
        ("a bank", None), ("bank", None), ("", None), ("12", None), ("BC", None),
    ],
)
def test_read_choice(boxed, expected):
    assert read_choice(boxed) == expected


def test_multiple_choice_reward():
    completions = [
        "The river side fits, so \\boxed{(B)}",    # right
        "\\boxed{\\text{B. river bank}}",           # right, with text
        "\\boxed{C}",                               # wrong
        "\\boxed{a bank}",                          # malformed: names no option
        "so the answer is \\boxed{B",               # truncated
        "",                                         # empty
        [{"role": "assistant", "content": "\\boxed{B}"}],
    ]
    assert multiple_choice_reward(completions, ["B"] * 7) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0]
    assert multiple_choice_reward(["\\boxed{B}", "\\boxed{B}"], ["(B)", "river bank"]) == [1.0, None]


@pytest.mark.parametrize(
    "text, expected",
    [("Yes", True), ("\\text{yes}", True), ("\\textbf{No.}", False), ("no, because", False), ("True", True),
     ("FALSE", False), (True, True), (False, False), ("maybe", None), ("", None), (1, None)],
)
def test_read_yes_no(text, expected):
    assert read_yes_no(text) is expected


def test_yes_no_reward():
    completions = ["\\boxed{Yes}", "\\boxed{\\text{no}}", "\\boxed{maybe}", "\\boxed{Ye", "", "yes"]
    assert yes_no_reward(completions, [True, True, True, True, True, True]) == [1.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert yes_no_reward(["\\boxed{No}", "\\boxed{No}", "\\boxed{No}"], ["no", "false", "unknown"]) == [1.0, 1.0, None]
