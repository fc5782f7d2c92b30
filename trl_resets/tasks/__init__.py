"""Procedurally generated tasks with verifiable answers."""

from .arithmetic import (
    ArithmeticProblem,
    StepCheck,
    check_steps,
    make_arithmetic_dataset,
    parse_equations,
)

__all__ = [
    "ArithmeticProblem",
    "StepCheck",
    "check_steps",
    "make_arithmetic_dataset",
    "parse_equations",
]
