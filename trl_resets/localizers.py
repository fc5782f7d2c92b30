"""Localizers: who picks the reset index h* of a failed seed.

A localizer answers, for each seed, the 1-based index of its first wrong thought. The reset
algorithm checks every answer: one that is missing or outside ``1..H_s`` becomes a uniform random
reset and is counted as a parse failure, so a garbled reply never stops training.
"""

from __future__ import annotations

import inspect
import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

# Our own wording of the paper's self-localization instruction (Appendix D).
DEFAULT_LOCALIZATION_TEMPLATE = (
    "Below is a problem and your earlier step-by-step solution to it. The solution's final answer is "
    "wrong, so at least one step is wrong.\n\n"
    "Problem: {question}\n\n"
    "Your solution:\n{steps}\n\n"
    "Find the step where the solution first went wrong: the step whose claim cannot be justified "
    "from the problem and the steps before it. Look for the step where the mistake was made (a "
    "misreading, an unfounded assumption, a faulty calculation or inference), not the later step "
    "where its effect shows. Do not solve the problem again.\n"
    "Answer with exactly one step number between 1 and {num_steps}. End your reply with that number "
    "as \\boxed{{N}} on its own line and write nothing after it."
)

# The same for a program that fails the problem's tests (answer_format="code").
CODE_LOCALIZATION_TEMPLATE = (
    "Below is a programming problem and your earlier step-by-step solution to it. The program in its last step "
    "fails some of the problem's tests, so at least one step is wrong.\n\n"
    "Problem: {question}\n\n"
    "Your solution:\n{steps}\n\n"
    "Find the step where the solution first went wrong: the step whose claim or code cannot be justified from the "
    "problem and the steps before it. Look for the step where the mistake was made (a misread requirement or "
    "input format, a wrong idea for the algorithm, a missed edge case, a bug in the code), not the later step "
    "where its effect shows. Do not write the program again.\n"
    "Answer with exactly one step number between 1 and {num_steps}. End your reply with that number "
    "as \\boxed{{N}} on its own line and write nothing after it."
)


@dataclass
class LocalizationRequest:
    """A failed seed shown to a localizer: the question and the seed's thoughts (delimiters removed).

    ``row`` holds the prompt's dataset columns when the trainer has them (the answer, a reference
    solution): an oracle localizer grades the seed against it; the policy never sees it.

    ``rng`` is the generator of the prompt the seed came from, keyed by the run's seed, the generation and
    the prompt's index in the global batch (not by process), so a run draws the same resets on one process
    as on eight. Localizers that draw at random draw from it (the ``rng`` handed to ``locate`` is used only
    when a request has none).
    """

    question: str
    thoughts: list[str]
    row: Mapping | None = None
    rng: random.Random | None = None

    @property
    def num_steps(self) -> int:
        return len(self.thoughts)


@dataclass
class Localization:
    """A localizer's answer: ``index`` is the 1-based first wrong thought, or None when it gave none."""

    index: int | None
    tokens: int = 0
    reply: str | None = None


class TextPolicy(Protocol):
    """The current policy as a text-in, text-out function, for localizers that query it."""

    def complete(self, prompts: list[str], max_new_tokens: int, temperature: float) -> list[tuple[str, int]]:
        """One reply per prompt, with the number of tokens it took."""
        ...


class Localizer(Protocol):
    name: str

    def locate(
        self, requests: list[LocalizationRequest], policy: TextPolicy | None, rng: random.Random
    ) -> list[Localization]:
        ...


def render_steps(thoughts: Sequence[str]) -> str:
    return "\n".join(f"Step {i}: {text}" for i, text in enumerate(thoughts, start=1))


def localization_prompt(request: LocalizationRequest, template: str = DEFAULT_LOCALIZATION_TEMPLATE) -> str:
    try:
        return template.format(
            question=request.question, steps=render_steps(request.thoughts), num_steps=request.num_steps
        )
    except (KeyError, IndexError) as err:
        raise ValueError(
            f"localization template has an unknown placeholder {err}; it may use {{question}}, {{steps}} "
            "and {num_steps} (write literal braces as {{ and }})."
        ) from None


_BOXED_CONTENT = re.compile(r"\\boxed\s*\{([^{}]*)\}")
_STEP_NUMBER = re.compile(r"^\s*(?:step\s*)?(\d+)\s*\.?\s*$", re.IGNORECASE)


