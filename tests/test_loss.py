"""The suffix-masked loss and per-group advantages."""

import math

import torch

from trl_resets.advantages import group_advantages
from trl_resets.loss import reset_pg_loss, rows_per_micro_batch


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
