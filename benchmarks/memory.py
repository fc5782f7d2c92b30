"""Host memory of SRPO training steps, and a soak run: no leak, no crash, every metric finite.

    python -m benchmarks.memory                 # 50 SRPO steps at the paper's caps, full batch (testbed policy)
    python -m benchmarks.memory --quick         # 8 steps (a smoke test)
    python -m benchmarks.memory --soak          # 1000 steps: the soak run

The policy is the shipped testbed policy (experiments/testbed/policy, a small Llama trained on the testbed's
chains), trained with `SRPOTrainer` (1x4 split, self-localization, 8 prompts x 8 rows per step) at the paper's
caps: 20 thoughts of at most 256 tokens, 4096 response tokens. A sampling thread reads the process's resident
memory (RSS) every 5 ms; each step's peak and its RSS at the step's end are recorded. The leak check compares
the RSS at the end of step 50 (the last step on shorter runs) with step 5: the target is within 5%. Every
logged metric must be finite (NaN is allowed only for metrics that are undefined on a step, such as the
shared-prefix pass rate of a step where every prompt fell back; those are counted).

Writes benchmarks/results/memory{,_soak}.{json,md,png} (``--quick``: memory_quick.* in a new temporary folder), also
every ``--write-every`` steps while it runs (marked partial, with the steps done, the memory curve so far and the
non-finite count so far), so a run that is stopped still leaves its curve.
The last line printed is the headline.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

from experiments.testbed import RL_SEED, config_fields, load_policy, machine_description, quiet, task_dataset

RESULTS = Path(__file__).parent / "results"
PAPER_CAPS = {"max_completion_length": 4096, "max_thoughts": 20, "max_thought_tokens": 256}
LEAK_TOLERANCE = 0.05
MIB = 2**20


class RssSampler:
    """Reads this process's RSS every ``interval`` seconds in a thread; ``peak()`` since the last ``reset()``."""

    def __init__(self, interval: float = 0.005):
        self.process = psutil.Process()
        self.interval = interval
        self._peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self._peak = max(self._peak, self.process.memory_info().rss)
            time.sleep(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def now(self) -> int:
        return self.process.memory_info().rss

    def reset(self) -> None:
        self._peak = self.now()

    def peak(self) -> int:
        return max(self._peak, self.now())


def leak_ratio(rss_end: list[int], early: int = 5, late: int = 50) -> tuple[int, int, float]:
    """(early step, late step, RSS at the late step's end over the early one's); steps are 1-based."""
    late = min(late, len(rss_end))
    early = min(early, late)
    return early, late, rss_end[late - 1] / rss_end[early - 1]


def non_finite(logs: list[dict]) -> dict[str, int]:
    """How many logged values of each metric were NaN or infinite."""
    counts: dict[str, int] = {}
    for entry in logs:
        for key, value in entry.items():
            if isinstance(value, float) and not math.isfinite(value):
                counts[key] = counts.get(key, 0) + 1
    return counts


def summarize(record: dict, logs: list[dict]) -> None:
    """The logged metrics' share of ``record``: non-finite counts and the mean completion length."""
    logs = [e for e in logs if "resets/tokens_base" in e]
    record["non_finite"] = non_finite(logs)
    record["completion_length_mean"] = sum(e.get("completions/mean_length", 0.0) for e in logs) / max(len(logs), 1)


def run(steps: int, prompts: int, seed: int = 0, progress=None, every: int = 10) -> dict:
    """Train and measure; ``progress(record)`` is called every ``every`` steps with the record so far."""
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback

    from trl_resets import SRPOConfig, SRPOTrainer
    from trl_resets.rewards import boxed_answer_reward

    model, tokenizer = load_policy()
    out_dir = tempfile.mkdtemp(prefix="memory-")
    fields = config_fields(**PAPER_CAPS)
    args = SRPOConfig(
        output_dir=out_dir, per_device_train_batch_size=8 * prompts, max_steps=steps, learning_rate=1e-4,
        lr_scheduler_type="constant", warmup_steps=0, beta=0.0, seed=seed, logging_steps=1, report_to="none",
        save_strategy="no", use_cpu=True, bf16=False, disable_tqdm=True, seed_budget=8, **fields,
    )
    record = {"steps": [], "peak_rss_mib": [], "end_rss_mib": [], "seconds": []}
    with RssSampler() as rss:
        class Measure(TrainerCallback):
            def on_step_begin(self, _args, state, control, **kwargs):
                rss.reset()
                self.tic = time.perf_counter()

            def on_step_end(self, _args, state, control, **kwargs):
                record["steps"].append(state.global_step)
                record["peak_rss_mib"].append(rss.peak() / MIB)
                record["end_rss_mib"].append(rss.now() / MIB)
                record["seconds"].append(time.perf_counter() - self.tic)
                if state.global_step % 10 == 0 or state.global_step == steps:
                    print(f"step {state.global_step}: peak {record['peak_rss_mib'][-1]:.0f} MiB, "
                          f"end {record['end_rss_mib'][-1]:.0f} MiB, {record['seconds'][-1]:.1f} s", flush=True)
                if progress is not None and state.global_step % every == 0 and state.global_step < steps:
                    record["train_seconds"] = time.perf_counter() - tic
                    summarize(record, state.log_history)
                    progress(record)

        record["start_rss_mib"] = rss.now() / MIB
        trainer = SRPOTrainer(
            model=model, reward_funcs=boxed_answer_reward, args=args, processing_class=tokenizer,
            train_dataset=task_dataset(max(64, prompts * steps), seed=RL_SEED), callbacks=[Measure()],
        )
        trainer.remove_callback(PrinterCallback)
        tic = time.perf_counter()  # read by Measure
        trainer.train()
        record["train_seconds"] = time.perf_counter() - tic
    shutil.rmtree(out_dir, ignore_errors=True)
    summarize(record, trainer.state.log_history)
    return record


def render(record: dict, settings: dict, machine: str) -> str:
    early, late, ratio = leak_ratio([int(v * MIB) for v in record["end_rss_mib"]])
    done = len(record["steps"])
    partial = [f"**Partial: {done} of {settings['steps']} steps done** (written while the run goes on).", ""] \
        if done < settings["steps"] else []
    lines = [
        "# Host memory of SRPO steps (testbed policy, paper caps)", "",
        f"`{settings['command']}` on {machine}.", "", *partial,
        (f"{settings['steps']} steps of {settings['prompts']} prompts x 8 rows (1x4 split, self-localization), "
         f"caps {PAPER_CAPS}; mean completion length {record['completion_length_mean']:.1f} tokens; "
         f"{record['train_seconds']:.0f} s{' so far' if partial else ' in all'}."), "",
        "| | MiB |", "|---|---|",
        f"| RSS before the trainer | {record['start_rss_mib']:.0f} |",
        f"| peak RSS of a step, max over steps | {max(record['peak_rss_mib']):.0f} |",
        f"| peak RSS of a step, median | {sorted(record['peak_rss_mib'])[len(record['peak_rss_mib']) // 2]:.0f} |",
        f"| RSS at the end of step {early} | {record['end_rss_mib'][early - 1]:.0f} |",
        f"| RSS at the end of step {late} | {record['end_rss_mib'][late - 1]:.0f} |", "",
        f"RSS step {late} / step {early}: {ratio:.3f} (target: within {1 + LEAK_TOLERANCE:.2f}).",
        f"Non-finite logged values: {record['non_finite'] or 'none'}.",
    ]
    return "\n".join(lines) + "\n"


def plot(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(record["steps"], record["peak_rss_mib"], label="peak RSS of the step")
    ax.plot(record["steps"], record["end_rss_mib"], label="RSS at the step's end")
    ax.set_xlabel("step")
    ax.set_ylabel("MiB")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


def write_results(stem: Path, record: dict, settings: dict, machine: str) -> None:
    """``stem``.json, .md and .png, each replaced whole (a run stopped while writing keeps the previous set);
    ``complete`` is false and ``steps_done`` short of the settings' steps while the run goes on."""
    from trl_resets.checkpoints import write_atomically

    done = {"complete": len(record["steps"]) >= settings["steps"], "steps_done": len(record["steps"])}
    blob = json.dumps({"settings": settings, "machine": machine, **done, **record}, indent=1)
    write_atomically(stem.with_suffix(".json"), lambda path: Path(path).write_text(blob))
    write_atomically(stem.with_suffix(".md"), lambda path: Path(path).write_text(render(record, settings, machine)))
    write_atomically(stem.with_suffix(".png"), lambda path: plot(record, Path(path)))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="8 steps (a smoke test)")
    mode.add_argument("--soak", action="store_true", help="1000 steps")
    parser.add_argument("--steps", type=int, help="override the number of steps")
    parser.add_argument("--prompts", type=int, default=8, help="prompts per step (8 rows each)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--write-every", type=int, default=10, help="write the results so far every N steps")
    opts = parser.parse_args(argv)
    import torch

    torch.set_num_threads(opts.threads)
    quiet()
    steps = opts.steps or (8 if opts.quick else 1000 if opts.soak else 50)
    tag = "_quick" if opts.quick else "_soak" if opts.soak else ""
    command = "python -m benchmarks.memory" + " ".join(["", *(argv if argv is not None else sys.argv[1:])]).rstrip()
    settings = {"steps": steps, "prompts": opts.prompts, "command": command}
    results = Path(tempfile.mkdtemp(prefix="trl-resets-memory-")) if opts.quick else RESULTS  # a smoke run: scratch
    results.mkdir(exist_ok=True)
    print(f"results in {results}")

    def write(record):
        write_results(results / f"memory{tag}", record, settings, machine_description(opts.threads))

    record = run(steps, opts.prompts, progress=write, every=opts.write_every)
    write(record)
    machine = machine_description(opts.threads)
    early, late, ratio = leak_ratio(record["end_rss_mib"])
    print(render(record, settings, machine))
    print(f"peak step RSS {max(record['peak_rss_mib']):.0f} MiB; RSS step {late}/step {early} = {ratio:.3f} "
          f"({'within' if ratio <= 1 + LEAK_TOLERANCE else 'over'} {LEAK_TOLERANCE:.0%}); "
          f"non-finite metrics: {sum(record['non_finite'].values())}")


if __name__ == "__main__":
    main()
