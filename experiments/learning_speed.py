"""Learning speed on the fast testbed: GRPO, RRPO and SRPO (self / oracle, splits, clip) at the same rollout budget.

    python -m experiments.learning_speed            # every method, 3 seeds
    python -m experiments.learning_speed --quick    # GRPO and SRPO, 1 seed, 12 steps (under two minutes); options
                                                   # given beside --quick keep their values
    python -m experiments.learning_speed --policy experiments/testbed/policy-critical --tag critical
                                                   # the critical-step testbed (hard * and / steps)
    python -m experiments.learning_speed --methods GRPO SRPO --seeds 12 --reuse A.json B.json --tag more
                                                   # earlier runs read back (same settings), the rest run
    python -m experiments.learning_speed --methods GRPO RRPO SRPO GRPO-diff GRPO-state SRPO-diff --seeds 6 --tag credit
                                                   # comparison-based credit (docs/credit.md) beside resets
    python -m experiments.learning_speed --methods GRPO SRPO SRPO-b0 SRPO-lag1 SRPO-lag2 SRPO-iid --seeds 6 --tag lag
    python -m experiments.learning_speed --methods GRPO SRPO SRPO-b0 SRPO-lag1 SRPO-lag2 SRPO-iid --seeds 6 \
        --policy experiments/testbed/policy-critical --tag lag_critical
    python -m experiments.learning_speed --methods GRPO SRPO SRPO-b0 SRPO-lag1 SRPO-lag2 SRPO-iid --seeds 12 \
        --policy experiments/testbed/policy-hard --tag lag_hard_12seeds
                                                   # pipelined resets and the iid base group (docs/concepts.md),
                                                   # paired by seed: lag - SRPO-b0 (SRPO without seed search, as a
                                                   # lag runs) and SRPO-iid - SRPO at the last evaluation, 95%
                                                   # t-intervals; accuracy also against cumulative decoding steps
    python -m experiments.learning_speed --embedded --methods GRPO RRPO SRPO --seeds 3 --steps 8 --eval_every 4 \
        --eval_problems 68 --tag smollm2_3op    # the main job (embedded SmolLM2-135M-Instruct, its recipe)
    python -m experiments.learning_speed --embedded ... --first_seed S --seeds 1 --out DIR_S
                                                   # one seed per process, side by side; then the same command with
    python -m experiments.learning_speed --embedded ... --seeds 3 --reuse DIR_0/*.json DIR_1/*.json DIR_2/*.json
                                                   # reads their runs back (same settings) and writes the comparison

Every method trains the shipped testbed policy (experiments/testbed/) with the package's trainers,
sampler and localizers: 8 rows per prompt, the same prompts in the same order each step, the same number
of steps. GRPO is the reset trainer with k=0 and G1=8 (same thought sampler and harness). Held-out
accuracy is sampled at temperature 1 on a fixed evaluation set with fixed sampling noise.

With ``--embedded`` every run is the main job itself (`trl_resets.app.harness`, the method's CPU recipe: the
warmed-up SmolLM2-135M-Instruct, LoRA, the arithmetic task) with ``--seed``, ``--max_steps`` (``--steps``) and its
greedy held-out validation (``--eval_problems`` problems every ``--eval_every`` steps) set from here, and any other
main-job flag passed through ``--job_args``; accuracy is the validation's greedy pass rate.

Every run also records the tokens the policy generated and its cumulative sequential decoding steps (the trainer's
``resets/decode_steps``; NaN, not zero, where a step was not counted), and the curves are plotted against optimizer
steps, generated tokens and decoding steps. For each pair in ``PAIRS`` that ran on common seeds, the method minus
its pair is reported seed by seed with a 95% t-interval over seeds.

Headline: the steps SRPO needs to reach GRPO's final accuracy, as a fraction of GRPO's steps (last line).
Writes experiments/results/learning_speed.{json,md,png} (``--quick``: a new temporary folder; ``--out``: any folder).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import tempfile
import time
from pathlib import Path

import torch

from experiments.testbed import (
    EVAL_SEED,
    RL_SEED,
    config_fields,
    evaluate,
    load_policy,
    machine_description,
    policy_task,
    quiet,
    task_dataset,
)

RESULTS = Path(__file__).parent / "results"

# name -> (trainer, config overrides). Every split spends 8 rows per prompt.
METHODS = {
    "GRPO": ("srpo", {"num_base_generations": 8, "num_reset_prefixes": 0}),
    "RRPO": ("rrpo", {"num_base_generations": 4, "num_reset_prefixes": 1, "num_reset_generations": 4}),
    "SRPO": ("srpo", {"num_base_generations": 4, "num_reset_prefixes": 1, "num_reset_generations": 4}),
    "SRPO-oracle": ("srpo", {"num_base_generations": 4, "num_reset_prefixes": 1, "num_reset_generations": 4,
                             "localizer": "oracle"}),
    "SRPO-2x4": ("srpo", {"num_base_generations": 0, "num_reset_prefixes": 2, "num_reset_generations": 4}),
    "SRPO-1x8": ("srpo", {"num_base_generations": 0, "num_reset_prefixes": 1, "num_reset_generations": 8}),
    "SRPO-clip": ("srpo", {"num_base_generations": 4, "num_reset_prefixes": 1, "num_reset_generations": 4,
                           "clip_surrogate": True}),
    # comparison-based credit (docs/credit.md), thoughts keyed by the value they compute
    "GRPO-diff": ("srpo", {"num_base_generations": 8, "num_reset_prefixes": 0, "credit": "diff",
                           "state_key": "arithmetic"}),
    "GRPO-state": ("srpo", {"num_base_generations": 8, "num_reset_prefixes": 0, "credit": "state",
                            "state_key": "arithmetic"}),
    "SRPO-diff": ("srpo", {"num_base_generations": 4, "num_reset_prefixes": 1, "num_reset_generations": 4,
                           "credit": "diff", "state_key": "arithmetic"}),
    # pipelined resets (docs/concepts.md): no seed search under a lag, so SRPO-b0 (seed_budget=0) is their pair
    "SRPO-b0": ("srpo", {"num_base_generations": 4, "num_reset_prefixes": 1, "num_reset_generations": 4,
                         "seed_budget": 0}),
    "SRPO-lag1": ("srpo", {"num_base_generations": 4, "num_reset_prefixes": 1, "num_reset_generations": 4,
                           "seed_budget": 0, "reset_lag": 1}),
    "SRPO-lag2": ("srpo", {"num_base_generations": 4, "num_reset_prefixes": 1, "num_reset_generations": 4,
                           "seed_budget": 0, "reset_lag": 2}),
    # the base group as the first G1 draws, iid (base_group="iid")
    "SRPO-iid": ("srpo", {"num_base_generations": 4, "num_reset_prefixes": 1, "num_reset_generations": 4,
                          "base_group": "iid"}),
}
BASELINE, HEADLINE_METHOD = "GRPO", "SRPO"
# --quick: a smoke run (options given on the command line keep their values)
QUICK = {"methods": [BASELINE, HEADLINE_METHOD], "seeds": 1, "steps": 12, "eval_every": 4, "prompts_per_step": 8,
         "eval_problems": 48, "eval_samples": 4}
# (method, its pair): the paired differences reported with a 95% t-interval over seeds, where both ran
PAIRS = (("SRPO-lag1", "SRPO-b0"), ("SRPO-lag2", "SRPO-b0"), ("SRPO-iid", "SRPO"))
# The options a run's result depends on: a run in a --reuse file counts for this invocation only if they match.
RUN_OPTIONS = ("steps", "prompts_per_step", "lr", "eval_every", "eval_problems", "eval_samples", "train_prompts",
               "num_steps", "policy", "task")
# With --embedded a run also depends on the main-job flags passed through (and is not a testbed run).
EMBEDDED_RUN_OPTIONS = ("embedded", "steps", "eval_every", "eval_problems", "job_args")


def reusable_runs(paths, opts, options=RUN_OPTIONS) -> dict[tuple[str, int], dict]:
    """Runs recorded in earlier results files (``--reuse``), keyed by (method, seed).

    A run is reproducible from its method, seed and ``options`` (RUN_OPTIONS; EMBEDDED_RUN_OPTIONS for the main
    job): the trainer, the sampling noise and the evaluation are all seeded, so a file whose options match is read
    back instead of run again; one whose options differ is an error, not a silent mix. Records from before seeds were written down are numbered
    from 0 in file order (every earlier run started at seed 0).
    """
    found = {}
    for path in paths:
        data = json.loads(Path(path).read_text())
        if not isinstance(data, dict) or not isinstance(data.get("runs"), dict):
            raise SystemExit(f"--reuse {path}: not a learning_speed results file (it has no runs).")
        theirs = data.get("options", {})
        differ = [k for k in options if _comparable(theirs.get(k)) != _comparable(getattr(opts, k))]
        if differ:
            raise SystemExit(f"--reuse {path}: its runs used other settings ({', '.join(differ)}: "
                             f"{[theirs.get(k) for k in differ]} here {[getattr(opts, k) for k in differ]}).")
        for method, records in data["runs"].items():
            for index, record in enumerate(records):
                found[(method, record.get("seed", index))] = {**record, "seed": record.get("seed", index)}
    return found


def _comparable(value):
    if isinstance(value, str) and Path(value).exists():
        return str(Path(value).resolve())
    return json.loads(json.dumps(value))  # tuples and lists alike


def steps_to_reach(steps: list[int], curve: list[float], target: float) -> int | None:
    """The first evaluated step at which ``curve`` reaches ``target``; None if it never does."""
    for step, value in zip(steps, curve):
        if value >= target:
            return step
    return None


def speed_ratio(steps: list[int], baseline: list[float], method: list[float]) -> float | None:
    """Steps ``method`` needs to reach the baseline's final value, over the baseline's steps.

    None when it never does, or when the baseline ended no higher than it started (nothing to reach).
    """
    if baseline[-1] <= baseline[0]:
        return None
    reached = steps_to_reach(steps, method, baseline[-1])
    return None if reached is None else reached / steps[-1]


def median_curve(runs: list[list[float]]) -> list[float]:
    """The median over seeds at each evaluation (a stalled seed moves it less than the mean)."""
    import statistics

    return [statistics.median(values) for values in zip(*runs)]


def mean_and_spread(runs: list[list[float]]) -> tuple[list[float], list[float], list[float]]:
    """Per point: mean, minimum and maximum over runs (seeds)."""
    columns = list(zip(*runs))
    return ([sum(c) / len(c) for c in columns], [min(c) for c in columns], [max(c) for c in columns])


def generated_tokens(logs: dict) -> float:
    """Tokens the policy generated in a logged training step: every sampled token once (rollouts, seeds,
    localization replies, unused draws, repair replies), read from the trainer's own metrics."""
    return logs["resets/generated_tokens"] + logs.get("credit/tokens_repair", 0.0)