def parse_step_index(reply: str | None, num_steps: int) -> int | None:
    """The step number in the reply's last ``\\boxed{N}``, or None when absent or outside 1..num_steps."""
    if not reply:
        return None
    boxes = _BOXED_CONTENT.findall(reply)
    if not boxes:
        return None
    match = _STEP_NUMBER.match(boxes[-1])
    if not match:
        return None
    index = int(match.group(1))
    return index if 1 <= index <= num_steps else None


def resolve_reset_index(localization: Localization, num_thoughts: int, rng: random.Random) -> tuple[int, bool]:
    """The reset index to use and whether the localizer's answer had to be replaced by a random one."""
    index = localization.index
    if isinstance(index, int) and not isinstance(index, bool) and 1 <= index <= num_thoughts:
        return index, False
    return rng.randint(1, num_thoughts), True


class RandomLocalizer:
    """RRPO: h* uniform over the seed's thoughts."""

    name = "random"
    uses_policy = False  # answers without querying the policy: a scheduler may call it one seed at a time

    def locate(self, requests, policy=None, rng=None) -> list[Localization]:
        rng = rng or random.Random()
        return [Localization((r.rng or rng).randint(1, max(r.num_steps, 1))) for r in requests]


class SelfLocalizer:
    """SRPO: the current policy reads its failed chain and names the first wrong step as ``\\boxed{N}``.

    Called through ``locate``, all requests go to the policy in one batched call; a scheduler that decodes the
    replies among the rollouts (`scheduler.run_overlapped`) uses ``prompts`` and ``read`` instead.
    """

    name = "self"

    def __init__(
        self,
        template: str = DEFAULT_LOCALIZATION_TEMPLATE,
        max_new_tokens: int = 32,
        temperature: float = 0.0,
    ):
        localization_prompt(LocalizationRequest("q", ["s"]), template)  # fail early on a broken template
        self.template = template
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature

    def locate(self, requests, policy=None, rng=None) -> list[Localization]:
        if policy is None:
            raise ValueError("SelfLocalizer needs the policy to query; the trainer passes it in.")
        return self.read(requests, policy.complete(self.prompts(requests), self.max_new_tokens, self.temperature))

    def prompts(self, requests: list[LocalizationRequest]) -> list[str]:
        """The text the policy is asked, one prompt per request (a scheduler decodes the replies itself)."""
        return [localization_prompt(r, self.template) for r in requests]

    def read(self, requests: list[LocalizationRequest], replies: list[tuple[str, int]]) -> list[Localization]:
        """The answers in the policy's replies (text, tokens), one per request."""
        return [Localization(parse_step_index(text, r.num_steps), tokens, text) for r, (text, tokens) in
                zip(requests, replies)]


class CallableLocalizer:
    """Any function ``fn(question, thoughts) -> int`` (a PRM, an oracle, environment feedback).

    Return values that are not an integer step number count as failures and become random resets.
    """

    def __init__(self, fn: Callable[[str, list[str]], object], name: str | None = None):
        if not callable(fn):
            raise TypeError(f"localizer must be callable or have a .locate method, got {type(fn).__name__}.")
        self.fn = fn
        self.name = name or getattr(fn, "__name__", "callable")
        self.uses_policy = False

    def locate(self, requests, policy=None, rng=None) -> list[Localization]:
        return [Localization(_as_index(self.fn(r.question, list(r.thoughts)))) for r in requests]


_ORACLE_CHECKER: Callable[[Mapping, list[str]], int | None] | None = None


def register_oracle_checker(checker: Callable[[Mapping, list[str]], int | None]) -> None:
    """Make ``checker(row, thoughts) -> first wrong step`` the default of `OracleLocalizer` (``localizer="oracle"``)."""
    global _ORACLE_CHECKER
    if not callable(checker):
        raise TypeError(f"checker must be callable, got {type(checker).__name__}.")
    _ORACLE_CHECKER = checker


