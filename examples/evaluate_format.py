"""Before / after the format warm-up: answer accuracy, delimiter compliance and localization on held-out problems.

    python examples/evaluate_format.py                      # base SmolLM2 vs its cached warm-up (trains it if missing)
    python examples/evaluate_format.py --model PATH [--model PATH2 ...]

Rollouts come from the package's thought sampler on the trainer's rollout prompt, localization replies
from the trainer's localization prompt, so the numbers are what training sees. Prints a markdown table
and writes it with the raw numbers to --out (JSON).
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

from trl_resets.app import harness
from trl_resets.app.warmup import measure_format, warm_up

ROWS = (
    ("answer accuracy", "answer_accuracy"),
    ("rollouts whose thoughts all end with </thought>", "delimited_rate"),
    ("rollouts with 2+ thoughts", "multi_thought_rate"),
    ("rollouts with a boxed answer", "boxed_rate"),
    ("localization parse rate (injected errors)", "localization_parse_rate"),
    ("localization accuracy vs checker (injected errors)", "localization_accuracy"),
    ("self-localization parse rate (own failed rollouts)", "self_localization_parse_rate"),
    ("self-localization accuracy vs checker (own failed rollouts)", "self_localization_accuracy"),
)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", help="model folder(s); default: SmolLM2 and its warm-up")
    parser.add_argument("--num_problems", type=int, default=32)
    parser.add_argument("--rollouts_per_problem", type=int, default=4)
    parser.add_argument("--num_localization", type=int, default=48)
    parser.add_argument("--seed", type=int, default=2024, help="held-out problems (warm-up uses 1000, training 0)")
    parser.add_argument("--out", default="outputs/format_eval.json")
    cli = parser.parse_args()
    # the main job's settings (prompts, caps, task, warm-up), so this measures the warm-up `make train` uses
    args, _, task, run = harness.parse("srpo", [])
    if cli.model:
        models = {path: path for path in cli.model}
    else:
        from trl_resets.app.models import default_model_path

        base = default_model_path()
        models = {"SmolLM2-135M-Instruct": base,
                  "after warm-up": warm_up(base, harness.warmup_settings(args, task, run))}
    reports = {}
    for name, path in models.items():
        reports[name] = measure_format(
            path, num_problems=cli.num_problems, rollouts_per_problem=cli.rollouts_per_problem,
            num_localization=cli.num_localization, seed=cli.seed, num_steps=harness.step_counts(task.num_steps),
            operations=task.operations, temperature=args.temperature, top_p=args.top_p,
            max_thoughts=args.max_thoughts, max_thought_tokens=args.max_thought_tokens,
            max_completion_tokens=args.max_completion_length, localization_max_tokens=args.localization_max_tokens,
            rollout_template=args.rollout_template, localization_template=args.localization_template,
            delimiter=args.thought_delimiter,
        ).as_dict()
        print(f"{name}: {reports[name]}", flush=True)
    names = list(reports)
    lines = ["| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for label, key in ROWS:
        lines.append(f"| {label} | " + " | ".join(f"{reports[n][key]:.2f}" for n in names) + " |")
    lines.append("| rollouts / localization prompts / own failed chains | " + " | ".join(
        f"{reports[n]['rollouts']} / {reports[n]['localization_prompts']} / {reports[n]['self_localization_prompts']}"
        for n in names) + " |")
    table = "\n".join(lines)
    print(table)
    os.makedirs(os.path.dirname(cli.out) or ".", exist_ok=True)
    with open(cli.out, "w") as f:
        json.dump({"reports": reports, "table": table, "settings": vars(cli)}, f, indent=2)


if __name__ == "__main__":
    main()
