"""Cost of one training step: GRPO, RRPO and SRPO at 8 rollouts per prompt, same prompts, same model, side by side.

    python -m benchmarks.step_cost            # the main job's setting: embedded SmolLM2-135M-Instruct after
                                              # its format warm-up (cached; built if missing, untimed), the
                                              # main job's prompts, task and sampling, LoRA r64
    python -m benchmarks.step_cost --paper-caps   # the shipped testbed policy (tiny) at the paper's caps
                                              # (20 thoughts x 256 tokens, 4096 response tokens)
    python -m benchmarks.step_cost --quick    # the embedded model as shipped, one prompt, short rollouts,
                                              # one round, light warm-up (a smoke test, written to a
                                              # temporary folder unless --results-dir is given)
    python -m benchmarks.step_cost --paper-caps --with-iid   # adds SRPO-iid: SRPO with base_group="iid"
    python -m benchmarks.step_cost --lag 1,2 --with-iid   # adds SRPO-lag1, SRPO-lag2 and RRPO-lag1 (pipelined
                                              # resets), every method timed in steady state (its second step)
    python -m benchmarks.step_cost --model path/to/model   # any model, the package's default prompts
    python -m benchmarks.step_cost --shape qwen2.5-1.5b --bf16 --prompts 4 --tokens 1024   # on a GPU: a
                                              # random-weight model of a named shape (gpu_recipe.SHAPES), in bf16

GRPO is the reset trainer with ``num_reset_prefixes=0, num_base_generations=8`` (plain GRPO on the same
thought sampler); RRPO and SRPO use the 4 + 1x4 split (G1=4 base rollouts, one seed, G2=4 suffixes).
``--with-iid`` adds SRPO-iid, SRPO with ``base_group="iid"`` (the base group is the first 4 draws, the seed the
first failure among them, so phase 1 draws 4 rollouts, not 5), judged against its own target: generated tokens
at most 0.90x GRPO's. ``--methods`` picks the methods compared (GRPO and SRPO always among them).
``--lag 1,2`` adds SRPO with ``reset_lag`` 1 and 2 (``SRPO-lag1``, ``SRPO-lag2``; a lagged run has no seed search:
``seed_budget=0``) and, with lag 1 and RRPO among the methods, ``RRPO-lag1``. A run lagged by L generations has
empty reset slots in its first L generations, and its last L do not localize (or keep) seeds no later generation
uses, so with ``--lag`` every method runs max(L) untimed steps before and after the measured ones (steady state); the lag variants are judged against their target: sequential decoding
steps at most 1.10x GRPO's.
Everything is measured from outside the trainers:

* a callback marks the step boundaries (``on_step_begin`` .. ``on_step_end``, optimizer step included);
* the trainer's ``rollout_func`` is timed: generation (all sampling, scoring and localization);
* the sampler's decoding stream is wrapped, so every token drawn is counted (rollouts: phase-1 draws, seeds,
  unused seed-search draws and suffixes; and localization replies);
* a forward hook on the sampling model counts the sequential forward passes of sampling (prefills and
  decoding steps), the rows each decoding step computed, and the context tokens prefilled;
* the localizer is wrapped, so the time spent inside ``locate`` is known (0 where SRPO's replies decode in
  the stream).

On a GPU, each method's peak of allocated GPU memory over its run is recorded too (``peak_memory_gib``).

update = step - rollout_func (TRL's bookkeeping, log-probs, loss, backward, optimizer). Methods run in
rotating order for several rounds (the machine is shared; timings are noisy) and the medians are reported,
with SRPO / GRPO ratios next to the targets and the paper's figures. The last line printed is the headline:
SRPO / GRPO generation time and sequential decoding steps (forward passes of sampling).

Writes benchmarks/results/step_cost.{json,md,png} (``--paper-caps``: step_cost_paper_caps.*); ``--quick``
writes step_cost_quick.* into a new temporary folder (printed), so a smoke run never overwrites tracked results;
``--results-dir`` names the folder for any run.
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
PHASED = "SRPO-phased"  # SRPO sampled phase by phase (the scheduler's reference path), with --with-phased
IID = "SRPO-iid"  # SRPO with base_group="iid", with --with-iid
VARIANTS = {PHASED: "SRPO", IID: "SRPO", "SRPO-lag1": "SRPO", "SRPO-lag2": "SRPO", "RRPO-lag1": "RRPO"}
LAGS = {"SRPO-lag1": 1, "SRPO-lag2": 2, "RRPO-lag1": 1}  # each lagged variant's reset_lag
IID_TARGETS = {"tokens": 0.90}  # SRPO-iid over GRPO: at most
LAG_TARGETS = {"decode_steps": 1.10}  # a lagged variant over GRPO: at most
PARTS = ("generation", "update")
# SRPO over GRPO: at most (at least, for throughput) these.
TARGETS = {"wall_clock": 1.05, "generation": 1.10, "gen_throughput": 0.90, "forward_passes": 1.10, "tokens": 1.08}
# The paper's cost figures (OLMo-3-7B-Instruct on LiveCodeBench-Medium, 2x A100, Tables 7-8): SRPO over GRPO.
PAPER_SRPO = {"wall_clock": 1.51, "generation": 1.61, "tokens": 1.08, "gen_throughput": 557 / 833}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ---------------------------------------------------------------------------------------------- probes
class Probe:
    """Seconds and counts of one training step, filled by the wrappers below."""

    def __init__(self, clock=time.perf_counter):
        self.clock = clock
        self.active = True  # False while an untimed step runs (steady-state runs skip the first)
        self.seconds: dict[str, float] = {}
        self.tokens: dict[str, int] = {}
        self.calls: dict[str, int] = {}

    def add_time(self, key: str, seconds: float) -> None:
        if not self.active:
            return
        self.seconds[key] = self.seconds.get(key, 0.0) + seconds
        self.calls[key] = self.calls.get(key, 0) + 1

    def add_tokens(self, key: str, count: int) -> None:
        if not self.active:
            return
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
    """A localizer that times its inner localizer's ``locate`` into ``probe.seconds['localization']``; everything
    else (a self-localizer's prompts and reading, which the scheduler uses to decode replies in the stream) is the
    inner localizer's."""

    def __init__(self, inner, probe: Probe):
        self.inner, self.probe = inner, probe
        self.name = getattr(inner, "name", type(inner).__name__)
        self.locate = probe.timed("localization", inner.locate)

    def __getattr__(self, name):
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)


