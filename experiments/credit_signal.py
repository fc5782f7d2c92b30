"""Where each method's credit lands in a failed rollout, by the exact step checker (testbed policies).

    python -m experiments.credit_signal            # every shipped testbed policy, 128 problems x 4 samples
    python -m experiments.credit_signal --quick    # 32 problems each (a few minutes)
    python -m experiments.credit_signal --policies experiments/testbed/policy-fillers --tag fillers

GRPO gives every token of a failed rollout the same negative advantage. How much that moves a token is
the size of the gradient of log pi(y_t) with respect to the logits, which the paper (Appendix G) measures by
its factor 1 - pi(y_t): a token the policy was sure of gets almost no push, an unlikely one a large push. So
the tokens of the clean prefix (the thoughts before the checker's first wrong one) are only a problem for
GRPO, and masking them only helps SRPO, in proportion to the signal they carry.

For each policy: rollouts sampled at temperature 1 (the trainer's sampling), scored by `check_steps`, and for
each failed rollout the sum of 1 - pi(y_t) over the tokens of its clean prefix, its first wrong thought and
the thoughts after it. Reported: each part's share of the failed rollouts' tokens and of their signal, and the
mean 1 - pi per token (also for successful rollouts).

Credit precision, per method (second table): each method builds its training rows for the same problems with
the package's code (`ResetAlgorithm`, the localizers, `trl_resets.comparison`), 8 rows per prompt: GRPO (8 iid
rollouts, uniform credit), RRPO / SRPO / SRPO with the oracle localizer (4 + 1 x 4, prefixes masked), and the
comparison estimators on the GRPO rows (`diff` by exact text or by the value a thought computes, `state` by value,
`repair` with the testbed policy as its corrector and with an exact corrector built from the checker) and `diff`
on SRPO's base group. For each failed row, its negative update is the sum over its trained tokens of
max(-A_t, 0) (1 - pi(y_t)); reported: the share of the failed rows' negative update on the clean prefix, on the
first wrong thought and after it, the mean negative and positive update per failed row.

The last line is the headline: the clean prefix's share of the failed rollouts' signal, per policy.
Writes experiments/results/credit_signal.{json,md,png} and credit_signal_methods.png (``--quick``: a new temporary folder; ``--out``: any folder).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from experiments.testbed import (
    EVAL_SEED,
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
from trl_resets.advantages import group_advantages
from trl_resets.comparison import Repairer, Trajectory, batch_credit, edited_thoughts, repair_credit
from trl_resets.localizers import OracleLocalizer, RandomLocalizer, SelfLocalizer
from trl_resets.resets import ResetAlgorithm, Split
from trl_resets.rewards import boxed_answer_reward
from trl_resets.tasks import check_steps
from trl_resets.tasks.arithmetic import thought_value

RESULTS = Path(__file__).parent / "results"
TESTBED = Path(__file__).parent / "testbed"
PARTS = ("prefix", "first_wrong", "after")


def split_by_part(spans: list[tuple[int, int]], first_wrong: int, values: list[float]) -> dict[str, list[float]]:
    """``values`` (one per token) cut into the clean prefix (thoughts before ``first_wrong``, 1-based), the first
    wrong thought and everything after it; tokens outside every thought (a cut-off tail) count as after."""
    parts = {name: [] for name in PARTS}
    covered = 0
    for h, (start, end) in enumerate(spans, 1):
        name = "prefix" if h < first_wrong else "first_wrong" if h == first_wrong else "after"
        parts[name] += values[start:end]
        covered = max(covered, end)
    parts["after"] += values[covered:]
    return parts


def token_probabilities(model, context: list[int], completion: list[int]) -> list[float]:
    """pi(y_t | context, y_<t) for each completion token (temperature 1: the distribution sampled from)."""
    ids = torch.tensor([context + completion])
    with torch.no_grad():
        logits = model(ids).logits[0, len(context) - 1 : -1].float()
    chosen = torch.tensor(completion)[:, None]
    return torch.log_softmax(logits, -1).gather(1, chosen)[:, 0].exp().tolist()


def measure(policy: str, problems: int, samples: int, seed: int) -> dict:
    model, tokenizer = load_policy(policy)
    task = policy_task(policy)
    fields = config_fields(task)
    sampler = make_sampler(model, tokenizer, fields=fields)
    dataset = task_dataset(problems, seed=EVAL_SEED, task=task)
    rows = [dict(zip(dataset.column_names, values)) for values in zip(*dataset.to_dict().values())]
    contexts, owners = [], []
    for i, row in enumerate(rows):
        contexts += [tokenizer(rollout_prompt(row["prompt"]))["input_ids"]] * samples
        owners += [i] * samples
    torch.manual_seed(seed)
    rollouts = sampler.sample(contexts)

    sums = {name: [0.0, 0] for name in (*PARTS, "success")}  # signal, tokens
    failed = unlocated = 0
    for context, rollout, owner in zip(contexts, rollouts, owners):
        check = check_steps(rows[owner], thoughts_of(rollout, tokenizer, fields))
        signal = [1.0 - p for p in token_probabilities(model, context, rollout.token_ids)]
        if check.final_correct:
            parts = {"success": signal}
        elif check.first_wrong is None:  # a failed chain the checker finds no wrong step in: not counted
            unlocated += 1
            continue
        else:
            failed += 1
            parts = split_by_part(rollout.thought_spans, check.first_wrong, signal)
        for name, values in parts.items():
            sums[name][0] += sum(values)
            sums[name][1] += len(values)
    failed_signal = sum(sums[n][0] for n in PARTS) or 1.0
    failed_tokens = sum(sums[n][1] for n in PARTS) or 1
    result = {"rollouts": len(rollouts), "accuracy": 1 - (failed + unlocated) / len(rollouts), "failed": failed,
              "failed_without_checker_error": unlocated, "parts": {}}
    for name, (signal, tokens) in sums.items():
        result["parts"][name] = {
            "tokens": tokens,
            "mean_signal_per_token": signal / tokens if tokens else None,
            "token_share": tokens / failed_tokens if name in PARTS else None,
            "signal_share": signal / failed_signal if name in PARTS else None,
        }
    return result


# name -> (how the rows are built, credit estimator, thought key)
CREDIT_METHODS = {
    "GRPO": ("grpo", "uniform", None),
    "RRPO": ("rrpo", "uniform", None),
    "SRPO": ("srpo", "uniform", None),
    "SRPO-oracle": ("srpo-oracle", "uniform", None),
    "diff (text)": ("grpo", "diff", "text"),
    "diff": ("grpo", "diff", "value"),
    "state": ("grpo", "state", "value"),
    "repair (policy)": ("grpo", "repair", "value"),
    "repair (exact corrector)": ("grpo", "repair-exact", "value"),
    "diff + SRPO": ("srpo", "diff", "value"),
}
KEYS = {"text": str.strip, "value": thought_value}


def exact_correction(row: dict, thoughts: list[str]) -> list[str]:
    """A minimal correction by the step checker: right thoughts kept, wrong ones replaced by the reference step at
    their place, missing steps appended (the edits a perfect compare-and-correct operator would make)."""
    reference = row["solution_steps"]
    check = check_steps(row, thoughts)
    kept = [t if ok else reference[h] for h, (t, ok) in enumerate(zip(thoughts, check.correct)) if ok or
            h < len(reference)]
    return kept + reference[len(thoughts):]


def build_rows(kind: str, model, tokenizer, fields: dict, rows: list[dict], seed: int):
    """Each problem's training rows, built as the trainer builds them (8 per prompt)."""
    from experiments.testbed import LOCALIZATION_TEMPLATE, TextPolicy, thought_format

    sampler = make_sampler(model, tokenizer, fields=fields)
    split = Split(8, 0, 1) if kind == "grpo" else Split(4, 1, 4)
    localizer = {"grpo": RandomLocalizer(), "rrpo": RandomLocalizer(), "srpo-oracle": OracleLocalizer(),
                 "srpo": SelfLocalizer(LOCALIZATION_TEMPLATE, fields["localization_max_tokens"], 1.0)}[kind]

    def score(owners, completions):
        texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
        return [[r] for r in boxed_answer_reward(texts, [rows[o]["answer"] for o in owners])]

    import random

    algorithm = ResetAlgorithm(split, thought_format(fields), seed_budget=8)
    contexts = [tokenizer(rollout_prompt(row["prompt"]))["input_ids"] for row in rows]
    torch.manual_seed(seed)
    groups = algorithm.run(contexts, [row["prompt"] for row in rows], sampler, score, localizer,
                           describe=lambda r: thoughts_of(r, tokenizer, fields), policy=TextPolicy(sampler),
                           rng=random.Random(seed), rows=rows)
    return groups, contexts, sampler


