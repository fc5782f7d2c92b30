"""How the main job's policy answers the held-out problems: pass rate and number of written steps, by the
problem's number of operations (greedy, the job's decoding settings).

    python -m benchmarks.step_counts                                  # the warmed-up model (the job's step 0)
    python -m benchmarks.step_counts --adapter outputs/srpo-smollm2-arithmetic   # a trained adapter over it

For each operation count it prints the problems, the passes, and the answers that write fewer thoughts than the
problem has operations (boxed early), more, or the right number but a wrong value. Main-job flags (e.g.
``--num_steps 2``) go after ``--job_args``. Writes ``--out`` (default: a temp folder) ``step_counts.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path


def breakdown(rows, texts, scores, delimiter: str) -> dict:
    """Per operation count: problems, passes, and answers with fewer / more thoughts than operations, or the right
    number of thoughts and a wrong value."""
    counts: dict[int, Counter] = {}
    for row, text, score in zip(rows, texts, scores):
        ops = len(row["ops"])
        thoughts = text.count(delimiter)
        passed = score is not None and score >= 1
        tally = counts.setdefault(ops, Counter())
        tally["problems"] += 1
        tally["passed"] += passed
        tally["fewer_thoughts"] += thoughts < ops
        tally["more_thoughts"] += thoughts > ops
        tally["right_count_wrong_value"] += thoughts == ops and not passed
    return {str(ops): dict(tally) for ops, tally in sorted(counts.items())}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapter", default=None, help="a trained LoRA adapter folder (default: none, step 0)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="folder for step_counts.json (default: a temp folder)")
    parser.add_argument("--job_args", nargs=argparse.REMAINDER, default=[], help="further flags of the main job")
    opts = parser.parse_args()

    import torch

    torch.set_num_threads(opts.threads)
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trl_resets.app import harness
    from trl_resets.evaluation.callback import _trainer_settings
    from trl_resets.evaluation.generation import load_transformers_model, transformers_completer
    from trl_resets.rewards import boxed_answer_reward

    out = Path(opts.out or tempfile.mkdtemp(prefix="step-counts-"))
    args, model_args, task, run = harness.parse("srpo", ["--output_dir", str(out / "unused"), *opts.job_args])
    path = harness.prepare_model(args, model_args, task, run)
    held_out = harness.load_validation(task, run, harness.load_problems(task))
    if opts.adapter:
        model, tokenizer = load_transformers_model(path, opts.adapter, "float32", "cpu")
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(path)
    settings = _trainer_settings(args, None, run.validation_batch_size)
    tic = time.perf_counter()
    with torch.no_grad():
        texts = [s[0] for s in transformers_completer(model, tokenizer, settings).complete(list(held_out["prompt"]))]
    seconds = time.perf_counter() - tic
    scores = boxed_answer_reward(completions=texts, answer=held_out["answer"])
    rows = list(held_out)
    result = {"command": " ".join(["python -m benchmarks.step_counts", *sys.argv[1:]]), "adapter": opts.adapter,
              "problems": len(rows), "pass_rate": sum(s >= 1 for s in scores) / len(scores),
              "by_operations": breakdown(rows, texts, scores, args.thought_delimiter), "seconds": round(seconds, 1)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "step_counts.json").write_text(json.dumps(result, indent=2) + "\n")
    for ops, tally in result["by_operations"].items():
        print(f"{ops} operations: {tally}")
    print(f"[{out / 'step_counts.json'}] pass rate {result['pass_rate']:.3f} on {len(rows)} problems")


if __name__ == "__main__":
    main()
