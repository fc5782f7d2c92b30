r"""The fast testbed: a 0.47M-parameter Llama that does the multi-step arithmetic task thought by thought.

It is trained from scratch (`train_testbed.py`) on 4-6 step chains in exactly the trainer's format, with
knobs that make it a useful policy for comparing RL methods in seconds per step:

* ``step_error_rate`` (p): each step of a training chain writes a wrong result with probability p,
  and later steps carry the wrong value forward. Sampled at temperature 1, the policy makes step
  errors at about that rate, so its accuracy sits well between 0 and 1 and RL can raise it.
  With ``hard_ops`` the rate depends on the step's operator (the critical-step testbed, ``policy-critical``:
  ``*`` and ``/`` slip half the time, ``+`` and ``-`` rarely), so a problem's difficulty sits in a few steps.
* ``fillers``: each step opens with a filler word drawn uniformly (`FILLERS`), which the checker ignores, so
  correct steps carry entropy with no bearing on the outcome (``policy-fillers``).
* ``localization_accuracy`` (q): asked the localization prompt about a failed chain, the policy checks
  the steps in order (one ``"i: a op b = redone vs written ok"`` line each, see `localization_reply`) and
  ends with ``\boxed{N}``; in training, N is the checker's first wrong step with probability q, otherwise
  another step uniformly (the check lines agree with N). Sampled at temperature 1, self-localization is a
  real model call, better than a random reset and short of perfect (measured by localization_quality.py).

Everything else is the package's: `make_arithmetic_dataset` problems, `wrap_question` prompts,
`localization_prompt` requests, thoughts closed by ``</thought>``, the last one boxing the answer.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

from trl_resets.localizers import LocalizationRequest, localization_prompt
from trl_resets.tasks import make_arithmetic_dataset
from trl_resets.tasks.arithmetic import ArithmeticProblem, apply_operation
from trl_resets.thoughts import DEFAULT_DELIMITER, wrap_question

POLICY_DIR = Path(__file__).parent / "policy"
CRITICAL_POLICY_DIR = Path(__file__).parent / "policy-critical"

# Our own short wording for a tiny model: the templates are config fields, the format is the trainer's.
# The localization prompt leaves the question out: every injected error shows in its own step's equation.
ROLLOUT_TEMPLATE = "Problem: {question}\nSteps, each closed by {delimiter}:\n"
LOCALIZATION_TEMPLATE = "A wrong solution:\n{steps}\nCheck the steps in order. First wrong step, 1 to {num_steps}?"
# The task's size: 4-6 steps of small numbers, so a rollout is about 45 tokens and, at the policy's step
# error rate, few rollouts from the prompt succeed (the regime resets are for).
TASK = {"num_steps": [4, 5, 6], "max_operand": 5, "max_start": 10, "max_value": 30}
MAX_NUMBER = 99  # largest number a chain (even a wrong one) may write; the vocabulary holds 0..MAX_NUMBER
ERROR_DELTAS = (-4, -3, -2, -1, 1, 2, 3, 4)
# Seeds of the problem sets: the testbed's training chains, RL prompts and held-out evaluation never share one.
TRAIN_SEED, RL_SEED, EVAL_SEED = 1000, 2000, 3000

_EQUATION = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)")
# Words a step may open with, all meaning nothing: with ``fillers`` set, correct steps carry entropy that has
# no bearing on the outcome, as a large model's wording does (the prefix-entropy testbed, ``policy-fillers``).
FILLERS = ("so", "then", "next", "now", "thus", "here", "and", "again")
_TOKEN_PATTERN = r" ?</thought>| ?\\boxed\{| ?\d+| ?[A-Za-z]+|\n| ?[^\sA-Za-z\d]|\s"
SPECIAL_TOKENS = {"pad": "<pad>", "eos": "<eos>", "unk": "<unk>"}


def policy_task(path: str | Path = POLICY_DIR) -> dict:
    """The task a testbed policy was trained on (the ``task`` of its ``testbed.json``; TASK if it has none)."""
    import json

    settings = Path(path) / "testbed.json"
    task = json.loads(settings.read_text()).get("task") if settings.exists() else None
    return dict(task or TASK)


def policy_fillers(path: str | Path = POLICY_DIR) -> tuple[str, ...]:
    """The filler words a testbed policy opens its steps with (``fillers`` in its ``testbed.json``; none if unset)."""
    import json

    settings = Path(path) / "testbed.json"
    count = json.loads(settings.read_text()).get("fillers", 0) if settings.exists() else 0
    return FILLERS[:count]


def task_dataset(n: int, seed: int = RL_SEED, num_steps=None, task: dict | None = None):
    """``n`` arithmetic problems at the testbed's size (a `make_arithmetic_dataset` dataset); ``num_steps``
    (a list of step counts within the testbed's) picks harder or easier ones. ``task``: the policy's task
    (`policy_task`), TASK by default."""
    task = dict(task or TASK)
    if num_steps is not None:
        if not set(num_steps) <= set(task["num_steps"]):
            raise ValueError(f"the testbed policy knows {task['num_steps']}-step problems, not {num_steps}.")
        task["num_steps"] = list(num_steps)
    return make_arithmetic_dataset(n, seed=seed, **task)


def rollout_prompt(question: str) -> str:
    return wrap_question(question, ROLLOUT_TEMPLATE, DEFAULT_DELIMITER)


@dataclass
class Chain:
    """A solution chain with injected errors: one string per thought, and the first wrong one (1-based)."""

    steps: list[str]
    first_wrong: int | None

    def completion(self) -> str:
        return "".join(step + DEFAULT_DELIMITER for step in self.steps)


def _stays_valid(value: int, ops) -> bool:
    """Whether a chain can go on from ``value`` through ``ops`` with integer results in 0..MAX_NUMBER."""
    for op, operand in ops:
        if not 0 <= value <= MAX_NUMBER:
            return False
        try:
            value = apply_operation(value, op, operand)
        except ValueError:
            return False
    return 0 <= value <= MAX_NUMBER


def corrupt_chain(problem: ArithmeticProblem, error_rate, rng: random.Random, fillers=()) -> Chain:
    r"""The problem's chain with each step's result wrong with probability ``error_rate``, carried forward.

    ``error_rate`` is one probability for every step, or a mapping from operator to probability (steps
    whose operator is missing from it stay right): the critical-step testbed makes ``*`` and ``/`` slips
    likely and ``+`` / ``-`` slips rare, so a problem's difficulty sits in a few hard steps.

    A wrong result is the right one plus a small nonzero delta, chosen so the rest of the chain stays in
    whole numbers from 0 to MAX_NUMBER (a step with no such delta stays right). Later steps apply their
    operation to the chain's own running value, as a model that slipped once would.

    ``fillers``: words one of which, drawn uniformly, opens each step (none by default); the checker
    ignores them, so they are entropy a model's steps carry with no effect on the outcome.
    """
    value, steps, first_wrong = problem.start, [], None
    ops = list(problem.ops)
    for i, (op, operand) in enumerate(ops):
        result = apply_operation(value, op, operand)
        rate = error_rate.get(op, 0.0) if isinstance(error_rate, dict) else error_rate
        if rng.random() < rate:
            deltas = [d for d in ERROR_DELTAS if _stays_valid(result + d, ops[i + 1:])]
            if deltas:
                result += rng.choice(deltas)
                first_wrong = first_wrong or i + 1
        step = f"{value} {op} {operand} = {result}"
        if fillers:
            step = f"{rng.choice(fillers)} {step}"
        if i == len(ops) - 1:
            step += f", so the answer is \\boxed{{{result}}}"
        steps.append(step)
        value = result
    return Chain(steps, first_wrong)


def localization_label(first_wrong: int, num_steps: int, accuracy: float, rng: random.Random) -> int:
    """The step the testbed is taught to name: the first wrong one with probability ``accuracy``, else another."""
    others = [s for s in range(1, num_steps + 1) if s != first_wrong]
    if not others or rng.random() < accuracy:
        return first_wrong
    return rng.choice(others)


def localization_request(question: str, steps: list[str]) -> str:
    return localization_prompt(LocalizationRequest(question, steps), LOCALIZATION_TEMPLATE)


def localization_reply(steps: list[str], named: int) -> str:
    r"""The testbed's answer to the localization prompt: it checks the steps in order, then names one.

    One line per step up to the named one, ``"{i}: {a} {op} {b} = {right} vs {written} ok"``: the step's
    equation redone, the result the step wrote, and a verdict (``no`` on the named step's line), then
    ``\boxed{named}``. The model reasons before it answers, as a large model asked the localization
    prompt does, and each verdict only compares two numbers side by side, which a tiny model learns
    where judging a whole chain at once is beyond it.
    """
    lines = []
    for i, step in enumerate(steps[:named], 1):
        left, op, right, written = _EQUATION.search(step).groups()
        redone = apply_operation(int(left), op, int(right))
        lines.append(f"\n{i}: {left} {op} {right} = {redone} vs {written} {'no' if i == named else 'ok'}")
    return "".join(lines) + f"\n\\boxed{{{named}}}"


def make_tokenizer(texts):
    """A word-level tokenizer over the words of ``texts`` and every number up to MAX_NUMBER.

    Words keep their leading space, so decoding is exact concatenation; ``</thought>`` and ``\boxed{``
    are single tokens.
    """
    import re

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pattern = re.compile(_TOKEN_PATTERN)
    words = {w for text in texts for w in pattern.findall(text)}
    words |= {f"{p}{n}" for n in range(MAX_NUMBER + 1) for p in ("", " ")}
    vocab = {tok: i for i, tok in enumerate(list(SPECIAL_TOKENS.values()) + sorted(words))}
    core = Tokenizer(models.WordLevel(vocab, unk_token=SPECIAL_TOKENS["unk"]))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(_TOKEN_PATTERN), behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=SPECIAL_TOKENS["pad"],
        eos_token=SPECIAL_TOKENS["eos"],
        unk_token=SPECIAL_TOKENS["unk"],
    )


def load_policy(path: str | Path = POLICY_DIR):
    """The shipped testbed policy and its tokenizer (CPU, fp32, eval mode)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(
            f"no testbed policy at {path}; train one with `python -m experiments.testbed.train_testbed`."
        )
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    return model, tokenizer


def config_fields(task: dict | None = None, **overrides) -> dict:
    """ResetConfig fields that fit the testbed (templates, caps, sampling at temperature 1).

    The caps follow the task's longest chain (``task``: `policy_task`, TASK by default): 16 tokens and one
    thought per step with two to spare, and a check line (11 tokens) per step for the localization reply.
    """
    longest = max((task or TASK)["num_steps"])
    fields = {
        "rollout_template": ROLLOUT_TEMPLATE,
        "localization_template": LOCALIZATION_TEMPLATE,
        "max_completion_length": 16 * longest,
        "max_thoughts": longest + 2,
        "max_thought_tokens": 20,
        "localization_max_tokens": 12 * longest + 8,  # the check lines, then the boxed step number
        "localization_temperature": 1.0,
        "temperature": 1.0,
        "top_p": 1.0,
        "top_k": 0,
    }
    fields.update(overrides)
    return fields


def thought_format(fields: dict | None = None):
    """The ThoughtFormat the trainer builds from the testbed's config fields."""
    from trl_resets.thoughts import ThoughtFormat

    fields = fields or config_fields()
    return ThoughtFormat(max_thoughts=fields["max_thoughts"], max_thought_tokens=fields["max_thought_tokens"],
                         max_completion_tokens=fields["max_completion_length"])


def make_sampler(model, tokenizer, temperature: float = 1.0, fields: dict | None = None):
    """A TransformersThoughtSampler over the testbed at the trainer's sampling settings (``fields``:
    `config_fields` of the policy's task, the default task's if None)."""
    from transformers import GenerationConfig

    from trl_resets.sampling import TransformersThoughtSampler

    config = GenerationConfig(do_sample=True, temperature=temperature, top_p=1.0, top_k=0,
                              pad_token_id=tokenizer.pad_token_id)
    return TransformersThoughtSampler(model, tokenizer, thought_format(fields), config)


class TextPolicy:
    """The testbed as text in, text out (plain prompts, no chat template), for `SelfLocalizer`."""

    def __init__(self, sampler):
        self.sampler = sampler

    def complete(self, prompts, max_new_tokens, temperature):
        tokenizer = self.sampler.tokenizer
        ids = [tokenizer(p)["input_ids"] for p in prompts]
        replies = self.sampler.complete(ids, max_new_tokens, temperature)
        return [(tokenizer.decode(r, skip_special_tokens=True), len(r)) for r in replies]


def thoughts_of(rollout, tokenizer, fields: dict | None = None) -> list[str]:
    """A rollout's thoughts as text without delimiters (what the trainer shows a localizer)."""
    from trl_resets.thoughts import strip_delimiter

    fmt = thought_format(fields)
    return [strip_delimiter(tokenizer.decode(rollout.thought_ids(h), skip_special_tokens=True), fmt)
            for h in range(rollout.num_thoughts)]


def evaluate(model, tokenizer, dataset, samples: int = 4, seed: int = 0, batch_size: int = 128,
             fields: dict | None = None) -> dict:
    """Sampled accuracy (temperature 1) on ``dataset``, ``samples`` rollouts per problem, with fixed noise
    (``fields``: `config_fields` of the policy's task, for its caps).

    Returns the accuracy and the mean rollout length in tokens.
    """
    import torch

    from trl_resets.rewards import boxed_answer_reward

    was_training = model.training
    model.eval()
    sampler = make_sampler(model, tokenizer, fields=fields)
    sampler.batch_size = batch_size
    contexts = [tokenizer(rollout_prompt(q))["input_ids"] for q in dataset["prompt"] for _ in range(samples)]
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(seed)
        rollouts = sampler.sample(contexts)
    if was_training:
        model.train()
    texts = [tokenizer.decode(r.token_ids, skip_special_tokens=True) for r in rollouts]
    answers = [a for a in dataset["answer"] for _ in range(samples)]
    rewards = boxed_answer_reward(texts, answers)
    return {
        "accuracy": sum(rewards) / len(rewards),
        "tokens": sum(len(r.token_ids) for r in rollouts) / len(rollouts),
    }


def machine_description(threads: int) -> str:
    """The machine line the testbed benchmarks write beside their numbers (the load is taken now, at the end)."""
    import os
    import platform

    import torch

    load = os.getloadavg()
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{threads} thread(s), load average {load[0]:.1f} at the end (other jobs share the cores)")


def quiet() -> None:
    """No progress bars or deprecation chatter from the libraries: the benchmark prints its own lines."""
    import os
    import warnings

    import transformers

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
