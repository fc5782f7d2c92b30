"""SRPO on the embedded SmolLM2-135M-Instruct and the multi-step arithmetic task (CPU, offline).

    python examples/train_srpo.py                          # the defaults below
    accelerate launch examples/train_srpo.py --max_steps 10
    python examples/train_srpo.py --config examples/recipes/<recipe>.yaml

Every setting is a command-line flag (SRPOConfig, ModelConfig and TaskArguments fields) or a YAML
recipe key.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

from transformers import TrainerCallback  # noqa: E402
from trl import ModelConfig, TrlParser, get_peft_config  # noqa: E402

from trl_resets import SRPOConfig, SRPOTrainer  # noqa: E402
from trl_resets.rewards import boxed_answer_reward  # noqa: E402
from trl_resets.tasks import make_arithmetic_dataset  # noqa: E402

CPU_DEFAULTS = dict(
    output_dir="outputs/srpo-smollm2-arithmetic",
    per_device_train_batch_size=8,
    max_steps=3,
    learning_rate=5e-5,
    max_completion_length=128,
    max_thought_tokens=48,
    max_thoughts=6,
    temperature=0.7,
    top_p=0.95,
    seed_budget=4,
    logging_steps=1,
    save_strategy="no",
    report_to="none",
    use_cpu=True,
    bf16=False,
    use_peft=True,
    lora_r=64,
    lora_alpha=64,
    lora_target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
)


@dataclass
class TaskArguments:
    """The training task."""

    num_problems: int = field(default=32, metadata={"help": "Problems generated for training."})
    num_steps: int = field(default=2, metadata={"help": "Arithmetic steps per problem (difficulty)."})
    operations: str = field(default="+-", metadata={"help": "Operations used, e.g. '+-' or '+-*/'."})
    task_seed: int = field(default=0, metadata={"help": "Seed of the generated problems."})


class JsonlMetrics(TrainerCallback):
    """Appends every log line to <output_dir>/metrics.jsonl."""

    def __init__(self, path: Path):
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            with self.path.open("a") as f:
                f.write(json.dumps({"step": state.global_step, **logs}) + "\n")


def main():
    parser = TrlParser((SRPOConfig, ModelConfig, TaskArguments))
    parser.set_defaults(**CPU_DEFAULTS)
    args, model_args, task = parser.parse_args_and_config()
    if model_args.model_name_or_path is None:
        from trl_resets.models import default_model_path

        model_args.model_name_or_path = default_model_path()

    rows = make_arithmetic_dataset(task.num_problems, num_steps=task.num_steps, seed=task.task_seed,
                                   operations=tuple(task.operations))
    dataset = rows.map(lambda row: {"prompt": [{"role": "user", "content": row["prompt"]}]})

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.jsonl").unlink(missing_ok=True)
    trainer = SRPOTrainer(
        model=model_args.model_name_or_path,
        reward_funcs=boxed_answer_reward,
        args=args,
        train_dataset=dataset,
        peft_config=get_peft_config(model_args),
        callbacks=[JsonlMetrics(out / "metrics.jsonl")],
    )
    start = time.perf_counter()
    trainer.train()
    trainer.save_model(args.output_dir)
    if trainer.accelerator.is_main_process:
        print(f"trained {trainer.state.global_step} SRPO steps in {time.perf_counter() - start:.0f} s; "
              f"adapter and metrics.jsonl in {out}")


if __name__ == "__main__":
    main()
