r"""Final-answer rewards for tasks that box their answer.

:func:`boxed_answer_reward` checks the last ``\boxed{...}`` of a completion
against the row's reference answer with ``math-verify`` (its ``parse`` and
``verify``, as ``trl.rewards.accuracy_reward`` does), so ``\sqrt{8}`` matches
``2\sqrt{2}`` and ``0.5`` matches ``\frac{1}{2}``. A reference that
math-verify cannot parse gives ``None``: TRL turns it into NaN and leaves the
row out of the advantage, instead of teaching the model that every answer to
it is wrong.

:func:`arithmetic_reward` is the exact integer check of
:mod:`trl_resets.tasks.arithmetic`. The reward functions follow TRL's contract
``(completions, **dataset_columns) -> list[float | None]``.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Mapping, Sequence
from fractions import Fraction

logger = logging.getLogger(__name__)

BOXED_COMMAND = "\\boxed"
_THOUSANDS_COMMA = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_LATEX_SPACING = re.compile(r"\\[,;:! ]|\\quad|\\qquad")
_TEXT_WRAPPER = re.compile(r"^\\(?:text|mathrm|textbf|mathbf)\{(.*)\}$")
_PARSE_TIMEOUT_S = 5
_VERIFY_TIMEOUT_S = 5


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


def check_lengths(name: str, completions: Sequence, column: str, values: Sequence) -> None:
    """Refuse a reward call whose dataset column does not give one value per completion."""
    if len(completions) != len(values):
        raise ValueError(
            f"{name} got {len(completions)} completions but {len(values)} values in `{column}`; pass the "
            f"dataset's `{column}` column so there is one value per completion."
        )


# ---------------------------------------------------------------------------- math-verify


def _math_verify():
    """Return math-verify's ``parse`` and ``verify``, or say how to install it."""
    try:
        from math_verify import parse, verify
    except ImportError as error:
        raise ImportError(
            "boxed_answer_reward checks answers with math-verify, which is not installed; "
            "run `pip install 'trl-resets[math]'` (or `pip install math-verify`)."
        ) from error
    return parse, verify


def _timeouts() -> tuple[int | None, int | None]:
    """math-verify's timeouts use ``signal.alarm``, which only the main thread may set."""
    if threading.current_thread() is threading.main_thread():
        return _PARSE_TIMEOUT_S, _VERIFY_TIMEOUT_S
    return None, None


def parse_gold(reference) -> list:
    r"""Parse a reference answer with math-verify; an empty list when it cannot be parsed.

    A reference that carries its own math delimiters (a worked solution with a
    ``\boxed{}``, or ``$...$``) is parsed as it is; a bare answer such as
    ``2\sqrt{2}`` is read as LaTeX (math-verify would otherwise read only its
    leading ``2``).
    """
    if reference is None:
        return []
    parse, _ = _math_verify()
    text = str(reference).strip()
    if not text:
        return []
    if BOXED_COMMAND not in text and "$" not in text:
        text = f"${text}$"
    parse_timeout, _ = _timeouts()
    return parse(text, parsing_timeout=parse_timeout)


def _verify_boxed(boxed: str, gold: list) -> bool:
    """Say whether one boxed answer equals the parsed reference; unparseable output does not."""
    parse, verify = _math_verify()
    parse_timeout, verify_timeout = _timeouts()
    guess = parse(f"{BOXED_COMMAND}{{{boxed}}}", parsing_timeout=parse_timeout)
    return bool(guess) and verify(gold, guess, timeout_seconds=verify_timeout)


def boxed_answer_reward(completions: Sequence, answer: Sequence, **kwargs) -> list[float | None]:
    r"""Return 1.0 per completion whose last ``\boxed{}`` equals ``answer`` by math-verify, else 0.0.

    Each distinct reference is parsed once per call (the rollouts of one
    prompt share it). A reference math-verify cannot parse (or a missing one)
    gives ``None`` for its completions, and a warning names it.

    Args:
        completions: plain strings or conversational message lists, one per rollout.
        answer: the reference answers (the dataset's ``answer`` column), one per
            completion: a bare answer (``\frac{1}{2}``, ``32``) or a worked
            solution with a ``\boxed{}``.
        **kwargs: other dataset columns, ignored.
    """
    check_lengths("boxed_answer_reward", completions, "answer", answer)
    golds: dict[str, list] = {}
    rewards: list[float | None] = []
    for completion, reference in zip(completions, answer):
        key = "" if reference is None else str(reference)
        if key not in golds:
            golds[key] = parse_gold(reference)
            if not golds[key]:
                logger.warning("boxed_answer_reward: math-verify cannot parse the reference answer %r; its "
                               "completions get None (left out of training) until the dataset is fixed.", reference)
        if not golds[key]:
            rewards.append(None)
            continue
        boxed = extract_boxed(completion_text(completion))
        rewards.append(float(boxed is not None and boxed.strip() != "" and _verify_boxed(boxed, golds[key])))
    return rewards


# ---------------------------------------------------------------------------- exact integer answers


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
    """Return the exact value of an integer, decimal or ``a/b`` literal; ``None`` for anything else."""
    try:
        return Fraction(normalize_answer(text))
    except (ValueError, ZeroDivisionError):
        return None


def answers_match(predicted: str, reference: str) -> bool:
    r"""Say whether a boxed answer ``predicted`` is the number ``reference``, exactly.

    Hand-written rather than math-verify because the arithmetic task's step
    checker runs it on every thought of every rollout: a plain literal
    comparison is exact for its integer answers and costs microseconds, where
    a sympy parse costs milliseconds. An equation (``x = 5``) is compared by
    its right-hand side. Never raises: unparseable input simply does not match.
    """
    candidates = [predicted]
    if "=" in predicted:
        candidates.append(predicted.rsplit("=", 1)[1])
    return any(_literal_matches(candidate, reference) for candidate in candidates)


def _literal_matches(predicted: str, reference: str) -> bool:
    """Compare by normalized text, then by exact value."""
    if not normalize_answer(predicted):
        return False
    if normalize_answer(predicted) == normalize_answer(reference):
        return True
    predicted_value, reference_value = parse_number(predicted), parse_number(reference)
    return predicted_value is not None and predicted_value == reference_value


def arithmetic_reward(completions: Sequence, answer: Sequence, **kwargs) -> list[float]:
    r"""Return 1.0 per completion whose last ``\boxed{}`` is the integer ``answer``, else 0.0.

    The reward of :mod:`trl_resets.tasks.arithmetic` (see :func:`answers_match`).
    """
    check_lengths("arithmetic_reward", completions, "answer", answer)
    rewards = []
    for completion, reference in zip(completions, answer):
        if reference is None:
            raise ValueError("arithmetic_reward got answer=None; every arithmetic row has an integer `answer`.")
        boxed = extract_boxed(completion_text(completion))
        rewards.append(float(boxed is not None and answers_match(boxed, str(reference))))
    return rewards
