"""The main job's harness: recipes parse, a one-step run on a tiny model writes the whole output folder."""

import json
import math
from pathlib import Path

import pytest
import yaml

from trl_resets.app import harness
from trl_resets.app.plots import plot_reset_index, plot_rewards
from trl_resets.evaluation.callback import ValidationCallback
from trl_resets.rewards import CodeReward, boxed_answer_reward
from trl_resets.tasks import make_arithmetic_dataset
from trl_resets.tasks.arithmetic import ArithmeticProblem

RECIPES = Path(__file__).resolve().parents[2] / "examples" / "recipes"
# every shipped recipe: the GPU ones in examples/, the main jobs inside the package
ALL_RECIPES = sorted([*RECIPES.glob("*.yaml"), *harness.RECIPES.glob("*.yaml")])
HARDWARE = {"bf16": False, "use_cpu": True}  # what this machine substitutes in a GPU recipe
PNG = b"\x89PNG\r\n\x1a\n"


def _smoke_args(model_dir, out, *extra):
    return ["--model_name_or_path", model_dir, "--output_dir", str(out), "--warmup", "false", "--max_steps", "1",
            "--num_problems", "2", "--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "1",
            "--max_completion_length", "24",
            "--max_thought_tokens", "6", "--max_thoughts", "4", "--localization_max_tokens", "8",
            "--seed_budget", "2", "--temperature", "1.0", "--lora_r", "4", "--lora_alpha", "8",
            "--lora_target_modules", "q_proj", "v_proj", "--learning_rate", "1e-3", "--validation_problems", "8", *extra]


def _png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == PNG and path.stat().st_size > 2000


def test_srpo_main_job_one_step_writes_adapter_metrics_plots_and_card(tmp_path, tiny_model_dir):
    out = tmp_path / "srpo"
    trainer = harness.main("srpo", _smoke_args(tiny_model_dir, out))
    assert trainer.state.global_step == 1
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    step = [line for line in lines if "loss" in line]
    assert len(step) == 1 and "reward" in step[0] and "resets/reset_index_mean" in step[0]
    # held-out problems, greedy, before training and at the last step (validation_steps=6 > max_steps)
    validation = [(line["step"], line["validation/pass_rate"]) for line in lines if "validation/pass_rate" in line]
    assert [s for s, _ in validation] == [0, 1] and all(0 <= rate <= 1 for _, rate in validation)
    assert "validation/pass_rate" in step[0] and _png(out / "validation.png")
    resets = [json.loads(line) for line in (out / "resets.jsonl").read_text().splitlines()]
    # 1 prompt per step (8 rows), k=1: one seed unless the prompt fell back to GRPO
    assert len(resets) == 1 - round(step[0]["resets/fallback_rate"])
    for record in resets:
        assert record["step"] == 1 and 1 <= record["reset_index"] <= record["num_thoughts"]
    if resets:
        assert sum(r["reset_index"] for r in resets) / len(resets) == pytest.approx(step[0]["resets/reset_index_mean"])
    assert _png(out / "reward.png") and _png(out / "reset_index.png")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 1 and summary["headline"]["reward"]["last"] == pytest.approx(step[0]["reward"])
    assert [v["step"] for v in summary["validation"]] == [0, 1] and summary["validation_problems"] == 8
    rise = summary["validation_rise"]  # step 0 -> the last step, paired over the same 8 problems
    assert (rise["from_step"], rise["to_step"], rise["problems"]) == (0, 1, 8)
    assert rise["start"] == summary["validation"][0]["validation/pass_rate"]
    assert rise["end"] == summary["validation"][1]["validation/pass_rate"]
    assert rise["rise"] == pytest.approx(rise["end"] - rise["start"]) and rise["se"] >= 0
    card = (out / "README.md").read_text()
    assert "| method | SRPO |" in card and "| localizer | self |" in card and "generated arithmetic task" in card


def test_grpo_baseline_job_has_no_resets(tmp_path, tiny_model_dir):
    out = tmp_path / "grpo"
    trainer = harness.main("grpo", _smoke_args(tiny_model_dir, out))
    assert trainer.split.is_grpo and trainer.args.num_generations == 8
    assert (out / "resets.jsonl").read_text() == ""
    assert _png(out / "reset_index.png")
    assert "| method | GRPO |" in (out / "README.md").read_text()


