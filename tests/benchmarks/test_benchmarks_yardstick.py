"""benchmarks/trl_yardstick*.py: the splits it gives each test, its offline stand-ins and its table (TRL's tests
themselves are not run here)."""

import importlib.util
import json
from pathlib import Path

import pytest

_BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, _BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


plugin = _load("trl_yardstick_plugin")
runner = _load("trl_yardstick")


@pytest.mark.parametrize(("n", "split"), [(8, (4, 4)), (4, (2, 2)), (6, (3, 3)), (5, (3, 2)), (3, (0, 3)),
                                          (2, (0, 2)), (1, None)])
def test_reset_split_fills_num_generations_with_groups_of_two_or_more(n, split):
    assert plugin.reset_split(n) == split
    if split is not None:
        base, per_prefix = split
        assert base + per_prefix == n and base != 1 and per_prefix >= 2


def test_standin_model_has_the_architecture_its_id_names(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    monkeypatch.setattr(plugin, "STANDIN_DIR", tmp_path)
    moe = plugin.standin_model("trl-internal-testing/tiny-Qwen3MoeForCausalLM")
    model = AutoModelForCausalLM.from_pretrained(moe)
    assert type(model).__name__ == "Qwen3MoeForCausalLM" and model.config.output_router_logits
    scorer = AutoModelForSequenceClassification.from_pretrained(
        plugin.standin_model("trl-internal-testing/tiny-Qwen2ForSequenceClassification-2.5"))
    assert type(scorer).__name__ == "Qwen2ForSequenceClassification" and scorer.config.num_labels == 1
    tokenizer = AutoTokenizer.from_pretrained(moe)
    assert tokenizer.decode(tokenizer("a </thought>")["input_ids"]) == "a </thought>"
    assert plugin.standin_model("trl-internal-testing/tiny-LlavaForConditionalGeneration") is None
    assert plugin.standin_model(moe) is None  # a local folder is left as it is


def test_standin_datasets_have_the_zen_columns(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(plugin, "STANDIN_DIR", tmp_path)
    load = plugin.standin_load_dataset(datasets.load_dataset)
    standard = load("trl-internal-testing/zen", "standard_prompt_only", split="train")
    chat = load("trl-internal-testing/zen", "conversational_prompt_only")
    assert standard.column_names == ["prompt"] and isinstance(standard[0]["prompt"], str)
    assert set(chat) == {"train", "test"} and chat["test"][0]["prompt"][0]["role"] == "user"
    with pytest.raises(FileNotFoundError, match="no offline stand-in"):
        load("trl-internal-testing/zen-image", "conversational_prompt_only")


def test_report_counts_each_mode_and_lists_every_test(tmp_path):
    outcomes = {
        "trl": {"t::a": {"test": "t::a", "outcome": "passed", "reason": ""},
                "t::b": {"test": "t::b", "outcome": "passed", "reason": ""}},
        "grpo": {"t::a": {"test": "t::a", "outcome": "refused", "reason": "ValueError: loss_type='dapo' | x"}},
    }
    text = runner.report(outcomes, "cmd")
    assert "| passed | 2 | 0 |" in text and "| refused | 0 | 1 |" in text
    assert "| `a` | passed | refused: ValueError: loss_type='dapo' \\| x |" in text
    assert "| `b` | passed | not run |" in text
    (tmp_path / "trl.jsonl").write_text("\n".join(json.dumps(e) for e in outcomes["trl"].values()))
    assert runner.load(tmp_path / "trl.jsonl") == outcomes["trl"]
