"""The thought MDP: prompt template, thought segmentation, caps and final-answer detection.

A rollout is a sequence of thoughts. A thought ends at the delimiter (``</thought>`` by
default, or a blank line in paragraph mode) or when it reaches ``max_thought_tokens``.
A rollout ends at EOS, after the thought that completes its final answer (a closed ``\\boxed{...}`` in that
thought for math, ``answer="boxed"``; a closed fenced code block in the rollout for programs, ``answer="code"``),
after ``max_thoughts`` thoughts, or when it reaches its token budget.

`ThoughtTracker` makes these decisions one token at a time, so the same code runs inside a
decoding loop (as a stopping criterion) and after the fact (`segment_thoughts`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

DEFAULT_DELIMITER = "</thought>"
PARAGRAPH_BREAK = "\n\n"

# Our own wording of the paper's thought-by-thought rollout instruction (Appendix D).
DEFAULT_ROLLOUT_TEMPLATE = (
    "Solve the problem below one reasoning step at a time. Write only the next single step: one "
    "observation, calculation or deduction that moves toward the answer, follows from the steps "
    "before it, and is more than filler. Close every step with {delimiter}.\n"
    "When a step reaches the final answer, write it as \\boxed{{answer}} and close that step with "
    "{delimiter}.\n\n"
    "Problem: {question}"
)

# The same instruction for programming problems: the program comes last, whole, in one fenced block (a rollout
# ends at a closed code block, never at a box).
CODE_ROLLOUT_TEMPLATE = (
    "Solve the programming problem below one reasoning step at a time. Write only the next single step: one "
    "observation about the problem, one idea for the algorithm, or one check of it on an example, that follows "
    "from the steps before it and is more than filler. Close every step with {delimiter}.\n"
    "In the last step, write the complete program in a single fenced Python code block (```python ... ```) and "
    "close that step with {delimiter}.\n\n"
    "Problem: {question}"
)
ANSWER_FORMATS = ("boxed", "code")

# Why a rollout stopped.
STOP_EOS = "eos"
STOP_ANSWER = "answer"
STOP_MAX_THOUGHTS = "max_thoughts"
STOP_MAX_TOKENS = "max_tokens"
STOP_NONE = "unfinished"


@dataclass(frozen=True)
class ThoughtFormat:
    """How rollouts are cut into thoughts and where they stop.

    Args:
        delimiter: text that closes a thought in ``"delimiter"`` mode.
        split: ``"delimiter"`` (thoughts end at ``delimiter``) or ``"paragraph"`` (thoughts end
            at a blank line, for models that never write the delimiter).
        max_thoughts: thoughts per rollout, counting those of a reset prefix.
        max_thought_tokens: tokens per thought; a longer thought is cut and the next begins.
        max_completion_tokens: tokens per response, counting those of a reset prefix.
        answer: what ends a rollout as answered: ``"boxed"`` (a thought holding a closed ``\\boxed{...}``) or
            ``"code"`` (a closed fenced code block, the program).
    """

    delimiter: str = DEFAULT_DELIMITER
    split: str = "delimiter"
    max_thoughts: int = 20
    max_thought_tokens: int = 256
    max_completion_tokens: int = 4096
    answer: str = "boxed"

    def __post_init__(self):
        if self.split not in ("delimiter", "paragraph"):
            raise ValueError(f"thought split must be 'delimiter' or 'paragraph', got {self.split!r}.")
        if self.answer not in ANSWER_FORMATS:
            raise ValueError(f"answer format must be one of {list(ANSWER_FORMATS)}, got {self.answer!r}.")
        if self.split == "delimiter" and not self.delimiter:
            raise ValueError("thought_delimiter is empty; give a delimiter or use thought_split='paragraph'.")
        for name in ("max_thoughts", "max_thought_tokens", "max_completion_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}.")

    @property
    def boundary(self) -> str:
        return self.delimiter if self.split == "delimiter" else PARAGRAPH_BREAK


def wrap_question(question: str, template: str = DEFAULT_ROLLOUT_TEMPLATE, delimiter: str = DEFAULT_DELIMITER) -> str:
    """The rollout prompt for one question."""
    try:
        return template.format(question=question, delimiter=delimiter)
    except (KeyError, IndexError) as err:
        raise ValueError(
            f"rollout template has an unknown placeholder {err}; it may use only {{question}} and "
            "{delimiter} (write literal braces as {{ and }})."
        ) from None


def wrap_prompt(prompt, template: str | None, delimiter: str = DEFAULT_DELIMITER):
    """A dataset prompt (text, or a conversation whose last message is the question) in the rollout template;
    unchanged with no template."""
    if template is None:
        return prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], dict):
        last = prompt[-1]
        return prompt[:-1] + [{**last, "content": wrap_question(last["content"], template, delimiter)}]
    return wrap_question(prompt, template, delimiter)


_BOXED = re.compile(r"\\boxed\s*\{")
_CODE_BLOCK = re.compile(r"```[^\n`]*\n.*?```", re.DOTALL)


def contains_code_block(text: str) -> bool:
    """True when ``text`` holds a fenced code block that is closed (an opening fence line, then a closing fence)."""
    return _CODE_BLOCK.search(text) is not None


def contains_final_answer(text: str) -> bool:
    """True when ``text`` holds a closed ``\\boxed{...}``."""
    for match in _BOXED.finditer(text):
        depth = 1
        for char in text[match.end():]:
            depth += (char == "{") - (char == "}")
            if depth == 0:
                return True
    return False


def strip_delimiter(thought: str, fmt: ThoughtFormat) -> str:
    """The thought's text without its closing delimiter, for display in prompts."""
    text = thought.strip()
    if fmt.split == "delimiter" and text.endswith(fmt.delimiter):
        text = text[: -len(fmt.delimiter)]
    return text.strip()