def decoding_steps(logs: dict) -> float:
    """Sequential decoding steps of a logged training step's generation (``resets/decode_steps``, the compact
    decoder's steps); NaN when the trainer could not count them (vLLM, collective decoding, a localizer called once
    per batch), so that a cumulative count never hides a missing step as zero."""
    value = logs.get("resets/decode_steps")
    return math.nan if value is None else float(value)


def train_one(method: str, seed: int, opts, eval_set, start_eval: dict) -> dict:
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback

    from trl_resets import RRPOConfig, RRPOTrainer, SRPOConfig, SRPOTrainer
    from trl_resets.rewards import boxed_answer_reward

    kind, overrides = METHODS[method]
    model, tokenizer = load_policy(opts.policy)
    out_dir = tempfile.mkdtemp(prefix="learning_speed-")
    config_cls = {"srpo": SRPOConfig, "rrpo": RRPOConfig}[kind]
    args = config_cls(
        output_dir=out_dir, per_device_train_batch_size=8 * opts.prompts_per_step, max_steps=opts.steps,
        learning_rate=opts.lr, lr_scheduler_type="constant", warmup_steps=0, beta=0.0, seed=seed,
        logging_steps=1, report_to="none", save_strategy="no", use_cpu=True, bf16=False, disable_tqdm=True,
        **config_fields(opts.task), **{"seed_budget": 8, **overrides},
    )
    record = {"seed": seed, "steps": [0], "accuracy": [start_eval["accuracy"]], "tokens": [0], "decode_steps": [0],
              "seconds": [0.0]}
    eval_seconds = [0.0]

    tokens, decode_steps = [0.0], [0.0]

    class Evaluate(TrainerCallback):
        def on_log(self, _args, state, control, logs=None, **kwargs):
            if "resets/generated_tokens" not in (logs or {}):
                return  # the end-of-training summary
            tokens[0] += generated_tokens(logs)
            decode_steps[0] += decoding_steps(logs)
            if state.global_step % opts.eval_every == 0 or state.global_step == opts.steps:
                tic = time.perf_counter()
                result = evaluate(trainer.model, tokenizer, eval_set, opts.eval_samples, seed=EVAL_SEED,
                                  fields=config_fields(opts.task))
                record["steps"].append(state.global_step)
                record["accuracy"].append(result["accuracy"])
                record["tokens"].append(int(tokens[0]))
                record["decode_steps"].append(decode_steps[0])
                record["seconds"].append(tic - start - eval_seconds[0])
                eval_seconds[0] += time.perf_counter() - tic

    trainer = {"srpo": SRPOTrainer, "rrpo": RRPOTrainer}[kind](
        model=model, reward_funcs=boxed_answer_reward, args=args, processing_class=tokenizer,
        train_dataset=task_dataset(opts.train_prompts, seed=RL_SEED, num_steps=opts.num_steps, task=opts.task),
        callbacks=[Evaluate()],
    )
    trainer.remove_callback(PrinterCallback)  # the per-step log dicts; the benchmark prints its own lines
    start = time.perf_counter()
    trainer.train()
    shutil.rmtree(out_dir, ignore_errors=True)
    logs = [e for e in trainer.state.log_history if "resets/tokens_base" in e]
    record["train_seconds"] = time.perf_counter() - start - eval_seconds[0]
    record["localization_parse_failure"] = _mean([e.get("resets/parse_failure_rate") for e in logs])
    record["fallback_rate"] = _mean([e.get("resets/fallback_rate") for e in logs])
    record["shared_state_rate"] = _mean([e.get("credit/shared_state_rate") for e in logs])
    return record


