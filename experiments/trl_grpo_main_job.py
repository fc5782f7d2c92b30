"""The main job under TRL's own ``GRPOTrainer``: the yardstick for the package's GRPO baseline and SRPO.

    python -m experiments.trl_grpo_main_job --seed 0 --output_dir OUT/trl-0       # one run (flags as the main job)
    python -m experiments.trl_grpo_main_job --report OUT/trl-0 OUT/trl-1 OUT/grpo-0 OUT/grpo-1 OUT/srpo-0 ...
                                                   # start / end pass rates per run, and each method minus TRL's
                                                   # trainer paired by seed, with a 95% t-interval over seeds

A run takes everything from the GRPO main job (``examples/train_grpo.py``, its recipe and any flag given here):
the same warmed-up SmolLM2-135M-Instruct, LoRA, training problems in the package's rollout prompt, boxed-answer
reward, optimizer, schedule, rows per step, temperature and top-p, and the same held-out problems validated
greedily by the same `ValidationCallback` with the package's thought format. What differs is TRL's trainer itself:
its sampler decodes each rollout to EOS or ``max_completion_length`` tokens (the package cuts a rollout at the
first thought with a boxed answer) with the model in train mode, and the reward reads the completion's last box.
Every ``GRPOConfig`` field is copied from the package's resolved config, so the two trainers see the same
settings; the run's folder holds ``summary.json`` (with ``validation_rise``, ``seed`` and ``trainer``) and
``metrics.jsonl`` as the main job writes them, and no plots (the main job's plots show reset metrics).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import fields
from pathlib import Path

TRAINER_LABEL = "TRL GRPOTrainer"


def trl_config(args):
    """TRL's ``GRPOConfig`` with every field of the package's resolved config ``args`` (a ``ResetConfig``).
    ``generation_batch_size`` is left for TRL to derive from ``steps_per_generation`` (they are exclusive)."""
    from trl import GRPOConfig

    values = {f.name: getattr(args, f.name) for f in fields(GRPOConfig) if f.init and f.name != "generation_batch_size"}
    return GRPOConfig(**values)


def run(argv: list[str]) -> dict:
    """One run of the GRPO main job under TRL's ``GRPOTrainer``; returns its summary."""
    from trl import GRPOTrainer, get_peft_config

    from trl_resets.app import harness
    from trl_resets.evaluation.callback import ValidationCallback
    from trl_resets.thoughts import wrap_prompt

    args, model_args, task, run_args = harness.parse("grpo", argv)
    dataset = harness.load_problems(task)
    held_out = harness.load_validation(task, run_args, dataset)
    model_path = harness.prepare_model(args, model_args, task, run_args)
    reward = harness.task_reward(task)
    if args.model_init_kwargs is None:
        args.model_init_kwargs = {"dtype": model_args.dtype, "revision": model_args.model_revision}
    config = trl_config(args)
    # TRL's trainer sees the package's rollout prompt as the question (the reset trainers wrap it when sampling)
    wrapped = dataset.map(lambda row: {"prompt": wrap_prompt(row["prompt"], args.rollout_template,
                                                             args.thought_delimiter)})
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.jsonl").unlink(missing_ok=True)
    trainer = GRPOTrainer(model=model_path, reward_funcs=reward, args=config, train_dataset=wrapped,
                          peft_config=get_peft_config(model_args), callbacks=[harness.JsonlMetrics(out / "metrics.jsonl")])
    if held_out is not None:
        trainer.add_callback(ValidationCallback(trainer, held_out, reward, run_args.validation_steps,
                                                batch_size=run_args.validation_batch_size, generation_args=args))
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    trainer.save_model(args.output_dir)
    if run_args.plots:
        print("trl_grpo_main_job writes no plots (the main job's plots show reset metrics, which TRL's trainer does "
              "not log); --plots is ignored here.")
        run_args.plots = False
    summary = harness.write_outputs(trainer, out, task, run_args, model_path, seconds)  # records the seed too
    summary["trainer"] = TRAINER_LABEL
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    rise = summary.get("validation_rise")
    if rise is not None:
        print(f"{TRAINER_LABEL}: held-out greedy pass rate {rise['start']:.3f} -> {rise['end']:.3f} "
              f"({rise['problems']} problems): {rise['rise']:+.3f} +- {rise['se']:.3f} (paired s.e.), {seconds:.0f} s")
    return summary


def report(folders: list[str]) -> str:
    """The runs' start and end pass rates, and each trainer minus TRL's, paired by seed (95% t-interval)."""
    from experiments.learning_speed import t_interval

    rows = []
    for folder in folders:
        summary = json.loads((Path(folder) / "summary.json").read_text())
        rise = summary.get("validation_rise")
        if rise is None or "seed" not in summary:
            raise SystemExit(f"{folder}: its summary.json has no validation_rise or seed (a main-job or "
                             "trl_grpo_main_job run with validation is needed).")
        trainer = summary.get("trainer") or f"trl_resets {summary['method']}"
        rows.append((trainer, summary["seed"], rise, Path(folder).name))
    lines = ["| trainer | seed | held-out pass rate, start -> end | change ± paired s.e. | run |", "|---|---|---|---|---|"]
    for trainer, seed, rise, name in sorted(rows, key=lambda r: (r[0], r[1])):
        lines.append(f"| {trainer} | {seed} | {rise['start']:.3f} -> {rise['end']:.3f} | "
                     f"{rise['rise']:+.3f} ± {rise['se']:.3f} | {name} |")
    ends = {}
    for trainer, seed, rise, _ in rows:
        ends.setdefault(trainer, {})[seed] = rise["end"]
    base = ends.get(TRAINER_LABEL, {})
    lines += ["", f"| end pass rate, trainer - {TRAINER_LABEL} | seeds | mean | 95% t-interval |", "|---|---|---|---|"]
    for trainer, by_seed in sorted(ends.items()):
        if trainer == TRAINER_LABEL:
            continue
        common = sorted(set(by_seed) & set(base))
        diffs = [by_seed[s] - base[s] for s in common]
        if len(diffs) < 2:
            lines.append(f"| {trainer} | {len(diffs)} | - | needs 2 common seeds |")
            continue
        mean, low, high = t_interval(diffs)
        lines.append(f"| {trainer} | {len(diffs)} ({', '.join(map(str, common))}) | {mean:+.3f} | "
                     f"[{low:+.3f}, {high:+.3f}] |")
    return "\n".join(lines)


def main(argv: list[str] | None = None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "--report":
        parser = argparse.ArgumentParser(prog="python -m experiments.trl_grpo_main_job --report")
        parser.add_argument("--report", nargs="+", required=True, metavar="RUN_FOLDER")
        print(report(parser.parse_args(argv).report))
        return None
    return run(argv)


if __name__ == "__main__":
    main()