@dataclass
class ThoughtTracker:
    """Follows one rollout token by token and decides where thoughts end and when to stop.

    Args:
        fmt: the thought format.
        decode: token ids -> text.
        eos_ids: tokens that end the rollout.
        start_thoughts: thoughts already in the context (a reset prefix counts toward the caps).
        token_budget: tokens this rollout may still generate.
    """

    fmt: ThoughtFormat
    decode: Callable[[Sequence[int]], str]
    eos_ids: frozenset
    start_thoughts: int = 0
    token_budget: int | None = None
    tokens: list = field(default_factory=list)
    spans: list = field(default_factory=list)
    stop_reason: str | None = None
    _thought_start: int = 0

    def __post_init__(self):
        if self.token_budget is None:
            self.token_budget = self.fmt.max_completion_tokens
        # tokens to decode when looking for the boundary: a token spells at least one UTF-8 byte of it
        self._window = len(self.fmt.boundary.encode("utf-8")) + 2

    @property
    def done(self) -> bool:
        return self.stop_reason is not None

    def push(self, token_id: int) -> bool:
        """Feed the next sampled token; returns True once the rollout is finished."""
        if self.done:
            return True
        self.tokens.append(int(token_id))
        if token_id in self.eos_ids:
            if self._thought_start == len(self.tokens) - 1 and self.spans:
                # EOS right after a closed thought belongs to that thought, not to a new one.
                self.spans[-1] = (self.spans[-1][0], len(self.tokens))
                self._thought_start = len(self.tokens)
            else:
                self._close_thought()
            self.stop_reason = STOP_EOS
            return True
        at_boundary = self._boundary_reached()
        at_thought_cap = len(self.tokens) - self._thought_start >= self.fmt.max_thought_tokens
        if at_boundary or at_thought_cap:
            text = self._close_thought()
            if self._answered(text):
                self.stop_reason = STOP_ANSWER
            elif self.start_thoughts + len(self.spans) >= self.fmt.max_thoughts:
                self.stop_reason = STOP_MAX_THOUGHTS
        if not self.done and len(self.tokens) >= self.token_budget:
            self._close_thought()
            self.stop_reason = STOP_MAX_TOKENS
        return self.done

    def _answered(self, thought: str) -> bool:
        if self.fmt.answer == "code":  # a long program may span thoughts cut at max_thought_tokens
            return contains_code_block(self.decode(self.tokens))
        return contains_final_answer(thought)

    def finish(self) -> None:
        """Close an unfinished rollout (the decoder stopped before the tracker did)."""
        if not self.done:
            self._close_thought()
            self.stop_reason = STOP_NONE

    def _boundary_reached(self) -> bool:
        tail = self.decode(self.tokens[max(self._thought_start, len(self.tokens) - self._window):])
        if self.fmt.boundary not in tail:
            return False
        if self.fmt.split == "delimiter":
            return True
        # Paragraph mode: a blank line only ends a thought that already has content.
        return PARAGRAPH_BREAK in self.decode(self.tokens[self._thought_start:]).lstrip()

    def _close_thought(self) -> str:
        if self._thought_start == len(self.tokens):
            return ""
        span = (self._thought_start, len(self.tokens))
        self.spans.append(span)
        self._thought_start = len(self.tokens)
        return self.decode(self.tokens[span[0]:span[1]])


@dataclass
class Rollout:
    """One sampled continuation of a context.

    ``token_ids`` are exactly the sampled ids; ``thought_spans`` are ``[start, end)`` offsets into
    them, one per thought; ``logprobs`` (when the backend reports them) align with ``token_ids``.
    """

    token_ids: list[int]
    thought_spans: list[tuple[int, int]]
    stop_reason: str
    logprobs: list[float] | None = None

    @property
    def num_thoughts(self) -> int:
        return len(self.thought_spans)

    def thought_ids(self, index: int) -> list[int]:
        start, end = self.thought_spans[index]
        return self.token_ids[start:end]


def segment_thoughts(
    token_ids: Sequence[int],
    decode: Callable[[Sequence[int]], str],
    fmt: ThoughtFormat,
    eos_ids: Sequence[int] = (),
    start_thoughts: int = 0,
    token_budget: int | None = None,
) -> Rollout:
    """Cut already-sampled tokens into thoughts by the same rules used while decoding.

    Tokens after the point where the rollout would have stopped are dropped.
    """
    tracker = ThoughtTracker(fmt, decode, frozenset(eos_ids), start_thoughts, token_budget)
    for token in token_ids:
        if tracker.push(token):
            break
    tracker.finish()
    return Rollout(list(tracker.tokens), list(tracker.spans), tracker.stop_reason)