# The main job's methods by the harness's name (its train_grpo.py / train_rrpo.py / train_srpo.py).
EMBEDDED_METHODS = {"GRPO": "grpo", "RRPO": "rrpo", "SRPO": "srpo"}


def embedded_argv(seed: int, opts, out_dir: str) -> list[str]:
    """The main job's command line for one run: the harness's flags set here, then ``opts.job_args`` (shlex-split),
    which may override any of them."""
    import shlex

    return ["--output_dir", out_dir, "--seed", str(seed), "--max_steps", str(opts.steps),
            "--validation_problems", str(opts.eval_problems), "--validation_steps", str(opts.eval_every),
            "--plots", "false", "--disable_tqdm", "true", *shlex.split(opts.job_args or "")]


def embedded_record(seed: int, log_history: list[dict], validation: list[dict], train_seconds: float) -> dict:
    """A run's record from the main job's log: the validation's greedy pass rate at each evaluated step, and the
    tokens generated up to that step (every logged training step's `generated_tokens`, summed) and the sequential
    decoding steps (`decoding_steps`, summed)."""
    per_step, steps_per_step = {}, {}
    for entry in log_history:
        if "resets/generated_tokens" in entry:
            per_step[entry["step"]] = generated_tokens(entry)
            steps_per_step[entry["step"]] = decoding_steps(entry)
    record = {"seed": seed, "steps": [], "accuracy": [], "tokens": [], "decode_steps": [],
              "train_seconds": train_seconds}
    for point in validation:
        record["steps"].append(point["step"])
        record["accuracy"].append(point["validation/pass_rate"])
        record["tokens"].append(int(sum(t for step, t in per_step.items() if step <= point["step"])))
        record["decode_steps"].append(sum(n for step, n in steps_per_step.items() if step <= point["step"]))
    if not record["steps"] or record["steps"][0] != 0:
        raise ValueError(f"the run's validation has no step-0 point ({[p.get('step') for p in validation]}); "
                         "the learning-speed curves start from the untrained model.")
    return record