def _counted(probe: Probe, results: list) -> list:
    """Counts rollouts (and their tokens) and localization-reply tokens among ``results``; returns them."""
    for result in results:
        if hasattr(result, "token_ids"):
            probe.add_tokens("rollout", len(result.token_ids))
            probe.add_tokens("rollouts", 1)
        else:
            probe.add_tokens("localization", len(result))
    return results


class CountingStream:
    """A decoding stream that counts what comes back: rollout tokens and rollouts, localization-reply tokens, and
    the time spent in its steps; and how long each request stayed in the stream beyond its own tokens.

    A request submitted after ``a`` steps and returned by step ``b`` spent ``b - a`` steps in the stream; it
    needed at least one step per token it brought back, so ``b - a - tokens`` steps it waited (for a batch
    boundary, behind other work). Where no request waits, and each request is submitted as soon as its inputs
    exist (the scheduler's rule), the decoding steps of a generation are its dependency chain: no scheduler can
    take fewer. Everything else is the inner stream's."""

    def __init__(self, inner, probe: Probe):
        self._inner, self._probe = inner, probe
        self._steps = 0
        self._submitted: dict[int, int] = {}

    def submit(self, requests):
        handles = self._inner.submit(requests)
        self._submitted.update((h, self._steps) for h in handles)
        return handles

    def step(self):
        start = self._probe.clock()
        done = self._inner.step()
        self._steps += 1
        self._probe.add_time("sample", self._probe.clock() - start)
        _counted(self._probe, [result for _, result in done])
        for handle, result in done:
            tokens = len(result.token_ids) if hasattr(result, "token_ids") else len(result)
            waited = max(0, self._steps - self._submitted.pop(handle) - tokens)
            self._probe.add_tokens("stream_wait_steps", waited)
            self._probe.add_tokens("stream_requests", 1)
            if self._probe.active:
                self._probe.tokens["stream_max_wait"] = max(self._probe.tokens.get("stream_max_wait", 0), waited)
        return done

    def __getattr__(self, name):
        return getattr(self._inner, name)


class ForwardCounter:
    """A forward hook (with keyword arguments) on the causal LM that samples: counts every forward pass, the
    decoding steps among them (one new token per row) with their rows, and the context tokens prefilled."""

    def __init__(self, probe: Probe):
        self.probe = probe

    def __call__(self, module, args, kwargs, output):
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.probe.add_tokens("forward_passes", 1)
        if ids.shape[1] == 1:
            self.probe.add_tokens("decode_steps", 1)
            self.probe.add_tokens("row_steps", ids.shape[0])
        else:
            mask = kwargs.get("attention_mask")
            self.probe.add_tokens("prefill", int(mask[:, -ids.shape[1]:].sum()) if mask is not None else ids.numel())


def step_parts(seconds: dict[str, float]) -> dict[str, float]:
    """The step's wall-clock split: generation (the whole rollout_func: sampling, scoring, localization), the
    time inside a localizer's ``locate`` (part of generation; 0 when the replies decode among the rollouts), and
    the update (the rest of the step)."""
    step, rollout = seconds["step"], seconds.get("rollout", 0.0)
    return {"generation": rollout, "localization": seconds.get("localization", 0.0), "update": step - rollout,
            "step": step}


