"""The procedural arithmetic task and its exact step checker."""

import json

import pytest

from trl_resets.rewards import arithmetic_reward
from trl_resets.tasks import ArithmeticProblem, check_steps, make_arithmetic_dataset, parse_equations

# Take 7, add 5, multiply by 3, subtract 4: 12, 36, 32.
PROBLEM = ArithmeticProblem(start=7, ops=(("+", 5), ("*", 3), ("-", 4)))
ROW = PROBLEM.to_row()


def _check(thoughts, problem=ROW):
    result = check_steps(problem, thoughts)
    return result.correct, result.first_wrong, result.final_correct


def test_same_seed_gives_same_rows_and_smaller_sets_are_prefixes():
    first = make_arithmetic_dataset(20, num_steps=3, seed=7)
    again = make_arithmetic_dataset(20, num_steps=3, seed=7)
    assert first.to_list() == again.to_list()
    assert make_arithmetic_dataset(5, num_steps=3, seed=7).to_list() == first.to_list()[:5]
    assert make_arithmetic_dataset(20, num_steps=3, seed=8).to_list() != first.to_list()


def test_rows_have_the_documented_columns_and_consistent_content():
    data = make_arithmetic_dataset(200, num_steps=[1, 2, 4, 6], seed=0, max_value=100)
    assert set(data.column_names) == {"prompt", "answer", "solution_steps", "num_steps", "start", "ops"}
    assert set(data["num_steps"]) == {1, 2, 4, 6}
    for row in data:
        problem = ArithmeticProblem.from_row(row)
        assert isinstance(row["prompt"], str) and row["prompt"].endswith("?")
        assert row["num_steps"] == len(row["ops"]) == len(row["solution_steps"])
        assert row["answer"] == str(problem.answer)
        assert all(1 <= value <= 100 for value in problem.values)
        assert f"\\boxed{{{row['answer']}}}" in row["solution_steps"][-1]


def test_prompt_reads_as_a_sequence_of_instructions():
    assert ROW["prompt"] == (
        "Take the number 7. Add 5. Multiply by 3. Subtract 4. What number do you have at the end?"
    )
    assert ROW["solution_steps"] == ["7 + 5 = 12", "12 * 3 = 36", "36 - 4 = 32, so the answer is \\boxed{32}"]
    assert ROW["answer"] == "32"


def test_every_reference_solution_passes_the_checker_and_the_reward():
    data = make_arithmetic_dataset(300, num_steps=[1, 3, 5, 8], seed=3)
    for row in data:
        assert _check(row["solution_steps"], row) == ([True] * row["num_steps"], None, True)
    completions = ["</thought>".join(steps) for steps in data["solution_steps"]]
    assert arithmetic_reward(completions, data["answer"]) == [1.0] * len(data)


def test_all_right_chain_in_loose_formatting():
    thoughts = [
        "First, add 5 to 7: 7 + 5 = 12.</thought>",
        "Then multiply: 12 × 3 = 36 </thought>",
        "Finally 36 − 4 = 32. The answer is $\\boxed{32}$.</thought>",
    ]
    assert _check(thoughts) == ([True, True, True], None, True)


def test_first_step_wrong_is_found_even_though_later_steps_follow_from_it():
    thoughts = ["7 + 5 = 13", "13 * 3 = 39", "39 - 4 = 35, so \\boxed{35}"]
    assert _check(thoughts) == ([False, False, False], 1, False)


def test_late_arithmetic_slip_is_found():
    thoughts = ["7 + 5 = 12", "12 * 3 = 36", "36 - 4 = 30, so \\boxed{30}"]
    assert _check(thoughts) == ([True, True, False], 3, False)


def test_wrong_operation_with_right_arithmetic_is_wrong():
    thoughts = ["7 + 5 = 12", "12 + 3 = 15", "15 - 4 = 11 \\boxed{11}"]
    assert _check(thoughts)[1] == 2


def test_unparseable_thought_is_wrong_and_does_not_advance():
    thoughts = ["7 + 5 = 12", "Let me think about this carefully.", "12 * 3 = 36", "36 - 4 = 32 \\boxed{32}"]
    assert _check(thoughts) == ([True, False, True, True], 2, True)