def train_embedded(method: str, seed: int, opts) -> dict:
    """One main-job run of ``method`` (GRPO, RRPO or SRPO) with ``seed``, through the harness; its output folder is
    a temporary one, removed afterwards."""
    from trl_resets.app.harness import main as run_main_job
    from trl_resets.evaluation.callback import ValidationCallback

    out_dir = tempfile.mkdtemp(prefix="learning_speed-embedded-")
    start = time.perf_counter()
    trainer = run_main_job(EMBEDDED_METHODS[method], embedded_argv(seed, opts, out_dir))
    seconds = time.perf_counter() - start
    validation = next(c for c in trainer.callback_handler.callbacks if isinstance(c, ValidationCallback))
    summary = json.loads((Path(out_dir) / "summary.json").read_text())
    shutil.rmtree(out_dir, ignore_errors=True)
    record = embedded_record(seed, trainer.state.log_history, validation.history, summary["train_seconds"])
    record["seconds"] = [seconds]
    record["validation_problems"] = len(validation.dataset)
    logs = [e for e in trainer.state.log_history if "resets/tokens_base" in e]
    record["localization_parse_failure"] = _mean([e.get("resets/parse_failure_rate") for e in logs])
    record["fallback_rate"] = _mean([e.get("resets/fallback_rate") for e in logs])
    record["zero_std_share"] = _mean([e.get("frac_reward_zero_std") for e in logs])
    record["grad_norm_zero_steps"] = sum(1 for e in logs if e.get("grad_norm") == 0.0)
    return record


def _mean(values):
    finite = [v for v in values if v is not None and not math.isnan(v)]
    return sum(finite) / len(finite) if finite else None


def summarize(runs: dict[str, list[dict]]) -> dict:
    """Mean curves over seeds and every method's steps-to-GRPO's-final-accuracy ratio."""
    summary = {}
    for method, records in runs.items():
        mean, low, high = mean_and_spread([r["accuracy"] for r in records])
        summary[method] = {
            "steps": records[0]["steps"], "accuracy_mean": mean, "accuracy_min": low, "accuracy_max": high,
            "accuracy_median": median_curve([r["accuracy"] for r in records]), "seeds": len(records),
            "tokens_mean": mean_and_spread([r["tokens"] for r in records])[0],
            "decode_steps_mean": (mean_and_spread([r["decode_steps"] for r in records])[0]
                                  if all("decode_steps" in r for r in records) else None),
            "seconds_per_step": sum(r["train_seconds"] for r in records) / len(records) / records[0]["steps"][-1],
        }
    base = summary[BASELINE]
    for method, entry in summary.items():
        entry["steps_to_grpo_final"] = steps_to_reach(base["steps"], entry["accuracy_mean"], base["accuracy_mean"][-1])
        entry["ratio_to_grpo"] = speed_ratio(base["steps"], base["accuracy_mean"], entry["accuracy_mean"])
        entry["ratio_to_grpo_median"] = speed_ratio(base["steps"], base["accuracy_median"], entry["accuracy_median"])
        # against tokens: the tokens generated when the mean curve first reaches GRPO's final mean, over GRPO's own
        entry["tokens_to_grpo_final"] = steps_to_reach(entry["tokens_mean"], entry["accuracy_mean"],
                                                       base["accuracy_mean"][-1])
    grpo_tokens = base["tokens_to_grpo_final"]
    for entry in summary.values():
        reached = entry["tokens_to_grpo_final"]
        entry["token_ratio_to_grpo"] = (None if reached is None or not grpo_tokens or not baseline_improved(summary)
                                        else reached / grpo_tokens)
    return summary


def paired_with_baseline(runs: dict[str, list[dict]]) -> dict[str, dict]:
    """Each method against GRPO seed by seed (the same seed: the same prompts and sampling seed): the mean and
    standard error over seeds of the difference in final accuracy and in the mean accuracy over the evaluations
    after the start (a whole-curve measure of speed), and the seeds whose curve mean is above GRPO's."""
    import statistics

    base = {r["seed"]: r for r in runs.get(BASELINE, [])}
    out = {}
    for method, records in runs.items():
        pairs = [(r, base[r["seed"]]) for r in records if method != BASELINE and r.get("seed") in base]
        if len(pairs) < 2:
            continue
        final = [r["accuracy"][-1] - g["accuracy"][-1] for r, g in pairs]
        curve = [statistics.fmean(r["accuracy"][1:]) - statistics.fmean(g["accuracy"][1:]) for r, g in pairs]
        out[method] = {"seeds": len(pairs), "final_diff": statistics.fmean(final),
                       "final_diff_se": statistics.stdev(final) / len(final) ** 0.5,
                       "curve_diff": statistics.fmean(curve), "curve_diff_se": statistics.stdev(curve) / len(curve) ** 0.5,
                       "seeds_above": sum(d > 0 for d in curve)}
    return out


