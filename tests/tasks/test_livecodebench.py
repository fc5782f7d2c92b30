"""The LiveCodeBench loader on a fixture in the real schema: columns, prompt, the test split, the reward end to end."""

import base64
import pickle
import sys
import zlib
from pathlib import Path

import pytest

from trl_resets.rewards import CodeReward
from trl_resets.sandbox import LocalSandbox
from trl_resets.tasks.livecodebench import decode_test_cases, load_livecodebench

FIXTURE = str(Path(__file__).parents[1] / "fixtures" / "livecodebench.jsonl")
SOLUTIONS = {
    "abc999_b": "```python\na, b = map(int, input().split())\nprint(a * b)\n```",
    "9999": "```python\nclass Solution:\n    def countGreater(self, nums: List[int], k: int) -> int:\n"
            "        return sum(1 for x in nums if x > k)\n```",
}


def test_columns_prompt_and_difficulty():
    data = load_livecodebench("all", data_files=FIXTURE)
    assert data.column_names == ["prompt", "tests", "question_id", "platform", "difficulty"]
    assert data["question_id"] == ["abc999_b", "9999"]  # the easy problem is left out
    stdin_row, call_row = data[0], data[1]
    assert stdin_row["prompt"].startswith("You are given two integers") and "standard input" in stdin_row["prompt"]
    assert "def countGreater(self, nums: List[int], k: int)" in call_row["prompt"]
    assert stdin_row["tests"]["fn_name"] is None and call_row["tests"]["fn_name"] == "countGreater"
    assert stdin_row["tests"]["inputs"] == ["2 3\n", "10 10\n", "0 7\n", "12 12\n"]  # public, then private
    assert len(load_livecodebench("all", difficulty=None, data_files=FIXTURE)) == 3


def test_train_and_eval_parts_split_each_problems_tests():
    full = load_livecodebench("all", data_files=FIXTURE)
    train = load_livecodebench("train", data_files=FIXTURE, seed=3)
    held_out = load_livecodebench("eval", data_files=FIXTURE, seed=3)
    for whole, a, b in zip(full["tests"], train["tests"], held_out["tests"]):
        assert a["inputs"] and b["inputs"]
        assert sorted(a["inputs"] + b["inputs"]) == sorted(whole["inputs"])
        assert not set(a["inputs"]) & set(b["inputs"])
    assert load_livecodebench("train", data_files=FIXTURE, seed=3)["tests"] == train["tests"]  # seeded


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the local sandbox needs Linux")
def test_reward_end_to_end(tmp_path):
    reward = CodeReward(LocalSandbox(memory_bytes=512 * 2**20, tmp_root=str(tmp_path)), max_workers=2)
    data = load_livecodebench("train", data_files=FIXTURE)
    right = [SOLUTIONS[q] for q in data["question_id"]]
    wrong = ["```python\nprint(-1)\n```",
             ("```python\nclass Solution:\n    def countGreater(self, nums, k):\n"
              "        return -1\n```")]
    assert reward(right + wrong, list(data["tests"]) * 2) == [1.0, 1.0, 0.0, 0.0]


def test_private_tests_never_unpickle_objects():
    hostile = base64.b64encode(zlib.compress(pickle.dumps(Path("/")))).decode()
    with pytest.raises(pickle.UnpicklingError, match="refusing to load"):
        decode_test_cases(hostile)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="part='test'"):
        load_livecodebench("test", data_files=FIXTURE)
    with pytest.raises(ValueError, match="release=7"):
        load_livecodebench(release=7, data_files=FIXTURE)
    with pytest.raises(ValueError, match="train_fraction=1"):
        load_livecodebench(train_fraction=1, data_files=FIXTURE)