def _hardware_argv(keys: dict) -> list[str]:
    """Flags that put a GPU recipe on this CPU (none for a CPU recipe)."""
    if not keys.get("bf16"):
        return []
    return [arg for name, value in HARDWARE.items() for arg in (f"--{name}", str(value).lower())]


@pytest.mark.parametrize("path", ALL_RECIPES, ids=lambda p: p.name)
def test_a_recipe_resolves_to_its_file_plus_the_method_defaults(path):
    """Key by key: a setting the recipe names has the recipe's value; every other one has the method's own default,
    never the CPU main job's (a recipe does not inherit another recipe)."""
    from dataclasses import fields

    method = path.name.split("_")[0]
    keys = yaml.safe_load(path.read_text())
    hardware = {k: v for k, v in HARDWARE.items() if _hardware_argv(keys)}
    resolved = harness.parse(method, ["--config", str(path), *_hardware_argv(keys)])
    classes = [type(part) for part in resolved]
    known = {f.name for cls in classes for f in fields(cls)}
    assert set(keys) <= known, f"{path.name} names keys no parser field takes: {set(keys) - known}"
    for part in resolved:
        names = {f.name for f in fields(part)}
        given = {k: v for k, v in {**harness.METHOD_DEFAULTS[method], **keys, **hardware}.items() if k in names}
        expected = type(part)(**given)
        for f in fields(part):
            assert getattr(part, f.name) == getattr(expected, f.name), (path.name, f.name)


def test_no_config_runs_the_main_job_and_a_recipe_starts_from_the_method_defaults(tmp_path):
    main_job, *_ = harness.parse("srpo", [])
    assert main_job.rollout_template == yaml.safe_load(harness.default_recipe("srpo").read_text())["rollout_template"]
    recipe = tmp_path / "mine.yaml"
    recipe.write_text("num_problems: 4\nlearning_rate: 1.0e-6\nuse_cpu: true\n")
    args, model_args, task, run = harness.parse("srpo", ["--config", str(recipe), "--max_steps", "3"])
    defaults = harness.SRPOConfig(output_dir="x", use_cpu=True)
    assert args.rollout_template == defaults.rollout_template and args.learning_rate == 1e-6
    assert args.max_completion_length == defaults.max_completion_length and args.bf16 == defaults.bf16
    assert args.temperature == defaults.temperature and args.per_device_train_batch_size == 8
    assert (args.max_steps, task.num_problems, run.warmup, model_args.use_peft) == (3, 4, False, False)


def test_print_config_marks_each_source(capsys):
    harness.main("grpo", ["--max_steps", "2", "--print-config"])
    out = capsys.readouterr().out.splitlines()
    marks = {line.split(":", 1)[0]: line.rsplit("# ", 1)[1] for line in out[1:]}
    assert marks["max_steps"] == "command line" and marks["learning_rate"] == "recipe"
    assert marks["num_reset_prefixes"] == "recipe" and marks["beta"] == "default"
    assert yaml.safe_load("\n".join(out))["max_steps"] == 2


