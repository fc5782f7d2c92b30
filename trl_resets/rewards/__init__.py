"""Reward functions with TRL's signature ``(completions, **columns) -> list[float]``."""

from .math import (
    answers_match,
    arithmetic_reward,
    boxed_answer_reward,
    completion_text,
    extract_boxed,
    normalize_answer,
    parse_number,
)

__all__ = [
    "answers_match",
    "arithmetic_reward",
    "boxed_answer_reward",
    "completion_text",
    "extract_boxed",
    "normalize_answer",
    "parse_number",
]
