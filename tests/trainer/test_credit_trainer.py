"""Comparison-based credit in the trainers: per-token advantages through the loss, the wiring and the metrics.

* the loss with per-token advantages against the gradient written out by hand (clipped and unclipped);
* a scripted policy (known thoughts) in GRPO mode: the per-token advantages handed to TRL and the ``credit/*``
  metrics equal the values computed by hand from the rows;
* a tiny random policy trained one step (GRPO mode and SRPO with every group credited): the gradient on each
  token's log-probability is the per-token advantage's.
"""

from __future__ import annotations

import math

import pytest
import torch
from datasets import Dataset

from tests.conftest import ScriptedLlama, make_tiny_llama
from trl_resets import ResetConfig, SRPOConfig, SRPOTrainer
from trl_resets.loss import reset_pg_loss
from trl_resets.trainer import GRPOBaselineTrainer


def test_per_token_advantages_through_the_loss_match_the_hand_computed_gradient():
    logps = torch.tensor([[-0.5, -1.0, -2.0], [-0.3, -0.7, -0.7]], requires_grad=True)
    adv = torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 1.0]])
    reset_pg_loss(logps, adv, mask).loss.backward()
    # on-policy, unclipped: d/d logp = -A_t / (active tokens of the row) / (rows)
    want = torch.tensor([[-1.0 / 3, 2.0 / 3, -0.5 / 3], [0.0, -3.0 / 2, 1.0 / 2]]) / 2
    assert torch.allclose(logps.grad, want)

    old = torch.tensor([[-0.8, -1.5, -2.0], [-0.3, -0.7, -0.4]])  # ratios e^0.3, e^0.5, 1 / 1, 1, e^-0.3
    logps.grad = None
    reset_pg_loss(logps, adv, mask, old_logps=old, clip=(0.2, 0.2)).loss.backward()
    ratio = torch.exp(logps.detach() - old)
    # PPO's min(r A, clip(r) A) is the constant clipped term, so no gradient, where A > 0 and r > 1.2 (token 0, 0)
    # or A < 0 and r < 0.8 (token 1, 2); token (0, 1) has A < 0 and r = 1.65: the unclipped term, gradient -A r
    held = torch.tensor([[True, False, False], [False, False, True]])
    want = torch.where(held, torch.zeros_like(ratio), -adv * ratio) * mask / mask.sum(-1, keepdim=True) / 2
    assert torch.allclose(logps.grad, want)


def test_row_advantages_and_the_same_values_per_token_give_the_same_loss_bit_for_bit():
    torch.manual_seed(0)
    logps = torch.randn(3, 5)
    adv = torch.randn(3)
    mask = (torch.rand(3, 5) > 0.3).float()
    old = logps + 0.1 * torch.randn(3, 5)
    for clip in (None, (0.2, 0.28)):
        rows = reset_pg_loss(logps, adv, mask, old_logps=old, clip=clip).loss
        tokens = reset_pg_loss(logps, adv[:, None].expand(3, 5), mask, old_logps=old, clip=clip).loss
        assert torch.equal(rows, tokens)
    with pytest.raises(ValueError, match=r"per-token advantages \(3, 4\) and logps \(3, 5\)"):
        reset_pg_loss(logps, torch.zeros(3, 4), mask)


def boxed_seven(completions, **kwargs):
    return [1.0 if "\\boxed{7}" in c else 0.0 for c in completions]


SCRIPTS = ["a</thought>b</thought>\\boxed{7}</thought>", "a</thought>b</thought>\\boxed{8}</thought>",
           "a</thought>c</thought>\\boxed{7}</thought>", "d</thought>\\boxed{9}</thought>"]
THOUGHT = len("a</thought>")


def _scripted(tmp_path, tokenizer, **credit):
    scripts = [tokenizer(s, add_special_tokens=False)["input_ids"] for s in SCRIPTS]
    args = ResetConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_base_generations=4,
                       num_reset_prefixes=0, max_steps=1, max_completion_length=60, max_thought_tokens=20,
                       max_thoughts=5, report_to="none", use_cpu=True, bf16=False, seed_budget=0,
                       repair_max_tokens=8, share_prefill=False, **credit)
    trainer = GRPOBaselineTrainer(model=ScriptedLlama.build(tokenizer, scripts), reward_funcs=boxed_seven, args=args,
                                  train_dataset=Dataset.from_dict({"prompt": ["q?"] * 4}), processing_class=tokenizer)
    trainer.model.train()
    output = trainer._generate_and_score_completions([{"prompt": "q?"}] * 4)
    return trainer, output


