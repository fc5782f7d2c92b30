"""Cost of one training step: GRPO, RRPO and SRPO at 8 rollouts per prompt, same prompts, same model.

    python benchmarks/step_cost.py            # the main job's setting: embedded SmolLM2-135M-Instruct after
                                              # its format warm-up (cached; built if missing, untimed), the
                                              # main job's prompts, task and sampling, LoRA r64
    python benchmarks/step_cost.py --quick    # the embedded model as shipped, one prompt, short rollouts,
                                              # one round, light warm-up (a smoke test)
    python benchmarks/step_cost.py --model path/to/model   # any model, the package's default prompts

GRPO is the reset trainer with ``num_reset_prefixes=0, num_base_generations=8`` (plain GRPO on the same
thought sampler); RRPO and SRPO use the 4 + 1x4 split (G1=4 base rollouts, one seed, G2=4 suffixes).
Everything is measured from outside the trainers:

* a callback marks the step boundaries (``on_step_begin`` .. ``on_step_end``, optimizer step included);
* the trainer's ``rollout_func`` is timed (all sampling, scoring of rollouts and localization);
* the localizer is wrapped, so localization time is the time spent inside ``locate``;
* the sampler is wrapped, so every token drawn is counted: phase-1 draws (base rows, seeds and unused
  seed-search draws), reset suffixes, and localization replies.

generation = rollout_func - localization; update = step - rollout_func (TRL's bookkeeping, log-probs, loss,
backward, optimizer). Methods run in rotating order for several rounds (the machine is shared; timings are
noisy) and the medians are reported, with ratios to GRPO next to the targets and the paper's figures.
The last line printed is the headline: SRPO / GRPO wall-clock per step.

Writes benchmarks/results/step_cost.{json,md,png} (``--quick``: step_cost_quick.*).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

RESULTS = Path(__file__).parent / "results"
METHODS = ("GRPO", "RRPO", "SRPO")
PARTS = ("generation", "localization", "update")
TARGETS = {"wall_clock": 1.15, "tokens": 1.08}
# The paper's cost figures (OLMo-3-7B-Instruct on LiveCodeBench-Medium, 2x A100, Tables 7-8): SRPO over GRPO.
PAPER_SRPO = {"wall_clock": 1.51, "tokens": 1.08, "gen_throughput": 557 / 833}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ---------------------------------------------------------------------------------------------- probes
class Probe:
    """Seconds and token counts of one training step, filled by the wrappers below."""

    def __init__(self, clock=time.perf_counter):
        self.clock = clock
        self.seconds: dict[str, float] = {}
        self.tokens: dict[str, int] = {}
        self.calls: dict[str, int] = {}

    def add_time(self, key: str, seconds: float) -> None:
        self.seconds[key] = self.seconds.get(key, 0.0) + seconds
        self.calls[key] = self.calls.get(key, 0) + 1

    def add_tokens(self, key: str, count: int) -> None:
        self.tokens[key] = self.tokens.get(key, 0) + int(count)

    def timed(self, key: str, fn):
        """``fn`` wrapped so that every call adds its duration to ``seconds[key]`` (also when it raises)."""

        def wrapper(*args, **kwargs):
            start = self.clock()
            try:
                return fn(*args, **kwargs)
            finally:
                self.add_time(key, self.clock() - start)

        wrapper.__wrapped__ = fn
        return wrapper


class TimedLocalizer:
    """A localizer that times its inner localizer's ``locate`` into ``probe.seconds['localization']``."""

    def __init__(self, inner, probe: Probe):
        self.inner, self.probe = inner, probe
        self.name = getattr(inner, "name", type(inner).__name__)
        self.locate = probe.timed("localization", inner.locate)


