"""The trainer's wiring: what reaches TRL and the loss, checked against values recomputed from the rows.

One SRPO run on a tiny model, spied from outside (no change to the package):

* every reward-function call is recorded, so each row's reward is known independently of the trainer;
* the output of ``_generate_and_score_completions`` (TRL's hook, in row order) gives the rows, their masks and
  the advantages handed to TRL;
* ``compute_loss`` is wrapped to keep each training step's inputs and loss, and the policy's forward to keep the
  per-token log-probabilities with their gradient, so the gradient on every token is read after backward.

The split is 4 base rows + 1 prefix x 4 suffixes; two prompts per generation trained in two optimizer steps
(``steps_per_generation=2``), so the second step is off-policy and clipping can bite.
"""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from datasets import Dataset

from tests.conftest import make_tiny_llama
from trl_resets import SRPOConfig, SRPOTrainer
from trl_resets.metrics import PREFIX

G1, K, G2 = 4, 1, 4
PROMPTS_PER_GENERATION = 2
MAX_THOUGHT_TOKENS = 6


class RewardLog:
    """A reward function that records every completion it scores.

    A completion of one thought (at most ``MAX_THOUGHT_TOKENS`` tokens) is correct (2.0); a longer one gets a
    value below the success threshold that depends on its tokens, so groups carry varied rewards and every seed
    has at least two thoughts (its reset prefix is never empty).
    """

    __name__ = "reward_log"

    def __init__(self):
        self.scored: list[tuple[int, ...]] = []

    @staticmethod
    def value(ids) -> float:
        ids = list(ids)
        return 2.0 if len(ids) <= MAX_THOUGHT_TOKENS else (sum(ids) * 7 % 97) / 100.0

    def __call__(self, completions, completion_ids, **kwargs):
        self.scored.extend(tuple(ids) for ids in completion_ids)
        return [self.value(ids) for ids in completion_ids]


class LastThought:
    """Localizer naming the seed's last thought, recording how many thoughts each seed had."""

    def __init__(self):
        self.lengths: list[int] = []

    def __call__(self, question, thoughts):
        self.lengths.append(len(thoughts))
        return len(thoughts)


def _rows_of(output) -> list[dict]:
    """Each row of a generation output as plain values: prompt, completion, prefix length, advantage."""
    rows = []
    for b in range(output["completion_ids"].size(0)):
        prompt = output["prompt_ids"][b][output["prompt_mask"][b].bool()].tolist()
        keep = output["completion_mask"][b].bool()
        completion = output["completion_ids"][b][keep].tolist()
        tool = output["tool_mask"][b][keep].tolist() if "tool_mask" in output else [1] * len(completion)
        prefix_len = tool.index(1) if 1 in tool else len(tool)
        assert all(tool[prefix_len:]), "the masked tokens of a row are not one leading prefix"
        rows.append({"prompt": tuple(prompt), "ids": tuple(completion), "prefix_len": prefix_len,
                     "advantage": float(output["advantages"][b])})
    return rows


def _groups(rows: list[dict]) -> dict[tuple, list[int]]:
    """Rows by (prompt, shared prefix): the base group has no prefix, each shared-prefix group its own."""
    groups: dict[tuple, list[int]] = {}
    for j, row in enumerate(rows):
        prefix = row["ids"][: row["prefix_len"]] if row["prefix_len"] else None
        groups.setdefault((row["prompt"], prefix), []).append(j)
    return groups


def _normalized(rewards: list[float], eps: float = 1e-4) -> list[float]:
    """(r - mean) / (sample std + eps), the per-group normalization written out."""
    n = len(rewards)
    mean = sum(rewards) / n
    std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / (n - 1))
    return [(r - mean) / (std + eps) for r in rewards]


