"""The suffix-masked loss and per-group advantages."""

import math
import re

import pytest
import torch

from trl_resets.advantages import group_advantages
from trl_resets.loss import entropy_bonus, reset_pg_loss, rows_per_micro_batch


def test_advantages_are_normalized_inside_each_group_only():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0])
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    adv = group_advantages(rewards, groups, eps=0.0)
    base = torch.tensor([1.0, 0.0, 0.0, 0.0])
    expected_base = (base - base.mean()) / base.std()
    assert torch.allclose(adv[:4], expected_base)
    assert torch.allclose(adv[4:], torch.tensor([0.5, 0.5, 0.5, -1.5]))  # its own mean 0.75, not the pooled 0.5
    pooled = (rewards - rewards.mean()) / rewards.std()
    assert not torch.allclose(adv, pooled)
    for g in (0, 1):
        assert abs(adv[groups == g].sum().item()) < 1e-6


def test_degenerate_and_nan_rows_get_zero_advantage():
    rewards = torch.tensor([1.0, 1.0, 1.0, float("nan"), 0.0, 1.0, float("nan"), float("nan")])
    groups = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2])
    adv = group_advantages(rewards, groups)
    assert torch.all(adv[:3] == 0) and adv[3] == 0 and torch.all(adv[6:] == 0)
    assert adv[4] < 0 < adv[5]  # NaN row left out of its group's statistics
    assert torch.allclose(group_advantages(torch.tensor([1.0, 3.0]), torch.tensor([0, 0]), scale=False),
                          torch.tensor([-1.0, 1.0]))


def _logps_from_logits(logits, ids):
    return torch.log_softmax(logits, dim=-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)


def test_prefix_tokens_get_exactly_zero_gradient_on_a_tiny_model(tiny_model):
    torch.manual_seed(0)
    prompt = torch.randint(5, 90, (2, 4))
    completion = torch.randint(5, 90, (2, 6))
    ids = torch.cat([prompt, completion], dim=1)
    # Row 0: a reset row whose first 3 completion tokens are the shared prefix. Row 1: a base row.
    mask = torch.tensor([[0, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 0]], dtype=torch.float32)
    advantages = torch.tensor([1.5, -0.5])

    logits = tiny_model(ids).logits[:, prompt.shape[1] - 1 : -1, :].detach().requires_grad_(True)
    logps = _logps_from_logits(logits, completion)
    loss = reset_pg_loss(logps, advantages, mask).loss
    loss.backward()
    assert torch.count_nonzero(logits.grad[0, :3]) == 0  # prefix: exactly zero
    assert torch.count_nonzero(logits.grad[1, 5]) == 0  # padding
    assert torch.count_nonzero(logits.grad[0, 3:]) > 0 and torch.count_nonzero(logits.grad[1, :5]) > 0

    assert math.isclose(loss.item(), 0.5 * (-1.5 + 0.5), rel_tol=1e-6)  # on-policy: pi / pi_old = 1 on every token

    # The gradient on a suffix token's own logit is -(1/B)(A/T)(1 - p), as in Appendix G.
    probs = torch.softmax(logits.detach(), dim=-1)
    token = completion[0, 4]
    expected = -(1 / 2) * (1.5 / 3) * (1 - probs[0, 4, token])
    assert math.isclose(logits.grad[0, 4, token].item(), expected.item(), rel_tol=1e-5)


def test_model_parameters_see_no_prefix_signal(tiny_model):
    """Changing only the prefix tokens' advantage-free part leaves the gradient unchanged."""
    torch.manual_seed(1)
    ids = torch.randint(5, 90, (1, 10))
    mask = torch.tensor([[0, 0, 0, 0, 1, 1]], dtype=torch.float32)

    def grads(advantage):
        tiny_model.zero_grad()
        logits = tiny_model(ids).logits[:, 3:-1, :]
        reset_pg_loss(_logps_from_logits(logits, ids[:, 4:]), torch.tensor([advantage]), mask).loss.backward()
        return torch.cat([p.grad.flatten() for p in tiny_model.parameters() if p.grad is not None])

    g = grads(1.0)
    assert torch.allclose(grads(2.0), 2 * g, atol=1e-7)
    zero_mask_loss = reset_pg_loss(torch.randn(1, 6, requires_grad=True), torch.tensor([1.0]), torch.zeros(1, 6))
    assert zero_mask_loss.loss.item() == 0.0