@pytest.mark.parametrize("path", ALL_RECIPES, ids=lambda p: p.name)
def test_recipes_parse_with_their_script(path):
    recipe = path.name
    method = recipe.split("_")[0]
    keys = yaml.safe_load(path.read_text())
    args, model_args, task, run = harness.parse(method, ["--config", str(path), *_hardware_argv(keys)])
    assert args.num_generations == 8 and model_args.lora_r == 64 and model_args.lora_alpha == 64
    if "gpu" in recipe:  # the paper's settings
        assert args.learning_rate == 5e-5 and args.temperature == 0.7 and args.top_p == 0.95
    else:  # the CPU main job: sampled at T=0.7, lr 2e-4 decayed to 0 over its 8 steps, validated on 65 problems
        assert args.learning_rate == 2e-4 and args.temperature == 0.7 and args.top_p == 0.95
        assert args.lr_scheduler_type == "cosine" and args.max_steps == 8 and args.pack_shared_prefixes
        assert run.validation_problems == 68 and run.validation_steps == args.max_steps  # the start and the end
        assert (task.num_steps, run.warmup_num_steps, task.max_start, task.max_operand, task.max_value) == (
            "3", "2,3", 10, 5, 20)  # three operations on small numbers, after the two- and three-step warm-up
    assert args.num_reset_prefixes == (0 if method == "grpo" else 1)
    if method != "grpo":
        assert args.localizer == {"srpo": "self", "rrpo": "random"}[method]
    if "livecodebench" in recipe:  # Section 5.3: LiveCodeBench v6 medium, 1 epoch, the code reward in the sandbox
        assert task.dataset_name == "livecodebench/code_generation_lite" and harness.is_code_task(task)
        assert (task.code_release, task.code_difficulty, task.code_train_fraction) == (6, "medium", 0.5)
        assert task.num_problems == 383 and args.num_train_epochs == 1 and task.code_max_workers == 16
        reward = harness.task_reward(task)
        assert isinstance(reward, CodeReward) and reward.max_workers == 16
    elif "gpu" in recipe:
        assert task.dataset_name == "AI-MO/NuminaMath-CoT" and task.dataset_source == "olympiads"
        assert task.num_problems == 400 and args.num_train_epochs == 2
        assert harness.task_reward(task) is boxed_answer_reward
    if "gpu" in recipe:
        assert not run.warmup and run.validation_problems == 32
        assert args.use_vllm and args.vllm_mode == "colocate" and args.max_completion_length == 4096
        assert args.max_thoughts == 20 and args.max_thought_tokens == 256 and not args.clip_surrogate
        # 32 prompts per generation, optimizer steps of 8 prompts
        rows = args.per_device_train_batch_size * args.steps_per_generation
        assert rows // 8 == 32 and args.per_device_train_batch_size * args.gradient_accumulation_steps // 8 == 8
        # a backward pass over 16 full-length rows peaked at 65.7 GiB on an H100 (benchmarks/gpu_recipe.py)
        assert args.per_device_train_batch_size <= 4
    else:
        assert task.dataset_name is None and run.warmup and args.use_cpu
        # 4 prompts x 8 rows per optimizer step, through the loss 4 rows at a time (the memory of the backward pass)
        assert args.per_device_train_batch_size * args.gradient_accumulation_steps == 32
        assert args.per_device_train_batch_size == 4 and args.steps_per_generation == 8
        assert run.validation_batch_size >= run.validation_problems  # one greedy batch


def test_code_job_trains_on_training_tests_and_validates_on_held_out_tests(tmp_path, tiny_model_dir):
    """The coding recipe's data path on the LiveCodeBench fixture: the code reward (bounded by code_max_workers)
    scores training rows against their training tests; validation runs the same problems' held-out tests."""
    fixture = str(Path(__file__).parents[1] / "fixtures" / "livecodebench.jsonl")
    task = harness.TaskArguments(dataset_name="livecodebench/code_generation_lite", data_files=fixture, num_problems=2)
    train = harness.load_problems(task)
    held_out = harness.load_validation(task, harness.RunArguments(validation_problems=8), train)
    assert len(train) == 2 == len(held_out) and train["question_id"] == held_out["question_id"]
    for mine, other in zip(train, held_out):
        assert mine["prompt"] == other["prompt"] and mine["prompt"][0]["role"] == "user"
        assert not set(zip(mine["tests"]["inputs"], mine["tests"]["outputs"])) & set(
            zip(other["tests"]["inputs"], other["tests"]["outputs"]))
    out = tmp_path / "code"
    trainer = harness.main("srpo", _smoke_args(
        tiny_model_dir, out, "--dataset_name", "livecodebench/code_generation_lite", "--data_files", fixture,
        "--code_max_workers", "2", "--validation_problems", "2", "--answer_format", "code"))
    reward = trainer.reward_funcs[0]
    assert isinstance(reward, CodeReward) and reward.max_workers == 2
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines if "validation/pass_rate" in line] == [0, 1]
    assert any("rewards/code_reward/mean" in line for line in lines)


def test_bad_settings_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match="num_reset_prefixes=0"):
        harness.parse("grpo", ["--num_reset_prefixes", "1", "--num_base_generations", "4",
                               "--output_dir", str(tmp_path)])
    with pytest.raises(ValueError, match="unknown method"):
        harness.build_parser("ppo")
    with pytest.raises(ValueError, match="num_steps"):
        harness.load_problems(harness.TaskArguments(num_steps="two"))
    with pytest.raises(ValueError, match="num_problems"):
        harness.load_problems(harness.TaskArguments(num_problems=0))
    train = harness.load_problems(harness.TaskArguments(num_problems=4))
    with pytest.raises(ValueError, match="validation_steps=0"):
        harness.load_validation(harness.TaskArguments(num_problems=4), harness.RunArguments(validation_steps=0), train)
    with pytest.raises(ValueError, match="validation_batch_size=0"):
        harness.load_validation(harness.TaskArguments(num_problems=4), harness.RunArguments(validation_batch_size=0),
                                train)
    args, model_args, task, run = harness.parse("srpo", ["--dataset_name", "some/hub-set", "--model_name_or_path",
                                                         str(tmp_path), "--output_dir", str(tmp_path)])
    with pytest.raises(ValueError, match="warmup: false"):
        harness.prepare_model(args, model_args, task, run)