def step_record(probe: Probe, prompts: int, generations: int = 1) -> dict:
    """One measured run as plain numbers: the split, tokens per prompt group, generation throughput (every token
    generated, localization replies included, per second of generation), and per generation the sequential
    forward passes of sampling (``generations``: how many rollout_func calls the run made)."""
    parts = step_parts(probe.seconds)
    rollout_tokens, localization = probe.tokens.get("rollout", 0), probe.tokens.get("localization", 0)
    generation = parts["generation"]
    return {
        **parts,
        "tokens_per_group": rollout_tokens / prompts,
        "localization_tokens_per_group": localization / prompts,
        "total_tokens_per_group": (rollout_tokens + localization) / prompts,
        "rollouts_per_group": probe.tokens.get("rollouts", 0) / prompts,
        "prefill_tokens_per_group": probe.tokens.get("prefill", 0) / prompts,  # context tokens encoded
        "row_steps_per_group": probe.tokens.get("row_steps", 0) / prompts,  # rows computed over decoding steps
        "forward_passes": probe.tokens.get("forward_passes", 0) / generations,
        "decode_steps": probe.tokens.get("decode_steps", 0) / generations,
        "stream_requests": probe.tokens.get("stream_requests", 0),
        "stream_wait_steps": probe.tokens.get("stream_wait_steps", 0),  # summed over the run's requests
        "stream_max_wait": probe.tokens.get("stream_max_wait", 0),
        "gen_tokens_per_s": (rollout_tokens + localization) / generation if generation > 0 else float("nan"),
        "seconds": dict(probe.seconds),
    }


# ---------------------------------------------------------------------------------------------- summary
NUMBERS = (
    "step", "generation", "localization", "update", "tokens_per_group", "localization_tokens_per_group",
    "total_tokens_per_group", "rollouts_per_group", "prefill_tokens_per_group", "row_steps_per_group",
    "forward_passes", "decode_steps", "gen_tokens_per_s", "peak_memory_gib",
)


def summarize(runs: dict[str, list[dict]], stat=statistics.median) -> dict[str, dict[str, float]]:
    """Per method, the median (or ``stat``) over its measured steps of every number in ``NUMBERS``."""
    # results saved before a number existed give NaN for it
    return {m: {k: stat([r.get(k, math.nan) for r in records]) for k in NUMBERS}
            for m, records in runs.items() if records}


def ratio(value: float, base: float) -> float:
    return value / base if base else float("nan")


def ratios_to(summary: dict[str, dict[str, float]], base: str = "GRPO") -> dict[str, dict[str, float]]:
    """Each method over ``base``: wall-clock per step, generation time, rollout tokens, tokens with localization,
    generation throughput, sequential forward passes and rows x decoding steps."""
    ref = summary[base]
    keys = {"wall_clock": "step", "generation": "generation", "tokens": "tokens_per_group",
            "tokens_with_localization": "total_tokens_per_group", "gen_throughput": "gen_tokens_per_s",
            "forward_passes": "forward_passes", "decode_steps": "decode_steps", "row_steps": "row_steps_per_group",
            "peak_memory": "peak_memory_gib"}
    return {m: {name: ratio(s[key], ref[key]) for name, key in keys.items()} for m, s in summary.items()}


def verdicts(srpo: dict[str, float]) -> dict[str, bool]:
    """SRPO's ratios against the targets (throughput: at least; tokens judged with the localization replies)."""
    return {
        "wall_clock": srpo["wall_clock"] <= TARGETS["wall_clock"],
        "generation": srpo["generation"] <= TARGETS["generation"],
        "gen_throughput": srpo["gen_throughput"] >= TARGETS["gen_throughput"],
        "forward_passes": srpo["forward_passes"] <= TARGETS["forward_passes"],
        "tokens": srpo["tokens_with_localization"] <= TARGETS["tokens"],
    }