def test_kl_term_and_shapes():
    logps = torch.log(torch.tensor([[0.5, 0.25]]))
    ref = torch.log(torch.tensor([[0.25, 0.25]]))
    mask = torch.ones(1, 2)
    with_kl = reset_pg_loss(logps, torch.tensor([0.0]), mask, ref_logps=ref, beta=1.0)
    d = ref - logps
    assert math.isclose(with_kl.loss.item(), ((torch.exp(d) - d - 1).mean()).item(), rel_tol=1e-6)
    assert with_kl.policy_loss.item() == 0.0 and torch.allclose(with_kl.kl, torch.exp(d) - d - 1)


def test_later_step_gradient_is_weighted_by_the_ratio_to_the_sampling_policy():
    """On a token's own logit: -(1/B)(A/T) * (pi/pi_old) * (1 - p); with pi_old = pi it is the on-policy value."""
    torch.manual_seed(2)
    logits = torch.randn(1, 3, 7, requires_grad=True)
    ids = torch.tensor([[1, 4, 6]])
    logps = _logps_from_logits(logits, ids)
    old = logps.detach() + torch.tensor([[0.3, -0.2, 0.1]])
    reset_pg_loss(logps, torch.tensor([2.0]), torch.ones(1, 3), old_logps=old).loss.backward()
    probs = torch.softmax(logits.detach(), -1)
    for t in range(3):
        p, ratio = probs[0, t, ids[0, t]], torch.exp(logps[0, t].detach() - old[0, t])
        assert math.isclose(logits.grad[0, t, ids[0, t]].item(), (-(2.0 / 3) * ratio * (1 - p)).item(), rel_tol=1e-5)


def test_clipped_surrogate_keeps_the_per_row_mean_and_stops_clipped_tokens():
    """Rows of 1 and 3 tokens: each row is averaged over its own tokens, then rows are averaged (not all tokens)."""
    logps = torch.zeros(2, 3, requires_grad=True)
    old = torch.tensor([[0.0, 0.0, 0.0], [0.0, -0.5, 0.0]])  # row 1 token 1: ratio e^0.5 > 1 + 0.2, A > 0: clipped
    mask = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    reset_pg_loss(logps, torch.tensor([1.0, 3.0]), mask, old_logps=old, clip=(0.2, 0.2)).loss.backward()
    # d/dlogp of -A * ratio is -A * ratio, divided by the row's T and by B=2
    assert torch.allclose(logps.grad, torch.tensor([[-0.5, 0.0, 0.0], [-0.5, 0.0, -0.5]]))


def test_filler_rows_do_not_count_in_the_mean_over_rows():
    logps = torch.zeros(3, 2, requires_grad=True)
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.0, 0.0]])  # the last row is a filler
    terms = reset_pg_loss(logps, torch.tensor([1.0, -1.0, 0.0]), mask)
    terms.loss.backward()
    assert torch.allclose(logps.grad, torch.tensor([[-0.25, -0.25], [0.5, 0.0], [0.0, 0.0]]))  # B = 2 rows, not 3
    # 12 rows that carry loss in a generation batch of 3 micro-batches per process, 2 processes, 2 micro-batches
    # per optimizer step: each micro-batch's row sum is divided by the 4 rows a process trains per optimizer step
    assert rows_per_micro_batch(12, num_processes=2, accumulation_steps=2, steps_per_generation=3) == 4.0


