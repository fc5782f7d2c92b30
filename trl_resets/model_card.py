"""The reset-specific part of a trained model's card.

TRL's model-card machinery (``create_model_card`` of its trainers) writes the card: base model,
trainer name and tags, the paper's BibTeX, framework versions. `ResetTrainer.create_model_card`
calls it and then adds one section built here, which names the method, cites the paper, gives
the group split and the localizer, and lists the run's headline metrics.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

from .metrics import PREFIX

# The paper, as TRL's model card cites it (trainer._paper).
PAPER = {
    "title": "Credit Assignment with Resets in Language Model Reasoning",
    "id": None,
    "citation": textwrap.dedent("""\
        @article{samanta2026resets,
            title  = {{Credit Assignment with Resets in Language Model Reasoning}},
            author = {Ankur Samanta and Akshayaa Magesh and Ayush Jain and Youliang Yu and Daniel Jiang and Kavosh Asadi and Kaveh Hassani and Paul Sajda and Jalaj Bhandari and Yonathan Efroni},
            year   = 2026,
        }"""),
}

SECTION_TITLE = "## Reset-based credit assignment"
METHODS = {
    "SRPO": "Self-Reset Policy Optimization: the policy names the first wrong thought of a failed rollout itself",
    "RRPO": "Random-Reset Policy Optimization: the reset thought is drawn uniformly from the failed rollout",
    "GRPO": "GRPO baseline with the same thought sampler (no resets, k=0)",
}
HEADLINE_KEYS = (
    "reward",
    PREFIX + "base_pass_rate",
    PREFIX + "sp_pass_rate",
    PREFIX + "reset_index_mean",
    PREFIX + "reset_depth_mean",
    PREFIX + "parse_failure_rate",
    PREFIX + "fallback_rate",
    PREFIX + "grad_signal_ratio",
    PREFIX + "reset_age",  # pipelined resets only
    PREFIX + "dropped_states",
)


def finite_number(value) -> bool:
    """A real number that is not NaN or infinite (log values may be None, NaN or a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def headline_metrics(log_history: Sequence[Mapping], keys: Sequence[str] = HEADLINE_KEYS) -> dict[str, dict]:
    """For each key logged during training: its last finite value, its mean over steps, and how many steps had it.

    Only training log entries count (those with a ``loss``); NaN and missing values are skipped.
    """
    entries = [e for e in log_history if "loss" in e]
    out = {}
    for key in keys:
        values = [e[key] for e in entries if finite_number(e.get(key))]
        if values:
            out[key] = {"last": values[-1], "mean": sum(values) / len(values), "steps": len(values)}
    return out


def method_name(trainer_name: str, num_reset_prefixes: int) -> str:
    """The method a run trained: k=0 is the GRPO baseline whatever the trainer class."""
    return "GRPO" if num_reset_prefixes == 0 else trainer_name


def split_name(num_base: int, num_prefixes: int, num_per_prefix: int) -> str:
    if num_prefixes == 0:
        return f"GRPO, {num_base} rollouts per prompt"
    return f"{num_prefixes}x{num_per_prefix} with {num_base} base rollouts ({num_base + num_prefixes * num_per_prefix} per prompt)"


def reset_card_section(
    method: str,
    split: str,
    localizer: str | None,
    metrics: Mapping[str, Mapping],
    paper: Mapping,
    dataset: str | None = None,
    steps: int | None = None,
) -> str:
    """Markdown for the card: method, paper, split, localizer, dataset and a metrics table."""
    if not method:
        raise ValueError("the model card needs the method name (SRPO, RRPO or GRPO).")
    lines = [SECTION_TITLE, ""]
    summary = METHODS.get(method, method)
    lines.append(f"Trained with **{method}** ({summary}), implemented in "
                 "the `trl-resets` package on top of TRL's `GRPOTrainer`.")
    if paper.get("title"):
        lines.append(f"The method comes from *{paper['title']}* (Samanta et al., 2026); see the citation below.")
    lines += ["", "| setting | value |", "|---|---|", f"| method | {method} |", f"| group split | {split} |"]
    lines.append(f"| localizer | {localizer if localizer and method != 'GRPO' else 'none (no resets)'} |")
    if dataset:
        lines.append(f"| training data | {dataset} |")
    if steps is not None:
        lines.append(f"| optimizer steps | {steps} |")
    lines.append("")
    if metrics:
        lines += ["### Headline metrics", "", "| metric | last step | mean over steps |", "|---|---|---|"]
        for key, stats in metrics.items():
            lines.append(f"| `{key}` | {stats['last']:.4g} | {stats['mean']:.4g} |")
    else:
        lines.append("No training step was logged, so the card carries no metrics.")
    return "\n".join(lines) + "\n"


def insert_section(card_text: str, section: str) -> str:
    """Put ``section`` before the card's framework-versions heading (or at its end), replacing an older copy."""
    if SECTION_TITLE in card_text:
        start = card_text.index(SECTION_TITLE)
        rest = card_text[start + len(SECTION_TITLE):]
        following = [i for i in (rest.find("\n## "), rest.find("\n### Framework")) if i >= 0]
        end = start + len(SECTION_TITLE) + (min(following) + 1 if following else len(rest))
        card_text = card_text[:start] + card_text[end:]
    for anchor in ("### Framework versions", "## Citations"):
        if anchor in card_text:
            at = card_text.index(anchor)
            return card_text[:at] + section + "\n" + card_text[at:]
    return card_text.rstrip("\n") + "\n\n" + section


def name_unknown_references(card_text: str, base_model: str | None, model_ref: str | None) -> str:
    """Fill the placeholders TRL's card leaves when the base model is a local folder or nothing was pushed.

    TRL links the base model only when it is a hub id, and writes the hub id of the trained model into
    the quick start; both read "None" otherwise.
    """
    if base_model:
        card_text = card_text.replace("fine-tuned version of [None](https://huggingface.co/None)",
                                      f"fine-tuned version of `{base_model}`")
    if model_ref:
        card_text = card_text.replace('model="None"', f'model="{model_ref}"')
    return card_text


def add_reset_section(card_path: str | Path, trainer, dataset_name: str | None = None) -> str:
    """Add the reset section for ``trainer``'s run to the card at ``card_path``; returns the new text."""
    args = trainer.args
    method = method_name(trainer._name, args.num_reset_prefixes)
    split = split_name(args.num_base_generations, args.num_reset_prefixes, args.num_reset_generations)
    if getattr(args, "base_group", "algorithm2") == "iid" and args.num_base_generations and args.num_reset_prefixes:
        split += ", iid base group (the first draws, the seed among them)"
    lag = getattr(args, "reset_lag", 0)
    if lag and args.num_reset_prefixes:
        split += (f", pipelined resets: suffixes sampled {lag} generation(s) after their seed, from the queue's "
                  f"oldest states (dropped after {args.reset_max_age})")
    localizer = getattr(trainer.localizer, "name", type(trainer.localizer).__name__)
    section = reset_card_section(
        method, split, localizer, headline_metrics(trainer.state.log_history), trainer._paper,
        dataset=dataset_name or getattr(trainer, "training_data_label", None), steps=trainer.state.global_step,
    )
    path = Path(card_path)
    base = getattr(trainer, "base_model_label", None) or Path(str(trainer.model.config._name_or_path)).name or None
    text = name_unknown_references(path.read_text(), base, trainer.hub_model_id or str(path.parent))
    text = insert_section(text, section)
    path.write_text(text)
    return text