def row_thoughts(row, tokenizer, fmt) -> list[str]:
    """A training row's thoughts (a reset row's prefix thoughts, then its suffix's) as text without delimiters."""
    from trl_resets.thoughts import strip_delimiter

    return [strip_delimiter(tokenizer.decode(row.completion_ids[a:b], skip_special_tokens=True), fmt)
            for a, b in row.thought_spans]


def method_credit(name: str, groups, tokenizer, fmt, rows: list[dict], policy):
    """Per prompt, per row: the per-token advantages ``name`` trains its rows with; and (repair replies that
    parsed and edited something, repair requests). The estimator sees the whole batch at once (the repair prompts
    go to the policy in one call, as in the trainer)."""
    _, estimator, key_name = CREDIT_METHODS[name]
    key = KEYS[key_name or "text"]
    flat, owners, advantages, base = [], [], [], []
    for p, result in enumerate(groups):
        rewards = torch.tensor([r.reward if r.weight > 0 else float("nan") for r in result.rows])
        advantages += group_advantages(rewards, torch.tensor([r.group for r in result.rows])).tolist()
        base.append([len(flat) + j for j, r in enumerate(result.rows) if r.group == 0])
        flat += result.rows
        owners += [p] * len(result.rows)
    texts = [row_thoughts(r, tokenizer, fmt) for r in flat]
    trajs = [Trajectory([key(t) for t in ts], r.thought_spans, len(r.completion_ids),
                        r.reward if r.weight > 0 else float("nan"), r.prefix_len) for r, ts in zip(flat, texts)]
    if estimator == "repair-exact":
        credit = batch_credit("uniform", trajs, advantages, base).token_advantages
        for members in base:
            edits = {n: edited_thoughts(trajs[i].keys, [key(t) for t in exact_correction(rows[owners[i]], texts[i])])
                     for n, i in enumerate(members) if trajs[i].valid and trajs[i].reward < 1.0 and trajs[i].keys}
            for i, values in zip(members, repair_credit([trajs[i] for i in members],
                                                        [advantages[i] for i in members], edits)):
                credit[i] = values
        repairs = [0, 0]
    else:
        result = batch_credit(estimator, trajs, advantages, base, texts=texts,
                              questions=[rows[p]["prompt"] for p in owners], key=key,
                              repairer=Repairer(max_new_tokens=64), policy=policy)
        credit, repairs = result.token_advantages, [result.repairs_used, result.repairs]
    sizes = [len(g.rows) for g in groups]
    starts = [sum(sizes[:p]) for p in range(len(sizes))]
    return [credit[start:start + size] for start, size in zip(starts, sizes)], repairs


