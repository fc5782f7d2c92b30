"""``python -m trl_resets.evaluation`` / ``trl-resets-evaluate``: run, re-score or report evaluations.

    trl-resets-evaluate run --model Qwen/Qwen2.5-1.5B-Instruct --adapter outputs/srpo --output-dir evals/srpo-s0
    trl-resets-evaluate rescore evals/srpo-s0
    trl-resets-evaluate report --output-dir evals/table SRPO=evals/srpo-s0 SRPO=evals/srpo-s1 GRPO=evals/grpo-s0
"""

from __future__ import annotations

import argparse
import os
import sys

from .generation import BACKENDS, GenerationSettings
from .report import collect_runs, write_report
from .runner import RunSettings, evaluate_model, rescore
from .suite import BENCHMARKS


def _ints(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as '1,4', got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trl-resets-evaluate", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="evaluate a model (and adapter) on a suite; resumes an interrupted run")
    run.add_argument("--model", required=True, help="model folder or hub id")
    run.add_argument("--adapter", help="LoRA adapter folder (PEFT)")
    run.add_argument("--benchmarks", default="paper",
                     help=f"comma list of {', '.join(BENCHMARKS)}; 'paper' (Table 3's ten) or 'all'")
    run.add_argument("--data-dir", help="read each benchmark from a local JSON-lines file here instead of the hub")
    run.add_argument("--num-items", type=int, default=500, help="items drawn per benchmark (fewer when smaller)")
    run.add_argument("--seed", type=int, default=0, help="seeds the items drawn and the sampling")
    run.add_argument("--num-samples", type=int, default=1, help="completions per item (>1 needs --temperature)")
    run.add_argument("--temperature", type=float, default=0.0, help="0: greedy (the paper's evaluation)")
    run.add_argument("--top-p", type=float, default=1.0)
    run.add_argument("--pass-k", type=_ints, default=[1], help="pass@k values, e.g. 1,4 (each <= --num-samples)")
    run.add_argument("--max-completion-tokens", type=int, default=2048)
    run.add_argument("--max-thoughts", type=int, default=20)
    run.add_argument("--max-thought-tokens", type=int, default=256)
    run.add_argument("--batch-size", type=int, default=32, help="items decoded together")
    run.add_argument("--backend", choices=BACKENDS, default="auto", help="auto: vLLM with a GPU, else transformers")
    run.add_argument("--dtype", default="auto", help="auto: bfloat16 on a GPU, float32 on the CPU")
    run.add_argument("--label", help="the run's row name in the table (default: the adapter's or model's name)")
    run.add_argument("--output-dir", required=True)
    run.add_argument("--no-progress", action="store_true", help="no progress bars")

    again = commands.add_parser("rescore", help="score a run's completions again and rewrite its results")
    again.add_argument("run_dir")

    report = commands.add_parser("report", help="Table 3 (mean ± SD over runs of a label) and its PNG")
    report.add_argument("runs", nargs="+", help="LABEL=RUN_FOLDER (a label given several folders: seeds)")
    report.add_argument("--metric", default="accuracy", help="accuracy, mean_score or pass@K")
    report.add_argument("--output-dir", required=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    cli = build_parser().parse_args(argv)
    if cli.command == "run":
        generation = GenerationSettings(
            temperature=cli.temperature, top_p=cli.top_p, num_samples=cli.num_samples,
            max_thoughts=cli.max_thoughts, max_thought_tokens=cli.max_thought_tokens,
            max_completion_tokens=cli.max_completion_tokens, batch_size=cli.batch_size, seed=cli.seed,
        )
        settings = RunSettings(model=cli.model, adapter=cli.adapter, benchmarks=cli.benchmarks.split(","),
                               data_dir=cli.data_dir, num_items=cli.num_items, seed=cli.seed, pass_k=cli.pass_k,
                               label=cli.label, generation=generation)
        evaluate_model(settings, cli.output_dir, backend=cli.backend, dtype=cli.dtype, progress=not cli.no_progress)
        table = os.path.join(cli.output_dir, "table.md")
    elif cli.command == "rescore":
        rescore(cli.run_dir)
        table = os.path.join(cli.run_dir, "table.md")
    else:
        os.makedirs(cli.output_dir, exist_ok=True)
        table = os.path.join(cli.output_dir, "table.md")
        write_report(collect_runs(cli.runs), table, os.path.join(cli.output_dir, "results.png"), cli.metric)
    with open(table, encoding="utf-8") as handle:
        print(handle.read())
    return 0


if __name__ == "__main__":
    sys.exit(main())
