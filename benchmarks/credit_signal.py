"""Where GRPO's uniform credit lands in a failed rollout, by the exact step checker (testbed policies).

    python benchmarks/credit_signal.py            # every shipped testbed policy, 128 problems x 4 samples
    python benchmarks/credit_signal.py --quick    # 32 problems each (under two minutes)
    python benchmarks/credit_signal.py --policies benchmarks/testbed/policy-fillers --tag fillers

GRPO gives every token of a failed rollout the same negative advantage. How much that moves a token is
the size of the gradient of log pi(y_t) with respect to the logits, which the paper (Appendix G) measures by
its factor 1 - pi(y_t): a token the policy was sure of gets almost no push, an unlikely one a large push. So
the tokens of the clean prefix (the thoughts before the checker's first wrong one) are only a problem for
GRPO, and masking them only helps SRPO, in proportion to the signal they carry.

For each policy: rollouts sampled at temperature 1 (the trainer's sampling), scored by `check_steps`, and for
each failed rollout the sum of 1 - pi(y_t) over the tokens of its clean prefix, its first wrong thought and
the thoughts after it. Reported: each part's share of the failed rollouts' tokens and of their signal, and the
mean 1 - pi per token (also for successful rollouts).

The last line is the headline: the clean prefix's share of the failed rollouts' signal, per policy.
Writes benchmarks/results/credit_signal.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.testbed import (
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
from trl_resets.tasks import check_steps

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
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--tag", default="", help="results name suffix")
    parser.add_argument("--out", default=str(RESULTS))
    opts = parser.parse_args()
    if opts.quick:
        opts.problems = 32
    policies = opts.policies or shipped_policies()
    torch.set_num_threads(opts.threads)
    quiet()
    wall = time.perf_counter()
    results = {}
    for policy in policies:
        results[Path(policy).name] = measure(policy, opts.problems, opts.samples, opts.seed)
        print(f"{Path(policy).name}: {results[Path(policy).name]['failed']} failed rollouts measured", flush=True)
    wall = time.perf_counter() - wall
    machine = machine_description(opts.threads)
    setting = f"{opts.problems} problems x {opts.samples} rollouts per policy, sampled at T=1, seed {opts.seed}"
    text = table(results)
    headline = "clean prefix's share of failed rollouts' signal: " + ", ".join(
        f"{name} {r['parts']['prefix']['signal_share']:.3f}" for name, r in results.items())
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    suffix = (f"_{opts.tag}" if opts.tag else "") + ("_quick" if opts.quick else "")
    (out / f"credit_signal{suffix}.json").write_text(json.dumps(
        {"setting": setting, "machine": machine, "wall_seconds": wall, "options": vars(opts), "results": results},
        indent=1) + "\n")
    (out / f"credit_signal{suffix}.md").write_text(
        f"# Where GRPO's credit lands in failed rollouts (testbed)\n\n{text}\n{headline}\n\n"
        f"{setting}; {machine}; wall {wall:.0f}s.\n\n![credit signal](credit_signal{suffix}.png)\n")
    plot(results, out / f"credit_signal{suffix}.png", setting)
    print(text)
    print(f"{setting}; {machine}; wall {wall:.0f}s")
    print(headline)


if __name__ == "__main__":
    main()