def measure_methods(policy_dir: str, problems: int, seed: int, methods=tuple(CREDIT_METHODS)) -> dict:
    """Credit precision of each method on ``problems`` problems of the policy's task (see the module docstring)."""
    from experiments.testbed import TextPolicy, thought_format

    model, tokenizer = load_policy(policy_dir)
    fields = config_fields(policy_task(policy_dir))
    dataset = task_dataset(problems, seed=EVAL_SEED, task=policy_task(policy_dir))
    rows = [dict(zip(dataset.column_names, values)) for values in zip(*dataset.to_dict().values())]
    batches = {kind: build_rows(kind, model, tokenizer, fields, rows, seed)
               for kind in {CREDIT_METHODS[m][0] for m in methods}}
    fmt = thought_format(fields)
    results, signals = {}, {}  # signals: 1 - pi per token of each failed row, shared by the methods of one batch
    for name in methods:
        kind = CREDIT_METHODS[name][0]
        groups, contexts, sampler = batches[kind]
        credit, repairs = method_credit(name, groups, tokenizer, fmt, rows, TextPolicy(sampler))
        sums = dict.fromkeys(PARTS, 0.0)
        positive = failed = unlocated = 0
        for p, result in enumerate(groups):
            for j, (row, advantages) in enumerate(zip(result.rows, credit[p])):
                if row.weight == 0 or row.reward >= 1.0:
                    continue
                check = check_steps(rows[p], row_thoughts(row, tokenizer, fmt))
                if check.first_wrong is None:
                    unlocated += 1
                    continue
                failed += 1
                if (kind, p, j) not in signals:
                    probabilities = token_probabilities(model, contexts[p], row.completion_ids)
                    signals[kind, p, j] = [1.0 - q for q in probabilities]
                signal = signals[kind, p, j]
                negative = [max(-a, 0.0) * s for a, s in zip(advantages, signal)]
                positive += sum(max(a, 0.0) * s for a, s in zip(advantages, signal))
                for part, values in split_by_part(row.thought_spans, check.first_wrong, negative).items():
                    sums[part] += sum(values)
        total = sum(sums.values()) or 1.0
        results[name] = {
            "failed_rows": failed, "failed_without_checker_error": unlocated,
            "negative_share": {part: sums[part] / total for part in PARTS},
            "negative_per_failed_row": sum(sums.values()) / max(failed, 1),
            "positive_per_failed_row": positive / max(failed, 1),
            "repair_parse_rate": repairs[0] / repairs[1] if repairs[1] else None,
        }
    return results


