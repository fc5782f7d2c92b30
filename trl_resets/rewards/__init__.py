"""Reward functions with TRL's signature ``(completions, **columns) -> list[float | None]``."""

from .choice import multiple_choice_reward, read_choice, read_yes_no, yes_no_reward
from .code import CodeReward, bound_code_rewards, code_reward, extract_program, outputs_match
from .math import (
    answers_match,
    arithmetic_reward,
    boxed_answer_reward,
    completion_text,
    extract_boxed,
    normalize_answer,
    parse_gold,
    parse_number,
)

__all__ = [
    "CodeReward",
    "answers_match",
    "arithmetic_reward",
    "bound_code_rewards",
    "boxed_answer_reward",
    "code_reward",
    "completion_text",
    "extract_boxed",
    "extract_program",
    "multiple_choice_reward",
    "normalize_answer",
    "outputs_match",
    "parse_gold",
    "parse_number",
    "read_choice",
    "read_yes_no",
    "yes_no_reward",
]