def render_table(summary, ratios) -> str:
    head = (
        "| method | step s | generation s | update s | tokens/group (with loc.) | gen tok/s "
        "| sequential forward passes / generation (decoding steps) | rows x decoding steps/group "
        "| context tokens encoded/group | wall-clock vs GRPO | generation vs GRPO | gen tok/s vs GRPO "
        "| forward passes vs GRPO |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for m, s in summary.items():
        r = ratios[m]
        lines.append(
            f"| {m} | {s['step']:.1f} | {s['generation']:.1f} | {s['update']:.1f} "
            f"| {s['tokens_per_group']:.0f} ({s['total_tokens_per_group']:.0f}) | {s['gen_tokens_per_s']:.1f} "
            f"| {s['forward_passes']:.0f} ({s['decode_steps']:.0f}) | {s['row_steps_per_group']:.0f} "
            f"| {s['prefill_tokens_per_group']:.0f} | {r['wall_clock']:.2f}x | {r['generation']:.2f}x "
            f"| {r['gen_throughput']:.2f}x | {r['forward_passes']:.2f}x |"
        )
    return head + "\n".join(lines) + "\n"


def render_memory_line(summary, ratios) -> str:
    """Each method's peak of allocated GPU memory (median over its runs), or nothing where none was measured."""
    if not all(math.isfinite(s.get("peak_memory_gib", math.nan)) for s in summary.values()):
        return ""
    parts = [f"{m} {s['peak_memory_gib']:.2f} GiB ({ratios[m]['peak_memory']:.2f}x GRPO)" for m, s in summary.items()]
    return "Peak allocated GPU memory per run: " + "; ".join(parts) + ".\n"


def render_targets(ratios) -> str:
    s = ratios["SRPO"]
    ok = verdicts(s)
    mark = {True: "met", False: "missed"}
    rows = [
        ("wall-clock per step", "wall_clock", f"{s['wall_clock']:.2f}x", "<=", f"{PAPER_SRPO['wall_clock']:.2f}x"),
        ("generation time", "generation", f"{s['generation']:.2f}x", "<=", f"{PAPER_SRPO['generation']:.2f}x"),
        ("generation throughput (tokens/s)", "gen_throughput", f"{s['gen_throughput']:.2f}x", ">=",
         f"{PAPER_SRPO['gen_throughput']:.2f}x"),
        ("sequential forward passes of sampling (rows x decoding steps)", "forward_passes",
         f"{s['forward_passes']:.2f}x ({s['row_steps']:.2f}x)", "<=", "-"),
        ("generated tokens (with localization)", "tokens",
         f"{s['tokens']:.2f}x ({s['tokens_with_localization']:.2f}x)", "<=", f"{PAPER_SRPO['tokens']:.2f}x (without)"),
    ]
    return "| SRPO / GRPO | measured | target | paper (OLMo-3-7B, 2x A100) |\n|---|---|---|---|\n" + "".join(
        f"| {label} | {value} | {sign} {TARGETS[key]:.2f}x ({mark[ok[key]]}) | {paper} |\n"
        for label, key, value, sign, paper in rows)


def render_iid_line(ratios) -> str:
    """SRPO-iid's generated tokens and sequential decoding steps over GRPO's and SRPO's, with its token target;
    nothing where SRPO-iid did not run."""
    if IID not in ratios:
        return ""
    r, srpo = ratios[IID], ratios["SRPO"]
    met = "met" if r["tokens_with_localization"] <= IID_TARGETS["tokens"] else "missed"
    return (f"SRPO-iid (base_group=\"iid\") / GRPO: generated tokens {r['tokens']:.2f}x "
            f"({r['tokens_with_localization']:.2f}x with localization; target <= {IID_TARGETS['tokens']:.2f}x, "
            f"{met}), sequential forward passes of sampling {r['forward_passes']:.2f}x (decoding steps "
            f"{r['decode_steps']:.2f}x), generation time {r['generation']:.2f}x. SRPO / GRPO for comparison: tokens "
            f"{srpo['tokens']:.2f}x ({srpo['tokens_with_localization']:.2f}x), forward passes "
            f"{srpo['forward_passes']:.2f}x.\n")


def render_lag_line(ratios) -> str:
    """Each lagged variant's sequential decoding steps and tokens over GRPO's, with its target; nothing where none
    ran."""
    parts = []
    for method in (m for m in LAGS if m in ratios):
        r = ratios[method]
        met = "met" if r["decode_steps"] <= LAG_TARGETS["decode_steps"] else "missed"
        parts.append(f"{method} / GRPO: sequential decoding steps {r['decode_steps']:.2f}x (target <= "
                     f"{LAG_TARGETS['decode_steps']:.2f}x, {met}), forward passes {r['forward_passes']:.2f}x, "
                     f"generated tokens {r['tokens']:.2f}x ({r['tokens_with_localization']:.2f}x with localization), "
                     f"generation time {r['generation']:.2f}x")
    if not parts:
        return ""
    srpo = ratios["SRPO"]
    return ("; ".join(parts) + f". SRPO / GRPO for comparison: decoding steps {srpo['decode_steps']:.2f}x, tokens "
            f"{srpo['tokens']:.2f}x.\n")


def render_mean_line(runs) -> str:
    """The same ratios from means over the rounds (a second estimator; with few rounds the two can differ)."""
    r = ratios_to(summarize(runs, statistics.fmean))["SRPO"]
    return (f"With means over the rounds instead of medians, SRPO / GRPO: wall-clock {r['wall_clock']:.2f}x, "
            f"generation {r['generation']:.2f}x, tokens {r['tokens']:.2f}x ({r['tokens_with_localization']:.2f}x "
            f"with localization), generation throughput {r['gen_throughput']:.2f}x.\n")


def pooled_update_ratios(runs) -> dict[str, float]:
    """Step wall-clock over GRPO's with the update pooled: each method's median generation (localization
    included) plus one update time, the median over every method's rounds.

    The update (log-probs, backward, optimizer over 8 rows per prompt of about the same length) is the same
    computation for every method, so differences between the methods' update medians are the machine's load,
    not the method; pooling removes that noise from the ratio.
    """
    update = statistics.median(r["update"] for records in runs.values() for r in records)
    steps = {m: statistics.median(r["generation"] for r in records) + update
             for m, records in runs.items() if records}
    return {m: ratio(step, steps["GRPO"]) for m, step in steps.items()}


def render_pooled_line(runs) -> str:
    pooled = pooled_update_ratios(runs)
    update = statistics.median(r["update"] for records in runs.values() for r in records)
    others = ", ".join(f"{m} {pooled[m]:.2f}x" for m in pooled if m not in ("GRPO", "SRPO"))
    return (f"With the update pooled over the methods (median {update:.1f} s over all rounds; it is the same "
            f"computation for each), SRPO / GRPO wall-clock: {pooled['SRPO']:.2f}x"
            + (f" ({others})" if others else "") + ".\n")


def headline(ratios) -> str:
    """The last line printed: SRPO / GRPO generation time and sequential forward passes of sampling."""
    r = ratios["SRPO"]
    return (f"SRPO/GRPO generation time {r['generation']:.2f}x (target <= {TARGETS['generation']:.2f}x), "
            f"sequential decoding steps {r['forward_passes']:.2f}x (target <= {TARGETS['forward_passes']:.2f}x)")


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
    colors = {"generation": "#4c72b0", "update": "#55a868"}
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 5.2), gridspec_kw={"width_ratios": [3, 2]})
    bottom = _stacked_bars(
        ax, methods, {part: ([max(summary[m][part], 0.0) for m in methods], colors[part]) for part in PARTS},
        [f"{summary[m]['step']:.1f} s\n{ratios[m]['wall_clock']:.2f}x\ngen {ratios[m]['generation']:.2f}x"
         for m in methods],
    )
    ax.axhline(summary["GRPO"]["step"] * TARGETS["wall_clock"], color="grey", ls="--", lw=1,
               label=f"target {TARGETS['wall_clock']}x GRPO")
    ax.set_ylabel("seconds per training step (median)")
    ax.set_ylim(0, max(bottom) * 1.35)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=3, fontsize=8, frameon=False)
    ax.set_title("wall-clock split")
    passes = {
        "decoding steps": ([summary[m]["decode_steps"] for m in methods], "#4c72b0"),
        "prefills": ([summary[m]["forward_passes"] - summary[m]["decode_steps"] for m in methods], "#dd8452"),
    }
    bottom = _stacked_bars(ax2, methods, passes, [f"{ratios[m]['forward_passes']:.2f}x" for m in methods])
    ax2.axhline(summary["GRPO"]["forward_passes"] * TARGETS["forward_passes"], color="grey", ls="--", lw=1,
                label=f"target {TARGETS['forward_passes']}x")
    ax2.set_ylabel("sequential forward passes per generation (median)")
    ax2.set_ylim(0, max(bottom) * 1.2)
    ax2.legend(loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=3, fontsize=8, frameon=False)
    ax2.set_title("forward passes of sampling")
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

    overrides = {"base_group": "iid"} if method == IID else {}
    if method in LAGS:
        overrides = {"reset_lag": LAGS[method], "seed_budget": 0}
    method = VARIANTS.get(method, method)
    if method == "GRPO":
        config_cls, trainer_cls, split = SRPOConfig, SRPOTrainer, {"num_base_generations": 8, "num_reset_prefixes": 0}
    elif method == "RRPO":
        config_cls, trainer_cls, split = RRPOConfig, RRPOTrainer, {}
    elif method == "SRPO":
        config_cls, trainer_cls, split = SRPOConfig, SRPOTrainer, {}
    else:
        raise ValueError(f"unknown method {method!r}; use one of {METHODS + tuple(VARIANTS)}.")
    args = config_cls(output_dir=output_dir, **split, **{**settings, **overrides})
    peft_config = None
    if lora_r > 0:
        peft_config = LoraConfig(r=lora_r, lora_alpha=lora_r, target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
    trainer = trainer_cls(model=model, reward_funcs=boxed_answer_reward, args=args, train_dataset=dataset,
                          peft_config=peft_config)
    for callback in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(callback)
    return trainer


class _BatchOnly:
    """A localizer seen only through ``locate``: the trainer then samples phase by phase (`ResetAlgorithm.run`)."""

    def __init__(self, inner):
        self.inner, self.name, self.locate = inner, inner.name, inner.locate


def instrument(trainer, probe: Probe, phased: bool = False, skip: int = 0, measured: int | None = None):
    """Attaches the probes to a trainer instance (nothing in the trainer's code changes); ``phased``: hide the
    localizer's streaming interface, so SRPO samples phase by phase; only steps ``skip`` .. ``skip + measured - 1``
    (0-based; all from ``skip`` on when ``measured`` is None) are measured."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self):
            self.start = None
            self.logs = []

        def on_step_begin(self, args, state, control, **kwargs):
            probe.active = skip <= state.global_step and (measured is None or state.global_step < skip + measured)
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
    if phased:
        trainer.localizer = _BatchOnly(trainer.localizer)
    original_sampler = trainer._sampler

    @contextmanager
    def counted_sampler():
        with original_sampler() as sampler:
            model = sampler.model.get_base_model() if hasattr(sampler.model, "get_base_model") else sampler.model
            hook = model.register_forward_hook(ForwardCounter(probe), with_kwargs=True)
            stream = sampler.stream
            sampler.stream = lambda: CountingStream(stream(), probe)
            if phased:  # the phased run calls the sampler itself
                sample, complete = sampler.sample, sampler.complete
                sampler.sample = lambda *a, **k: _counted(probe, sample(*a, **k))
                sampler.complete = lambda *a, **k: _counted(probe, complete(*a, **k))
            try:
                yield sampler
            finally:
                hook.remove()

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


def measure(method, model, dataset, settings, lora_r, prompts, output_dir, skip: int = 0, tail: int = 0) -> dict:
    """One method's run of ``settings["max_steps"]`` steps, the first ``skip`` and the last ``tail`` untimed."""
    import gc

    import torch

    probe = Probe()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer = build_trainer(method, model, dataset, settings, lora_r, output_dir)
    steps = settings["max_steps"] - skip - tail
    clock = instrument(trainer, probe, phased=method == PHASED, skip=skip, measured=steps)
    trainer.train()
    record = step_record(probe, prompts * steps, generations=probe.calls.get("rollout", 0) or 1)
    if torch.cuda.is_available():
        record["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    for key in ("step", "generation", "localization", "update"):
        record[key] /= steps
    record["trainer_logged"] = logged_metrics(clock.logs[skip:skip + steps], prompts * steps)
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


def wait_note(runs: dict) -> str:
    """Whether any request of a streamed run waited in the decoding stream beyond its own tokens: where none did,
    the decoding steps are the generation's dependency chain (`CountingStream`)."""
    lines = []
    for method, records in runs.items():
        streamed = [r for r in records if r.get("stream_requests")]
        if streamed:
            requests = sum(r["stream_requests"] for r in streamed)
            waited = sum(r["stream_wait_steps"] for r in streamed)
            longest = max(r["stream_max_wait"] for r in streamed)
            lines.append(f"{method} {waited} step(s) over {requests} requests (longest wait {longest})")
    if not lines:
        return ""
    return ("Steps that requests spent in the decoding stream beyond one step per token they brought back (waiting "
            "to join, behind other work): " + "; ".join(lines) + ". A request joins the stream as soon as its "
            "inputs exist, so with no waiting the decoding steps are each generation's dependency chain (a prompt's "
            "seed, then its localization reply, then its longest suffix, one after the other): no scheduler over "
            "the same rows takes fewer.\n\n")


def write_outputs(result: dict, name: str, write_json: bool = True, folder: Path = RESULTS) -> None:
    """<folder>/<name>.{json,md,png} from one run's result (by default in benchmarks/results)."""
    folder.mkdir(parents=True, exist_ok=True)
    if write_json:
        (folder / f"{name}.json").write_text(json.dumps(result, indent=2))
    summary, ratios = result["summary"], result["ratios_to_grpo"]
    iid_line = render_iid_line(ratios) + render_lag_line(ratios)
    (folder / f"{name}.md").write_text(
        f"# Step cost: {', '.join(summary)}\n\n{result['setup']}.\n\n{render_table(summary, ratios)}\n"
        f"{render_memory_line(summary, ratios)}{render_targets(ratios)}\n" + (f"{iid_line}\n" if iid_line else "")
        + f"{render_mean_line(result['runs'])}\n"
        f"{render_pooled_line(result['runs'])}\n"
        "generation = the whole rollout_func (sampling, scoring, localization: SRPO's localization replies decode "
        "in the same batch as the rollouts); update = the rest of the step (log-probs, loss, backward, optimizer). "
        "Tokens per group: every rollout token drawn (phase-1 draws, seeds and unused seed-search draws included, "
        "and suffixes), with the localization replies in brackets; generation throughput counts both. Sequential "
        "forward passes: the policy's forward passes while sampling one generation (prefills included, decoding "
        "steps in brackets), the device-independent cost of sampling where a step costs about the same for few "
        "rows as for many (a GPU); rows x decoding steps: the rows those steps computed, the cost where a step "
        "costs in proportion to its rows (a CPU). Medians per column (the medians of the parts need not add up to "
        "the median total). Timings come from a machine shared with other jobs; the pass and row counts do not "
        "depend on it.\n\n"
        f"{localization_note(result['runs'])}{wait_note(result['runs'])}"
        f"Machine at start: {result['machine_before']}.\nMachine at end: {result['machine_after']}.\n"
        f"Wall time of the whole run: {result['wall_s']:.0f} s.\nCommand: `{result['command']}`\n"
    )
    plot(summary, ratios, folder / f"{name}.png", f"{result['setup']}; {result['machine_before']}")


def results_folder(results_dir: str | None, smoke: bool) -> Path:
    """Where a run writes: ``results_dir`` when given; for a smoke run (``--quick``) a new temporary folder, so
    that it never overwrites the tracked results; otherwise benchmarks/results."""
    import tempfile

    if results_dir is not None:
        return Path(results_dir)
    return Path(tempfile.mkdtemp(prefix="step_cost_quick-")) if smoke else RESULTS


def main_job_setting(prompts: int):
    """(model path, dataset, config fields) of the CPU main job (`make train`): its format-warmed-up model
    (trained now if not cached, before any timing), its rollout and localization prompts, and its first
    ``prompts`` problems."""
    from trl_resets.app import harness

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
    from benchmarks.gpu_recipe import SHAPES, build_model

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
    parser.add_argument("--paper-caps", action="store_true",
                        help="the shipped testbed policy (a 0.47M-parameter Llama) on its own task at the paper's "
                             "caps: 20 thoughts x 256 tokens, 4096 response tokens, full fine-tune")
    parser.add_argument("--shape", default=None, choices=sorted(SHAPES),
                        help="a random-weight model of this shape (benchmarks/gpu_recipe.py's SHAPES) with the "
                             "embedded model's tokenizer, on the package's default prompts; for a GPU, where no hub "
                             "is needed")
    parser.add_argument("--bf16", action="store_true", help="train in bfloat16 mixed precision (bf16=True)")
    parser.add_argument("--with-phased", action="store_true",
                        help=f"add {PHASED}: SRPO sampled phase by phase (all phase-1 rollouts, then all localization "
                             "replies, then all suffixes), for comparison")
    parser.add_argument("--with-iid", action="store_true",
                        help=f"add {IID}: SRPO with base_group='iid' (the first G1 draws are the base group)")
    parser.add_argument("--lag", default="",
                        help="comma-separated reset lags (1, 2) to add as SRPO-lag<n> (and RRPO-lag1 with lag 1 and "
                             "RRPO among the methods); every method is then timed from its second step on")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"comma-separated methods before the --with-* variants (default {','.join(METHODS)}; "
                             "GRPO and SRPO must be among them)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=None, help="results name (default step_cost, step_cost_quick)")
    parser.add_argument("--results-dir", default=None,
                        help="folder for the results (default benchmarks/results; --quick: a new temporary folder)")
    parser.add_argument("--replot", action="store_true", help="redraw the Markdown and PNG from the saved JSON")
    args = parser.parse_args()
    if args.quick:
        args.prompts, args.steps, args.rounds, args.tokens, args.thought_tokens, args.thoughts = 1, 1, 1, 24, 8, 3
    if args.paper_caps:
        args.tokens, args.thought_tokens, args.thoughts, args.lora_r = 4096, 256, 20, 0
    if args.shape is not None and (args.model is not None or args.paper_caps):
        parser.error("--shape builds its own model: drop --model / --paper-caps.")
    name = args.out or (f"step_cost_{args.shape}" if args.shape else "step_cost_quick" if args.quick else
                        "step_cost_paper_caps" if args.paper_caps else "step_cost")
    base_methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    if not {"GRPO", "SRPO"} <= set(base_methods) or not set(base_methods) <= set(METHODS):
        parser.error(f"--methods {args.methods!r}: name methods among {','.join(METHODS)}, GRPO and SRPO included "
                     "(the ratios are over GRPO, the targets SRPO's).")
    lags = sorted({int(v) for v in args.lag.split(",") if v.strip()})
    if not set(lags) <= {1, 2}:
        parser.error(f"--lag {args.lag!r}: name lags among 1 and 2.")
    lagged = tuple(f"SRPO-lag{n}" for n in lags) + (("RRPO-lag1",) if 1 in lags and "RRPO" in base_methods else ())
    # steady state: a run lagged by L generations fills its reset slots from generation L on, and its last L
    # generations do not localize (or keep) what no later generation would use
    skip = tail = max(lags, default=0)
    results_dir = results_folder(args.results_dir, args.quick and not args.replot)
    if args.replot:
        result = json.loads((results_dir / f"{name}.json").read_text())
        result.setdefault("command", "python -m benchmarks.step_cost" + (" --quick" if args.quick else ""))
        write_outputs(result, name, write_json=False, folder=results_dir)
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
        "per_device_train_batch_size": 8 * args.prompts, "max_steps": args.steps + skip + tail, "learning_rate": 5e-5,
        "max_completion_length": args.tokens, "max_thought_tokens": args.thought_tokens,
        "max_thoughts": args.thoughts, "temperature": 0.7, "top_p": 0.95, "seed_budget": 4, "logging_steps": 1,
        "save_strategy": "no", "report_to": "none", "use_cpu": not torch.cuda.is_available(), "bf16": args.bf16,
        "disable_tqdm": True, "gradient_checkpointing": False, "share_prefill": args.share_prefill,
        "compact_decoding": args.compact, "merge_adapter_for_sampling": args.merge,
    }
    main_job = args.model is None and args.shape is None and not args.quick and not args.paper_caps
    shape_dir = tempfile.TemporaryDirectory(prefix="step_cost_shape-") if args.shape else None
    if args.paper_caps:
        from experiments.testbed import POLICY_DIR, RL_SEED, config_fields, task_dataset

        args.model, dataset = str(POLICY_DIR), task_dataset(args.prompts, seed=RL_SEED + args.seed)
        settings.update(config_fields(max_completion_length=args.tokens, max_thoughts=args.thoughts,
                                      max_thought_tokens=args.thought_tokens))
    elif main_job:  # the model, prompts and problems `make train` trains on
        args.model, dataset, job_settings = main_job_setting(args.prompts)
        settings.update(job_settings)
    else:
        from trl_resets.app.models import default_model_path

        if args.shape is not None:
            args.model = shape_dir.name
            parameters = build_model(args.shape, default_model_path(), Path(args.model), "cpu")
            print(f"random-weight {args.shape} model: {parameters:,} parameters (bf16 weights)", flush=True)
        elif args.model is None:
            args.model = default_model_path()
        rows = make_arithmetic_dataset(args.prompts, num_steps=2, seed=args.seed, operations=("+", "-"))
        dataset = rows.map(lambda row: {"prompt": [{"role": "user", "content": row["prompt"]}]})
    started = time.perf_counter()
    machine_before = machine_line()
    with tempfile.TemporaryDirectory() as tmp:
        # untimed warm-up: first-call costs (kernels, allocator, tokenizer caches) land on no method
        if args.quick or args.paper_caps:
            light_warm_up(args.model)
        else:
            warm = dict(settings, max_completion_length=4, max_thought_tokens=2, max_thoughts=2, max_steps=1,
                        localization_max_tokens=2)
            measure("SRPO", args.model, dataset, warm, args.lora_r, args.prompts, tmp)
        print(f"warm-up done after {time.perf_counter() - started:.0f} s", flush=True)
        methods = base_methods + ((PHASED,) if args.with_phased else ()) + ((IID,) if args.with_iid else ()) + lagged
        runs = {m: [] for m in methods}
        for rnd in range(args.rounds):
            order = methods[rnd % len(methods):] + methods[: rnd % len(methods)]
            for method in order:
                record = measure(method, args.model, dataset, dict(settings, seed=args.seed + rnd), args.lora_r,
                                 args.prompts, tmp, skip=skip, tail=tail)
                record["round"] = rnd
                runs[method].append(record)
                print(f"round {rnd} {method}: step {record['step']:.1f} s (generation {record['generation']:.1f}, "
                      f"update {record['update']:.1f}); {record['tokens_per_group']:.0f} tokens/group + "
                      f"{record['localization_tokens_per_group']:.0f} localization; {record['forward_passes']:.0f} "
                      "forward passes per generation", flush=True)
    machine_after = machine_line()
    summary = summarize(runs)
    ratios = ratios_to(summary)
    model_name = args.model.rstrip('/').split('/')[-1]
    if main_job:
        model_name = f"{model_name} (the main job's model, prompts and task)"
    if args.paper_caps:
        model_name = "the testbed policy (0.47M-parameter Llama) on its task at the paper's caps"
    if args.shape:
        model_name = f"a random-weight {args.shape}-shaped Qwen2 (the embedded model's tokenizer)"
    if shape_dir is not None:
        shape_dir.cleanup()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    setup = f"{model_name} on {device}, " + ("bf16, " if args.bf16 else "") + (
        f"LoRA r{args.lora_r}" if args.lora_r else "full fine-tune")
    setup += (f"; {args.prompts} prompt(s) x 8 rollouts per step, {args.tokens} tokens max "
              f"({args.thoughts} thoughts x {args.thought_tokens}); split 4 + 1x4 for RRPO/SRPO"
              + ("; SRPO-iid: SRPO with base_group='iid'" if args.with_iid else "")
              + (f"; {', '.join(lagged)}: reset_lag as named, seed_budget=0 (SRPO/RRPO: seed_budget=4); steady state: "
                 f"each run's first and last {skip} step(s) untimed" if lagged else "") + "; "
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
        "command": " ".join(["python -m benchmarks.step_cost", *sys.argv[1:]]),
    }
    result["ratios_to_grpo_of_means"] = ratios_to(summarize(runs, statistics.fmean))
    result["wall_clock_ratios_pooled_update"] = pooled_update_ratios(runs)
    write_outputs(result, name, folder=results_dir)
    table, targets = render_table(summary, ratios), render_targets(ratios)
    print()
    print(table)
    print(render_memory_line(summary, ratios), end="")
    print(targets)
    print(render_iid_line(ratios), end="")
    print(render_lag_line(ratios), end="")
    print(render_mean_line(runs))
    print(render_pooled_line(runs))
    print(wait_note(runs))
    print(f"machine: {machine_after}; {time.perf_counter() - started:.0f} s in all; results in {results_dir}")
    print(headline(ratios))


if __name__ == "__main__":
    main()