class CountingSampler:
    """A thought sampler that counts the tokens it draws and the time it spends, by use.

    ``sample`` without ``start_thoughts`` is phase 1 (iid rollouts from the prompt: base rows, seeds and
    unused seed-search draws); with them it continues reset prefixes (suffixes). ``complete`` is free text
    (the self-localization reply). Anything else goes to the inner sampler.
    """

    def __init__(self, inner, probe: Probe):
        self._inner, self._probe = inner, probe

    def sample(self, contexts, start_thoughts=None, token_budgets=None):
        key = "phase1" if start_thoughts is None else "suffix"
        start, encoded = self._probe.clock(), getattr(self._inner, "prefill_tokens", 0)
        computed = getattr(self._inner, "row_steps", 0)
        rollouts = self._inner.sample(contexts, start_thoughts, token_budgets)
        self._probe.add_time(f"sample_{key}", self._probe.clock() - start)
        self._probe.add_tokens("prefill", getattr(self._inner, "prefill_tokens", 0) - encoded)
        self._probe.add_tokens("row_steps", getattr(self._inner, "row_steps", 0) - computed)
        self._probe.add_tokens(key, sum(len(r.token_ids) for r in rollouts))
        self._probe.add_tokens(f"{key}_rollouts", len(rollouts))
        return rollouts

    def complete(self, prompts, max_new_tokens, temperature):
        start = self._probe.clock()
        replies = self._inner.complete(prompts, max_new_tokens, temperature)
        self._probe.add_time("sample_localization", self._probe.clock() - start)
        self._probe.add_tokens("localization", sum(len(r) for r in replies))
        return replies

    def __getattr__(self, name):
        return getattr(self._inner, name)


def step_parts(seconds: dict[str, float]) -> dict[str, float]:
    """The step's wall-clock split: generation (rollout_func without localization), localization, update."""
    step, rollout = seconds["step"], seconds.get("rollout", 0.0)
    localization = seconds.get("localization", 0.0)
    return {
        "generation": rollout - localization,
        "localization": localization,
        "update": step - rollout,
        "step": step,
    }


def step_record(probe: Probe, prompts: int) -> dict:
    """One measured step as plain numbers: the split, token counts per prompt group, sampling throughput."""
    parts = step_parts(probe.seconds)
    rollout_tokens = probe.tokens.get("phase1", 0) + probe.tokens.get("suffix", 0)
    sample_seconds = probe.seconds.get("sample_phase1", 0.0) + probe.seconds.get("sample_suffix", 0.0)
    return {
        **parts,
        "tokens_per_group": rollout_tokens / prompts,
        "phase1_tokens_per_group": probe.tokens.get("phase1", 0) / prompts,
        "suffix_tokens_per_group": probe.tokens.get("suffix", 0) / prompts,
        "localization_tokens_per_group": probe.tokens.get("localization", 0) / prompts,
        "total_tokens_per_group": (rollout_tokens + probe.tokens.get("localization", 0)) / prompts,
        "phase1_rollouts_per_group": probe.tokens.get("phase1_rollouts", 0) / prompts,
        "prefill_tokens_per_group": probe.tokens.get("prefill", 0) / prompts,  # context tokens encoded
        # rows the model computed over all rollout decoding steps (finished rows included when not compacted)
        "row_steps_per_group": probe.tokens.get("row_steps", 0) / prompts,
        "gen_tokens_per_s": rollout_tokens / sample_seconds if sample_seconds > 0 else float("nan"),
        "seconds": dict(probe.seconds),
    }


# ---------------------------------------------------------------------------------------------- summary
NUMBERS = (
    "step", "generation", "localization", "update", "tokens_per_group", "phase1_tokens_per_group",
    "suffix_tokens_per_group", "localization_tokens_per_group", "total_tokens_per_group",
    "phase1_rollouts_per_group", "prefill_tokens_per_group", "row_steps_per_group", "gen_tokens_per_s",
)


def summarize(runs: dict[str, list[dict]], stat=statistics.median) -> dict[str, dict[str, float]]:
    """Per method, the median (or ``stat``) over its measured steps of every number in ``NUMBERS``."""
    # results saved before a number existed give NaN for it
    return {m: {k: stat([r.get(k, math.nan) for r in records]) for k in NUMBERS}
            for m, records in runs.items() if records}


def ratio(value: float, base: float) -> float:
    return value / base if base else float("nan")