def t_quantile(p: float, df: int) -> float:
    """The ``p``-quantile (p >= 0.5) of Student's t distribution with ``df`` degrees of freedom: bisection on its
    distribution function, integrated from the density by Simpson's rule."""
    scale = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)

    def cdf(x: float, n: int = 2000) -> float:
        h = x / n
        density = [scale * (1 + (i * h) ** 2 / df) ** (-(df + 1) / 2) for i in range(n + 1)]
        return 0.5 + h / 3 * (density[0] + density[-1] + 4 * sum(density[1:-1:2]) + 2 * sum(density[2:-1:2]))

    low, high = 0.0, 1.0
    while cdf(high) < p:
        high *= 2
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if cdf(middle) < p else (low, middle)
    return (low + high) / 2


def t_interval(values: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """The mean of ``values`` (at least two) and its ``level`` Student t-interval: (mean, low, high)."""
    import statistics

    mean = statistics.fmean(values)
    half = t_quantile((1 + level) / 2, len(values) - 1) * statistics.stdev(values) / len(values) ** 0.5
    return mean, mean - half, mean + half


def paired_differences(runs: dict[str, list[dict]], pairs=PAIRS) -> dict[str, dict]:
    """``method - reference`` seed by seed (the same seed: the same prompts and sampling seed) for each pair where
    both ran at least two common seeds: the held-out accuracy difference at the last evaluation and in the mean over
    the evaluations after the start, each with its 95% t-interval over seeds, and the ratio of cumulative sequential
    decoding steps and of generated tokens at the end (mean over seeds; None where steps were not counted)."""
    import statistics

    out = {}
    for method, reference in pairs:
        theirs = {r["seed"]: r for r in runs.get(reference, [])}
        both = [(r, theirs[r["seed"]]) for r in runs.get(method, []) if r.get("seed") in theirs]
        if len(both) < 2:
            continue
        final = t_interval([r["accuracy"][-1] - g["accuracy"][-1] for r, g in both])
        curve = t_interval([statistics.fmean(r["accuracy"][1:]) - statistics.fmean(g["accuracy"][1:]) for r, g in both])
        ratios = [r["decode_steps"][-1] / g["decode_steps"][-1] for r, g in both
                  if "decode_steps" in r and "decode_steps" in g]
        step_ratio = statistics.fmean(ratios) if len(ratios) == len(both) else None
        out[f"{method} - {reference}"] = {
            "method": method, "reference": reference, "seeds": len(both),
            "final_diff": final[0], "final_ci95": list(final[1:]), "curve_diff": curve[0], "curve_ci95": list(curve[1:]),
            "decode_steps_ratio": None if step_ratio is None or math.isnan(step_ratio) else step_ratio,
            "tokens_ratio": statistics.fmean(r["tokens"][-1] / g["tokens"][-1] for r, g in both),
        }
    return out


def paired_differences_table(differences: dict[str, dict]) -> str:
    if not differences:
        return ""
    lines = [("| paired by seed | seeds | final accuracy difference [95% t-interval] | mean accuracy over the curve, "
              "difference [95% t-interval] | cumulative decoding steps, ratio | generated tokens, ratio |"),
             "|---|---|---|---|---|---|"]
    for name, d in differences.items():
        steps = "not counted" if d["decode_steps_ratio"] is None else f"{d['decode_steps_ratio']:.2f}"
        lines.append(f"| {name} | {d['seeds']} | {d['final_diff']:+.3f} [{d['final_ci95'][0]:+.3f}, "
                     f"{d['final_ci95'][1]:+.3f}] | {d['curve_diff']:+.3f} [{d['curve_ci95'][0]:+.3f}, "
                     f"{d['curve_ci95'][1]:+.3f}] | {steps} | {d['tokens_ratio']:.2f} |")
    return "\n".join(lines) + "\n"


def paired_table(paired: dict[str, dict]) -> str:
    if not paired:
        return ""
    lines = [("| against GRPO, paired by seed | seeds | final accuracy difference (mean ± s.e.) | mean accuracy over "
              "the curve, difference (mean ± s.e.) | seeds with the curve above GRPO's |"), "|---|---|---|---|---|"]
    for method, p in paired.items():
        lines.append(f"| {method} | {p['seeds']} | {p['final_diff']:+.3f} ± {p['final_diff_se']:.3f} "
                     f"| {p['curve_diff']:+.3f} ± {p['curve_diff_se']:.3f} | {p['seeds_above']} of {p['seeds']} |")
    return "\n".join(lines) + "\n"


def baseline_improved(summary: dict) -> bool:
    curve = summary[BASELINE]["accuracy_mean"]
    return curve[-1] > curve[0]


def table(summary: dict) -> str:
    lines = [
        ("| method | seeds | start acc | final acc (mean, min-max over the seeds) | final (median) | steps to GRPO's "
         "final | fraction of GRPO's steps (mean curves) | same, median curves | tokens generated | tokens to "
         "GRPO's final / GRPO's (mean curves) | s/step |"),
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method, e in summary.items():
        ratio = "not reached" if e["ratio_to_grpo"] is None else f"{e['ratio_to_grpo']:.2f}"
        if not baseline_improved(summary):
            ratio = "GRPO did not improve"
        median_ratio = "not reached" if e["ratio_to_grpo_median"] is None else f"{e['ratio_to_grpo_median']:.2f}"
        reached = "-" if e["steps_to_grpo_final"] is None else str(e["steps_to_grpo_final"])
        token_ratio = "not reached" if e.get("token_ratio_to_grpo") is None else f"{e['token_ratio_to_grpo']:.2f}"
        lines.append(
            f"| {method} | {e['seeds']} | {e['accuracy_mean'][0]:.3f} | {e['accuracy_mean'][-1]:.3f} "
            f"({e['accuracy_min'][-1]:.3f}-{e['accuracy_max'][-1]:.3f}) | {e['accuracy_median'][-1]:.3f} | {reached} "
            f"| {ratio} | {median_ratio} | "
            f"{e['tokens_mean'][-1]:.0f} | {token_ratio} | {e['seconds_per_step']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: Path, title: str, measure: str = "held-out accuracy (sampled, T=1)") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(17, 8.5), sharey=True)
    for method, e in summary.items():
        style = {"linewidth": 2.5} if method in (BASELINE, HEADLINE_METHOD) else {"linewidth": 1.2, "alpha": 0.85}
        for row, curve in ((0, "accuracy_mean"), (1, "accuracy_median")):
            columns = [(axes[row][0], e["steps"]), (axes[row][1], e["tokens_mean"])]
            if e.get("decode_steps_mean") is not None:  # a run whose steps were not all counted is left out
                columns.append((axes[row][2], e["decode_steps_mean"]))
            for ax, x in columns:
                (line,) = ax.plot(x, e[curve], label=method, **style)
                if row == 0:  # the spread over seeds around the mean
                    ax.fill_between(x, e["accuracy_min"], e["accuracy_max"], color=line.get_color(), alpha=0.12)
    for row, name in ((0, "mean over seeds (band: min-max)"), (1, "median over seeds")):
        axes[row][0].axhline(summary[BASELINE][("accuracy_mean", "accuracy_median")[row]][-1], color="gray",
                             linestyle=":", linewidth=1)
        axes[row][0].set_xlabel("training step")
        axes[row][1].set_xlabel("generated tokens (all sampling, localization included; mean over seeds)")
        axes[row][2].set_xlabel("sequential decoding steps, cumulative (resets/decode_steps; mean over seeds)")
        axes[row][0].set_ylabel(f"{measure}\n{name}")
    axes[0][1].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def given_options(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> set[str]:
    """The options given on the command line (``argv``, default ``sys.argv``), whatever their values: the command
    line parsed again with no defaults."""
    probe = copy.deepcopy(parser)
    for action in probe._actions:
        action.default = argparse.SUPPRESS
    return set(vars(probe.parse_args(argv)))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first_seed", type=int, default=0,
                        help="seeds first_seed .. first_seed+seeds-1 (more seeds later: --first_seed 6, then --reuse)")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--prompts_per_step", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--eval_every", type=int, default=2)
    parser.add_argument("--eval_problems", type=int, default=64)
    parser.add_argument("--eval_samples", type=int, default=4)
    parser.add_argument("--train_prompts", type=int, default=512)
    parser.add_argument("--num_steps", type=int, nargs="+", default=None,
                        help="step counts of the training and evaluation problems (default: all the testbed's)")
    parser.add_argument("--policy", default=None, help="testbed policy folder (default: the shipped one)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core CPU)")
    parser.add_argument("--reuse", nargs="+", default=[], metavar="JSON",
                        help="results files of earlier runs with the same settings: their (method, seed) runs are "
                             "read back, not run again (to add seeds or methods to a comparison)")
    parser.add_argument("--embedded", action="store_true",
                        help="run the main job (embedded SmolLM2-135M-Instruct, the methods' CPU recipes) instead of "
                             "the testbed: methods GRPO, RRPO, SRPO; accuracy is the greedy held-out pass rate")
    parser.add_argument("--job_args", default="",
                        help="with --embedded: more main-job flags, e.g. --job_args='--learning_rate 2e-4'")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--tag", default="", help="results name suffix, e.g. 'critical' -> learning_speed_critical.*")
    parser.add_argument("--out", default=None, help="results folder (default: experiments/results; --quick: a new "
                        "temporary folder)")
    opts = parser.parse_args()
    if opts.embedded:
        return main_embedded(parser, opts)
    if opts.job_args:
        parser.error("--job_args are main-job flags: add --embedded.")
    if opts.quick:  # the quick settings, for the options not given on the command line
        given = given_options(parser)
        for name, value in QUICK.items():
            if name not in given:
                setattr(opts, name, list(value) if isinstance(value, list) else value)
    for name in (BASELINE, HEADLINE_METHOD):
        if name not in opts.methods:
            opts.methods.insert(0 if name == BASELINE else 1, name)
    if opts.policy is None:
        from experiments.testbed import POLICY_DIR

        opts.policy = str(POLICY_DIR)
    opts.task = policy_task(opts.policy)
    torch.set_num_threads(opts.threads)
    quiet()
    wall = time.perf_counter()
    eval_set = task_dataset(opts.eval_problems, seed=EVAL_SEED, num_steps=opts.num_steps, task=opts.task)
    model, tokenizer = load_policy(opts.policy)
    start_eval = evaluate(model, tokenizer, eval_set, opts.eval_samples, seed=EVAL_SEED,
                          fields=config_fields(opts.task))
    print(f"testbed start accuracy {start_eval['accuracy']:.3f} ({opts.eval_problems} problems x "
          f"{opts.eval_samples} samples)", flush=True)

    reused = reusable_runs(opts.reuse, opts)
    runs: dict[str, list[dict]] = {}
    planned = len(opts.methods) * opts.seeds
    read_back = 0
    for method in opts.methods:
        for seed in range(opts.first_seed, opts.first_seed + opts.seeds):
            record = reused.get((method, seed))
            if record is not None and record["accuracy"][0] != start_eval["accuracy"]:
                raise SystemExit(f"--reuse: {method} seed {seed} started at accuracy {record['accuracy'][0]:.3f}, "
                                 f"this evaluation gives {start_eval['accuracy']:.3f}: not the same code or policy.")
            origin = "read back" if record is not None else None
            read_back += record is not None
            if record is None:
                record = train_one(method, seed, opts, eval_set, start_eval)
                origin = f"{record['train_seconds']:.0f}s"
            runs.setdefault(method, []).append(record)
            print(f"{method:12s} seed {seed}: accuracy {' '.join(f'{a:.2f}' for a in record['accuracy'])} "
                  f"({origin})", flush=True)
            done = sum(len(r) for r in runs.values())
            if done < planned:  # the results so far, so that a run stopped early leaves what it measured
                write_results(opts, runs, start_eval, time.perf_counter() - wall, final=False, read_back=read_back)
    text, setting, machine, wall_text, headline_text = write_results(opts, runs, start_eval,
                                                                     time.perf_counter() - wall, read_back=read_back)
    print(text)
    print(f"{setting}; {machine}; {wall_text}")
    print(f"SRPO steps to reach GRPO's final accuracy / GRPO's steps: {headline_text}")
    for name, d in paired_differences(runs).items():
        steps = "not counted" if d["decode_steps_ratio"] is None else f"{d['decode_steps_ratio']:.2f}x"
        print(f"{name} at the last evaluation ({d['seeds']} seeds): accuracy {d['final_diff']:+.3f}, 95% t-interval "
              f"[{d['final_ci95'][0]:+.3f}, {d['final_ci95'][1]:+.3f}]; cumulative decoding steps {steps}, "
              f"generated tokens {d['tokens_ratio']:.2f}x")


def main_embedded(parser, opts) -> None:
    """The learning-speed comparison on the main job (``--embedded``): GRPO, RRPO and SRPO runs of the harness, paired
    by seed, accuracy the greedy held-out pass rate."""
    unknown = [m for m in opts.methods if m not in EMBEDDED_METHODS]
    if unknown:
        parser.error(f"--embedded runs the main job's methods {list(EMBEDDED_METHODS)}, not {unknown}.")
    if opts.methods == list(METHODS):  # the testbed's default list: all the main job has
        opts.methods = list(EMBEDDED_METHODS)
    for name in (BASELINE, HEADLINE_METHOD):
        if name not in opts.methods:
            opts.methods.insert(0 if name == BASELINE else 1, name)
    if opts.quick:
        opts.methods, opts.seeds, opts.steps, opts.eval_every, opts.eval_problems = [BASELINE, HEADLINE_METHOD], 1, 1, 1, 4
    opts.lr, opts.policy, opts.task = None, "embedded SmolLM2-135M-Instruct (main job)", None
    torch.set_num_threads(opts.threads)
    quiet()
    wall = time.perf_counter()
    runs: dict[str, list[dict]] = {}
    planned = len(opts.methods) * opts.seeds
    # runs of the same settings from earlier files (e.g. one process per seed, run side by side), read back
    reused = reusable_runs(opts.reuse, opts, EMBEDDED_RUN_OPTIONS)
    read_back = 0
    for seed in range(opts.first_seed, opts.first_seed + opts.seeds):  # seed-major: a stopped run leaves pairs
        for method in opts.methods:
            record = reused.get((method, seed))
            read_back += record is not None
            if record is None:
                record = train_embedded(method, seed, opts)
            runs.setdefault(method, []).append(record)
            starts = {r["accuracy"][0] for records in runs.values() for r in records}
            if len(starts) > 1:  # every run starts from the same warmed-up model and held-out set
                raise SystemExit(f"{method} seed {seed} starts at pass rate {record['accuracy'][0]:.3f}, other runs "
                                 f"at {sorted(starts)}: not the same code, model or held-out set.")
            print(f"{method:6s} seed {seed}: pass rate {' '.join(f'{a:.3f}' for a in record['accuracy'])} at steps "
                  f"{record['steps']}, tokens {record['tokens'][-1]} ({record['train_seconds']:.0f}s)", flush=True)
            if sum(len(r) for r in runs.values()) < planned:
                write_results(opts, runs, {"accuracy": record["accuracy"][0]}, time.perf_counter() - wall,
                              final=False, read_back=read_back)
    start = {"accuracy": runs[BASELINE][0]["accuracy"][0]}
    text, setting, machine, wall_text, headline_text = write_results(opts, runs, start, time.perf_counter() - wall,
                                                                     read_back=read_back)
    print(text)
    print(f"{setting}; {machine}; {wall_text}")
    print(f"SRPO steps to reach GRPO's final accuracy / GRPO's steps: {headline_text}")


def held_out_count(runs: dict[str, list[dict]], drawn: int) -> str:
    """The held-out problems the runs validated on (``drawn`` less those that repeat a training question)."""
    counts = {r.get("validation_problems") for records in runs.values() for r in records}
    if len(counts) == 1 and None not in counts and counts != {drawn}:
        return f"{counts.pop()} ({drawn} drawn, less those repeating a training question)"
    return str(drawn)


def _seed_major(runs: dict[str, list[dict]]) -> dict[str, list[dict]]:
    """Only the seeds every method has finished (a partial seed-major run): curves and pairs over the same seeds."""
    common = set.intersection(*({r["seed"] for r in records} for records in runs.values()))
    return {m: [r for r in records if r["seed"] in common] for m, records in runs.items()}


def write_results(opts, runs: dict[str, list[dict]], start_eval: dict, wall: float, final: bool = True,
                  read_back: int = 0):
    """Writes learning_speed{suffix}.{json,md,png} for the runs so far (``final=False``: marked partial, with the
    seeds each method has)."""
    if getattr(opts, "embedded", False):
        runs = _seed_major(runs)
        if not all(runs.values()):
            return None
    summary = summarize(runs)
    machine = machine_description(opts.threads)
    seeds = {method: len(records) for method, records in runs.items()}
    seed_text = (f"{opts.seeds} seed(s)" if set(seeds.values()) == {opts.seeds} else
                 "seeds per method " + ", ".join(f"{m} {n}" for m, n in seeds.items()))
    if getattr(opts, "embedded", False):
        subject = "the main job (embedded SmolLM2-135M-Instruct)"
        setting = (f"{seed_text}, the main job's recipe for {opts.steps} steps"
                   + (f" with {opts.job_args}" if opts.job_args else "")
                   + f", greedy pass rate on {held_out_count(runs, opts.eval_problems)} held-out problems every "
                     f"{opts.eval_every} steps")
    else:
        subject = "the testbed"
        setting = (f"{seed_text}, {opts.steps} steps x {opts.prompts_per_step} prompts x 8 rows, lr {opts.lr}, "
                   f"eval {opts.eval_problems} problems x {opts.eval_samples} samples every {opts.eval_every} steps")
    if not final:
        setting = f"PARTIAL ({sum(seeds.values())} of {len(opts.methods) * opts.seeds} runs), " + setting
    headline = summary[HEADLINE_METHOD]["ratio_to_grpo"] if HEADLINE_METHOD in summary else None
    paired = paired_with_baseline(runs)
    differences = paired_differences(runs)
    text = (table(summary) + ("\n" + paired_table(paired) if paired else "")
            + ("\n" + paired_differences_table(differences) if differences else ""))
    if read_back:
        wall_text = f"wall {wall:.0f}s ({read_back} of {sum(seeds.values())} runs read back from earlier results)"
    else:
        wall_text = f"wall {wall:.0f}s"
    out = Path(opts.out or (tempfile.mkdtemp(prefix="trl-resets-learning_speed-") if opts.quick else RESULTS))
    out.mkdir(parents=True, exist_ok=True)
    suffix = (f"_{opts.tag}" if opts.tag else "") + ("_quick" if opts.quick else "")
    (out / f"learning_speed{suffix}.json").write_text(json.dumps(
        {"setting": setting, "machine": machine, "wall_seconds": wall, "options": vars(opts),
         "start_accuracy": start_eval["accuracy"], "summary": summary, "paired_with_grpo": paired,
         "paired_differences": differences, "runs": runs,
         "runs_read_back": read_back}, indent=1) + "\n")
    headline_text = "not reached" if headline is None else f"{headline:.2f}"
    if not baseline_improved(summary):
        headline_text = "undefined (GRPO did not improve)"
    (out / f"learning_speed{suffix}.md").write_text(
        f"# Learning speed on {subject}\n\n{text}\nSRPO steps to GRPO's final accuracy / GRPO's steps: "
        f"**{headline_text}**\n\n{setting}; {machine}; {wall_text}.\n\n"
        f"![learning speed](learning_speed{suffix}.png)\n"
    )
    measure = "held-out pass rate (greedy)" if getattr(opts, "embedded", False) else "held-out accuracy (sampled, T=1)"
    plot(summary, out / f"learning_speed{suffix}.png", f"{subject}, {setting}", measure)
    return text, setting, machine, wall_text, headline_text


if __name__ == "__main__":
    main()
