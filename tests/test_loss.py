"""The suffix-masked loss and per-group advantages."""

import math

import torch

from trl_resets.advantages import group_advantages
from trl_resets.loss import reset_pg_loss


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
    loss = reset_pg_loss(logps, advantages, mask)
    loss.backward()
    assert torch.count_nonzero(logits.grad[0, :3]) == 0  # prefix: exactly zero
    assert torch.count_nonzero(logits.grad[1, 5]) == 0  # padding
    assert torch.count_nonzero(logits.grad[0, 3:]) > 0 and torch.count_nonzero(logits.grad[1, :5]) > 0

    lp = logps.detach()
    by_hand = 0.5 * (-1.5 * (lp[0, 3] + lp[0, 4] + lp[0, 5]) / 3 + 0.5 * (lp[1, :5].sum()) / 5)
    assert math.isclose(loss.item(), by_hand.item(), rel_tol=1e-6)

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
        reset_pg_loss(_logps_from_logits(logits, ids[:, 4:]), torch.tensor([advantage]), mask).backward()
        return torch.cat([p.grad.flatten() for p in tiny_model.parameters() if p.grad is not None])

    g = grads(1.0)
    assert torch.allclose(grads(2.0), 2 * g, atol=1e-7)
    zero_mask_loss = reset_pg_loss(torch.randn(1, 6, requires_grad=True), torch.tensor([1.0]), torch.zeros(1, 6))
    assert zero_mask_loss.item() == 0.0


def test_kl_term_and_shapes():
    logps = torch.log(torch.tensor([[0.5, 0.25]]))
    ref = torch.log(torch.tensor([[0.25, 0.25]]))
    mask = torch.ones(1, 2)
    with_kl = reset_pg_loss(logps, torch.tensor([0.0]), mask, ref_logps=ref, beta=1.0)
    d = ref - logps
    assert math.isclose(with_kl.item(), ((torch.exp(d) - d - 1).mean()).item(), rel_tol=1e-6)