def ratios_to(summary: dict[str, dict[str, float]], base: str = "GRPO") -> dict[str, dict[str, float]]:
    """Each method over ``base``: wall-clock per step, generation time, rollout tokens, tokens with
    localization, and generation throughput (tokens per second of sampling)."""
    ref = summary[base]
    return {
        m: {
            "wall_clock": ratio(s["step"], ref["step"]),
            "generation": ratio(s["generation"], ref["generation"]),
            "tokens": ratio(s["tokens_per_group"], ref["tokens_per_group"]),
            "tokens_with_localization": ratio(s["total_tokens_per_group"], ref["total_tokens_per_group"]),
            "gen_throughput": ratio(s["gen_tokens_per_s"], ref["gen_tokens_per_s"]),
        }
        for m, s in summary.items()
    }


def verdicts(srpo: dict[str, float]) -> dict[str, bool]:
    """SRPO's ratios against the targets (tokens judged with the localization replies included)."""
    return {
        "wall_clock": srpo["wall_clock"] <= TARGETS["wall_clock"],
        "tokens": srpo["tokens_with_localization"] <= TARGETS["tokens"],
    }


def render_table(summary, ratios) -> str:
    head = (
        "| method | step s | generation s | localization s | update s | tokens/group | of which suffix "
        "| localization tokens/group | gen tok/s | wall-clock vs GRPO | tokens vs GRPO (with loc.) "
        "| gen tok/s vs GRPO | context tokens encoded/group | rows x decoding steps/group |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for m, s in summary.items():
        r = ratios[m]
        lines.append(
            f"| {m} | {s['step']:.1f} | {s['generation']:.1f} | {s['localization']:.2f} | {s['update']:.1f} "
            f"| {s['tokens_per_group']:.0f} | {s['suffix_tokens_per_group']:.0f} "
            f"| {s['localization_tokens_per_group']:.0f} | {s['gen_tokens_per_s']:.1f} | {r['wall_clock']:.2f}x "
            f"| {r['tokens']:.2f}x ({r['tokens_with_localization']:.2f}x) | {r['gen_throughput']:.2f}x "
            f"| {s['prefill_tokens_per_group']:.0f} | {s.get('row_steps_per_group', float('nan')):.0f} |"
        )
    return head + "\n".join(lines) + "\n"


def render_targets(ratios) -> str:
    s = ratios["SRPO"]
    ok = verdicts(s)
    mark = {True: "met", False: "missed"}
    return (
        "| SRPO / GRPO | measured | target | paper (OLMo-3-7B, 2x A100) |\n|---|---|---|---|\n"
        f"| wall-clock per step | {s['wall_clock']:.2f}x | <= {TARGETS['wall_clock']:.2f}x ({mark[ok['wall_clock']]}) "
        f"| {PAPER_SRPO['wall_clock']:.2f}x |\n"
        f"| generated tokens (with localization) | {s['tokens']:.2f}x ({s['tokens_with_localization']:.2f}x) "
        f"| <= {TARGETS['tokens']:.2f}x ({mark[ok['tokens']]}) | {PAPER_SRPO['tokens']:.2f}x (without) |\n"
        f"| generation throughput (tokens/s) | {s['gen_throughput']:.2f}x | - | {PAPER_SRPO['gen_throughput']:.2f}x |\n"
    )


def render_mean_line(runs) -> str:
    """The same ratios from means over the rounds (a second estimator; with few rounds the two can differ)."""
    r = ratios_to(summarize(runs, statistics.fmean))["SRPO"]
    return (f"With means over the rounds instead of medians, SRPO / GRPO: wall-clock {r['wall_clock']:.2f}x, "
            f"tokens {r['tokens']:.2f}x ({r['tokens_with_localization']:.2f}x with localization), generation "
            f"throughput {r['gen_throughput']:.2f}x.\n")


def pooled_update_ratios(runs) -> dict[str, float]:
    """Step wall-clock over GRPO's with the update pooled: each method's median generation + localization plus
    one update time, the median over every method's rounds.

    The update (log-probs, backward, optimizer over 8 rows per prompt of about the same length) is the same
    computation for every method, so differences between the methods' update medians are the machine's load,
    not the method; pooling removes that noise from the ratio.
    """
    update = statistics.median(r["update"] for records in runs.values() for r in records)
    steps = {m: statistics.median(r["generation"] + r["localization"] for r in records) + update
             for m, records in runs.items() if records}
    return {m: ratio(step, steps["GRPO"]) for m, step in steps.items()}


def render_pooled_line(runs) -> str:
    pooled = pooled_update_ratios(runs)
    update = statistics.median(r["update"] for records in runs.values() for r in records)
    return (f"With the update pooled over the methods (median {update:.1f} s over all rounds; it is the same "
            f"computation for each), SRPO / GRPO wall-clock: {pooled['SRPO']:.2f}x (RRPO {pooled['RRPO']:.2f}x).\n")


def headline(ratios) -> str:
    return (f"SRPO/GRPO wall-clock per step: {ratios['SRPO']['wall_clock']:.2f}x "
            f"(target <= {TARGETS['wall_clock']:.2f}x, paper {PAPER_SRPO['wall_clock']:.2f}x)")


def _stacked_bars(ax, methods: list[str], series: dict, labels: list[str]) -> list[float]:
    """One stacked bar per method (``series``: name -> (values, color)), labelled on top; returns the bar heights."""
    bottom = [0.0] * len(methods)
    for name, (values, color) in series.items():
        ax.bar(methods, values, bottom=bottom, color=color, label=name)
        bottom = [b + v for b, v in zip(bottom, values)]
    for i, label in enumerate(labels):
        ax.text(i, bottom[i], label, ha="center", va="bottom", fontsize=9)
    return bottom


def plot(summary, ratios, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(summary)
    colors = {"generation": "#4c72b0", "localization": "#dd8452", "update": "#55a868"}
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 5.2), gridspec_kw={"width_ratios": [3, 2]})
    bottom = _stacked_bars(
        ax, methods, {part: ([max(summary[m][part], 0.0) for m in methods], colors[part]) for part in PARTS},
        [f"{summary[m]['step']:.1f} s\n{ratios[m]['wall_clock']:.2f}x" for m in methods],
    )
    ax.axhline(summary["GRPO"]["step"] * TARGETS["wall_clock"], color="grey", ls="--", lw=1,
               label=f"target {TARGETS['wall_clock']}x GRPO")
    ax.set_ylabel("seconds per training step (median)")
    ax.set_ylim(0, max(bottom) * 1.25)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=4, fontsize=8, frameon=False)
    ax.set_title("wall-clock split")
    tokens = {
        "phase 1": ([summary[m]["phase1_tokens_per_group"] for m in methods], "#4c72b0"),
        "suffixes": ([summary[m]["suffix_tokens_per_group"] for m in methods], "#8172b3"),
        "localization": ([summary[m]["localization_tokens_per_group"] for m in methods], "#dd8452"),
    }
    bottom = _stacked_bars(ax2, methods, tokens, [f"{ratios[m]['tokens_with_localization']:.2f}x" for m in methods])
    ax2.axhline(summary["GRPO"]["total_tokens_per_group"] * TARGETS["tokens"], color="grey", ls="--", lw=1,
                label=f"target {TARGETS['tokens']}x")
    ax2.set_ylabel("generated tokens per prompt group (median)")
    ax2.set_ylim(0, max(bottom) * 1.2)
    ax2.legend(loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=2, fontsize=8, frameon=False)
    ax2.set_title("tokens")
    fig.suptitle(title.replace("; ", "\n"), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- running
def build_trainer(method: str, model: str, dataset, settings: dict, lora_r: int, output_dir: str):
    from peft import LoraConfig
    from transformers import PrinterCallback, ProgressCallback

    from trl_resets import RRPOConfig, RRPOTrainer, SRPOConfig, SRPOTrainer
    from trl_resets.rewards import boxed_answer_reward

    if method == "GRPO":
        config_cls, trainer_cls, split = SRPOConfig, SRPOTrainer, {"num_base_generations": 8, "num_reset_prefixes": 0}
    elif method == "RRPO":
        config_cls, trainer_cls, split = RRPOConfig, RRPOTrainer, {}
    elif method == "SRPO":
        config_cls, trainer_cls, split = SRPOConfig, SRPOTrainer, {}
    else:
        raise ValueError(f"unknown method {method!r}; use one of {METHODS}.")
    args = config_cls(output_dir=output_dir, **split, **settings)
    peft_config = None
    if lora_r > 0:
        peft_config = LoraConfig(r=lora_r, lora_alpha=lora_r, target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
    trainer = trainer_cls(model=model, reward_funcs=boxed_answer_reward, args=args, train_dataset=dataset,
                          peft_config=peft_config)
    for callback in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(callback)
    return trainer


def instrument(trainer, probe: Probe):
    """Attaches the probes to a trainer instance (nothing in the trainer's code changes)."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self):
            self.start = None
            self.logs = []

        def on_step_begin(self, args, state, control, **kwargs):
            self.start = probe.clock()

        def on_step_end(self, args, state, control, **kwargs):
            probe.add_time("step", probe.clock() - self.start)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs:
                self.logs.append(dict(logs))

    clock = StepClock()
    trainer.add_callback(clock)
    trainer.rollout_func = probe.timed("rollout", trainer.rollout_func)
    trainer.localizer = TimedLocalizer(trainer.localizer, probe)
    original_sampler = trainer._sampler

    @contextmanager
    def counted_sampler():
        with original_sampler() as sampler:
            yield CountingSampler(sampler, probe)

    trainer._sampler = counted_sampler
    return clock


def logged_metrics(logs: list[dict], groups: int) -> dict[str, float]:
    """The trainer's own reset metrics from its log lines: token totals per prompt group, and the mean of
    the rates over the steps that counted something (TRL may log a NaN metric as NaN or as None)."""
    logged = [entry for entry in logs if "resets/tokens_base" in entry]
    out = {k: sum(e[k] for e in logged) / groups for k in
           ("resets/tokens_base", "resets/tokens_suffix", "resets/tokens_unused", "resets/tokens_localization")
           if logged and k in logged[0]}
    for key in ("resets/parse_failure_rate", "resets/fallback_rate", "resets/reset_depth_mean"):
        values = [e[key] for e in logged if isinstance(e.get(key), (int, float)) and e[key] == e[key]]
        if values:
            out[key] = sum(values) / len(values)
    return out


def light_warm_up(model_path: str) -> None:
    """A few decoding steps and one backward pass outside any trainer (the first calls are the slow ones)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path)
    ids = torch.arange(10, 42).unsqueeze(0)
    with torch.no_grad():
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=True)
    model(input_ids=ids, labels=ids).loss.backward()
    del model


