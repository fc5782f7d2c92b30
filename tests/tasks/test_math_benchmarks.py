"""The math benchmark loaders on fixtures in each source's schema: columns, prompt, answer, the reward end to end."""

from pathlib import Path

import pytest

from trl_resets.rewards import boxed_answer_reward
from trl_resets.tasks.math_benchmarks import (
    BENCHMARKS,
    load_boxed_problems,
    load_math_benchmark,
    load_numinamath_training,
)

pytest.importorskip("math_verify")
FIXTURES = Path(__file__).parents[1] / "fixtures"
EXPECTED = {  # name: (prompts kept, answers, a right and a wrong completion for the first row)
    "numinamath_olympiads": (["Find the sum of the first 10 positive integers."], ["55"], ("\\boxed{55}", "\\boxed{45}")),
    "hmmt_nov_2025": (["Compute $\\sqrt{8}$ in simplest form.", "Compute $3^4$."], ["2\\sqrt{2}", "81"],
                      ("\\boxed{\\sqrt{8}}", "\\boxed{8}")),
    "math_level5": (["Solve $x^2 = 1/4$ for $x > 0$."], ["\\frac{1}{2}"], ("so \\boxed{0.5}", "\\boxed{-0.5}")),
    "acereason_math": (["How many sides does a hexagon have?", "Evaluate $\\frac{6}{4}$."], ["6", "\\frac{3}{2}"],
                       ("\\boxed{6}", "\\boxed{5")),
}


@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_loader_on_its_fixture(name, caplog):
    data = load_math_benchmark(name, data_files=str(FIXTURES / f"{name}.jsonl"))
    prompts, answers, (right, wrong) = EXPECTED[name]
    assert data.column_names == ["prompt", "answer", "id"]
    assert data["prompt"] == prompts and data["answer"] == answers
    assert boxed_answer_reward([right, wrong], [data["answer"][0]] * 2) == [1.0, 0.0]


def test_rows_without_a_readable_answer_are_dropped_and_counted(caplog):
    load_math_benchmark("numinamath_olympiads", data_files=str(FIXTURES / "numinamath_olympiads.jsonl"))
    assert "dropped 1 of 2 rows with no readable reference answer" in caplog.text


def test_unknown_benchmark_is_refused():
    with pytest.raises(ValueError, match="unknown math benchmark 'aime'"):
        load_math_benchmark("aime")


def test_numinamath_training_set_on_its_fixture():
    """The paper's training set (NuminaMath-CoT olympiads rows with a boxed answer), seeded, with a disjoint tail."""
    fixture = str(FIXTURES / "numinamath_olympiads.jsonl")
    data = load_numinamath_training(data_files=fixture)
    assert data.column_names == ["prompt", "answer"] and len(data) == 1  # one olympiads row has no box
    assert data[0] == {"prompt": "Find the sum of the first 10 positive integers.", "answer": "55"}
    assert boxed_answer_reward(["so \\boxed{55}", "\\boxed{56}"], answer=[data[0]["answer"]] * 2) == [1.0, 0.0]
    every_source = load_numinamath_training(source=None, data_files=fixture)
    assert sorted(every_source["answer"]) == ["4", "55"]
    first = load_numinamath_training(num_problems=1, source=None, seed=3, data_files=fixture)
    rest = load_numinamath_training(num_problems=5, source=None, seed=3, skip=1, data_files=fixture)
    assert sorted([*first["answer"], *rest["answer"]]) == ["4", "55"]
    assert len(load_numinamath_training(skip=1, data_files=fixture)) == 0
    with pytest.raises(ValueError, match="no column 'question'"):
        load_boxed_problems("AI-MO/NuminaMath-CoT", question="question", data_files=fixture)
