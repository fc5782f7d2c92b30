r"""Rewards for multiple-choice and yes/no answers given in a ``\boxed{}``.

CommonsenseQA and SciKnowEval ask for a letter, StrategyQA for yes or no.
Models box them in many ways (``\boxed{B}``, ``\boxed{(B)}``,
``\boxed{\text{B}}``, ``\boxed{B. a bank}``, ``\boxed{\textbf{Yes}}``); the
readers here accept those and nothing looser, so an answer that names no
option scores 0. A reference that is not a letter (or not yes/no) gives
``None``, which TRL leaves out of training.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from .math import check_lengths, completion_text, extract_boxed

_WRAPPER = re.compile(r"\\(?:text|textbf|textit|mathrm|mathbf|mathit|textsf|texttt)\s*\{([^{}]*)\}")
_LEAD_IN = re.compile(r"^(?:the\s+)?(?:final\s+)?(?:answer|option|choice)\s*(?:is)?\s*[:=]?\s*", re.IGNORECASE)
_LETTER = re.compile(r"^\(?([A-Za-z])\)?(?=$|[\s.:),\]-])")
_YES_NO = {"yes": True, "true": True, "no": False, "false": False}


def _plain(boxed: str) -> str:
    r"""Return boxed content without ``\text{}``-style wrappers, ``$`` and outer spaces."""
    previous = None
    while previous != boxed:
        previous, boxed = boxed, _WRAPPER.sub(r"\1", boxed)
    return boxed.replace("$", "").replace("\\", " ").strip()


def read_choice(text: str) -> str | None:
    r"""Return the option letter (upper case) that ``text`` names, or ``None``.

    ``B``, ``(B)``, ``B)``, ``B. a bank``, ``\text{B}`` and ``Answer: B`` all
    give ``"B"``. A lower-case letter counts only standing alone (``b``,
    ``(b)``, ``b.``), so a sentence that opens with the word "a" names no option.
    """
    plain = _LEAD_IN.sub("", _plain(text))
    match = _LETTER.match(plain)
    if match is None:
        return None
    letter = match.group(1)
    if letter.islower() and plain.strip("().").strip() != letter:
        return None
    return letter.upper()


def read_yes_no(text) -> bool | None:
    r"""Return ``True`` for yes/true, ``False`` for no/false (the first word, any case), else ``None``.

    Booleans pass through, so a StrategyQA ``answer`` column of bools is read as it is.
    """
    if isinstance(text, bool):
        return text
    if not isinstance(text, str):
        return None
    words = re.findall(r"[a-z]+", _LEAD_IN.sub("", _plain(text)).lower())
    return _YES_NO.get(words[0]) if words else None


def multiple_choice_reward(completions: Sequence, answer: Sequence, **kwargs) -> list[float | None]:
    r"""Return 1.0 per completion whose last ``\boxed{}`` names the option ``answer``, else 0.0.

    Args:
        completions: plain strings or conversational message lists, one per rollout.
        answer: the correct option letters (``"B"`` or ``"(B)"``), one per completion;
            one that is not a letter gives ``None``.
        **kwargs: other dataset columns, ignored.
    """
    check_lengths("multiple_choice_reward", completions, "answer", answer)
    rewards: list[float | None] = []
    for completion, reference in zip(completions, answer):
        gold = read_choice(str(reference)) if reference is not None else None
        if gold is None:
            rewards.append(None)
            continue
        boxed = extract_boxed(completion_text(completion))
        rewards.append(float(boxed is not None and read_choice(boxed) == gold))
    return rewards


def yes_no_reward(completions: Sequence, answer: Sequence, **kwargs) -> list[float | None]:
    r"""Return 1.0 per completion whose last ``\boxed{}`` says yes/no as ``answer`` does, else 0.0.

    Args:
        completions: plain strings or conversational message lists, one per rollout.
        answer: bools, or strings ``"yes"``/``"no"``/``"true"``/``"false"``, one per
            completion; anything else gives ``None``.
        **kwargs: other dataset columns, ignored.
    """
    check_lengths("yes_no_reward", completions, "answer", answer)
    rewards: list[float | None] = []
    for completion, reference in zip(completions, answer):
        gold = read_yes_no(reference)
        if gold is None:
            rewards.append(None)
            continue
        boxed = extract_boxed(completion_text(completion))
        rewards.append(float(boxed is not None and read_yes_no(boxed) is gold))
    return rewards