def measure(method, model, dataset, settings, lora_r, prompts, output_dir) -> dict:
    import gc

    probe = Probe()
    trainer = build_trainer(method, model, dataset, settings, lora_r, output_dir)
    clock = instrument(trainer, probe)
    trainer.train()
    steps = trainer.state.global_step
    record = step_record(probe, prompts * steps)
    for key in ("step", "generation", "localization", "update"):
        record[key] /= steps
    record["trainer_logged"] = logged_metrics(clock.logs, prompts * steps)
    if record["trainer_logged"]:  # phase-1 tokens the trainer's metrics leave out: the seeds themselves
        logged_phase1 = record["trainer_logged"]["resets/tokens_base"] + record["trainer_logged"]["resets/tokens_unused"]
        record["seed_tokens_per_group"] = record["phase1_tokens_per_group"] - logged_phase1
    record["steps"] = steps
    del trainer
    gc.collect()
    return record


def localization_note(runs: dict) -> str:
    """How often SRPO's self-localization reply was unusable (then the reset is random, as in RRPO)."""
    rates = [r["trainer_logged"]["resets/parse_failure_rate"] for r in runs.get("SRPO", [])
             if "resets/parse_failure_rate" in r.get("trainer_logged", {})]
    if not rates:
        return ""
    return (f"SRPO self-localization replies that named no valid step (reset drawn at random instead): "
            f"{statistics.mean(rates):.0%} (mean over {len(rates)} step(s)).\n\n")


