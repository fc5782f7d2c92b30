"""Self-localization against the exact step checker on the testbed (the paper's Figure 4, with a real oracle).

    python -m experiments.localization_quality            # 128 problems x 4 samples
    python -m experiments.localization_quality --quick    # 48 problems (under two minutes)
    python -m experiments.localization_quality --policy PATH   # another checkpoint (e.g. after SRPO training)
    python -m experiments.localization_quality --policy experiments/testbed/policy-critical --tag critical
    python -m experiments.localization_quality --embedded --problems 96 --samples 2 --tag smollm2_before
    python -m experiments.localization_quality --embedded --adapter OUTPUT_DIR --tag smollm2_after
                              # the embedded SmolLM2-135M-Instruct on the main job's task, after its format warm-up
                              # (and with the adapter a main-job run saved in OUTPUT_DIR)

Failed rollouts of the testbed policy are the seeds. For each, the policy localizes its first wrong step
(`SelfLocalizer`, the trainer's call), `RandomLocalizer` draws a reset index, and the checker
(`check_steps`) gives the true first wrong step. From each reset state G2 suffixes are sampled, as in
training, and scored on the whole trajectory. Reported: the deviation of the reset index from the
checker's, the share of clean prefixes (reset at or before the first error), and the correction rate of
the suffix group (mean success and pass@G2) for clean and erroneous prefixes.

With ``--embedded`` the policy is the main job's model (the warmed-up SmolLM2-135M-Instruct, plus ``--adapter``)
and every call goes through an `SRPOTrainer` built from the main job's recipe: its rollout prompts, its sampler, its
localizer and its thought splitting, on held-out problems of the recipe's task.

Rates carry 95% Wilson intervals; self against random is also compared seed by seed (the same failed chain).
The last line is the headline: clean-prefix share of self-localized resets against random ones.
Writes experiments/results/localization_quality.{json,md,png} (``--quick``: a new temporary folder; ``--out``: any folder).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shlex
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from experiments.testbed import (
    EVAL_SEED,
    LOCALIZATION_TEMPLATE,
    POLICY_DIR,
    TextPolicy,
    config_fields,
    load_policy,
    machine_description,
    make_sampler,
    policy_task,
    quiet,
    rollout_prompt,
    task_dataset,
    thoughts_of,
)
from trl_resets.batch import question_text
from trl_resets.localizers import (
    LocalizationRequest,
    OracleLocalizer,
    RandomLocalizer,
    SelfLocalizer,
    resolve_reset_index,
)
from trl_resets.resets import reset_prefix
from trl_resets.rewards import boxed_answer_reward

RESULTS = Path(__file__).parent / "results"
LOCALIZERS = ("self", "random", "oracle")


def is_clean(reset_index: int, first_wrong: int) -> bool:
    """A reset state is clean when it keeps only thoughts before the first wrong one."""
    return reset_index <= first_wrong


def wilson_interval(hits: int, n: int, z: float = 1.96) -> tuple[float, float] | None:
    """The Wilson score interval (95% by default) of a share ``hits / n``; None when n is 0."""
    if n == 0:
        return None
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def paired_difference(a: list[float], b: list[float], z: float = 1.96) -> dict:
    """Mean of ``a[i] - b[i]`` over the pairs with its normal 95% interval (from the pairs' standard error)."""
    if len(a) != len(b) or len(a) < 2:
        raise ValueError(f"need two equally long lists of at least 2 pairs, got {len(a)} and {len(b)}.")
    diffs = [x - y for x, y in zip(a, b)]
    mean = statistics.fmean(diffs)
    se = statistics.stdev(diffs) / math.sqrt(len(diffs))
    return {"n": len(diffs), "mean": mean, "se": se, "ci": (mean - z * se, mean + z * se)}


def rates(records: list[dict], key: str | tuple[str, ...]) -> dict:
    """Correction rates of one localizer's resets (or of several localizers' resets pooled, ``key`` a tuple),
    over all of them and split into clean and erroneous prefixes; pass@G2 with its 95% interval."""
    keys = (key,) if isinstance(key, str) else key
    resets = [r[k] for r in records for k in keys]
    out = {}
    for name, keep in (("all", lambda c: True), ("clean", lambda c: c["clean"]),
                       ("erroneous", lambda c: not c["clean"])):
        chosen = [c for c in resets if keep(c)]
        scored = [c for c in chosen if c["success"] is not None]  # none without suffixes (--g2 0)
        passed = sum(c["success"] > 0 for c in scored)
        out[name] = {
            "n": len(chosen),
            "success": sum(c["success"] for c in scored) / len(scored) if scored else None,
            "pass_at_g2": passed / len(scored) if scored else None,
            "pass_at_g2_ci": wilson_interval(passed, len(scored)),
        }
    return out


def deviation_histogram(records: list[dict], key: str) -> dict[int, int]:
    return dict(sorted(Counter(r[key]["index"] - r["first_wrong"] for r in records).items()))


def correction_by_deviation(records: list[dict], key: str) -> dict[int, float]:
    by = {}
    for r in records:
        if r[key]["success"] is not None:
            by.setdefault(r[key]["index"] - r["first_wrong"], []).append(r[key]["success"])
    return {d: sum(v) / len(v) for d, v in sorted(by.items())}


@dataclass
class Subject:
    """The policy whose own failed rollouts are localized, and how the trainer would prompt, sample and ask it.

    ``prompt_ids(rows)``: the rollout prompts' token ids; ``sampling()``: a context giving the thought sampler;
    ``text_policy(sampler)``: the policy as text in / text out for ``localizer``; ``describe(rollout)``: the
    rollout's thoughts without delimiters (what a localizer is shown); ``budget``: tokens a whole completion may
    take (a suffix gets what its prefix left).
    """

    name: str
    rows: list[dict]
    prompt_ids: Callable[[list[dict]], list[list[int]]]
    sampling: Callable[[], AbstractContextManager]
    text_policy: Callable
    localizer: object
    describe: Callable
    decode: Callable[[list[int]], str]
    budget: int


def testbed_subject(opts) -> Subject:
    """The testbed policy at ``opts.policy`` on its own task's evaluation problems."""
    model, tokenizer = load_policy(opts.policy)
    task = policy_task(opts.policy)
    fields = config_fields(task)
    sampler = make_sampler(model, tokenizer, fields=fields)
    dataset = task_dataset(opts.problems, seed=EVAL_SEED, task=task)
    rows = [dict(zip(dataset.column_names, values)) for values in zip(*dataset.to_dict().values())]
    temperature = fields["localization_temperature"] if opts.temperature is None else opts.temperature
    return Subject(
        name=f"testbed {Path(opts.policy).name}", rows=rows,
        prompt_ids=lambda rows: [tokenizer(rollout_prompt(row["prompt"]))["input_ids"] for row in rows],
        sampling=lambda: nullcontext(sampler), text_policy=TextPolicy,
        localizer=SelfLocalizer(LOCALIZATION_TEMPLATE, fields["localization_max_tokens"], temperature),
        describe=lambda rollout: thoughts_of(rollout, tokenizer, fields),
        decode=lambda ids: tokenizer.decode(ids, skip_special_tokens=True), budget=fields["max_completion_length"],
    )


def embedded_subject(opts) -> Subject:
    """The main job's policy (the embedded model after its cached format warm-up, plus ``opts.adapter``) through an
    `SRPOTrainer` built from the main job's recipe, on held-out problems of its task (after the training and
    validation ones)."""
    from trl_resets.app.harness import load_problems, parse, prepare_model
    from trl_resets.policy_text import PolicyText, SystemMessages
    from trl_resets.trainer import SRPOTrainer

    work = tempfile.mkdtemp(prefix="trl-resets-localization-")
    flags = ["--output_dir", work, "--report_to", "none"]
    if opts.temperature is not None:
        flags += ["--localization_temperature", str(opts.temperature)]
    args, model_args, task, run = parse("srpo", flags + shlex.split(opts.job_args))
    model_path = prepare_model(args, model_args, task, run)
    if opts.adapter:
        model_path = merged_adapter(model_path, opts.adapter, work)
    held_out = load_problems(task, skip=task.num_problems + run.validation_problems, count=opts.problems)
    trainer = SRPOTrainer(model=model_path, reward_funcs=boxed_answer_reward, args=args, train_dataset=held_out)
    trainer.model.eval()
    rows = [dict(zip(held_out.column_names, values)) for values in zip(*held_out.to_dict().values())]
    return Subject(
        name="SmolLM2-135M-Instruct after the format warm-up" + (f" + adapter {opts.adapter}" if opts.adapter else ""),
        rows=rows,
        prompt_ids=lambda rows: [list(ids) for ids in
                                 trainer._tokenize_prompts([trainer._wrap(row["prompt"]) for row in rows])[0]],
        sampling=trainer._sampler,
        text_policy=lambda sampler: PolicyText(sampler, trainer._tokenized, trainer._decode_text, True),
        localizer=SystemMessages(trainer.localizer), describe=trainer._describe, decode=trainer._decode_text,
        budget=args.max_completion_length,
    )


def merged_adapter(model_path: str, adapter: str, work: str) -> str:
    """A folder holding ``model_path`` with the LoRA adapter saved in ``adapter`` merged into its weights."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (Path(adapter) / "adapter_config.json").is_file():
        raise ValueError(f"--adapter {adapter}: no adapter_config.json there; give the output_dir of a main-job run "
                         "(e.g. `python examples/train_srpo.py --output_dir DIR`).")
    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, adapter).merge_and_unload()
    target = Path(work) / "merged"
    merged.save_pretrained(target)
    AutoTokenizer.from_pretrained(model_path).save_pretrained(target)
    return str(target)


def collect(opts, subject: Subject | None = None) -> tuple[list[dict], dict]:
    """Seeds, their reset indices under each localizer, and the success of their suffix groups."""
    subject = subject or testbed_subject(opts)
    with torch.no_grad(), subject.sampling() as sampler:
        if getattr(opts, "batch_size", None):
            sampler.batch_size = opts.batch_size  # bounds the KV cache: ~1000 suffixes at once take ~12 GB on SmolLM2
        return _collect(opts, subject, sampler)


def _collect(opts, subject: Subject, sampler) -> tuple[list[dict], dict]:
    rows = subject.rows
    rng = random.Random(opts.seed)
    torch.manual_seed(opts.seed)

    contexts, owners = [], []
    for i, ids in enumerate(subject.prompt_ids(rows)):
        contexts += [ids] * opts.samples
        owners += [i] * opts.samples
    rollouts = sampler.sample(contexts)
    texts = [subject.decode(r.token_ids) for r in rollouts]
    rewards = boxed_answer_reward(texts, [rows[i]["answer"] for i in owners])
    seeds = [(owners[j], contexts[j], rollouts[j]) for j, r in enumerate(rewards) if r < 1.0]
    stats = {"rollouts": len(rollouts), "accuracy": sum(rewards) / len(rewards), "seeds": len(seeds)}

    requests = [LocalizationRequest(question_text(rows[i]["prompt"]), subject.describe(ro), rows[i])
                for i, _, ro in seeds]
    answers = {
        "self": subject.localizer.locate(requests, subject.text_policy(sampler), rng),
        "random": RandomLocalizer().locate(requests, None, rng),
        "oracle": OracleLocalizer().locate(requests, None, rng),
    }
    records, jobs = [], []
    for s, ((i, context, rollout), request) in enumerate(zip(seeds, requests)):
        oracle = answers["oracle"][s].index
        if oracle is None:  # the checker finds no wrong step in a failed chain: nothing to compare against
            continue
        record = {"problem": i, "num_thoughts": rollout.num_thoughts, "first_wrong": oracle,
                  "thoughts": request.thoughts}
        for name in LOCALIZERS:
            index, failed = resolve_reset_index(answers[name][s], rollout.num_thoughts, rng)
            record[name] = {"index": index, "parse_failed": failed, "clean": is_clean(index, oracle),
                            "reply": answers[name][s].reply}
            prefix = reset_prefix(rollout, index)
            jobs += [(len(records), name, context + prefix, prefix, index - 1)] * opts.g2
        records.append(record)
    stats["no_checker_error"] = len(seeds) - len(records)

    for name in LOCALIZERS:
        for r in records:
            r[name]["success"] = 0.0 if opts.g2 else None  # --g2 0: the localizers alone, no suffixes
    if not jobs:
        return records, stats
    budget = subject.budget
    suffixes = sampler.sample([j[2] for j in jobs], [j[4] for j in jobs], [budget - len(j[3]) for j in jobs])
    full = [subject.decode(j[3] + s.token_ids) for j, s in zip(jobs, suffixes)]
    scores = boxed_answer_reward(full, [rows[records[j[0]]["problem"]]["answer"] for j in jobs])
    for (r, name, *_), score in zip(jobs, scores):
        records[r][name]["success"] += score / opts.g2
    return records, stats


def summarize(records: list[dict]) -> dict:
    """Per localizer: hit rate at the first error (exact), clean-prefix share and parse-failure rate, each with its
    95% interval, and the correction rates; ``self_vs_random``: the paired differences over the same seeds;
    ``pooled_self_random``: clean against erroneous prefixes over the self and random resets together."""
    out = {}
    n = len(records)
    for name in LOCALIZERS:
        exact = sum(r[name]["index"] == r["first_wrong"] for r in records)
        clean = sum(r[name]["clean"] for r in records)
        failed = sum(r[name]["parse_failed"] for r in records)
        out[name] = {
            "exact": exact / n, "exact_ci": wilson_interval(exact, n),
            "clean_share": clean / n, "clean_share_ci": wilson_interval(clean, n),
            "parse_failure_rate": failed / n, "parse_failure_ci": wilson_interval(failed, n),
            "deviation_histogram": deviation_histogram(records, name),
            "correction_by_deviation": correction_by_deviation(records, name),
            "correction": rates(records, name),
        }
    if n >= 2:
        out["self_vs_random"] = {
            measure: paired_difference([float(test(r["self"], r)) for r in records],
                                       [float(test(r["random"], r)) for r in records])
            for measure, test in (("exact", lambda c, r: c["index"] == r["first_wrong"]),
                                  ("clean", lambda c, r: c["clean"]), ("success", lambda c, r: c["success"]))
            if measure != "success" or records[0]["self"]["success"] is not None
        }
    out["pooled_self_random"] = rates(records, ("self", "random"))
    return out


def _fmt(value):
    return "-" if value is None else f"{value:.3f}"


def _ci(interval) -> str:
    return "" if interval is None else f" [{interval[0]:.2f}, {interval[1]:.2f}]"


def table(summary: dict) -> str:
    """The localizers' rates (95% intervals in brackets), the pooled clean/erroneous pass@G2 and the paired
    self-vs-random differences."""
    lines = [("| reset chosen by | exactly the first error | clean prefixes | correction (clean) | "
              "correction (erroneous) | pass@G2 (clean / erroneous) | parse failures |"), "|---|---|---|---|---|---|---|"]
    for name in LOCALIZERS:
        s = summary[name]
        c = s["correction"]
        lines.append(
            f"| {name} | {s['exact']:.3f}{_ci(s.get('exact_ci'))} | {s['clean_share']:.3f}{_ci(s.get('clean_share_ci'))}"
            f" | {_fmt(c['clean']['success'])} (n={c['clean']['n']}) | {_fmt(c['erroneous']['success'])} "
            f"(n={c['erroneous']['n']}) | {_fmt(c['clean']['pass_at_g2'])}{_ci(c['clean'].get('pass_at_g2_ci'))} / "
            f"{_fmt(c['erroneous']['pass_at_g2'])}{_ci(c['erroneous'].get('pass_at_g2_ci'))} | "
            f"{s['parse_failure_rate']:.3f}{_ci(s.get('parse_failure_ci'))} |"
        )
    pooled = summary.get("pooled_self_random")
    if pooled:
        clean, wrong = pooled["clean"], pooled["erroneous"]
        lines.append(f"\nSuffix pass@G2 over the self and random resets together: from a clean prefix "
                     f"{_fmt(clean['pass_at_g2'])}{_ci(clean['pass_at_g2_ci'])} (n={clean['n']}), from an erroneous "
                     f"one {_fmt(wrong['pass_at_g2'])}{_ci(wrong['pass_at_g2_ci'])} (n={wrong['n']}).")
    paired = summary.get("self_vs_random")
    if paired:
        lines.append("\nSelf minus random on the same seeds (mean, 95% interval): " + "; ".join(
            f"{label} {p['mean']:+.3f} [{p['ci'][0]:+.3f}, {p['ci'][1]:+.3f}]" for label, p in
            (("exact hit", paired["exact"]), ("clean prefix", paired["clean"]),
             ("suffix success", paired.get("success"))) if p) + f" (n={paired['exact']['n']}).")
    return "\n".join(lines) + "\n"


def plot(records: list[dict], summary: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(17, 4))
    depth = {name: [r[name]["index"] / r["num_thoughts"] for r in records] for name in ("self", "random")}
    axes[0].hist([depth["self"], depth["random"]], bins=[0.0, 0.25, 0.5, 0.75, 1.0], label=["self", "random"])
    axes[0].set(title="(a) reset depth h*/H", xlabel="h*/H", ylabel="seeds")
    for name in ("self", "random"):
        hist = summary[name]["deviation_histogram"]
        shift = -0.2 if name == "self" else 0.2
        axes[1].bar([d + shift for d in hist], list(hist.values()), width=0.4, label=name)
        corr = summary[name]["correction_by_deviation"]
        axes[2].plot(list(corr), list(corr.values()), marker="o", label=name)
    axes[1].axvline(0.5, color="gray", linestyle=":")
    axes[1].set(title="(b) reset index - checker's first wrong step", xlabel="deviation", ylabel="seeds")
    axes[2].axvline(0.5, color="gray", linestyle=":")
    axes[2].set(title="(c) suffix success by deviation", xlabel="deviation (<= 0: clean)", ylabel="success rate")
    names = ["self", "random", "oracle"]
    for k, part in enumerate(("clean", "erroneous")):
        values = [summary[n]["correction"][part]["success"] or 0.0 for n in names]
        axes[3].bar([x + (k - 0.5) * 0.4 for x in range(len(names))], values, width=0.4, label=part)
    axes[3].set_xticks(range(len(names)), names)
    axes[3].set(title="(d) suffix success: clean vs erroneous prefix", ylabel="success rate")
    for ax in axes:
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problems", type=int, default=128)
    parser.add_argument("--samples", type=int, default=4, help="rollouts per problem")
    parser.add_argument("--g2", type=int, default=4,
                        help="suffixes per reset state (0: measure the localizers only, no suffix success)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--temperature", type=float, default=None,
                        help="temperature of the localization reply (default: the testbed config's)")
    parser.add_argument("--policy", default=str(POLICY_DIR))
    parser.add_argument("--embedded", action="store_true",
                        help="the main job's policy (embedded SmolLM2-135M-Instruct after its format warm-up) through "
                             "the trainer built from the main job's recipe, instead of a testbed policy")
    parser.add_argument("--adapter", default=None,
                        help="with --embedded: the output_dir of a main-job run, whose LoRA adapter is merged in")
    parser.add_argument("--job_args", default="",
                        help="with --embedded: main-job flags over its recipe, e.g. --job_args='--num_steps 2,3'")
    parser.add_argument("--batch_size", type=int, default=None,
                        help="most sequences decoded at once (default: all for a testbed policy, 32 with --embedded)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core CPU)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--tag", default="", help="results name suffix, e.g. 'critical' -> localization_quality_critical.*")
    parser.add_argument("--out", default=None, help="results folder (default: experiments/results; --quick: a new "
                        "temporary folder)")
    opts = parser.parse_args()
    if opts.job_args and not opts.embedded:
        parser.error("--job_args are main-job flags: add --embedded.")
    if opts.adapter and not opts.embedded:
        parser.error("--adapter is for the main job's model: add --embedded (a testbed checkpoint is a --policy).")
    if opts.batch_size is not None and opts.batch_size < 1:
        parser.error(f"--batch_size {opts.batch_size}: decode at least one sequence at a time.")
    if opts.embedded and opts.batch_size is None:
        opts.batch_size = 32
    if opts.quick:
        opts.problems = 8 if opts.embedded else 48
    torch.set_num_threads(opts.threads)
    quiet()
    wall = time.perf_counter()
    subject = embedded_subject(opts) if opts.embedded else testbed_subject(opts)
    records, stats = collect(opts, subject)
    summary = summarize(records)
    wall = time.perf_counter() - wall
    machine = machine_description(opts.threads)
    setting = (f"{opts.problems} problems x {opts.samples} samples (accuracy {stats['accuracy']:.3f}), "
               f"{len(records)} seeds, G2={opts.g2}")
    text = table(summary)
    out = Path(opts.out or (tempfile.mkdtemp(prefix="trl-resets-localization_quality-") if opts.quick else RESULTS))
    out.mkdir(parents=True, exist_ok=True)
    suffix = (f"_{opts.tag}" if opts.tag else "") + ("_quick" if opts.quick else "")
    s, r = summary["self"], summary["random"]
    headline = (f"clean prefixes: self-localized {s['clean_share']:.3f} vs random {r['clean_share']:.3f}; "
                f"self-localized suffix success {_fmt(s['correction']['all']['success'])} vs random "
                f"{_fmt(r['correction']['all']['success'])}")
    (out / f"localization_quality{suffix}.json").write_text(json.dumps(
        {"setting": setting, "machine": machine, "wall_seconds": wall, "options": vars(opts), "stats": stats,
         "summary": summary, "records": records}, indent=1) + "\n")
    (out / f"localization_quality{suffix}.md").write_text(
        f"# Self-localization against the step checker ({subject.name})\n\n{text}\n{headline}\n\n"
        f"{setting}; {machine}; wall {wall:.0f}s.\n\n![localization quality](localization_quality{suffix}.png)\n"
    )
    plot(records, summary, out / f"localization_quality{suffix}.png", f"{subject.name}, {setting}")
    print(text)
    print(f"{setting}; {machine}; wall {wall:.0f}s")
    print(headline)


if __name__ == "__main__":
    main()