def test_arithmetic_problems_are_conversational_and_the_held_out_ones_are_new():
    task = harness.TaskArguments(num_problems=5, num_steps="2,3")
    data = harness.load_problems(task)
    assert len(data) == 5 and set(data["num_steps"]) <= {2, 3}
    assert all(row["prompt"][0]["role"] == "user" and row["answer"] for row in data)
    held_out = harness.load_validation(task, harness.RunArguments(validation_problems=40), data)
    questions = {row["prompt"][0]["content"] for row in data}
    assert 0 < len(held_out) <= 40 and not questions & {row["prompt"][0]["content"] for row in held_out}
    assert harness.load_validation(task, harness.RunArguments(validation_problems=0), data) is None


def test_plots_handle_nan_and_no_resets(tmp_path):
    logs = [{"step": 1, "reward": 0.5, "resets/sp_pass_rate": float("nan")}, {"step": 2, "reward": 0.6}]
    assert _png(plot_rewards(logs, tmp_path / "r.png"))
    assert _png(plot_reset_index([], tmp_path / "h.png"))
    resets = [{"reset_index": 2, "num_thoughts": 3, "localizer_failed": False},
              {"reset_index": 1, "num_thoughts": 2, "localizer_failed": True}]
    assert _png(plot_reset_index(resets, tmp_path / "h2.png"))