def write_outputs(result: dict, name: str, write_json: bool = True) -> None:
    """benchmarks/results/<name>.{json,md,png} from one run's result."""
    RESULTS.mkdir(exist_ok=True)
    if write_json:
        (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2))
    summary, ratios = result["summary"], result["ratios_to_grpo"]
    (RESULTS / f"{name}.md").write_text(
        f"# Step cost: GRPO, RRPO, SRPO\n\n{result['setup']}.\n\n{render_table(summary, ratios)}\n"
        f"{render_targets(ratios)}\n{render_mean_line(result['runs'])}\n{render_pooled_line(result['runs'])}\n"
        "generation = rollout_func minus localization (sampling and scoring); update = the rest of the step "
        "(log-probs, loss, backward, optimizer). Tokens per group: phase-1 draws (base rows, seeds, unused "
        "seed-search draws) plus suffixes; localization replies are counted apart. Medians per column (the "
        "medians of the parts need not add up to the median total).\n\n"
        f"{localization_note(result['runs'])}"
        f"Machine at start: {result['machine_before']}.\nMachine at end: {result['machine_after']}.\n"
        f"Wall time of the whole run: {result['wall_s']:.0f} s.\nCommand: `{result['command']}`\n"
    )
    plot(summary, ratios, RESULTS / f"{name}.png", f"{result['setup']}; {result['machine_before']}")


