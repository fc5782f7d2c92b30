"""Peak resident memory of the main job (`make train`), and the wall time of one greedy validation pass.

    python -m benchmarks.main_job                        # 2 SRPO steps of the main job + validation timing
    python -m benchmarks.main_job --cache /tmp/fresh     # the same from an empty cache: GGUF conversion and
                                                         # warm-up run in the job's process, as in a fresh clone
    python -m benchmarks.main_job --quick                # 1 step, 8 held-out problems (a smoke test)
    python -m benchmarks.main_job --cache /tmp/fresh --steps 0 --skip validation   # conversion + warm-up only
    python -m benchmarks.main_job --skip job --validation_problems 68 --batch_sizes 68 --repeats 2 --adapter OUT
                                                         # validation of a trained run's adapter (OUT: its output
                                                         # folder), whose answers are longer than step 0's

Two child processes, each with a thread that reads its resident memory (RSS) every 20 ms:

* ``job``: the main job as ``examples/train_srpo.py`` runs it (the harness's defaults, ``--max_steps`` and
  ``--validation_problems`` from the flags), in phases: the embedded model's conversion from the GGUF file
  (``trl_resets.app.models.default_model_path``), the format warm-up (``trl_resets.app.warmup``), then training with
  validation. Each phase reports the peak RSS so far and the RSS at its end; a cached phase takes no time.
* ``validation``: the warmed-up model's greedy pass over the held-out problems with the trainer's decoding
  settings, once one problem at a time and once batched as the harness validates (``--batch_sizes``); it checks
  that every batch size gives the same answers and prints each pass's wall time and pass rate. With ``--adapter``
  the model is the warmed-up one with a trained run's LoRA adapter merged (the validation at that run's last
  step); ``--repeats`` times each batch size that many times.

The load average is printed beside every time: the machine may be shared. Writes ``--out`` (default: a temp
folder) ``main_job.json``; the last line printed is the headline.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

MIB = 2**20


class RssSampler(threading.Thread):
    """Reads this process's RSS every ``interval`` seconds; ``peak`` is the highest value seen."""

    def __init__(self, interval: float = 0.02):
        import psutil

        super().__init__(daemon=True)
        self.process = psutil.Process()
        self.interval = interval
        self.peak = self.now()
        self.running = True

    def now(self) -> int:
        return self.process.memory_info().rss

    def run(self):
        while self.running:
            self.peak = max(self.peak, self.now())
            time.sleep(self.interval)

    def mark(self, phase: str, seconds: float) -> dict:
        self.peak = max(self.peak, self.now())
        record = {"phase": phase, "seconds": round(seconds, 1), "peak_rss_mib": round(self.peak / MIB),
                  "end_rss_mib": round(self.now() / MIB), "load_average": round(os.getloadavg()[0], 2)}
        print(json.dumps(record), flush=True)
        return record


def quiet() -> None:
    import warnings

    import transformers

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore")


def job_argv(opts, output_dir: str) -> list[str]:
    return ["--output_dir", output_dir, "--max_steps", str(opts.steps), "--validation_problems",
            str(opts.validation_problems), "--validation_steps", str(opts.steps), "--plots", "false",
            "--disable_tqdm", "true"] + opts.job_args


def run_job(opts) -> dict:
    """The main job in this process, phase by phase."""
    import torch

    torch.set_num_threads(opts.threads)
    quiet()
    from trl_resets.app import harness
    from trl_resets.app.models import default_model_path

    phases = []
    with tempfile.TemporaryDirectory(prefix="main-job-") as out:
        rss = RssSampler()
        rss.start()
        tic = time.perf_counter()
        default_model_path()
        phases.append(rss.mark("model conversion (cached after the first run)", time.perf_counter() - tic))
        args, model_args, task, run = harness.parse("srpo", job_argv(opts, out))
        tic = time.perf_counter()
        harness.prepare_model(args, model_args, task, run)
        phases.append(rss.mark("format warm-up (cached after the first run)", time.perf_counter() - tic))
        summary, step_seconds = {}, []
        if opts.steps:
            tic = time.perf_counter()
            harness.train("srpo", args, model_args, task, run)
            phases.append(rss.mark(f"training, {opts.steps} step(s) with validation", time.perf_counter() - tic))
            summary = json.loads((Path(out) / "summary.json").read_text())
            logs = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
            step_seconds = [round(entry["step_time"], 1) for entry in logs if "step_time" in entry]
        rss.running = False
    return {"phases": phases, "peak_rss_mib": max(p["peak_rss_mib"] for p in phases),
            "ru_maxrss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "validation": summary.get("validation", []), "step_seconds": step_seconds}


def run_validation(opts) -> dict:
    """Greedy passes over the held-out problems of the main job, one per batch size."""
    import torch

    torch.set_num_threads(opts.threads)
    quiet()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trl_resets.app import harness
    from trl_resets.evaluation.callback import _trainer_settings
    from trl_resets.evaluation.generation import transformers_completer
    from trl_resets.rewards import boxed_answer_reward

    args, model_args, task, run = harness.parse("srpo", job_argv(opts, tempfile.mkdtemp(prefix="main-job-val-")))
    path = harness.prepare_model(args, model_args, task, run)
    held_out = harness.load_validation(task, run, harness.load_problems(task))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    if opts.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, opts.adapter).merge_and_unload().eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    prompts = list(held_out["prompt"])
    passes, answers = [], {}
    for batch_size in [b for b in opts.batch_sizes for _ in range(opts.repeats)]:
        settings = _trainer_settings(args, None)
        settings = type(settings)(**{**settings.__dict__, "batch_size": batch_size})
        load = os.getloadavg()[0]
        tic = time.perf_counter()
        with torch.no_grad():
            texts = [s[0] for s in transformers_completer(model, tokenizer, settings).complete(prompts)]
        seconds = time.perf_counter() - tic
        scores = boxed_answer_reward(completions=texts, answer=held_out["answer"])
        answers[batch_size] = texts
        passes.append({"batch_size": batch_size, "problems": len(prompts), "seconds": round(seconds, 1),
                       "pass_rate": sum(s >= 1 for s in scores) / len(scores),
                       "load_average_before": round(load, 2), "load_average_after": round(os.getloadavg()[0], 2)})
        print(json.dumps(passes[-1]), flush=True)
    first = answers[opts.batch_sizes[0]]
    same = {b: sum(a == f for a, f in zip(texts, first)) for b, texts in answers.items()}
    return {"passes": passes, "same_answers_as_first": same}