def test_per_token_advantages_token_weights_and_a_given_row_count():
    logps = torch.zeros(2, 2, requires_grad=True)  # on-policy: every ratio is 1
    advantages = torch.tensor([[1.0, 2.0], [-1.0, 4.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    weights = torch.tensor([[0.5, 2.0], [3.0, 1.0]])
    terms = reset_pg_loss(logps, advantages, mask, token_weights=weights, num_rows=4.0)
    # per token -A * w: row 0 (-0.5, -4.0), mean -2.25; row 1 (3.0), mean 3.0; rows summed over the 4 given
    assert math.isclose(terms.loss.item(), (-2.25 + 3.0) / 4, rel_tol=1e-6)
    assert math.isclose(terms.policy_loss.item(), (-2.25 + 3.0) / 2, rel_tol=1e-6)  # over the 2 rows with loss
    terms.loss.backward()
    assert torch.allclose(logps.grad, torch.tensor([[-0.5 / 8, -4.0 / 8], [3.0 / 4, 0.0]]))


def test_policy_loss_is_the_mean_over_the_rows_that_carry_loss():
    logps = torch.zeros(2, 2)
    terms = reset_pg_loss(logps, torch.tensor([2.0, 5.0]), torch.tensor([[1.0, 1.0], [0.0, 0.0]]))
    assert terms.policy_loss.item() == -2.0 and terms.loss.item() == -2.0  # the filler row counts in neither


def test_two_sided_clip_bounds_the_ratio_from_above_and_the_clip_holds_the_low_side():
    logps = torch.zeros(1, 3, requires_grad=True)
    old = torch.log(torch.tensor([[0.5, 2.0, 1.0]]))  # ratios 2, 0.5 and 1
    terms = reset_pg_loss(logps, torch.tensor([-1.0]), torch.ones(1, 3), old_logps=old, clip=(0.2, 0.2), delta=1.5)
    # A = -1: token 0 takes the delta-capped ratio (1.5 > 1.2), token 1 the clipped 0.8 (0.5 < 1 - 0.2), token 2 is 1
    assert math.isclose(terms.loss.item(), (1.5 + 0.8 + 1.0) / 3, rel_tol=1e-6)
    terms.loss.backward()
    assert torch.allclose(logps.grad, torch.tensor([[0.0, 0.0, 1.0 / 3]]))  # capped and clipped tokens: no gradient
    unbounded = reset_pg_loss(torch.zeros(1, 3), torch.tensor([-1.0]), torch.ones(1, 3), old_logps=old, clip=(0.2, 0.2))
    assert math.isclose(unbounded.loss.item(), (2.0 + 0.8 + 1.0) / 3, rel_tol=1e-6)


def test_kl_off_policy_with_and_without_the_bias_correction():
    logps = torch.log(torch.tensor([[0.5, 0.25]]))
    old = torch.log(torch.tensor([[0.25, 0.25]]))  # ratios 2 and 1
    ref = torch.log(torch.tensor([[0.25, 0.5]]))
    kl = torch.tensor([math.log(2) - 0.5, 1 - math.log(2)])  # e^d - d - 1 with d = log(ref / pi)
    plain = reset_pg_loss(logps, torch.tensor([0.0]), torch.ones(1, 2), old_logps=old, ref_logps=ref, beta=2.0)
    assert math.isclose(plain.loss.item(), 2.0 * kl.mean().item(), rel_tol=1e-6)
    assert torch.allclose(plain.kl, kl.unsqueeze(0))
    corrected = reset_pg_loss(logps, torch.tensor([0.0]), torch.ones(1, 2), old_logps=old, ref_logps=ref, beta=2.0,
                              kl_bias_correction=True)
    assert torch.allclose(corrected.kl, (kl * torch.tensor([2.0, 1.0])).unsqueeze(0))
    assert math.isclose(corrected.loss.item(), 2.0 * math.log(2) / 2, rel_tol=1e-6)


def _exactly(message: str) -> str:
    return f"^{re.escape(message)}$"


def test_bad_shapes_and_a_missing_reference_are_refused_with_the_values_seen():
    with pytest.raises(ValueError, match=_exactly("logps (2, 3) and mask (2, 2) differ in shape.")):
        reset_pg_loss(torch.zeros(2, 3), torch.zeros(2), torch.ones(2, 2))
    with pytest.raises(ValueError, match=_exactly("per-token advantages (2, 3) and logps (2, 2) differ in shape.")):
        reset_pg_loss(torch.zeros(2, 2), torch.zeros(2, 3), torch.ones(2, 2))
    with pytest.raises(ValueError, match=_exactly("beta != 0 needs the reference log-probabilities (ref_logps).")):
        reset_pg_loss(torch.zeros(2, 2), torch.zeros(2), torch.ones(2, 2), beta=0.1)


def test_the_loss_stays_in_the_log_probabilities_dtype():
    logps = torch.zeros(1, 2, dtype=torch.bfloat16)
    terms = reset_pg_loss(logps, torch.tensor([1.0]), torch.ones(1, 2), old_logps=torch.zeros(1, 2))
    assert terms.loss.dtype == terms.policy_loss.dtype == torch.bfloat16 and terms.loss.item() == -1.0
    bonus = entropy_bonus(torch.tensor([[1.0, 3.0]], dtype=torch.bfloat16), torch.ones(1, 2))
    assert bonus.dtype == torch.bfloat16 and bonus.item() == 2.0


def test_entropy_bonus_is_the_mean_over_the_active_tokens():
    entropies = torch.tensor([[1.0, 2.0, 4.0], [8.0, 16.0, 33.0]])
    assert entropy_bonus(entropies, torch.tensor([[1, 1, 0], [0, 0, 1]])).item() == (1.0 + 2.0 + 33.0) / 3
    assert entropy_bonus(entropies, torch.tensor([[0, 0, 0], [0, 1, 0]])).item() == 16.0
    assert entropy_bonus(entropies, torch.zeros(2, 3)).item() == 0.0  # no active token: no bonus


def test_a_batch_with_no_row_that_carries_loss_divides_by_one():
    assert rows_per_micro_batch(0, num_processes=1, accumulation_steps=1, steps_per_generation=1) == 1.0
    assert rows_per_micro_batch(1, num_processes=1, accumulation_steps=1, steps_per_generation=1) == 1.0
