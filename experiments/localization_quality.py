"""Self-localization against the exact step checker on the testbed (the paper's Figure 4, with a real oracle).

    python -m experiments.localization_quality            # 128 problems x 4 samples
    python -m experiments.localization_quality --quick    # 48 problems (under two minutes)
    python -m experiments.localization_quality --policy PATH   # another checkpoint (e.g. after SRPO training)
    python -m experiments.localization_quality --policy experiments/testbed/policy-critical --tag critical

Failed rollouts of the testbed policy are the seeds. For each, the policy localizes its first wrong step
(`SelfLocalizer`, the trainer's call), `RandomLocalizer` draws a reset index, and the checker
(`check_steps`) gives the true first wrong step. From each reset state G2 suffixes are sampled, as in
training, and scored on the whole trajectory. Reported: the deviation of the reset index from the
checker's, the share of clean prefixes (reset at or before the first error), and the correction rate of
the suffix group (mean success and pass@G2) for clean and erroneous prefixes.

The last line is the headline: clean-prefix share of self-localized resets against random ones.
Writes experiments/results/localization_quality.{json,md,png} (``--quick``: a new temporary folder; ``--out``: any folder).
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from collections import Counter
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


def rates(records: list[dict], key: str) -> dict:
    """Correction rates of one localizer's resets, pooled and split into clean and erroneous prefixes."""
    out = {}
    for name, keep in (("all", lambda r: True), ("clean", lambda r: r[key]["clean"]),
                       ("erroneous", lambda r: not r[key]["clean"])):
        chosen = [r[key] for r in records if keep(r)]
        out[name] = {
            "n": len(chosen),
            "success": sum(c["success"] for c in chosen) / len(chosen) if chosen else None,
            "pass_at_g2": sum(c["success"] > 0 for c in chosen) / len(chosen) if chosen else None,
        }
    return out


def deviation_histogram(records: list[dict], key: str) -> dict[int, int]:
    return dict(sorted(Counter(r[key]["index"] - r["first_wrong"] for r in records).items()))


def correction_by_deviation(records: list[dict], key: str) -> dict[int, float]:
    by = {}
    for r in records:
        by.setdefault(r[key]["index"] - r["first_wrong"], []).append(r[key]["success"])
    return {d: sum(v) / len(v) for d, v in sorted(by.items())}


def collect(opts) -> tuple[list[dict], dict]:
    """Seeds, their reset indices under each localizer, and the success of their suffix groups."""
    model, tokenizer = load_policy(opts.policy)
    task = policy_task(opts.policy)
    fields = config_fields(task)
    sampler = make_sampler(model, tokenizer, fields=fields)
    dataset = task_dataset(opts.problems, seed=EVAL_SEED, task=task)
    rows = [dict(zip(dataset.column_names, values)) for values in zip(*dataset.to_dict().values())]
    rng = random.Random(opts.seed)
    torch.manual_seed(opts.seed)

    contexts, owners = [], []
    for i, row in enumerate(rows):
        ids = tokenizer(rollout_prompt(row["prompt"]))["input_ids"]
        contexts += [ids] * opts.samples
        owners += [i] * opts.samples
    rollouts = sampler.sample(contexts)
    texts = [tokenizer.decode(r.token_ids, skip_special_tokens=True) for r in rollouts]
    rewards = boxed_answer_reward(texts, [rows[i]["answer"] for i in owners])
    seeds = [(owners[j], contexts[j], rollouts[j]) for j, r in enumerate(rewards) if r < 1.0]
    stats = {"rollouts": len(rollouts), "accuracy": sum(rewards) / len(rewards), "seeds": len(seeds)}

    requests = [LocalizationRequest(rows[i]["prompt"], thoughts_of(ro, tokenizer, fields), rows[i]) for i, _, ro in seeds]
    temperature = fields["localization_temperature"] if opts.temperature is None else opts.temperature
    self_loc = SelfLocalizer(LOCALIZATION_TEMPLATE, fields["localization_max_tokens"], temperature)
    answers = {
        "self": self_loc.locate(requests, TextPolicy(sampler), rng),
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

    budget = fields["max_completion_length"]
    suffixes = sampler.sample([j[2] for j in jobs], [j[4] for j in jobs], [budget - len(j[3]) for j in jobs])
    full = [tokenizer.decode(j[3] + s.token_ids, skip_special_tokens=True) for j, s in zip(jobs, suffixes)]
    scores = boxed_answer_reward(full, [rows[records[j[0]]["problem"]]["answer"] for j in jobs])
    for name in LOCALIZERS:
        for r in records:
            r[name]["success"] = 0.0
    for (r, name, *_), score in zip(jobs, scores):
        records[r][name]["success"] += score / opts.g2
    return records, stats


def summarize(records: list[dict]) -> dict:
    out = {}
    for name in LOCALIZERS:
        n = len(records)
        out[name] = {
            "exact": sum(r[name]["index"] == r["first_wrong"] for r in records) / n,
            "clean_share": sum(r[name]["clean"] for r in records) / n,
            "parse_failure_rate": sum(r[name]["parse_failed"] for r in records) / n,
            "deviation_histogram": deviation_histogram(records, name),
            "correction_by_deviation": correction_by_deviation(records, name),
            "correction": rates(records, name),
        }
    return out


def _fmt(value):
    return "-" if value is None else f"{value:.3f}"


def table(summary: dict) -> str:
    lines = [("| reset chosen by | exactly the first error | clean prefixes | correction (clean) | "
              "correction (erroneous) | pass@G2 (clean / erroneous) | parse failures |"), "|---|---|---|---|---|---|---|"]
    for name, s in summary.items():
        c = s["correction"]
        lines.append(
            f"| {name} | {s['exact']:.3f} | {s['clean_share']:.3f} | {_fmt(c['clean']['success'])} "
            f"(n={c['clean']['n']}) | {_fmt(c['erroneous']['success'])} (n={c['erroneous']['n']}) | "
            f"{_fmt(c['clean']['pass_at_g2'])} / {_fmt(c['erroneous']['pass_at_g2'])} | {s['parse_failure_rate']:.3f} |"
        )
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
    parser.add_argument("--g2", type=int, default=4, help="suffixes per reset state")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--temperature", type=float, default=None,
                        help="temperature of the localization reply (default: the testbed config's)")
    parser.add_argument("--policy", default=str(POLICY_DIR))
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core CPU)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--tag", default="", help="results name suffix, e.g. 'critical' -> localization_quality_critical.*")
    parser.add_argument("--out", default=None, help="results folder (default: experiments/results; --quick: a new "
                        "temporary folder)")
    opts = parser.parse_args()
    if opts.quick:
        opts.problems = 48
    torch.set_num_threads(opts.threads)
    quiet()
    wall = time.perf_counter()
    records, stats = collect(opts)
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
        f"# Self-localization against the step checker (testbed)\n\n{text}\n{headline}\n\n"
        f"{setting}; {machine}; wall {wall:.0f}s.\n\n![localization quality](localization_quality{suffix}.png)\n"
    )
    plot(records, summary, out / f"localization_quality{suffix}.png", f"testbed, {setting}")
    print(text)
    print(f"{setting}; {machine}; wall {wall:.0f}s")
    print(headline)


if __name__ == "__main__":
    main()
