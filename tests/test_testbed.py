"""The fast testbed: its chain generator, its labels, its tokenizer and the shipped policy."""

import random
import re

import pytest

from benchmarks.testbed import (
    LOCALIZATION_TEMPLATE,
    MAX_NUMBER,
    POLICY_DIR,
    TASK,
    TextPolicy,
    corrupt_chain,
    localization_label,
    localization_reply,
    localization_request,
    make_sampler,
    make_tokenizer,
    rollout_prompt,
    task_dataset,
    thoughts_of,
)
from trl_resets.localizers import LocalizationRequest, SelfLocalizer
from trl_resets.tasks import check_steps
from trl_resets.tasks.arithmetic import ArithmeticProblem, apply_operation

EQUATION = re.compile(r"^(\d+) ([-+*/]) (\d+) = (\d+)")


def _problems(n, seed=5):
    return [ArithmeticProblem.from_row(row) for row in task_dataset(n, seed=seed)]


def test_error_free_chains_are_the_reference_solution():
    rng = random.Random(0)
    for problem in _problems(50):
        chain = corrupt_chain(problem, 0.0, rng)
        assert chain.first_wrong is None and chain.steps == problem.solution_steps()


def test_injected_errors_hit_the_tunable_rate_and_match_the_checker():
    rng = random.Random(1)
    wrong_steps = total_steps = 0
    for problem in _problems(600):
        chain = corrupt_chain(problem, 0.3, rng)
        slips = []
        for step in chain.steps:
            left, op, right, result = EQUATION.match(step).groups()
            slips.append(apply_operation(int(left), op, int(right)) != int(result))
        wrong_steps += sum(slips)
        total_steps += len(slips)
        first_slip = slips.index(True) + 1 if True in slips else None
        assert chain.first_wrong == first_slip
        assert check_steps(problem, chain.steps).first_wrong == chain.first_wrong  # the checker agrees
    # a few steps have no valid wrong value and stay right, so the rate sits a little under p
    assert 0.25 < wrong_steps / total_steps <= 0.31


def test_localization_labels_are_right_at_the_tunable_rate():
    rng = random.Random(2)
    labels = [localization_label(2, 4, 0.6, rng) for _ in range(4000)]
    assert set(labels) <= {1, 2, 3, 4}
    assert abs(labels.count(2) / len(labels) - 0.6) < 0.03
    assert min(labels.count(k) for k in (1, 3, 4)) > 0.1 * len(labels)  # wrong labels spread over other steps
    assert localization_label(1, 1, 0.0, rng) == 1  # a one-step chain has no other step to name


def test_tokenizer_round_trips_the_trainer_formats():
    rng = random.Random(3)
    problem = _problems(1)[0]
    chain = corrupt_chain(problem, 0.5, rng)
    texts = [rollout_prompt(problem.question()) + chain.completion(),
             localization_request(problem.question(), chain.steps) + localization_reply(2)]
    tokenizer = make_tokenizer(texts)
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        assert tokenizer.unk_token_id not in ids and tokenizer.decode(ids) == text
    assert len(tokenizer("</thought>")["input_ids"]) == 1
    assert all(len(tokenizer(f" {n}")["input_ids"]) == 1 for n in range(MAX_NUMBER + 1))
    assert TASK["max_value"] <= MAX_NUMBER  # every right value is one token too


@pytest.fixture(scope="module")
def policy():
    if not (POLICY_DIR / "config.json").exists():
        pytest.fail(f"the testbed policy is missing from {POLICY_DIR}; run benchmarks/testbed/train_testbed.py")
    from benchmarks.testbed import load_policy

    return load_policy()


def test_shipped_policy_writes_delimited_thoughts_and_boxed_answers(policy):
    import torch

    model, tokenizer = policy
    torch.manual_seed(0)
    sampler = make_sampler(model, tokenizer)
    rows = task_dataset(8, seed=7)
    rollouts = sampler.sample([tokenizer(rollout_prompt(q))["input_ids"] for q in rows["prompt"]])
    finished = 0
    for rollout in rollouts:
        text = tokenizer.decode(rollout.token_ids)
        assert rollout.num_thoughts >= 1 and text.count("</thought>") >= rollout.num_thoughts - 1
        finished += rollout.stop_reason == "answer" and "\\boxed{" in thoughts_of(rollout, tokenizer)[-1]
    assert finished >= 6


def test_shipped_policy_answers_the_localization_prompt(policy):
    import torch

    model, tokenizer = policy
    torch.manual_seed(0)
    rng = random.Random(4)
    requests = []
    for problem in _problems(16, seed=8):
        chain = corrupt_chain(problem, 0.0, rng)
        while chain.first_wrong is None:
            chain = corrupt_chain(problem, 0.5, rng)
        requests.append(LocalizationRequest(problem.question(), chain.steps))
    policy_text = TextPolicy(make_sampler(model, tokenizer))
    answers = SelfLocalizer(LOCALIZATION_TEMPLATE, 4, 0.0).locate(requests, policy_text, rng)
    parsed = [a.index for a in answers if a.index is not None]
    assert len(parsed) >= 14 and all(1 <= i <= len(r.thoughts) for i, r in zip(parsed, requests))
