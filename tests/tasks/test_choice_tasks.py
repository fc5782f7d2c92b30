"""CommonsenseQA, SciKnowEval and StrategyQA loaders on fixtures in their real schemas: columns, prompt, the reward end to end."""

from pathlib import Path

import pytest

from trl_resets.tasks.choice import REWARDS, load_commonsense_qa, load_sciknoweval, load_strategyqa

FIXTURES = Path(__file__).parents[1] / "fixtures"


def test_commonsense_qa():
    data = load_commonsense_qa(data_files=str(FIXTURES / "commonsense_qa.jsonl"))
    assert data.column_names == ["prompt", "answer", "id"] and data["answer"] == ["B", "C"]
    assert data[0]["prompt"].startswith("Where would you keep milk cold at home?\n\nA. oven\nB. refrigerator\n")
    assert "\\boxed{" in data[0]["prompt"]
    completions = ["The fridge keeps it cold: \\boxed{B}", "\\boxed{\\text{(A) spoon}}"]
    assert REWARDS["commonsense_qa"](completions, data["answer"]) == [1.0, 0.0]


def test_strategyqa():
    data = load_strategyqa(data_files=str(FIXTURES / "strategyqa.jsonl"))
    assert data.column_names == ["prompt", "answer", "id"] and data["answer"] == [False, True]
    assert data[0]["prompt"].startswith("Could a penguin fly across the Atlantic Ocean?") and "yes or no" in data[0]["prompt"]
    completions = ["Penguins cannot fly, so \\boxed{No}", "\\boxed{No}"]
    assert REWARDS["strategyqa"](completions, data["answer"]) == [1.0, 0.0]


def test_unlabelled_commonsense_qa_split_is_refused(tmp_path):
    unlabelled = tmp_path / "test.jsonl"
    unlabelled.write_text((FIXTURES / "commonsense_qa.jsonl").read_text().replace('"answerKey": "B"', '"answerKey": ""'))
    with pytest.raises(ValueError, match="1 of 2 CommonsenseQA rows .* have no answerKey"):
        load_commonsense_qa("test", data_files=str(unlabelled))


@pytest.mark.parametrize("domain, questions, answers", [
    ("chemistry", ["Which element has the chemical symbol Na?"], ["B"]),   # the true/false row is left out
    ("biology", ["Which organelle produces most of a cell's ATP?"], ["C"]),
    ("materials", ["Which material is a semiconductor?"], ["B"]),
    ("physics", ["Which unit measures force?"], ["A"]),
])
def test_sciknoweval_domains(domain, questions, answers):
    data = load_sciknoweval(domain, data_files=str(FIXTURES / "sciknoweval.jsonl"))
    assert [p.split("\n\n")[0] for p in data["prompt"]] == questions and data["answer"] == answers
    right = f"\\boxed{{{answers[0]}}}"
    assert REWARDS["sciknoweval"]([right, "\\boxed{D}" if answers[0] != "D" else "\\boxed{A}"], answers * 2) == [1.0, 0.0]


def test_sciknoweval_unknown_domain_is_refused():
    with pytest.raises(ValueError, match="domain='math'"):
        load_sciknoweval("math")