def _run(tmp_path, tokenizer, clip: bool):
    reward, localizer = RewardLog(), LastThought()
    questions = ["2+5?", "3+4?", "1+6?", "9-2?"]
    args = SRPOConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=G1 + K * G2, steps_per_generation=2,
        num_base_generations=G1, num_reset_prefixes=K, num_reset_generations=G2,
        max_steps=2, max_completion_length=24, max_thought_tokens=MAX_THOUGHT_TOKENS, max_thoughts=6,
        learning_rate=0.05, logging_steps=1, report_to="none", use_cpu=True, bf16=False, save_strategy="no",
        seed_budget=4, temperature=1.0, seed=0, clip_surrogate=clip, loss_type="grpo",
    )
    trainer = SRPOTrainer(model=make_tiny_llama(tokenizer), reward_funcs=reward, args=args,
                          train_dataset=Dataset.from_dict({"prompt": questions, "answer": ["7"] * 4}),
                          processing_class=tokenizer, localizer=localizer)
    generations, steps, forwards = [], [], []

    generate = trainer._generate_and_score_completions

    def spy_generate(inputs):
        generations.append(generate(inputs))
        return generations[-1]

    compute_loss = trainer.compute_loss

    def spy_loss(model, inputs, *args, **kwargs):
        start = len(forwards)
        loss = compute_loss(model, inputs, *args, **kwargs)
        steps.append({"inputs": inputs, "loss": loss.detach(), "logps": forwards[start:]})
        return loss

    forward = trainer.model.forward

    def spy_forward(*args, **kwargs):
        out = forward(*args, **kwargs)
        log_probs = getattr(out, "log_probs", None)
        if log_probs is not None and log_probs.requires_grad:
            log_probs.retain_grad()
            forwards.append(log_probs)
        return out

    trainer._generate_and_score_completions = spy_generate
    trainer.compute_loss = spy_loss
    trainer.model.forward = spy_forward
    trainer.train()
    assert len(generations) == 1 and len(steps) == 2
    assert all(step["logps"] for step in steps), "the loss's forward returned no per-token log_probs to spy on"
    return trainer, reward, localizer, generations[0], steps


@pytest.fixture(scope="module")
def unclipped(tmp_path_factory, char_tokenizer):
    return _run(tmp_path_factory.mktemp("unclipped"), char_tokenizer, clip=False)


@pytest.fixture(scope="module")
def clipped(tmp_path_factory, char_tokenizer):
    return _run(tmp_path_factory.mktemp("clipped"), char_tokenizer, clip=True)


def test_each_reward_function_call_scores_each_rollout_once(unclipped):
    _, reward, localizer, output, _ = unclipped
    rows = _rows_of(output)
    # all-incorrect draws are not guaranteed; what is: every seed was found, each rollout scored exactly once
    assert len(localizer.lengths) == PROMPTS_PER_GENERATION * K
    phase1 = len(reward.scored) - PROMPTS_PER_GENERATION * K * G2
    assert phase1 == PROMPTS_PER_GENERATION * (G1 + K), (
        f"{len(reward.scored)} completions scored for {len(rows)} rows: the reward function ran more than once "
        "per rollout")
    scored = Counter(reward.scored)
    batch = Counter(row["ids"] for row in rows)
    for ids, count in batch.items():
        assert scored[ids] == count, f"a row's trajectory was scored {scored[ids]} times, expected {count}"


def test_advantages_are_normalized_inside_each_group(unclipped):
    _, _, localizer, output, _ = unclipped
    rows = _rows_of(output)
    assert min(localizer.lengths) >= 2  # every seed has a non-empty reset prefix: groups are told apart by it
    groups = _groups(rows)
    sizes = sorted(len(members) for members in groups.values())
    assert sizes == [G1] * PROMPTS_PER_GENERATION + [G2] * (PROMPTS_PER_GENERATION * K)
    nonzero = 0
    for members in groups.values():
        want = _normalized([RewardLog.value(rows[j]["ids"]) for j in members])
        got = [rows[j]["advantage"] for j in members]
        assert got == pytest.approx(want, abs=1e-5)
        nonzero += any(abs(a) > 1e-3 for a in want)
    assert nonzero >= 2  # the check above compares real signal, not zeros