def test_gpu_recipe_data_path_on_a_local_numina_shaped_dataset(tmp_path):
    """The GPU recipe's dataset settings, pointed at a local folder shaped like NuminaMath-CoT (no hub here)."""
    folder = tmp_path / "numina"
    folder.mkdir()
    rows = [
        {"problem": f"olympiad problem {i}", "solution": f"... so the answer is \\boxed{{{i}}}.", "source": "olympiads"}
        for i in range(5)
    ] + [
        {"problem": "no boxed answer", "solution": "it is 3", "source": "olympiads"},
        {"problem": "other source", "solution": "\\boxed{9}", "source": "amc_aime"},
    ]
    (folder / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    keys = yaml.safe_load((RECIPES / "srpo_qwen2.5-1.5b_numina_gpu.yaml").read_text())
    task = harness.TaskArguments(
        dataset_name=str(folder), dataset_split=keys["dataset_split"], dataset_source=keys["dataset_source"],
        question_column=keys["question_column"], answer_column=keys["answer_column"], num_problems=4,
    )
    data = harness.load_problems(task)
    assert len(data) == 4 and set(data.column_names) == {"prompt", "answer"}
    for row in data:
        question = row["prompt"][0]["content"]
        assert row["prompt"][0]["role"] == "user" and question.startswith("olympiad problem")
        assert row["answer"] == question.rsplit(" ", 1)[1]  # the boxed answer of the same row
    with pytest.raises(ValueError, match="no column"):
        harness.load_problems(harness.TaskArguments(dataset_name=str(folder), question_column="question"))


def test_gpu_recipe_runs_end_to_end_with_only_the_hardware_swapped(tmp_path, tiny_model_dir, monkeypatch):
    """The paper's GPU recipe as a GPU user runs it, on a CPU: every key of the recipe applies (vLLM colocate
    with per-thought stops, 32 prompts per generation in 4 optimizer steps of 8 prompts, gradient
    checkpointing, LoRA 64, the 1x4 split, self-localization) except what this machine cannot have: the hub
    model and dataset (a tiny local model, a local NuminaMath-shaped folder), the GPU (bf16 off), real vLLM
    (the CPU stand-in that follows its API), the rollout lengths a 1.5B model needs, and the held-out validation
    (the folder's 40 problems all train; the callback is tested in test_validation.py)."""
    from tests.helpers import fake_vllm

    engines = fake_vllm.install(monkeypatch)
    folder = tmp_path / "numina"
    folder.mkdir()
    rows = [{"problem": f"{i}+1?", "solution": f"so \\boxed{{{i + 1}}}", "source": "olympiads"} for i in range(40)]
    rows += [{"problem": "skip me", "solution": "\\boxed{1}", "source": "amc_aime"}]
    (folder / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "gpu-recipe"
    trainer = harness.main("srpo", [
        "--config", str(RECIPES / "srpo_qwen2.5-1.5b_numina_gpu.yaml"), "--model_name_or_path", tiny_model_dir,
        "--dataset_name", str(folder), "--output_dir", str(out), "--bf16", "false", "--use_cpu", "true",
        "--dtype", "float32", "--max_steps", "4", "--max_completion_length", "24", "--max_thought_tokens", "6",
        "--max_thoughts", "4", "--localization_max_tokens", "8", "--save_strategy", "no", "--validation_problems", "0",
    ])
    args = trainer.args
    assert trainer.state.global_step == 4 and args.use_vllm and args.vllm_mode == "colocate"
    assert args.gradient_checkpointing and args.per_device_train_batch_size * args.steps_per_generation // 8 == 32
    llm = engines[0].fake_llm
    assert llm.requests > 0 and trainer._vllm_per_thought is True
    assert all(p.temperature == 0.7 and p.top_p == 0.95 for p in llm.calls if p.temperature != 0.0)
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [s for s in steps if "loss" in s]
    assert len(steps) == 4 and all(math.isfinite(s["loss"]) for s in steps)
    # one generation of 32 of the 40 olympiads prompts serves the 4 optimizer steps
    resets = [json.loads(line) for line in (out / "resets.jsonl").read_text().splitlines()]
    assert 0 < len(resets) <= 32 and {r["step"] for r in resets} <= {1, 2, 3, 4}
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 64
    assert "SRPO" in (out / "README.md").read_text()


def test_gpu_recipe_stand_ins_have_the_recipe_model_shape_and_the_numina_data_shape(tmp_path, tiny_model_dir):
    """benchmarks/gpu_recipe.py: the stand-in model has Qwen2.5-1.5B's size, the stand-in data passes the
    recipe's source filter and boxed-answer extraction, and a built model loads as a Qwen2 causal LM."""
    import torch
    from transformers import AutoConfig, Qwen2Config, Qwen2ForCausalLM

    from benchmarks import gpu_recipe

    with torch.device("meta"):
        full = Qwen2ForCausalLM(Qwen2Config(**gpu_recipe.SHAPES["qwen2.5-1.5b"]))
    assert sum(p.numel() for p in full.parameters()) == 1_543_714_304  # Qwen2.5-1.5B's count
    gpu_recipe.build_model("tiny", tiny_model_dir, tmp_path / "model", "cpu")
    config = AutoConfig.from_pretrained(tmp_path / "model")
    assert config.model_type == "qwen2" and config.vocab_size == 151936 and config.num_key_value_heads == 2
    gpu_recipe.build_dataset(tmp_path / "numina", num_problems=10, other_source=3)
    keys = yaml.safe_load((RECIPES / "srpo_qwen2.5-1.5b_numina_gpu.yaml").read_text())
    task = harness.TaskArguments(dataset_name=str(tmp_path / "numina"), dataset_source=keys["dataset_source"],
                                 question_column=keys["question_column"], answer_column=keys["answer_column"],
                                 num_problems=keys["num_problems"])
    data = harness.load_problems(task)
    expected = make_arithmetic_dataset(13, num_steps=[3, 4, 5, 6], seed=0)
    assert len(data) == 10  # the 3 rows of another source are dropped
    assert sorted(data["answer"]) == sorted(expected["answer"][:10])


# What a run on this machine swaps in every recipe: the model (a tiny local one), the hardware, the rollout lengths a
# real model needs, the batch geometry sized for a GPU's memory (two prompts per generation), hub data (fixtures),
# the warm-up of the embedded model, checkpoints and validation. Everything else is the recipe's.
_STAND_INS = ["--bf16", "false", "--use_cpu", "true", "--dtype", "float32", "--max_steps", "1",
              "--max_completion_length", "24", "--max_thought_tokens", "6", "--max_thoughts", "4",
              "--localization_max_tokens", "8", "--save_strategy", "no", "--validation_problems", "0",
              "--warmup", "false"]
_GPU_GEOMETRY = ["--per_device_train_batch_size", "4", "--steps_per_generation", "4",
                 "--gradient_accumulation_steps", "4", "--num_problems", "4"]


@pytest.mark.parametrize("path", ALL_RECIPES, ids=lambda p: p.name)
def test_every_recipe_trains_a_step_with_only_hardware_model_and_data_swapped(path, tmp_path, tiny_model_dir,
                                                                                monkeypatch):
    from tests.helpers import fake_vllm

    method = path.name.split("_")[0]
    keys = yaml.safe_load(path.read_text())
    engines = fake_vllm.install(monkeypatch) if keys.get("use_vllm") else []
    argv = ["--config", str(path), "--model_name_or_path", tiny_model_dir, "--output_dir", str(tmp_path / "out"),
            *_STAND_INS]
    if keys.get("bf16"):
        argv += _GPU_GEOMETRY
    if keys.get("dataset_name") == "livecodebench/code_generation_lite":
        argv += ["--data_files", str(Path(__file__).parents[1] / "fixtures" / "livecodebench.jsonl"), "--num_problems",
                 "2", "--code_max_workers", "2", "--vllm_max_model_length", "2048"]  # the tiny model's 1024
    elif keys.get("dataset_name"):
        folder = tmp_path / "numina"
        folder.mkdir()
        rows = [{"problem": f"{i}+1?", "solution": f"so \\boxed{{{i + 1}}}", "source": "olympiads"} for i in range(8)]
        (folder / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
        argv += ["--dataset_name", str(folder)]
    trainer = harness.main(method, argv)
    assert trainer.state.global_step == 1
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 1 and math.isfinite(losses[0])
    for name, value in keys.items():  # every recipe key not swapped above reached the trainer
        if f"--{name}" in argv or name in ("model_name_or_path", "dataset_name"):
            continue
        for part in (trainer.args,):
            if hasattr(part, name) and name not in ("report_to", "lr_scheduler_type", "save_strategy"):
                assert getattr(part, name) == value, name
    if keys.get("use_vllm"):
        assert engines and engines[0].fake_llm.requests > 0
    if keys.get("answer_format") == "code":
        assert trainer.thought_format.answer == "code" and "program" in trainer.args.rollout_template
        validation = ValidationCallback(trainer, harness.load_problems(harness.TaskArguments(
            dataset_name=keys["dataset_name"], data_files=argv[argv.index("--data_files") + 1], num_problems=1)),
            boxed_answer_reward, every_steps=1)
        assert validation.settings.thought_format().answer == "code"  # held-out programs end as training's do


def test_resets_jsonl_rows_name_a_carried_resets_origin():
    from types import SimpleNamespace

    from trl_resets.app.harness import gathered_resets

    trainer = SimpleNamespace(accelerator=SimpleNamespace(num_processes=1), reset_history=[
        {"step": 2, "resets": [(3, 5, False, 0, 1)]}, {"step": 1, "resets": [(2, 4, True)]}])
    assert gathered_resets(trainer) == [
        {"step": 1, "reset_index": 2, "num_thoughts": 4, "localizer_failed": True},
        {"step": 2, "reset_index": 3, "num_thoughts": 5, "localizer_failed": False, "origin_generation": 0,
         "origin_prompt": 1}]


def test_the_arithmetic_ranges_and_the_warmup_step_counts_reach_the_data(tmp_path):
    """max_start / max_operand / max_value bound the training and held-out problems; warmup_num_steps sets the
    warm-up's step counts apart from the task's (unset: the task's)."""
    args, _, task, run = harness.parse("srpo", ["--output_dir", str(tmp_path), "--num_steps", "3", "--max_start",
                                                "10", "--max_operand", "5", "--max_value", "20",
                                                "--warmup_num_steps", "2,3", "--validation_problems", "16"])
    train = harness.load_problems(task)
    held_out = harness.load_validation(task, run, train)
    for row in [*train, *held_out]:
        problem = ArithmeticProblem.from_row(row)
        assert problem.start <= 10 and all(operand <= 5 for _, operand in problem.ops) and len(problem.ops) == 3
        assert max(problem.values) <= 20 and min(problem.values) >= 1
    assert harness.warmup_settings(args, task, run).num_steps == (2, 3)
    args, _, task, run = harness.parse("srpo", ["--output_dir", str(tmp_path), "--num_steps", "3",
                                                "--warmup_num_steps", ""])
    assert harness.warmup_settings(args, task, run).num_steps == (3,)
    wide = harness.load_problems(harness.TaskArguments(num_steps="3"))  # the generator's default ranges
    assert max(max(ArithmeticProblem.from_row(row).values) for row in wide) > 20