def test_wrong_thought_must_be_redone_on_the_correct_value():
    thoughts = ["7 + 5 = 13", "7 + 5 = 12", "12 * 3 = 36", "36 - 4 = 32 \\boxed{32}"]
    assert _check(thoughts) == ([False, True, True, True], 1, True)


def test_missing_boxed_answer_points_past_the_last_thought():
    thoughts = ["7 + 5 = 12", "12 * 3 = 36", "36 - 4 = 32"]
    assert _check(thoughts) == ([True, True, True], 4, False)


def test_chain_that_stops_early_points_past_the_last_thought():
    assert _check(["7 + 5 = 12"]) == ([True], 2, False)
    assert _check([]) == ([], 1, False)


def test_separate_final_answer_thought_is_right():
    thoughts = ["7 + 5 = 12", "12 * 3 = 36", "36 - 4 = 32", "So the final answer is \\boxed{32}."]
    assert _check(thoughts) == ([True, True, True, True], None, True)


def test_correct_answer_without_the_steps_is_a_wrong_thought():
    assert _check(["The answer is \\boxed{32}"]) == ([False], 1, True)


def test_premature_box_is_wrong():
    assert _check(["7 + 5 = 12, so the answer is \\boxed{12}"]) == ([False], 1, False)


def test_boxed_equation_counts_by_its_result():
    thoughts = ["7 + 5 = 12", "12 * 3 = 36", "\\boxed{36 - 4 = 32}"]
    assert _check(thoughts) == ([True, True, True], None, True)


def test_commutative_operands_may_swap_but_subtraction_may_not():
    assert _check(["5 + 7 = 12", "3 * 12 = 36"])[0] == [True, True]
    assert _check(["7 + 5 = 12", "12 * 3 = 36", "4 - 36 = -32"])[0] == [True, True, False]


def test_restating_a_done_step_is_allowed_but_is_not_progress():
    assert _check(["7 + 5 = 12", "Since 7 + 5 = 12, we get 12 * 3 = 36"])[0] == [True, True]
    assert _check(["7 + 5 = 12", "Again, 7 + 5 = 12"])[0] == [True, False]


def test_two_operations_in_one_thought():
    thoughts = ["7 + 5 = 12 and 12 * 3 = 36", "36 - 4 = 32, \\boxed{32}"]
    assert _check(thoughts) == ([True, True], None, True)


def test_checker_accepts_a_problem_object_and_json_or_pair_ops():
    thoughts = ROW["solution_steps"]
    assert check_steps(PROBLEM, thoughts).first_wrong is None
    as_json = {"start": 7, "ops": json.dumps(ROW["ops"])}
    as_pairs = {"start": 7, "ops": [["+", 5], ["*", 3], ["-", 4]]}
    assert check_steps(as_json, thoughts).first_wrong is None
    assert check_steps(as_pairs, thoughts).first_wrong is None


def test_checker_errors_name_the_mistake():
    with pytest.raises(TypeError, match="list of thoughts"):
        check_steps(ROW, "7 + 5 = 12</thought>12 * 3 = 36")
    with pytest.raises(KeyError, match="'start' and 'ops'"):
        check_steps({"prompt": "x", "answer": "3"}, ["1 + 2 = 3"])
    with pytest.raises(ValueError, match="Unknown operator"):
        check_steps({"start": 1, "ops": [["^", 2]]}, ["1 ^ 2 = 1"])


def test_parse_equations_handles_latex_unicode_and_chains():
    found = parse_equations("so 12 \\times 3 = 36, then 36 ÷ 4 = 9 = 9 * 1 = 9 and 3 − 5 = −2</thought>")
    assert [(int(e.left), e.op, int(e.right), int(e.result)) for e in found] == [
        (12, "*", 3, 36), (36, "/", 4, 9), (9, "*", 1, 9), (3, "-", 5, -2),
    ]
    assert parse_equations("Step 1. Add 5 to 7 to get 12.") == []
    assert [int(e.left) for e in parse_equations("17+5=22")] == [17]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"n": -1}, "n must be"),
        ({"n": 2, "num_steps": 0}, "num_steps"),
        ({"n": 2, "operations": ("^",)}, "operations"),
        ({"n": 2, "max_value": 5}, "max_value=5"),
    ],
)
def test_bad_settings_raise_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_arithmetic_dataset(**kwargs)
