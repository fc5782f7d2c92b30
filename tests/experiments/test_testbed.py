"""The fast testbed: its chain generator, its labels, its tokenizer and the shipped policy."""

import random
import re

import pytest

from experiments.testbed import (
    FILLERS,
    LOCALIZATION_TEMPLATE,
    MAX_NUMBER,
    POLICY_DIR,
    TASK,
    TextPolicy,
    config_fields,
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
from trl_resets.localizers import LocalizationRequest, SelfLocalizer, parse_step_index
from trl_resets.tasks import check_steps
from trl_resets.tasks.arithmetic import ArithmeticProblem, apply_operation

EQUATION = re.compile(r"^(\d+) ([-+*/]) (\d+) = (\d+)")
CHECK = re.compile(r"^(\d+) ([-+*/]) (\d+) = (\d+) vs (\d+) (ok|no)$")


def _problems(n, seed=5, task=None):
    return [ArithmeticProblem.from_row(row) for row in task_dataset(n, seed=seed, task=task)]


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


def test_per_operator_error_rates_put_the_slips_on_the_hard_steps():
    rng = random.Random(13)
    rates = {"*": 0.5, "/": 0.5, "+": 0.0, "-": 0.0}
    slips = {"hard": [0, 0], "easy": [0, 0]}  # [wrong, total]
    for problem in _problems(600, seed=14):
        chain = corrupt_chain(problem, rates, rng)
        for step in chain.steps:
            left, op, right, result = EQUATION.match(step).groups()
            kind = slips["hard" if op in "*/" else "easy"]
            kind[0] += apply_operation(int(left), op, int(right)) != int(result)
            kind[1] += 1
    assert slips["easy"][0] == 0 and slips["easy"][1] > 500
    assert 0.4 < slips["hard"][0] / slips["hard"][1] <= 0.5 and slips["hard"][1] > 300


def test_filler_words_open_steps_uniformly_and_change_nothing_the_checker_sees():
    rng = random.Random(11)
    opening = {}
    for problem in _problems(400, seed=13):
        chain = corrupt_chain(problem, 0.3, rng, FILLERS)
        for step in chain.steps:
            word, equation = step.split(" ", 1)
            assert word in FILLERS and EQUATION.match(equation)
            opening[word] = opening.get(word, 0) + 1
        assert check_steps(problem, chain.steps).first_wrong == chain.first_wrong
        if chain.first_wrong:  # the check lines read the equation behind the filler
            reply = localization_reply(chain.steps, chain.first_wrong)
            assert f"vs {EQUATION.match(chain.steps[0].split(' ', 1)[1]).group(4)} " in reply
    assert set(opening) == set(FILLERS)
    assert max(opening.values()) < 1.3 * min(opening.values())  # drawn uniformly (about 2000 steps)


def test_localization_labels_are_right_at_the_tunable_rate():
    rng = random.Random(2)
    labels = [localization_label(2, 4, 0.6, rng) for _ in range(4000)]
    assert set(labels) <= {1, 2, 3, 4}
    assert abs(labels.count(2) / len(labels) - 0.6) < 0.03
    assert min(labels.count(k) for k in (1, 3, 4)) > 0.1 * len(labels)  # wrong labels spread over other steps
    assert localization_label(1, 1, 0.0, rng) == 1  # a one-step chain has no other step to name


def test_localization_reply_checks_each_step_then_names_one():
    rng = random.Random(6)
    for problem in _problems(40, seed=9):
        chain = corrupt_chain(problem, 0.4, rng)
        for named in range(1, len(chain.steps) + 1):
            reply = localization_reply(chain.steps, named)
            assert parse_step_index(reply, len(chain.steps)) == named  # what SelfLocalizer reads from it
            lines = reply.strip("\n").split("\n")
            assert len(lines) == named + 1 and lines[-1] == f"\\boxed{{{named}}}"
            for i, line in enumerate(lines[:-1], 1):
                number, check = line.split(": ")
                left, op, right, redone, written, verdict = CHECK.match(check).groups()
                step = EQUATION.match(chain.steps[i - 1]).groups()
                assert int(number) == i and (left, op, right, written) == step  # the step as it was written
                assert int(redone) == apply_operation(int(left), op, int(right))  # its equation redone right
                assert verdict == ("no" if i == named else "ok")


def test_task_dataset_picks_step_counts_within_the_testbeds():
    assert set(task_dataset(30, num_steps=[6])["num_steps"]) == {6}
    with pytest.raises(ValueError, match="knows"):
        task_dataset(3, num_steps=[9])


def test_a_policy_carries_its_task_and_the_caps_follow_its_longest_chain(tmp_path):
    import json

    from experiments.testbed import POLICY_DIR, policy_task

    assert policy_task(POLICY_DIR) == TASK  # the shipped policies were trained on the default task
    assert policy_task(tmp_path) == TASK  # a folder without testbed.json: the default
    long_task = {**TASK, "num_steps": [8, 9, 10]}
    (tmp_path / "testbed.json").write_text(json.dumps({"task": long_task}))
    assert policy_task(tmp_path) == long_task
    assert set(task_dataset(40, task=long_task)["num_steps"]) == {8, 9, 10}
    with pytest.raises(ValueError, match="knows"):
        task_dataset(3, num_steps=[11], task=long_task)
    short, long = config_fields(), config_fields(long_task)
    assert (short["max_completion_length"], short["max_thoughts"], short["localization_max_tokens"]) == (96, 8, 80)
    assert (long["max_completion_length"], long["max_thoughts"], long["localization_max_tokens"]) == (160, 12, 128)


def test_tokenizer_round_trips_the_trainer_formats():
    rng = random.Random(3)
    problem = _problems(1)[0]
    chain = corrupt_chain(problem, 0.5, rng)
    texts = [rollout_prompt(problem.question()) + chain.completion(),
             localization_request(problem.question(), chain.steps) + localization_reply(chain.steps, 2)]
    tokenizer = make_tokenizer(texts)
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        assert tokenizer.unk_token_id not in ids and tokenizer.decode(ids) == text
    assert len(tokenizer("</thought>")["input_ids"]) == 1
    assert all(len(tokenizer(f" {n}")["input_ids"]) == 1 for n in range(MAX_NUMBER + 1))
    assert TASK["max_value"] <= MAX_NUMBER  # every right value is one token too


@pytest.fixture(scope="module", params=["policy", "policy-critical", "policy-long", "policy-hard", "policy-fillers"])
def policy(request):
    """Each shipped testbed policy (uniform slips, critical steps, long chains, long chains with many slips,
    filler words): its model, tokenizer, task, config fields and the filler words its steps open with."""
    folder = POLICY_DIR.parent / request.param
    if not (folder / "config.json").exists():
        pytest.fail(f"the testbed policy is missing from {folder}; run experiments/testbed/train_testbed.py")
    from experiments.testbed import load_policy, policy_fillers, policy_task

    task = policy_task(folder)
    return (*load_policy(folder), task, config_fields(task), policy_fillers(folder))


def test_critical_policy_slips_on_the_hard_steps():
    """The critical-step policy's own rollouts: `*` and `/` steps wrong far more often than `+` and `-`."""
    import torch

    from experiments.testbed import CRITICAL_POLICY_DIR, load_policy

    model, tokenizer = load_policy(CRITICAL_POLICY_DIR)
    torch.manual_seed(0)
    rows = task_dataset(48, seed=15)
    rollouts = make_sampler(model, tokenizer).sample(
        [tokenizer(rollout_prompt(q))["input_ids"] for q in rows["prompt"] for _ in range(2)])
    slips = {"hard": [0, 0], "easy": [0, 0]}  # [wrong, total]
    for rollout in rollouts:
        for thought in thoughts_of(rollout, tokenizer):
            match = EQUATION.match(thought.strip())
            if match:
                left, op, right, result = match.groups()
                try:
                    wrong = apply_operation(int(left), op, int(right)) != int(result)
                except ValueError:  # e.g. a division with a remainder after an earlier slip
                    continue
                kind = slips["hard" if op in "*/" else "easy"]
                kind[0] += wrong
                kind[1] += 1
    hard, easy = (slips[k][0] / max(slips[k][1], 1) for k in ("hard", "easy"))
    assert slips["hard"][1] > 50 and slips["easy"][1] > 100
    assert hard > 0.25 and easy < 0.1 and hard > 4 * easy


def test_shipped_policy_writes_delimited_thoughts_and_boxed_answers(policy):
    import torch

    model, tokenizer, task, fields, fillers = policy
    torch.manual_seed(0)
    sampler = make_sampler(model, tokenizer, fields=fields)
    rows = task_dataset(8, seed=7, task=task)
    rollouts = sampler.sample([tokenizer(rollout_prompt(q))["input_ids"] for q in rows["prompt"]])
    finished = 0
    for rollout, steps in zip(rollouts, rows["num_steps"]):
        text = tokenizer.decode(rollout.token_ids)
        assert rollout.num_thoughts >= 1 and text.count("</thought>") >= rollout.num_thoughts - 1
        thoughts = thoughts_of(rollout, tokenizer, fields)
        finished += (rollout.stop_reason == "answer" and rollout.num_thoughts == steps and "\\boxed{" in thoughts[-1])
        if fillers:  # a filler policy opens its steps with its filler words
            assert sum(t.split(" ", 1)[0] in fillers for t in thoughts) >= len(thoughts) - 1
    assert finished >= 6


def test_shipped_policy_answers_the_localization_prompt(policy):
    import torch

    model, tokenizer, task, fields, fillers = policy
    torch.manual_seed(0)
    rng = random.Random(4)
    requests = []
    for problem in _problems(16, seed=8, task=task):
        chain = corrupt_chain(problem, 0.0, rng, fillers)
        while chain.first_wrong is None:
            chain = corrupt_chain(problem, 0.5, rng, fillers)
        requests.append(LocalizationRequest(problem.question(), chain.steps))
    policy_text = TextPolicy(make_sampler(model, tokenizer, fields=fields))
    budget = fields["localization_max_tokens"]
    answers = SelfLocalizer(LOCALIZATION_TEMPLATE, budget, 0.0).locate(requests, policy_text, rng)
    parsed = [a.index for a in answers if a.index is not None]
    assert len(parsed) >= 14 and all(1 <= i <= len(r.thoughts) for i, r in zip(parsed, requests))


def test_shipped_policy_localizes_better_than_chance_and_below_perfect(policy):
    """Greedy self-localization on injected failures finds the first wrong step far above chance; sampled
    at T=1 (the trainer's setting) it is right well short of always (the tunable, imperfect localizer)."""
    import torch

    model, tokenizer, task, fields, fillers = policy
    rng = random.Random(11)
    requests, truth = [], []
    for problem in _problems(48, seed=12, task=task):
        chain = corrupt_chain(problem, 0.3, rng, fillers)
        while chain.first_wrong is None:
            chain = corrupt_chain(problem, 0.3, rng, fillers)
        requests.append(LocalizationRequest(problem.question(), chain.steps))
        truth.append(chain.first_wrong)
    chance = sum(1 / len(r.thoughts) for r in requests) / len(requests)
    policy_text = TextPolicy(make_sampler(model, tokenizer, fields=fields))
    budget = fields["localization_max_tokens"]
    hits = {}
    for temperature in (0.0, 1.0):
        torch.manual_seed(0)
        answers = SelfLocalizer(LOCALIZATION_TEMPLATE, budget, temperature).locate(requests, policy_text, rng)
        hits[temperature] = sum(a.index == t for a, t in zip(answers, truth)) / len(truth)
    # The filler policy localizes less well (steps open with a variable word before the equation it must
    # copy): localization_quality.py measured 0.375 exact at T=1 against 0.166 for random resets, where the
    # others reach 0.58-0.65 against 0.10-0.22.
    margin = 0.15 if fillers else 0.3
    assert hits[0.0] > chance + margin and hits[1.0] > chance + 0.15
    assert hits[1.0] < 0.95