def _expected_grad(step, eps_low, eps_high, clip: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss's gradient w.r.t. each completion token's log-probability, and that gradient as observed.

    Per row mean over active tokens, then mean over rows: d/d logp = -A * w / (n_active * B), with w the
    importance ratio pi / pi_old on a clipped surrogate (0 where the clip holds the ratio) and 1 on the first,
    on-policy step of the unclipped loss.
    """
    inputs = step["inputs"]
    width = inputs["completion_ids"].size(1)
    logps = torch.cat([lp[:, -width:] for lp in step["logps"]])
    grad = torch.cat([lp.grad[:, -width:] for lp in step["logps"]])
    mask = inputs["completion_mask"] * inputs.get("tool_mask", torch.ones_like(inputs["completion_mask"]))
    mask = mask.to(grad.dtype)
    adv = inputs["advantages"].to(grad.dtype).unsqueeze(1)
    rows = mask.size(0)
    weight = torch.ones_like(grad)
    if clip:
        old = inputs.get("old_per_token_logps")
        ratio = torch.ones_like(grad) if old is None else torch.exp(logps.detach() - old)
        held = ((adv > 0) & (ratio > 1 + eps_high)) | ((adv < 0) & (ratio < 1 - eps_low))
        weight = ratio * (~held)
    want = -adv * weight * mask / (mask.sum(-1, keepdim=True).clamp(min=1.0) * rows)
    return want, grad


def _prefix_and_suffix(inputs) -> tuple[torch.Tensor, torch.Tensor]:
    completion = inputs["completion_mask"].bool()
    suffix = completion & inputs["tool_mask"].bool()
    return completion & ~suffix, suffix


def test_reset_prefix_gets_exactly_zero_gradient_and_the_suffix_does_not(unclipped, clipped):
    for _, _, _, _, steps in (unclipped, clipped):
        for number, step in enumerate(steps):
            prefix, suffix = _prefix_and_suffix(step["inputs"])
            width = step["inputs"]["completion_ids"].size(1)
            grad = torch.cat([lp.grad[:, -width:] for lp in step["logps"]])
            assert prefix.any() and suffix.any()
            assert torch.count_nonzero(grad[prefix]) == 0
            if number == 0:  # on-policy: no clip holds a token, every suffix token with signal gets gradient
                active = suffix & (step["inputs"]["advantages"].abs() > 1e-3).unsqueeze(1)
                assert torch.count_nonzero(grad[active]) == int(active.sum())


def test_unclipped_loss_gradient_on_the_on_policy_step(unclipped):
    trainer, _, _, _, steps = unclipped
    want, grad = _expected_grad(steps[0], trainer.epsilon_low, trainer.epsilon_high, clip=False)
    assert torch.allclose(grad, want, atol=1e-7, rtol=1e-4)


def test_clipped_surrogate_gradient_holds_the_ratio_inside_the_clip(clipped):
    trainer, _, _, _, steps = clipped
    for number, step in enumerate(steps):
        want, grad = _expected_grad(step, trainer.epsilon_low, trainer.epsilon_high, clip=True)
        assert torch.allclose(grad, want, atol=1e-7, rtol=1e-4), f"optimizer step {number + 1}"
    # the second step trains on rollouts of the policy before the first update: the clip must have held some
    # active tokens (zero gradient) and left others (the unclipped loss has no such zeros)
    _, suffix = _prefix_and_suffix(steps[1]["inputs"])
    active = suffix & (steps[1]["inputs"]["advantages"].abs() > 1e-3).unsqueeze(1)
    want, _ = _expected_grad(steps[1], trainer.epsilon_low, trainer.epsilon_high, clip=True)
    held = int((want[active] == 0).sum())
    assert 0 < held < int(active.sum())


def _recomputed_metrics(rows: list[dict], localizer: LastThought, threshold: float) -> dict[str, float]:
    groups = _groups(rows)
    tokens = {"base": 0, "sp": 0}
    passed = {"base": [], "sp": []}
    base_signal, sp_signals = {}, {}

    def signal(members):
        values = [abs(rows[j]["advantage"]) / max(len(rows[j]["ids"]) - rows[j]["prefix_len"], 1)
                  for j in members if abs(rows[j]["advantage"]) > 0]
        return sum(values) / len(values) if values else None

    for (prompt, prefix), members in groups.items():
        kind = "base" if prefix is None else "sp"
        tokens[kind] += sum(len(rows[j]["ids"]) - rows[j]["prefix_len"] for j in members)
        passed[kind] += [RewardLog.value(rows[j]["ids"]) >= threshold for j in members]
        value = signal(members)
        if kind == "base":
            base_signal[prompt] = value
        elif value is not None:
            sp_signals.setdefault(prompt, []).append(value)
    ratio_num = sum(sum(v) / len(v) for p, v in sp_signals.items() if base_signal.get(p) is not None)
    ratio_den = sum(base_signal[p] for p in sp_signals if base_signal.get(p) is not None)
    assert ratio_den > 0
    return {
        "tokens_base": tokens["base"],
        "tokens_suffix": tokens["sp"],
        "base_pass_rate": sum(passed["base"]) / len(passed["base"]),
        "sp_pass_rate": sum(passed["sp"]) / len(passed["sp"]),
        "reset_index_mean": sum(localizer.lengths) / len(localizer.lengths),
        "reset_depth_mean": 1.0,
        "fallback_rate": 0.0,
        "parse_failure_rate": 0.0,
        "grad_signal_ratio": ratio_num / ratio_den,
    }


def test_logged_reset_metrics_equal_values_recomputed_from_the_rows(unclipped):
    trainer, _, localizer, output, _ = unclipped
    logged = [entry for entry in trainer.state.log_history if PREFIX + "grad_signal_ratio" in entry]
    assert len(logged) == 1
    want = _recomputed_metrics(_rows_of(output), localizer, trainer.args.success_threshold)
    got = {key: logged[0][PREFIX + key] for key in want}
    assert got == pytest.approx(want, rel=1e-5)
    assert got["grad_signal_ratio"] != pytest.approx(1.0)  # swapping its two terms changes it


def test_evaluation_scores_with_trls_reward_call_on_the_evaluated_rollouts(tmp_path, char_tokenizer):
    """Evaluation has no reset groups: TRL calls the reward functions itself, with the rows' prompts, completions,
    completion ids and columns, and logs their mean."""
    calls = []

    def judged(prompts, completions, completion_ids, answer, **kwargs):
        calls.append((list(prompts), list(completions), [list(ids) for ids in completion_ids], list(answer)))
        return [float(len(ids)) for ids in completion_ids]

    questions = ["2+5?", "3+4?"]
    args = SRPOConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=8, per_device_eval_batch_size=8, max_steps=1,
        max_completion_length=12, max_thought_tokens=MAX_THOUGHT_TOKENS, max_thoughts=4, report_to="none",
        use_cpu=True, bf16=False, save_strategy="no", seed=0, num_generations_eval=4,
    )
    data = Dataset.from_dict({"prompt": questions, "answer": ["7", "8"]})
    trainer = SRPOTrainer(model=make_tiny_llama(char_tokenizer), reward_funcs=judged, args=args, train_dataset=data,
                          eval_dataset=data, processing_class=char_tokenizer)
    metrics = trainer.evaluate()
    assert len(calls) == 1
    prompts, completions, ids, answers = calls[0]
    assert len(ids) == 8 and sorted(set(prompts)) == questions and prompts.count("2+5?") == 4
    assert answers == ["7" if p == "2+5?" else "8" for p in prompts]
    assert completions == char_tokenizer.batch_decode(ids, skip_special_tokens=True)
    assert metrics["eval_reward"] == pytest.approx(sum(map(len, ids)) / len(ids))


def test_the_loss_refuses_inputs_without_the_prefix_mask(unclipped):
    trainer = unclipped[0]
    inputs = {"completion_mask": torch.ones(1, 3), "completion_ids": torch.ones(1, 3, dtype=torch.long)}
    with pytest.raises(RuntimeError) as refused:
        trainer._compute_loss(trainer.model, inputs)
    message = str(refused.value)
    assert ("the loss inputs carry no tool_mask: TRL no longer hands over the env_mask that masks each reset row's "
            "prefix, so the prefix would be trained.") in message
    assert "This trl version is not supported by trl-resets; install the pinned one (see constraints.txt)." in message