def methods_table(results: dict) -> str:
    policies = list(results)
    lines = ["| method | " + " | ".join(f"{p}: prefix / first wrong / after (per failed row: - / +)" for p in policies)
             + " |", "|---|" + "---|" * len(policies)]
    for name in next(iter(results.values())):
        cells = []
        for p in policies:
            r = results[p][name]
            share = r["negative_share"]
            cell = (f"**{share['prefix']:.3f}** / {share['first_wrong']:.3f} / {share['after']:.3f} "
                    f"({r['negative_per_failed_row']:.2f} / {r['positive_per_failed_row']:.2f})")
            if r["repair_parse_rate"] is not None:
                cell += f", parsed {r['repair_parse_rate']:.2f}"
            cells.append(cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_methods(results: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    policies = list(results)
    names = list(next(iter(results.values())))
    fig, axes = plt.subplots(1, len(policies), figsize=(3.2 * len(policies), 4.2), sharey=True, squeeze=False)
    for ax, p in zip(axes[0], policies):
        bottom = [0.0] * len(names)
        for part in PARTS:
            shares = [results[p][n]["negative_share"][part] for n in names]
            ax.barh(names, shares, left=bottom, label=part)
            bottom = [b + s for b, s in zip(bottom, shares)]
        ax.set_title(p, fontsize=9)
        ax.set_xlabel("share of failed rows' negative update")
        ax.tick_params(axis="y", labelsize=7)
    axes[0][0].invert_yaxis()
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt(value, digits=3):
    return "-" if value is None else f"{value:.{digits}f}"


def table(results: dict) -> str:
    lines = [("| policy | accuracy | failed rollouts | clean prefix: tokens / signal | first wrong thought: tokens / "
              "signal | after it: tokens / signal | 1 - pi per token: prefix / first wrong / after / successes |"),
             "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        p = r["parts"]
        cells = [f"{_fmt(p[n]['token_share'])} / **{_fmt(p[n]['signal_share'])}**" if n == "prefix" else
                 f"{_fmt(p[n]['token_share'])} / {_fmt(p[n]['signal_share'])}" for n in PARTS]
        per_token = " / ".join(_fmt(p[n]["mean_signal_per_token"]) for n in (*PARTS, "success"))
        lines.append(f"| {name} | {r['accuracy']:.3f} | {r['failed']} | {' | '.join(cells)} | {per_token} |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    names = list(results)
    for k, part in enumerate(PARTS):
        shares = [results[n]["parts"][part]["signal_share"] or 0.0 for n in names]
        per_token = [results[n]["parts"][part]["mean_signal_per_token"] or 0.0 for n in names]
        offsets = [x + (k - 1) * 0.27 for x in range(len(names))]
        axes[0].bar(offsets, shares, width=0.27, label=part)
        axes[1].bar(offsets, per_token, width=0.27, label=part)
    for ax, label in ((axes[0], "share of failed rollouts' signal"), (axes[1], "mean 1 - pi(y_t) per token")):
        ax.set_xticks(range(len(names)), names, fontsize=8)
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def shipped_policies() -> list[str]:
    return [str(p) for p in sorted(TESTBED.glob("policy*")) if (p / "config.json").exists()]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policies", nargs="+", default=None, help="testbed policy folders (default: every shipped one)")
    parser.add_argument("--problems", type=int, default=128)
    parser.add_argument("--samples", type=int, default=4, help="rollouts per problem")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core CPU)")
    parser.add_argument("--method_problems", type=int, default=64, help="problems per policy for the method table")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--tag", default="", help="results name suffix")
    parser.add_argument("--out", default=None, help="results folder (default: experiments/results; --quick: a new "
                        "temporary folder)")
    opts = parser.parse_args()
    if opts.quick:
        opts.problems, opts.method_problems = 32, 32
    policies = opts.policies or shipped_policies()
    torch.set_num_threads(opts.threads)
    quiet()
    wall = time.perf_counter()
    results = {}
    for policy in policies:
        results[Path(policy).name] = measure(policy, opts.problems, opts.samples, opts.seed)
        print(f"{Path(policy).name}: {results[Path(policy).name]['failed']} failed rollouts measured", flush=True)
    methods = {}
    for policy in policies:
        methods[Path(policy).name] = measure_methods(policy, opts.method_problems, opts.seed)
        print(f"{Path(policy).name}: credit precision of {len(methods[Path(policy).name])} methods", flush=True)
    wall = time.perf_counter() - wall
    machine = machine_description(opts.threads)
    setting = f"{opts.problems} problems x {opts.samples} rollouts per policy, sampled at T=1, seed {opts.seed}"
    method_setting = (f"{opts.method_problems} problems per policy, 8 rows per prompt (GRPO 8, resets 4 + 1 x 4), "
                      f"sampled at T=1, seed {opts.seed}")
    text = table(results)
    headline = "clean prefix's share of failed rollouts' signal: " + ", ".join(
        f"{name} {r['parts']['prefix']['signal_share']:.3f}" for name, r in results.items())
    out = Path(opts.out or (tempfile.mkdtemp(prefix="trl-resets-credit_signal-") if opts.quick else RESULTS))
    out.mkdir(parents=True, exist_ok=True)
    suffix = (f"_{opts.tag}" if opts.tag else "") + ("_quick" if opts.quick else "")
    (out / f"credit_signal{suffix}.json").write_text(json.dumps(
        {"setting": setting, "method_setting": method_setting, "machine": machine, "wall_seconds": wall,
         "options": vars(opts), "results": results, "methods": methods}, indent=1) + "\n")
    method_text = methods_table(methods)
    (out / f"credit_signal{suffix}.md").write_text(
        f"# Where GRPO's credit lands in failed rollouts (testbed)\n\n{text}\n{headline}\n\n"
        f"{setting}; {machine}; wall {wall:.0f}s.\n\n![credit signal](credit_signal{suffix}.png)\n\n"
        f"## Credit precision per method\n\nShare of the failed rows' negative update (sum of max(-A_t, 0) (1 - pi)) "
        f"on the clean prefix (bold) / the first wrong thought / after it; in brackets the mean negative and "
        f"positive update per failed row.\n\n{method_text}\n{method_setting}.\n\n"
        f"![credit precision](credit_signal{suffix}_methods.png)\n")
    plot(results, out / f"credit_signal{suffix}.png", setting)
    plot_methods(methods, out / f"credit_signal{suffix}_methods.png", method_setting)
    print(text)
    print(method_text)
    print(f"{setting}; {machine}; wall {wall:.0f}s")
    print(headline)


if __name__ == "__main__":
    main()
