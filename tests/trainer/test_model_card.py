"""The model card: TRL's card plus the reset section (method, paper, split, localizer, metrics), rendered offline."""

import math

import pytest
from datasets import Dataset

from tests.conftest import make_tiny_llama
from trl_resets import GRPOBaselineTrainer, RRPOConfig, RRPOTrainer, SRPOConfig, SRPOTrainer
from trl_resets.config import ResetConfig
from trl_resets.model_card import SECTION_TITLE, headline_metrics, insert_section, reset_card_section

LOGS = [
    {"step": 1, "loss": 0.1, "reward": 0.25, "resets/base_pass_rate": 0.5, "resets/sp_pass_rate": float("nan"),
     "resets/reset_index_mean": 2.0, "resets/parse_failure_rate": 0.0},
    {"step": 2, "loss": 0.2, "reward": 0.75, "resets/base_pass_rate": 0.25, "resets/sp_pass_rate": 0.5,
     "resets/reset_index_mean": 3.0, "resets/parse_failure_rate": 0.5},
    {"train_runtime": 12.0, "reward": 99.0},  # the end-of-training summary is not a step
]


def _reward(completions, **kwargs):
    return [0.0] * len(completions)


def _trainer(tmp_path, char_tokenizer, trainer_cls, config_cls, **overrides):
    args = config_cls(output_dir=str(tmp_path), per_device_train_batch_size=8, max_completion_length=24,
                      use_cpu=True, bf16=False, report_to="none", **overrides)
    data = Dataset.from_dict({"prompt": ["1+1?"], "answer": ["2"]})
    trainer = trainer_cls(model=make_tiny_llama(char_tokenizer), reward_funcs=_reward, args=args, train_dataset=data,
                          processing_class=char_tokenizer)
    trainer.state.log_history = [dict(e) for e in LOGS]
    trainer.state.global_step = 2
    return trainer


def test_headline_metrics_skip_nan_and_non_step_entries():
    metrics = headline_metrics(LOGS)
    assert metrics["reward"] == {"last": 0.75, "mean": 0.5, "steps": 2}
    assert metrics["resets/sp_pass_rate"] == {"last": 0.5, "mean": 0.5, "steps": 1}
    assert metrics["resets/parse_failure_rate"]["mean"] == 0.25
    assert "resets/fallback_rate" not in metrics  # never logged
    assert headline_metrics([]) == {}


def test_srpo_card_names_method_paper_split_localizer_and_metrics(tmp_path, char_tokenizer):
    trainer = _trainer(tmp_path, char_tokenizer, SRPOTrainer, SRPOConfig)
    trainer.create_model_card(model_name="srpo-tiny")
    card = (tmp_path / "README.md").read_text()
    assert card.startswith("---") and "srpo" in card.split("---")[1]  # TRL's card data carries our tags
    assert "trained with SRPO" in card  # TRL's template, from the trainer's _name
    assert "@article{samanta2026resets" in card and "Credit Assignment with Resets" in card
    assert "| method | SRPO |" in card
    assert "| group split | 1x4 with 4 base rollouts (8 per prompt) |" in card
    assert "| localizer | self |" in card
    assert "| `reward` | 0.75 | 0.5 |" in card
    assert "| `resets/reset_index_mean` | 3 | 2.5 |" in card
    assert card.index(SECTION_TITLE) < card.index("### Framework versions")
    trainer.create_model_card(model_name="srpo-tiny")  # again: one section, not two
    assert (tmp_path / "README.md").read_text().count(SECTION_TITLE) == 1


def test_card_names_the_iid_base_group(tmp_path, char_tokenizer):
    trainer = _trainer(tmp_path, char_tokenizer, SRPOTrainer, SRPOConfig, base_group="iid")
    trainer.create_model_card(model_name="srpo-tiny")
    card = (tmp_path / "README.md").read_text()
    assert "| group split | 1x4 with 4 base rollouts (8 per prompt), iid base group (the first draws, " in card


def test_card_names_pipelined_resets_and_their_age(tmp_path, char_tokenizer):
    trainer = _trainer(tmp_path, char_tokenizer, SRPOTrainer, SRPOConfig, reset_lag=1, seed_budget=0)
    trainer.state.log_history[1]["resets/reset_age"] = 1.0
    trainer.create_model_card(model_name="srpo-tiny")
    card = (tmp_path / "README.md").read_text()
    assert "(8 per prompt), pipelined resets: suffixes sampled 1 generation(s) after their seed" in card
    assert "| `resets/reset_age` | 1 | 1 |" in card


def test_card_names_a_local_base_model_instead_of_none(tmp_path, char_tokenizer):
    trainer = _trainer(tmp_path, char_tokenizer, SRPOTrainer, SRPOConfig)
    trainer.model.config._name_or_path = str(tmp_path)  # a local folder: TRL cannot link it
    trainer.base_model_label = "SmolLM2-135M-Instruct after the warm-up"
    trainer.create_model_card(model_name="srpo-tiny")
    card = (tmp_path / "README.md").read_text()
    assert "[None]" not in card and 'model="None"' not in card
    assert "fine-tuned version of `SmolLM2-135M-Instruct after the warm-up`" in card
    assert f'model="{tmp_path}"' in card


def test_rrpo_and_grpo_cards(tmp_path, char_tokenizer):
    rrpo = _trainer(tmp_path / "r", char_tokenizer, RRPOTrainer, RRPOConfig, num_base_generations=0,
                    num_reset_prefixes=2)
    rrpo.create_model_card()
    card = (tmp_path / "r" / "README.md").read_text()
    assert "| method | RRPO |" in card and "| localizer | random |" in card and "2x4 with 0 base" in card
    grpo = _trainer(tmp_path / "g", char_tokenizer, GRPOBaselineTrainer, ResetConfig, num_base_generations=8,
                    num_reset_prefixes=0)
    grpo.training_data_label = "generated arithmetic task"
    grpo.create_model_card()
    card = (tmp_path / "g" / "README.md").read_text()
    assert "| method | GRPO |" in card and "none (no resets)" in card and "| training data | generated arithmetic" in card


def test_section_without_metrics_and_bad_input():
    text = reset_card_section("SRPO", "1x4", "self", {}, {"title": "T"})
    assert "carries no metrics" in text and "*T*" in text
    with pytest.raises(ValueError, match="method"):
        reset_card_section("", "1x4", "self", {}, {})
    assert insert_section("# card\n", text).endswith(text)
    assert not math.isnan(headline_metrics(LOGS)["resets/base_pass_rate"]["mean"])
