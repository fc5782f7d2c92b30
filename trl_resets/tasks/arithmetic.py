r"""A procedurally generated multi-step arithmetic task with exact step checking.

Each problem starts from a small number and applies a chain of operations:

    Take the number 7. Add 5. Multiply by 3. Subtract 4. What number do you have at the end?

The reference solution has one thought per operation (``7 + 5 = 12``,
``12 * 3 = 36``, ``36 - 4 = 32, so the answer is \boxed{32}``), and the number
of operations is the difficulty. Every running value stays between 1 and
``max_value``, and divisions are always exact, so a 135M-parameter model can
do the arithmetic.

Because the right next step is always known, :func:`check_steps` can grade a
model's chain thought by thought and name its first wrong thought: the
ground truth for the reset state that SRPO's self-localization estimates.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction

import datasets

from ..comparison import register_state_key
from ..localizers import register_oracle_checker
from ..rewards.math import answers_match, extract_boxed

OPERATIONS = ("+", "-", "*", "/")
INSTRUCTIONS = {"+": "Add {}.", "-": "Subtract {}.", "*": "Multiply by {}.", "/": "Divide by {}."}
FEATURES = datasets.Features(
    {
        "prompt": datasets.Value("string"),
        "answer": datasets.Value("string"),
        "solution_steps": datasets.List(datasets.Value("string")),
        "num_steps": datasets.Value("int64"),
        "start": datasets.Value("int64"),
        "ops": datasets.List({"op": datasets.Value("string"), "operand": datasets.Value("int64")}),
    }
)


@dataclass(frozen=True)
class ArithmeticProblem:
    """A start value and the operations applied to it, in order.

    ``ops`` holds ``(operator, operand)`` pairs with operators from ``+ - * /``.
    """

    start: int
    ops: tuple[tuple[str, int], ...]

    @property
    def values(self) -> list[int]:
        """Return the running values: the start, then the value after each operation."""
        values = [self.start]
        for op, operand in self.ops:
            values.append(apply_operation(values[-1], op, operand))
        return values

    @property
    def answer(self) -> int:
        """Return the final value."""
        return self.values[-1]

    def question(self) -> str:
        """Return the problem as a plain-text question."""
        steps = " ".join(INSTRUCTIONS[op].format(operand) for op, operand in self.ops)
        return f"Take the number {self.start}. {steps} What number do you have at the end?"

    def solution_steps(self) -> list[str]:
        r"""Return the reference solution, one equation per thought, the last one boxed."""
        values = self.values
        steps = [f"{values[i]} {op} {operand} = {values[i + 1]}" for i, (op, operand) in enumerate(self.ops)]
        steps[-1] += f", so the answer is \\boxed{{{self.answer}}}"
        return steps

    def to_row(self) -> dict:
        """Return the dataset row for this problem (see :data:`FEATURES`)."""
        return {
            "prompt": self.question(),
            "answer": str(self.answer),
            "solution_steps": self.solution_steps(),
            "num_steps": len(self.ops),
            "start": self.start,
            "ops": [{"op": op, "operand": operand} for op, operand in self.ops],
        }

    @classmethod
    def from_row(cls, row: Mapping) -> ArithmeticProblem:
        """Rebuild a problem from a dataset row's ``start`` and ``ops`` columns.

        ``ops`` may be a list of ``{"op", "operand"}`` dicts (as stored by
        :func:`make_arithmetic_dataset`), a list of pairs, or either as JSON.
        """
        if "start" not in row or "ops" not in row:
            raise KeyError(
                f"An arithmetic row needs the 'start' and 'ops' columns written by "
                f"make_arithmetic_dataset, but this row has {sorted(row)}."
            )
        ops = row["ops"]
        if isinstance(ops, str):
            ops = json.loads(ops)
        pairs = tuple(_as_pair(op) for op in ops)
        return cls(start=int(row["start"]), ops=pairs)


def _as_pair(op) -> tuple[str, int]:
    """Return ``(operator, operand)`` from a dict or a pair, checking the operator."""
    operator, operand = (op["op"], op["operand"]) if isinstance(op, Mapping) else op
    if operator not in OPERATIONS:
        raise ValueError(f"Unknown operator {operator!r} in ops; use one of {OPERATIONS}.")
    return operator, int(operand)


def apply_operation(value: int, op: str, operand: int) -> int:
    """Return ``value op operand``; division must be exact."""
    if op == "+":
        return value + operand
    if op == "-":
        return value - operand
    if op == "*":
        return value * operand
    if op == "/" and operand != 0 and value % operand == 0:
        return value // operand
    raise ValueError(f"Cannot apply {value} {op} {operand}: use + - * or an exact division.")


def make_arithmetic_dataset(
    n: int,
    num_steps: int | Sequence[int] = 3,
    seed: int = 0,
    max_operand: int = 10,
    max_start: int = 20,
    max_value: int = 100,
    operations: Sequence[str] = OPERATIONS,
) -> datasets.Dataset:
    """Return ``n`` arithmetic problems as a dataset.

    Args:
        n: number of rows.
        num_steps: operations per problem (the difficulty), or a list of
            step counts to draw from uniformly per row.
        seed: the same seed always gives the same rows, and row ``i`` does
            not depend on ``n``, so a smaller dataset is a prefix of a larger one.
        max_operand: largest number added, subtracted, multiplied or divided by.
        max_start: largest starting number.
        max_value: largest running value allowed; every value is at least 1.
        operations: the operators to use, a subset of ``+ - * /``.

    Columns: ``prompt`` (question text), ``answer`` (final value as a
    string), ``solution_steps`` (reference thoughts), ``num_steps``, and
    ``start`` and ``ops``, which :func:`check_steps` reads.
    """
    step_choices = _validate_settings(n, num_steps, max_operand, max_start, max_value, operations)
    rows = []
    for index in range(n):
        rng = random.Random(f"trl_resets-arithmetic-{seed}-{index}")
        problem = sample_problem(rng, rng.choice(step_choices), max_operand, max_start, max_value, operations)
        rows.append(problem.to_row())
    columns = {name: [row[name] for row in rows] for name in FEATURES}
    return datasets.Dataset.from_dict(columns, features=FEATURES)


def _validate_settings(n, num_steps, max_operand, max_start, max_value, operations) -> list[int]:
    """Check the generator settings and return the allowed step counts."""
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}.")
    step_choices = [num_steps] if isinstance(num_steps, int) else list(num_steps)
    if not step_choices or any(not isinstance(k, int) or k < 1 for k in step_choices):
        raise ValueError(f"num_steps must be a positive int or a list of them, got {num_steps!r}.")
    if max_operand < 2 or max_start < 1:
        raise ValueError(f"Need max_operand >= 2 and max_start >= 1, got {max_operand} and {max_start}.")
    if max_value < max(max_start, max_operand) + 1:
        raise ValueError(
            f"max_value={max_value} leaves no room to operate; make it larger than both "
            f"max_start={max_start} and max_operand={max_operand}."
        )
    unknown = set(operations) - set(OPERATIONS)
    if not operations or unknown:
        raise ValueError(f"operations must be a non-empty subset of {OPERATIONS}, got {operations!r}.")
    return step_choices


def sample_problem(
    rng: random.Random,
    num_steps: int,
    max_operand: int,
    max_start: int,
    max_value: int,
    operations: Sequence[str] = OPERATIONS,
) -> ArithmeticProblem:
    """Draw one problem whose running values all lie in ``[1, max_value]``.

    Each step picks an operator uniformly among those with at least one
    valid operand, then an operand uniformly among the valid ones.
    """
    start = value = rng.randint(1, max_start)
    ops = []
    for _ in range(num_steps):
        choices = _valid_operations(value, max_operand, max_value, operations)
        if not choices:
            raise ValueError(
                f"No operation in {tuple(operations)} keeps {value} within [1, {max_value}]; "
                "allow more operations or raise max_value."
            )
        op = rng.choice(sorted(choices))
        operand = rng.choice(choices[op])
        ops.append((op, operand))
        value = apply_operation(value, op, operand)
    return ArithmeticProblem(start=start, ops=tuple(ops))


def _valid_operations(value: int, max_operand: int, max_value: int, operations) -> dict[str, list[int]]:
    """Map each usable operator to the operands that keep the result in ``[1, max_value]``.

    Operands are at least 1 for ``+``/``-`` and at least 2 for ``*``/``/``,
    so no step leaves the value unchanged.
    """
    candidates = {
        "+": [b for b in range(1, max_operand + 1) if value + b <= max_value],
        "-": [b for b in range(1, max_operand + 1) if value - b >= 1],
        "*": [b for b in range(2, max_operand + 1) if value * b <= max_value],
        "/": [b for b in range(2, max_operand + 1) if value % b == 0],
    }
    return {op: operands for op, operands in candidates.items() if op in operations and operands}


# --- Step checking ----------------------------------------------------------

_NUMBER = r"\d+(?:\.\d+)?(?!\d)"
_OPERATOR = r"\\times|\\cdot|\\div|[-+*/x×X·÷−–]"
_EQUATION = re.compile(
    rf"(?=(?<![\d.])({_NUMBER})\s*({_OPERATOR})\s*({_NUMBER})\s*=\s*([-−]?\s*{_NUMBER}))"
)
_OPERATOR_NAMES = {
    "+": "+",
    "-": "-", "−": "-", "–": "-",
    "*": "*", "x": "*", "X": "*", "×": "*", "·": "*", "\\times": "*", "\\cdot": "*",
    "/": "/", "÷": "/", "\\div": "/",
}


@dataclass(frozen=True)
class Equation:
    """A parsed ``left op right = result`` with ``op`` one of ``+ - * /``."""

    left: Fraction
    op: str
    right: Fraction
    result: Fraction


@dataclass(frozen=True)
class StepCheck:
    """The verdict of :func:`check_steps` on one chain of thoughts.

    Attributes:
        correct: one bool per thought.
        first_wrong: 1-indexed position of the first wrong thought; ``None``
            when the chain is right and complete; ``len(thoughts) + 1`` when
            every thought is right but the chain stops before a correct
            boxed answer (the missing next thought is the first error).
        final_correct: whether the last ``\\boxed{}`` in the chain is the answer.
    """

    correct: list[bool]
    first_wrong: int | None
    final_correct: bool


def parse_equations(thought: str) -> list[Equation]:
    r"""Return every ``a op b = c`` in ``thought``, in order of appearance.

    Tolerates surrounding words, spaces, ``</thought>``, ``\boxed{}``, LaTeX
    ``\times``/``\cdot``/``\div``, unicode ``×``, ``÷`` and minus signs, and
    chained equations (``7 + 5 = 12 * 3 = 36`` gives two).
    """
    equations = []
    for match in _EQUATION.finditer(thought):
        left, op, right, result = match.groups()
        result = result.replace("−", "-").replace(" ", "")
        equations.append(Equation(Fraction(left), _OPERATOR_NAMES[op], Fraction(right), Fraction(result)))
    return equations


def check_steps(problem: Mapping | ArithmeticProblem, thoughts: Sequence[str]) -> StepCheck:
    r"""Grade a chain of thoughts against the exact solution of ``problem``.

    ``problem`` is a dataset row from :func:`make_arithmetic_dataset` (or an
    :class:`ArithmeticProblem`). The checker tracks how many reference
    operations the chain has done correctly so far. A thought is right when:

    * its equations perform the next operation(s) in order, on the correct
      running value, with the correct result (``a + b`` and ``a * b`` may
      be written either way round); restating an already-done step is
      allowed but does not count as progress, and a thought must make
      progress unless it is the final answer;
    * any ``\boxed{}`` in it comes after the last operation and holds the answer.

    So a thought without an equation is wrong unless it boxes the correct
    answer after all operations are done. A wrong thought does not advance
    the position: later thoughts must still do the operation it missed, on
    the correct running value rather than the chain's own mistaken one.
    """
    if isinstance(thoughts, str):
        raise TypeError(
            "check_steps expects a list of thoughts, got one string; split the "
            "completion into thoughts first (e.g. on '</thought>')."
        )
    if not isinstance(problem, ArithmeticProblem):
        problem = ArithmeticProblem.from_row(problem)
    expected = _expected_equations(problem)
    correct, position = [], 0
    for thought in thoughts:
        ok, position = _grade_thought(thought, expected, position, problem.answer)
        correct.append(ok)
    final_correct = _boxed_is(problem.answer, "\n".join(thoughts))
    return StepCheck(correct, _first_wrong(correct, final_correct), final_correct)


def _expected_equations(problem: ArithmeticProblem) -> list[Equation]:
    """Return the reference equation for each operation."""
    values = problem.values
    return [
        Equation(Fraction(values[i]), op, Fraction(operand), Fraction(values[i + 1]))
        for i, (op, operand) in enumerate(problem.ops)
    ]


def _grade_thought(thought: str, expected: list[Equation], position: int, answer: int) -> tuple[bool, int]:
    """Return whether ``thought`` is right and the position after it."""
    new_position = position
    for equation in parse_equations(thought):
        if new_position < len(expected) and _same_step(equation, expected[new_position]):
            new_position += 1
        elif not any(_same_step(equation, done) for done in expected[:new_position]):
            return False, position
    if extract_boxed(thought) is not None:
        finished = new_position == len(expected) and _boxed_is(answer, thought)
        return finished, new_position if finished else position
    return new_position > position, new_position


def _same_step(equation: Equation, reference: Equation) -> bool:
    """Say whether ``equation`` is ``reference``, allowing swapped operands for + and *."""
    if equation.op != reference.op or equation.result != reference.result:
        return False
    operands = (equation.left, equation.right)
    if operands == (reference.left, reference.right):
        return True
    return reference.op in "+*" and operands == (reference.right, reference.left)


def _boxed_is(answer: int, text: str) -> bool:
    """Say whether the last ``\\boxed{}`` in ``text`` holds ``answer``."""
    boxed = extract_boxed(text)
    return boxed is not None and answers_match(boxed, str(answer))


def _first_wrong(correct: list[bool], final_correct: bool) -> int | None:
    """Return the 1-indexed first wrong thought (see :class:`StepCheck`)."""
    if False in correct:
        return correct.index(False) + 1
    return None if final_correct else len(correct) + 1


def thought_value(thought: str) -> tuple:
    r"""A thought's state key for comparison-based credit: the value it computes.

    ``("value", c)`` for the result ``c`` of the thought's last equation (``so 12 * 3 = 36`` and ``then 12 * 3 =
    36`` both give 36: the wording around the arithmetic does not matter); ``("boxed", text)`` for a thought with
    no equation but a ``\boxed{}``; otherwise ``("text", thought)`` with surrounding whitespace removed.
    """
    equations = parse_equations(thought)
    if equations:
        return ("value", equations[-1].result)
    boxed = extract_boxed(thought)
    if boxed is not None:
        return ("boxed", boxed.strip())
    return ("text", thought.strip())


def _first_wrong_step(row: Mapping, thoughts: list[str]) -> int | None:
    return check_steps(row, thoughts).first_wrong


# The task's pieces for the library: the oracle localizer's default checker and the "arithmetic" state key.
register_oracle_checker(_first_wrong_step)
register_state_key("arithmetic", thought_value)