class OracleLocalizer:
    """The credit-assignment oracle made real: h* is the first wrong thought according to an exact checker.

    ``checker(row, thoughts)`` gets the prompt's dataset columns and the seed's thoughts and returns the
    1-based first wrong thought, or None when it finds none. The default is the checker a task registered with
    `register_oracle_checker` (the arithmetic task registers its step checker, :func:`trl_resets.tasks.check_steps`).
    A chain whose thoughts are all right but that
    stops before the answer (the checker says ``H_s + 1``) resets at its last thought. When the checker
    finds no error the answer counts as a failure and the reset is random, like any unusable answer.
    """

    name = "oracle"
    uses_policy = False

    def __init__(self, checker: Callable[[Mapping, list[str]], int | None] | None = None):
        if checker is not None and not callable(checker):
            raise TypeError(f"checker must be callable, got {type(checker).__name__}.")
        self.checker = checker

    def _first_wrong(self, row: Mapping, thoughts: list[str]) -> int | None:
        if self.checker is not None:
            return _as_index(self.checker(row, thoughts))
        if _ORACLE_CHECKER is None:
            raise ValueError("OracleLocalizer has no checker: pass checker=(row, thoughts) -> first wrong step, or "
                             "import a task that registers one (trl_resets.tasks.arithmetic).")
        return _as_index(_ORACLE_CHECKER(row, thoughts))

    def locate(self, requests, policy=None, rng=None) -> list[Localization]:
        answers = []
        for request in requests:
            if request.row is None:
                raise ValueError(
                    "OracleLocalizer needs the prompt's dataset row (answer, reference steps) with each request; "
                    "the trainers pass it, a direct caller must set LocalizationRequest.row."
                )
            index = self._first_wrong(request.row, list(request.thoughts))
            if index is not None and index > request.num_steps >= 1:
                index = request.num_steps
            answers.append(Localization(index, 0, None if index is None else f"\\boxed{{{index}}}"))
        return answers


def _as_index(value) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    return None


def as_localizer(obj, default: str = "self", **self_kwargs) -> Localizer:
    """Turns the trainer's ``localizer=`` argument (None, a name, an object, or a callable) into a Localizer."""
    if obj is None:
        obj = default
    if isinstance(obj, str):
        if obj == "self":
            return SelfLocalizer(**self_kwargs)
        if obj == "random":
            return RandomLocalizer()
        if obj == "oracle":
            return OracleLocalizer()
        raise ValueError(
            f"unknown localizer {obj!r}; use 'self', 'random', 'oracle' (the arithmetic task's step checker), a "
            "Localizer object or a callable."
        )
    if hasattr(obj, "locate"):
        check_localizer(obj)
        return obj
    if callable(obj) and not _can_call(obj, "", []):
        raise TypeError(
            f"localizer={_called(obj)}: a function localizer is called as fn(question, thoughts) and returns the "
            "1-based first wrong thought; give it those two parameters, or pass an object with "
            "locate(requests, policy, rng) (see trl_resets.localizers.Localizer)."
        )
    return CallableLocalizer(obj)


def _can_call(fn, *args) -> bool:
    try:
        inspect.signature(fn).bind(*args)
    except TypeError:
        return False
    except ValueError:  # no signature to read (a builtin): taken as it is
        return True
    return True


def _called(obj) -> str:
    name = getattr(obj, "__qualname__", None) or type(obj).__name__
    try:
        return f"{name}{inspect.signature(obj)}"
    except (TypeError, ValueError):
        return name


def check_localizer(obj) -> None:
    """Fails unless ``obj`` follows the `Localizer` interface: a ``name`` (a str, used in errors and the model
    card) and a method ``locate(requests, policy, rng)`` returning one `Localization` (or None) per request."""
    kind = type(obj).__name__
    locate = obj.locate
    fix = ("Define `name = '...'` and `def locate(self, requests, policy=None, rng=None)` returning one Localization "
           "per request (see trl_resets.localizers.Localizer), or pass a function fn(question, thoughts).")
    if not callable(locate):
        raise TypeError(f"localizer {kind}: its locate is a {type(locate).__name__}, not a method. {fix}")
    if not _can_call(locate, [], None, None):
        raise TypeError(f"localizer {kind}: {_called(locate)} cannot be called as locate(requests, policy, rng). "
                        f"{fix}")
    if not isinstance(getattr(obj, "name", None), str):
        raise TypeError(f"localizer {kind}: its name is {getattr(obj, 'name', None)!r}, not a str. {fix}")
