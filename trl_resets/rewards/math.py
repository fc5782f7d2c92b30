r"""Final-answer rewards for math-style tasks that box their answer.

A completion earns 1.0 when its last ``\boxed{...}`` matches the reference
answer and 0.0 otherwise. Matching tries, in order: exact text after light
normalization, exact numeric value, and (when the ``math-verify`` package is
installed) symbolic equivalence of LaTeX expressions. The reward functions
follow TRL's contract ``(completions, **dataset_columns) -> list[float]``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from fractions import Fraction

BOXED_COMMAND = "\\boxed"
_THOUSANDS_COMMA = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_LATEX_SPACING = re.compile(r"\\[,;:! ]|\\quad|\\qquad")
_TEXT_WRAPPER = re.compile(r"^\\(?:text|mathrm|textbf|mathbf)\{(.*)\}$")
_FRACTION = re.compile(r"^(-?)\\[dt]?frac\{(-?\d+)\}\{(-?\d+)\}$")


def extract_boxed(text: str) -> str | None:
    r"""Return the content of the last ``\boxed{...}`` in ``text``.

    Braces inside the box are balanced, so ``\boxed{\frac{1}{2}}`` gives
    ``\frac{1}{2}``; escaped braces (``\{``) do not count. Returns ``None``
    when there is no box, or when the last box is never closed (a truncated
    completion has no readable final answer, even if an earlier box does).
    """
    start = text.rfind(BOXED_COMMAND)
    while start != -1 and not _opens_box(text, start):
        start = text.rfind(BOXED_COMMAND, 0, start)
    if start == -1:
        return None
    brace = text.index("{", start + len(BOXED_COMMAND))
    return _balanced_content(text, brace)


def _opens_box(text: str, start: int) -> bool:
    r"""Say whether ``\boxed`` at ``start`` is followed (after spaces) by ``{``."""
    rest = text[start + len(BOXED_COMMAND):].lstrip()
    return rest.startswith("{")


def _balanced_content(text: str, brace: int) -> str | None:
    """Return the text between ``text[brace]`` ('{') and its matching '}'."""
    depth, i = 0, brace
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 2
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[brace + 1:i]
        i += 1
    return None


def normalize_answer(answer: str) -> str:
    r"""Return ``answer`` without spacing, ``$``, thousands commas or a final period.

    ``\text{...}`` wrappers are removed and a unicode minus becomes ``-``, so
    ``\text{ 1,200. }`` becomes ``1200``.
    """
    text = _LATEX_SPACING.sub("", answer.strip())
    text = text.replace("$", "").replace("\u2212", "-")
    wrapped = _TEXT_WRAPPER.match(text.strip())
    if wrapped:
        text = wrapped.group(1)
    text = _THOUSANDS_COMMA.sub("", "".join(text.split()))
    return text.rstrip(".")


def parse_number(text: str) -> Fraction | None:
    r"""Return the exact value of an integer, decimal, ``a/b`` or ``\frac{a}{b}``.

    Returns ``None`` for anything else, including garbage and division by zero.
    """
    normalized = normalize_answer(text)
    fraction = _FRACTION.match(normalized)
    if fraction:
        sign, numerator, denominator = fraction.groups()
        normalized = f"{sign}{numerator}/{denominator}"
    try:
        return Fraction(normalized)
    except (ValueError, ZeroDivisionError):
        return None


def answers_match(predicted: str, reference: str) -> bool:
    r"""Say whether a boxed answer ``predicted`` equals ``reference``.

    A prediction written as an equation (``x = 5``) is also compared by its
    right-hand side. Never raises: unparseable input simply does not match.
    """
    candidates = [predicted]
    if "=" in predicted:
        candidates.append(predicted.rsplit("=", 1)[1])
    return any(_single_answer_matches(candidate, reference) for candidate in candidates)


def _single_answer_matches(predicted: str, reference: str) -> bool:
    """Compare by normalized text, then by value, then with math-verify."""
    if not normalize_answer(predicted):
        return False
    if normalize_answer(predicted) == normalize_answer(reference):
        return True
    predicted_value, reference_value = parse_number(predicted), parse_number(reference)
    if predicted_value is not None and reference_value is not None:
        return predicted_value == reference_value
    return _math_verify_match(predicted, reference)


def _math_verify_match(predicted: str, reference: str) -> bool:
    """Symbolic comparison with math-verify; ``False`` if it is missing or fails."""
    try:
        from math_verify import parse, verify
    except ImportError:
        return False
    try:
        gold, guess = parse(f"${reference}$"), parse(f"${predicted}$")
        return bool(gold and guess and verify(gold, guess))
    except Exception:  # noqa: BLE001 - arbitrary model output; any failure means "no match"
        return False


def completion_text(completion: str | Sequence[Mapping]) -> str:
    """Return the text of a plain or conversational TRL completion.

    Conversational completions are lists of messages such as
    ``[{"role": "assistant", "content": "..."}]``; the contents of all
    assistant messages are joined. Content given as a list of parts
    (``{"type": "text", "text": ...}``) is joined too.
    """
    if isinstance(completion, str):
        return completion
    if not isinstance(completion, Sequence):
        raise TypeError(
            f"A completion must be a string or a list of chat messages, got "
            f"{type(completion).__name__}: {completion!r:.80}."
        )
    texts = [_message_text(message) for message in completion if _is_assistant(message)]
    return "\n".join(texts)


def _is_assistant(message: Mapping) -> bool:
    """Say whether a chat message was written by the model."""
    if not isinstance(message, Mapping):
        raise TypeError(
            f"A conversational completion must be a list of dicts with 'role' and "
            f"'content', but one message is {type(message).__name__}: {message!r:.80}."
        )
    return message.get("role", "assistant") == "assistant"


def _message_text(message: Mapping) -> str:
    """Return a message's content as one string."""
    content = message.get("content") or ""
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if isinstance(part, Mapping))


def boxed_answer_reward(completions: Sequence, answer: Sequence, **kwargs) -> list[float]:
    r"""Return 1.0 per completion whose last ``\boxed{}`` matches ``answer``, else 0.0.

    Args:
        completions: plain strings or conversational message lists, one per rollout.
        answer: the reference answers (the dataset's ``answer`` column), one
            per completion. Non-string answers (e.g. ints) are converted with ``str``.
        **kwargs: other dataset columns, ignored.
    """
    if len(completions) != len(answer):
        raise ValueError(
            f"boxed_answer_reward got {len(completions)} completions but {len(answer)} "
            "answers; pass the dataset's `answer` column so there is one answer per completion."
        )
    return [_score(completion, reference) for completion, reference in zip(completions, answer)]


def _score(completion, reference) -> float:
    """Score one completion against one reference answer."""
    if reference is None:
        raise ValueError(
            "boxed_answer_reward got answer=None; every dataset row needs a reference "
            "answer in its `answer` column."
        )
    boxed = extract_boxed(completion_text(completion))
    return float(boxed is not None and answers_match(boxed, str(reference)))


arithmetic_reward = boxed_answer_reward
"""Reward for :mod:`trl_resets.tasks.arithmetic`, whose answers are integers."""