def child(phase: str, opts) -> dict:
    """``phase`` in a child process of its own (its RSS is its own); returns its record."""
    env = {**os.environ, "OMP_NUM_THREADS": str(opts.threads), "HF_HUB_OFFLINE": "1",
           "TRL_EXPERIMENTAL_SILENCE": "1"}
    if opts.cache:
        env["TRL_RESETS_CACHE"] = opts.cache
    with tempfile.NamedTemporaryFile(suffix=".json") as record:
        command = [sys.executable, __file__, "--phase", phase, "--record", record.name, *sys.argv[1:]]
        subprocess.run(command, env=env, check=True)
        return json.loads(Path(record.name).read_text())


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=2,
                        help="SRPO steps of the main job (0: stop after the conversion and the warm-up)")
    parser.add_argument("--validation_problems", type=int, default=64)
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 64],
                        help="validation batch sizes to time (the first is the reference for the answers)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--adapter", default=None,
                        help="validation: merge this trained LoRA adapter (a main-job output folder) into the model")
    parser.add_argument("--repeats", type=int, default=1, help="validation: passes per batch size")
    parser.add_argument("--cache", default=None, help="model and warm-up cache (default: the user cache)")
    parser.add_argument("--skip", choices=["job", "validation"], default=None, help="leave out one measurement")
    parser.add_argument("--quick", action="store_true", help="1 step, 8 held-out problems")
    parser.add_argument("--out", default=None, help="folder for main_job.json (default: a temp folder)")
    parser.add_argument("--job_args", nargs=argparse.REMAINDER, default=[],
                        help="further flags of the main job, e.g. --job_args --per_device_train_batch_size 8")
    parser.add_argument("--phase", choices=["job", "validation"], default=None, help=argparse.SUPPRESS)
    parser.add_argument("--record", default=None, help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.adapter and not (Path(opts.adapter) / "adapter_config.json").is_file():
        parser.error(f"--adapter {opts.adapter}: no adapter_config.json there (give a main-job output folder).")
    if opts.steps < 0 or opts.validation_problems < 1 or min(opts.batch_sizes) < 1 or opts.repeats < 1:
        raise ValueError(f"steps={opts.steps}, validation_problems={opts.validation_problems}, batch_sizes="
                         f"{opts.batch_sizes}, repeats={opts.repeats}: need steps >= 0 and the others at least 1.")
    if opts.quick:
        opts.steps, opts.validation_problems = 1, 8
    if opts.phase is not None:
        result = run_job(opts) if opts.phase == "job" else run_validation(opts)
        Path(opts.record).write_text(json.dumps(result))
        return
    import torch

    result = {"command": " ".join(["python -m benchmarks.main_job", *sys.argv[1:]]),
              "machine": f"{os.cpu_count()} cores, torch {torch.__version__}, {opts.threads} thread(s)"}
    if opts.skip != "job":
        result["job"] = child("job", opts)
    if opts.skip != "validation":
        result["validation"] = child("validation", opts)
    out = Path(opts.out or tempfile.mkdtemp(prefix="main-job-bench-"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "main_job.json").write_text(json.dumps(result, indent=2) + "\n")
    headline = []
    if "job" in result:
        headline.append(f"main job peak RSS {result['job']['peak_rss_mib']} MiB")
        if result["job"]["step_seconds"]:
            headline.append(f"training steps {result['job']['step_seconds']} s")
    for p in result.get("validation", {}).get("passes", []):
        headline.append(f"validation of {p['problems']} problems at batch {p['batch_size']}: {p['seconds']} s "
                        f"(load {p['load_average_before']}-{p['load_average_after']})")
    print(f"[{out / 'main_job.json'}] " + "; ".join(headline))


if __name__ == "__main__":
    main()