def main_job_setting(prompts: int):
    """(model path, dataset, config fields) of the CPU main job (`make train`): its format-warmed-up model
    (trained now if not cached, before any timing), its rollout and localization prompts, and its first
    ``prompts`` problems."""
    from trl_resets import harness

    args, model_args, task, run = harness.parse("srpo", [])
    task.num_problems = prompts
    print("the main job's model: format warm-up (cached after the first run) ...", flush=True)
    model = harness.prepare_model(args, model_args, task, run)
    fields = {key: getattr(args, key) for key in ("rollout_template", "localization_template")}
    return model, harness.load_problems(task), fields


def machine_line() -> str:
    import torch

    load = os.getloadavg()
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} thread(s)), "
            f"load average {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} (1/5/15 min)")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model folder or id (default: the embedded SmolLM2)")
    parser.add_argument("--prompts", type=int, default=1, help="prompts per step (8 rollouts each)")
    parser.add_argument("--steps", type=int, default=1, help="training steps per measurement (averaged)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of GRPO/RRPO/SRPO in rotating order")
    parser.add_argument("--tokens", type=int, default=128, help="max_completion_length")
    parser.add_argument("--thought-tokens", type=int, default=48)
    parser.add_argument("--thoughts", type=int, default=6)
    parser.add_argument("--lora-r", type=int, default=64, help="LoRA rank; 0 trains all weights")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: on a shared machine, more threads mostly wait on each "
                             "other); 0: torch's choice")
    parser.add_argument("--no-compact", dest="compact", action="store_false",
                        help="decode with transformers' generate, which computes stopped rows until the batch ends "
                             "(the sampler's behaviour before compact decoding)")
    parser.add_argument("--no-merge", dest="merge", action="store_false",
                        help="sample with the LoRA adapter unmerged (as before merged sampling; still in eval mode)")
    parser.add_argument("--no-share-prefill", dest="share_prefill", action="store_false",
                        help="encode every row's context separately (the sampler's behaviour before prefill sharing)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=None, help="results name (default step_cost, step_cost_quick)")
    parser.add_argument("--replot", action="store_true", help="redraw the Markdown and PNG from the saved JSON")
    args = parser.parse_args()
    if args.quick:
        args.prompts, args.steps, args.rounds, args.tokens, args.thought_tokens, args.thoughts = 1, 1, 1, 24, 8, 3
    name = args.out or ("step_cost_quick" if args.quick else "step_cost")
    if args.replot:
        result = json.loads((RESULTS / f"{name}.json").read_text())
        result.setdefault("command", "python benchmarks/step_cost.py" + (" --quick" if args.quick else ""))
        write_outputs(result, name, write_json=False)
        print(headline(result["ratios_to_grpo"]))
        return
    import tempfile

    import torch
    from transformers.utils import logging as hf_logging

    from trl_resets.tasks import make_arithmetic_dataset

    hf_logging.set_verbosity_error()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    settings = {
        "per_device_train_batch_size": 8 * args.prompts, "max_steps": args.steps, "learning_rate": 5e-5,
        "max_completion_length": args.tokens, "max_thought_tokens": args.thought_tokens,
        "max_thoughts": args.thoughts, "temperature": 0.7, "top_p": 0.95, "seed_budget": 4, "logging_steps": 1,
        "save_strategy": "no", "report_to": "none", "use_cpu": not torch.cuda.is_available(), "bf16": False,
        "disable_tqdm": True, "gradient_checkpointing": False, "share_prefill": args.share_prefill,
        "compact_decoding": args.compact, "merge_adapter_for_sampling": args.merge,
    }
    main_job = args.model is None and not args.quick
    if main_job:  # the model, prompts and problems `make train` trains on
        args.model, dataset, job_settings = main_job_setting(args.prompts)
        settings.update(job_settings)
    else:
        if args.model is None:
            from trl_resets.models import default_model_path

            args.model = default_model_path()
        rows = make_arithmetic_dataset(args.prompts, num_steps=2, seed=args.seed, operations=("+", "-"))
        dataset = rows.map(lambda row: {"prompt": [{"role": "user", "content": row["prompt"]}]})
    started = time.perf_counter()
    machine_before = machine_line()
    with tempfile.TemporaryDirectory() as tmp:
        # untimed warm-up: first-call costs (kernels, allocator, tokenizer caches) land on no method
        if args.quick:
            light_warm_up(args.model)
        else:
            warm = dict(settings, max_completion_length=4, max_thought_tokens=2, max_thoughts=2, max_steps=1,
                        localization_max_tokens=2)
            measure("SRPO", args.model, dataset, warm, args.lora_r, args.prompts, tmp)
        print(f"warm-up done after {time.perf_counter() - started:.0f} s", flush=True)
        runs = {m: [] for m in METHODS}
        for rnd in range(args.rounds):
            order = METHODS[rnd % 3:] + METHODS[: rnd % 3]
            for method in order:
                record = measure(method, args.model, dataset, dict(settings, seed=args.seed + rnd), args.lora_r,
                                 args.prompts, tmp)
                record["round"] = rnd
                runs[method].append(record)
                print(f"round {rnd} {method}: step {record['step']:.1f} s (generation {record['generation']:.1f}, "
                      f"localization {record['localization']:.2f}, update {record['update']:.1f}); "
                      f"{record['tokens_per_group']:.0f} tokens/group + {record['localization_tokens_per_group']:.0f} "
                      "localization", flush=True)
    machine_after = machine_line()
    summary = summarize(runs)
    ratios = ratios_to(summary)
    model_name = args.model.rstrip('/').split('/')[-1]
    if main_job:
        model_name = f"{model_name} (the main job's model, prompts and task)"
    setup = f"{model_name}, " + (f"LoRA r{args.lora_r}" if args.lora_r else "full fine-tune")
    setup += (f"; {args.prompts} prompt(s) x 8 rollouts per step, {args.tokens} tokens max "
              f"({args.thoughts} thoughts x {args.thought_tokens}); split 4 + 1x4 for RRPO/SRPO; "
              f"median of {args.rounds} round(s) x {args.steps} step(s); "
              + ("shared prefill" if args.share_prefill else "no prefill sharing")
              + ("; compact decoding" if args.compact else "; generate (no compaction)")
              + ("; LoRA merged for sampling" if args.merge else "; LoRA unmerged for sampling"))
    result = {
        "model": args.model, "settings": {k: v for k, v in vars(args).items() if k != "model"},
        "setup": setup, "summary": summary, "ratios_to_grpo": ratios, "targets": TARGETS,
        "paper_srpo_over_grpo": PAPER_SRPO, "targets_met": verdicts(ratios["SRPO"]), "runs": runs,
        "machine_before": machine_before, "machine_after": machine_after,
        "wall_s": time.perf_counter() - started,
        "command": " ".join(["python benchmarks/step_cost.py", *sys.argv[1:]]),
    }
    result["ratios_to_grpo_of_means"] = ratios_to(summarize(runs, statistics.fmean))
    result["wall_clock_ratios_pooled_update"] = pooled_update_ratios(runs)
    write_outputs(result, name)
    table, targets = render_table(summary, ratios), render_targets(ratios)
    print()
    print(table)
    print(targets)
    print(render_mean_line(runs))
    print(render_pooled_line(runs))
    print(f"machine: {machine_after}; {time.perf_counter() - started:.0f} s in all")
    print(headline(ratios))


if __name__ == "__main__":
    main()