A = 0.5 / (math.sqrt(1 / 3) + 1e-4)  # rewards 1, 0, 1, 0: GRPO's advantage is +-A


def _tokens(output, row):
    return output["token_advantages"][row][output["completion_mask"][row].bool()].tolist()


def test_diff_in_grpo_mode_hands_the_loss_the_hand_computed_per_token_advantages(tmp_path, char_tokenizer):
    trainer, output = _scripted(tmp_path, char_tokenizer, credit="diff")
    assert output["advantages"].tolist() == pytest.approx([A, -A, A, -A], rel=1e-5)
    n = [len(s) for s in SCRIPTS]
    last = [n[0] - 2 * THOUGHT, n[1] - 2 * THOUGHT]
    # row 0 against the failed rows 1 and 3: shares a, b with row 1, so all its credit is on its boxed thought
    assert _tokens(output, 0) == pytest.approx([0.0] * (2 * THOUGHT) + [A * n[0] / last[0]] * last[0], rel=1e-5)
    assert _tokens(output, 1) == pytest.approx([0.0] * (2 * THOUGHT) + [-A * n[1] / last[1]] * last[1], rel=1e-5)
    # row 2 shares a with row 1 (b and c differ; rows 1 and 3 box other numbers)
    assert _tokens(output, 2) == pytest.approx([0.0] * THOUGHT + [A * n[2] / (n[2] - THOUGHT)] * (n[2] - THOUGHT),
                                               rel=1e-5)
    assert _tokens(output, 3) == pytest.approx([-A] * n[3], rel=1e-5)  # shares nothing with rows 0 and 2: uniform
    metrics = trainer._metrics["train"]
    # shared thoughts: row 0 all 3 (a, b with row 1; its boxed 7 with row 2), row 1 a and b, row 2 a and boxed 7
    assert metrics["credit/shared_state_rate"][-1] == pytest.approx(7 / 11)
    spreads = []
    for row in range(4):
        values = _tokens(output, row)
        mean = sum(values) / len(values)
        spreads.append(math.sqrt(sum((v - mean) ** 2 for v in values) / len(values)))
    assert spreads[0] > 0 and spreads[3] == 0
    assert metrics["credit/token_advantage_spread"][-1] == pytest.approx(sum(spreads) / 4, rel=1e-5)
    assert math.isnan(metrics["credit/repair_parse_rate"][-1]) and metrics["credit/tokens_repair"][-1] == 0


def test_state_in_grpo_mode_follows_the_trie_of_the_groups_thoughts(tmp_path, char_tokenizer):
    _, output = _scripted(tmp_path, char_tokenizer, credit="state")
    n = [len(s) for s in SCRIPTS]
    # root 1/2; [a] holds rows 0-2 (2/3); [a, b] rows 0-1 (1/2); then each row's outcome (see test_comparison)
    step = 2 * A  # the factor 1 / (std + eps)
    t = THOUGHT
    assert _tokens(output, 0) == pytest.approx([step / 6] * t + [-step / 6] * t + [step / 2] * (n[0] - 2 * t), rel=1e-5)
    assert _tokens(output, 1) == pytest.approx([step / 6] * t + [-step / 6] * t + [-step / 2] * (n[1] - 2 * t),
                                               rel=1e-5)
    assert _tokens(output, 2) == pytest.approx([step / 6] * t + [step / 3] * (n[2] - t), rel=1e-5)
    assert _tokens(output, 3) == pytest.approx([-A] * n[3], rel=1e-5)


def test_repair_replies_that_do_not_parse_fall_back_to_diff_and_are_counted(tmp_path, char_tokenizer):
    trainer, output = _scripted(tmp_path, char_tokenizer, credit="repair")
    _, diffed = _scripted(tmp_path, char_tokenizer, credit="diff")
    # the scripted policy answers the two repair prompts (failed rows 1 and 3) with its scripts: no Step lines
    assert torch.allclose(output["token_advantages"], diffed["token_advantages"])
    metrics = trainer._metrics["train"]
    assert metrics["credit/repair_parse_rate"][-1] == 0.0
    assert metrics["credit/tokens_repair"][-1] == 2 * 8  # both replies ran to repair_max_tokens


