"""The main job under TRL's own GRPOTrainer: the package's settings carried over, and the paired report."""

import json
from dataclasses import fields

import pytest
from trl import GRPOConfig, GRPOTrainer

from experiments.trl_grpo_main_job import TRAINER_LABEL, report, run, trl_config
from tests.app.test_harness import _smoke_args
from trl_resets import ResetConfig
from trl_resets.app import harness
from trl_resets.evaluation.callback import ValidationCallback


def test_every_grpo_config_field_is_carried_over_from_the_package_config(tmp_path):
    args = ResetConfig(output_dir=str(tmp_path), num_base_generations=8, num_reset_prefixes=0, temperature=0.7,
                       top_p=0.9, beta=0.02, learning_rate=3e-4, lr_scheduler_type="cosine",
                       per_device_train_batch_size=4, gradient_accumulation_steps=8, max_completion_length=96,
                       seed=5, use_cpu=True, report_to="none")
    config = trl_config(args)
    assert type(config) is GRPOConfig
    for f in fields(GRPOConfig):
        if f.init:
            assert getattr(config, f.name) == getattr(args, f.name), f.name
    assert config.generation_batch_size == 32 and config.num_generations == 8  # 4 prompts x 8 rows a step


def _summary(folder, seed, start, end, trainer=None, method="GRPO"):
    folder.mkdir()
    summary = {"method": method, "seed": seed,
               "validation_rise": {"start": start, "end": end, "rise": end - start, "se": 0.05, "problems": 65}}
    if trainer:
        summary["trainer"] = trainer
    (folder / "summary.json").write_text(json.dumps(summary))
    return str(folder)


def test_the_report_pairs_each_trainer_with_trls_by_seed(tmp_path):
    folders = [_summary(tmp_path / f"trl-{s}", s, 0.3, end, TRAINER_LABEL) for s, end in ((0, 0.2), (1, 0.3))]
    folders += [_summary(tmp_path / f"grpo-{s}", s, 0.3, end) for s, end in ((0, 0.4), (1, 0.3), (2, 0.5))]
    text = report(folders)
    assert "| TRL GRPOTrainer | 0 | 0.300 -> 0.200 | -0.100 ± 0.050 | trl-0 |" in text
    # seeds 0 and 1 in common: differences 0.2 and 0.0, mean 0.1, s.e. 0.1, t(0.975, 1) = 12.706
    assert "| trl_resets GRPO | 2 (0, 1) | +0.100 | [-1.171, +1.371] |" in text
    with pytest.raises(SystemExit, match="no validation_rise or seed"):
        report([str(_bare(tmp_path))])


def _bare(tmp_path):
    folder = tmp_path / "bare"
    folder.mkdir()
    (folder / "summary.json").write_text(json.dumps({"method": "GRPO", "validation_rise": None}))
    return folder


def test_a_run_trains_with_trls_trainer_and_validates_as_the_main_job(tmp_path, tiny_model_dir, monkeypatch):
    built = []
    original = ValidationCallback.__init__

    def record(self, trainer, *args, **kwargs):
        original(self, trainer, *args, **kwargs)
        built.append((type(trainer), self.settings))

    monkeypatch.setattr(ValidationCallback, "__init__", record)
    out = tmp_path / "trl"
    summary = run(_smoke_args(tiny_model_dir, out, "--plots", "false", "--seed", "3"))
    assert summary["trainer"] == TRAINER_LABEL and summary["seed"] == 3 and summary["steps"] == 1
    assert summary["validation_problems"] == 8 and [v["step"] for v in summary["validation"]] == [0, 1]
    assert json.loads((out / "summary.json").read_text())["trainer"] == TRAINER_LABEL
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("loss" in line and "reward" in line for line in lines)
    ((trainer_type, settings),) = built
    assert trainer_type is GRPOTrainer
    package = harness.parse("grpo", _smoke_args(tiny_model_dir, out))[0]  # the main job's thought format
    assert settings.template == package.rollout_template and settings.max_thought_tokens == 6
    assert settings.max_completion_tokens == 24 and (out / "adapter_model.safetensors").is_file()
