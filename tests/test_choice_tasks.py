"""CommonsenseQA and StrategyQA loaders on fixtures in their real schemas: columns, prompt, the reward end to end."""

from pathlib import Path

import pytest

from trl_resets.tasks.choice import REWARDS, load_commonsense_qa, load_strategyqa

FIXTURES = Path(__file__).parent / "fixtures"


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