def _train_one_step(tmp_path, tokenizer, trainer_cls, config_cls, **overrides):
    questions = ["2+5?", "3+4?"]
    args = config_cls(
        output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=1, max_completion_length=24,
        max_thought_tokens=4, max_thoughts=6, learning_rate=0.05, logging_steps=1, report_to="none",
        use_cpu=True, bf16=False, save_strategy="no", seed_budget=4, temperature=1.0, seed=0, **overrides)
    trainer = trainer_cls(model=make_tiny_llama(tokenizer), args=args, processing_class=tokenizer,
                          reward_funcs=lambda completions, **kw: [(len(c) % 3) / 2 for c in completions],
                          train_dataset=Dataset.from_dict({"prompt": questions}), state_key=lambda t: len(t) >= 3)
    steps, forwards = [], []
    compute_loss, forward = trainer.compute_loss, trainer.model.forward

    def spy_loss(model, inputs, *args, **kwargs):
        start = len(forwards)
        loss = compute_loss(model, inputs, *args, **kwargs)
        steps.append({"inputs": inputs, "logps": forwards[start:]})
        return loss

    def spy_forward(*args, **kwargs):
        out = forward(*args, **kwargs)
        if getattr(out, "log_probs", None) is not None and out.log_probs.requires_grad:
            out.log_probs.retain_grad()
            forwards.append(out.log_probs)
        return out

    trainer.compute_loss, trainer.model.forward = spy_loss, spy_forward
    trainer.train()
    return trainer, steps[0]


@pytest.mark.parametrize("mode", ["grpo", "srpo-all"])
def test_the_gradient_on_each_token_is_its_per_token_advantages(tmp_path, char_tokenizer, mode):
    if mode == "grpo":
        trainer, step = _train_one_step(tmp_path, char_tokenizer, GRPOBaselineTrainer, ResetConfig, credit="state",
                                        num_base_generations=4, num_reset_prefixes=0)
    else:
        trainer, step = _train_one_step(tmp_path, char_tokenizer, SRPOTrainer, SRPOConfig, credit="diff",
                                        credit_groups="all", localizer="random")
    inputs = step["inputs"]
    width = inputs["completion_ids"].size(1)
    grad = torch.cat([lp.grad[:, -width:] for lp in step["logps"]])
    mask = (inputs["completion_mask"] * inputs["tool_mask"]).to(grad.dtype)
    adv = inputs["token_advantages"]
    live = (mask.sum(-1) > 0).sum()
    want = -adv * mask / (mask.sum(-1, keepdim=True).clamp(min=1.0) * live)
    assert torch.allclose(grad, want, atol=1e-7, rtol=1e-4)
    active = [adv[b][mask[b].bool()] for b in range(adv.size(0)) if mask[b].any()]
    assert any(len(set(a.tolist())) > 1 for a in active)  # some row's credit is not uniform: a real check
    # a row's total credit over its trained tokens is GRPO's (diff) / telescopes to GRPO's centered reward (state)
    row_adv = inputs["advantages"]
    if mode != "grpo":
        assert torch.allclose((adv * mask).sum(-1), row_adv * mask.sum(-1), atol=1e-4)
    log = [e for e in trainer.state.log_history if "credit/shared_state_rate" in e]
    assert len(log) == 1 and 0 < log[0]["credit/shared_state_rate"] <= 1


@pytest.mark.parametrize("overrides, message", [
    ({"credit": "ibpo"}, r"credit='ibpo' is not one of \['uniform', 'diff', 'state', 'repair'\]"),
    ({"state_key": "value"}, r"state_key='value' is not one of \['text', 'arithmetic'\]"),
    ({"credit_groups": "seed"}, r"credit_groups='seed' is not one of \['base', 'all'\]"),
    ({"shared_thought_weight": -0.1}, r"shared_thought_weight=-0.1 is outside \[0, 1\]"),
    ({"credit": "diff", "num_base_generations": 0, "num_reset_prefixes": 2, "num_reset_generations": 4},
     "no base group to apply it to. Set credit_groups='all'"),
    ({"repair_template": "{question} {answer}"}, "repair template has an unknown placeholder 'answer'"),
    ({"repair_max_tokens": 0}, "repair_max_tokens=0"),
    ({"repair_temperature": -1.0}, "repair_temperature=-1.0 is negative"),
])
def test_credit_settings_that_cannot_work_fail_at_construction(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        SRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=8, max_completion_length=16,
                   report_to="none", use_cpu=True, bf16=False, **overrides)


def test_a_state_key_that_is_not_callable_is_refused(tmp_path, char_tokenizer):
    args = ResetConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_base_generations=4,
                       num_reset_prefixes=0, max_completion_length=16, report_to="none", use_cpu=True, bf16=False,
                       credit="state")
    with pytest.raises(TypeError, match="state_key must be a callable"):
        GRPOBaselineTrainer(model=make_tiny_llama(char_tokenizer), reward_funcs=boxed_seven, args=args,
                            train_dataset=Dataset.from_dict({"prompt": ["q?"]}), processing_class=char_tokenizer,
                            state_key="arithmetic")
