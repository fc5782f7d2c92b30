"""The trainer's loss against hand-computed gradients and against GRPOTrainer's own loss (issue: parity with TRL).

Each test builds the loss inputs TRL hands to ``_compute_loss`` by hand on a tiny model, so the gradient can be
compared exactly: the on-policy step equals ``-A * log pi``; a later optimizer step of one generation is weighted
by pi / pi_old; the clipped loss is GRPO's per-row-mean ``loss_type="grpo"``; filler rows do not dilute the mean.
"""

import pytest
import torch
from datasets import Dataset
from trl import GRPOTrainer

from tests.conftest import make_tiny_llama
from trl_resets import SRPOConfig, SRPOTrainer


def _reward(completions, **kwargs):
    return [float(len(c) % 2) for c in completions]


def _trainer(tmp_path, tok, data=None, **overrides):
    settings = {"output_dir": str(tmp_path), "per_device_train_batch_size": 8, "max_completion_length": 16,
                    "report_to": "none", "use_cpu": True, "bf16": False, "save_strategy": "no"}
    settings.update(overrides)
    trainer = SRPOTrainer(model=make_tiny_llama(tok), reward_funcs=_reward, args=SRPOConfig(**settings),
                          train_dataset=data or Dataset.from_dict({"prompt": ["a"] * 8}), processing_class=tok)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    return trainer


def _inputs(lengths, prefixes, advantages, seed=0):
    """Rows of different lengths; ``prefixes[i]`` leading tokens of row i are a masked reset prefix (a row whose
    prefix covers it all is a filler)."""
    g = torch.Generator().manual_seed(seed)
    rows, width = len(lengths), max(lengths)
    completion_mask = torch.tensor([[1] * n + [0] * (width - n) for n in lengths])
    tool_mask = torch.tensor([[0] * p + [1] * (width - p) for p in prefixes])
    return {
        "prompt_ids": torch.randint(5, 90, (rows, 3), generator=g),
        "prompt_mask": torch.ones(rows, 3, dtype=torch.long),
        "completion_ids": torch.randint(5, 90, (rows, width), generator=g),
        "completion_mask": completion_mask,
        "tool_mask": tool_mask,
        "advantages": torch.tensor(advantages),
        "num_loss_rows": torch.tensor(sum(int(((completion_mask * tool_mask)[i]).sum() > 0) for i in range(rows))),
        "num_items_in_batch": (completion_mask * tool_mask).sum(),
    }


def _logps(trainer, inputs):
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    attention = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    logps, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, attention,
                                                             inputs["completion_ids"].size(1))
    return logps


def _grads(trainer, loss, keep=False):
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, params, retain_graph=keep)])


def _by_hand(trainer, inputs, ratio=None):
    """mean over rows of mean over active tokens of -A * r * log pi, with r (detached) the importance ratio."""
    logps = _logps(trainer, inputs)
    mask = (inputs["completion_mask"] * inputs["tool_mask"]).float()
    weight = torch.ones_like(logps) if ratio is None else ratio
    per_row = (-inputs["advantages"].unsqueeze(1) * weight * logps * mask).sum(1) / mask.sum(1).clamp(min=1)
    return per_row.mean()


LENGTHS, PREFIXES, ADVANTAGES = [6, 4, 6, 3], [2, 0, 0, 0], [1.5, -0.5, 0.7, -1.2]


def test_on_policy_gradient_equals_minus_advantage_times_log_pi(tmp_path, char_tokenizer):
    trainer = _trainer(tmp_path, char_tokenizer)
    inputs = _inputs(LENGTHS, PREFIXES, ADVANTAGES)
    got = _grads(trainer, trainer._compute_loss(trainer.model, inputs))
    want = _grads(trainer, _by_hand(trainer, inputs))
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)


def test_later_optimizer_step_of_one_generation_is_importance_weighted(tmp_path, char_tokenizer):
    trainer = _trainer(tmp_path, char_tokenizer)
    inputs = _inputs(LENGTHS, PREFIXES, ADVANTAGES)
    with torch.no_grad():
        current = _logps(trainer, inputs)
    shift = torch.linspace(-0.4, 0.5, current.numel()).view_as(current)
    inputs["old_per_token_logps"] = current + shift  # the sampling policy, before an optimizer step moved it
    got = _grads(trainer, trainer._compute_loss(trainer.model, inputs))
    want = _grads(trainer, _by_hand(trainer, inputs, ratio=torch.exp(-shift)))
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)
    unweighted = _grads(trainer, _by_hand(trainer, inputs))
    assert not torch.allclose(got, unweighted, rtol=1e-3)


def test_trl_hands_the_sampling_policy_to_later_steps_of_a_generation(tmp_path, char_tokenizer):
    """steps_per_generation=2 > gradient_accumulation_steps=1: the second step trains on the first's rollouts."""
    trainer = _trainer(tmp_path, char_tokenizer, data=Dataset.from_dict({"prompt": ["2+5?", "3+4?"]}),
                       steps_per_generation=2, max_steps=2, learning_rate=1e-2, max_thought_tokens=4, max_thoughts=4,
                       seed_budget=1, localizer="random", logging_steps=1)
    seen = []
    compute_loss = trainer._compute_loss

    def recording(model, inputs):
        loss = compute_loss(model, inputs)
        with torch.no_grad():
            now = _logps(trainer, inputs)
        mask = (inputs["completion_mask"] * inputs["tool_mask"]).float()
        ratio = torch.exp(now - inputs["old_per_token_logps"])
        want = _by_hand(trainer, inputs, ratio=ratio) * inputs["completion_mask"].size(0) * 2 / inputs["num_loss_rows"]
        live = int((mask.sum(1) > 0).sum())
        seen.append((_grads(trainer, loss, keep=True), _grads(trainer, want), ratio[mask.bool()], live,
                     inputs["num_loss_rows"]))
        return loss

    trainer._compute_loss = recording
    trainer.train()
    assert len(seen) == 2
    (g1, w1, r1, live1, n1), (g2, w2, r2, live2, n2) = seen
    assert live1 + live2 == int(n1) == int(n2)  # the generation batch's rows that carry loss
    assert torch.allclose(r1, torch.ones_like(r1), atol=1e-5)  # first step: on-policy
    assert (r2 - 1).abs().max() > 1e-3  # second step: the policy has moved since sampling
    for got, want in ((g1, w1), (g2, w2)):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-6)


def _clipped_step(tmp_path, tok):
    """A clipped-surrogate trainer and a batch sampled by a policy that has moved since (ratios spread around 1)."""
    trainer = _trainer(tmp_path, tok, clip_surrogate=True, epsilon=0.1)
    inputs = _inputs(LENGTHS, [0, 0, 0, 0], ADVANTAGES)
    with torch.no_grad():
        current = _logps(trainer, inputs)
    inputs["old_per_token_logps"] = current + torch.linspace(-0.3, 0.3, current.numel()).view_as(current)
    return trainer, inputs


def test_clipped_loss_is_grpo_per_row_mean(tmp_path, char_tokenizer):
    trainer, inputs = _clipped_step(tmp_path, char_tokenizer)
    got = _grads(trainer, trainer._compute_loss(trainer.model, inputs))
    trainer.loss_type = "grpo"  # GRPOConfig's per-row mean, then mean over rows
    grpo = _grads(trainer, GRPOTrainer._compute_loss(trainer, trainer.model, inputs))
    assert torch.allclose(got, grpo, rtol=1e-5, atol=1e-6)
    trainer.loss_type = "dapo"  # TRL's default aggregation (mean over all tokens) differs on rows of unequal length
    dapo = _grads(trainer, GRPOTrainer._compute_loss(trainer, trainer.model, inputs))
    assert not torch.allclose(got, dapo, rtol=1e-3)


def test_clipped_loss_logs_grpo_clip_ratios_with_grpo_definitions(tmp_path, char_tokenizer):
    """Dashboards built for GRPO read clip_ratio/*: the clipped surrogate logs the same values GRPOTrainer logs."""
    trainer, inputs = _clipped_step(tmp_path, char_tokenizer)
    trainer._metrics["train"].clear()
    trainer._compute_loss(trainer.model, inputs)
    ours = {k: v[-1] for k, v in trainer._metrics["train"].items() if k.startswith("clip_ratio/")}
    trainer._metrics["train"].clear()
    trainer.loss_type = "grpo"
    GRPOTrainer._compute_loss(trainer, trainer.model, inputs)
    theirs = {k: v[-1] for k, v in trainer._metrics["train"].items() if k.startswith("clip_ratio/")}
    assert set(ours) == set(theirs) == {"clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean",
                                        "clip_ratio/low_min", "clip_ratio/high_max"}
    assert ours == pytest.approx(theirs, abs=1e-7)
    assert ours["clip_ratio/region_mean"] > 0  # the test clips something


def test_filler_rows_neither_add_to_nor_dilute_the_mean(tmp_path, char_tokenizer):
    """An all-fallback step: base rows plus the zero-weight fillers of the empty seed slot train as GRPO would on
    the base rows alone."""
    trainer = _trainer(tmp_path, char_tokenizer)
    base = _inputs(LENGTHS, [0, 0, 0, 0], ADVANTAGES)
    filled = {key: torch.cat([value, value]) if value.dim() else value for key, value in base.items()}
    filled["tool_mask"] = torch.cat([base["tool_mask"], torch.zeros_like(base["tool_mask"])])
    filled["advantages"] = torch.cat([base["advantages"], torch.zeros(4)])
    got = _grads(trainer, trainer._compute_loss(trainer.model, filled))
    trainer.loss_type = "grpo"
    grpo = _grads(trainer, GRPOTrainer._compute_loss(trainer, trainer.model, base))
    assert torch.allclose(got, grpo, rtol=1e-5, atol=1e-6)


def test_kl_is_logged_and_policy_loss_is_the_policy_term_alone(tmp_path, char_tokenizer):
    trainer = _trainer(tmp_path, char_tokenizer)
    trainer.beta = 0.5  # the reference log-probabilities come with the inputs (no reference model to build here)
    inputs = _inputs(LENGTHS, PREFIXES, ADVANTAGES)
    with torch.no_grad():
        current = _logps(trainer, inputs)
    inputs["ref_per_token_logps"] = current + 0.3
    loss = trainer._compute_loss(trainer.model, inputs)
    kl = torch.exp(torch.tensor(0.3)) - 0.3 - 1
    assert trainer._metrics["train"]["kl"][-1] == pytest.approx(kl.item(), rel=1e-4)
    policy = trainer._metrics["train"]["policy_loss"][-1]
    assert policy == pytest.approx(-sum(ADVANTAGES) / 4, abs=1e-6)  # on-policy ratio 1: -mean(A), no KL in it
    assert loss.item() == pytest.approx(policy + 0.5 * kl.item(), rel=1e-4)


def test_loss_refuses_inputs_without_the_prefix_mask(tmp_path, char_tokenizer):
    trainer = _trainer(tmp_path, char_tokenizer)
    inputs = _inputs(LENGTHS, PREFIXES, ADVANTAGES)
    del inputs["tool_mask"]
    with pytest.raises(RuntimeError, match="tool_mask"):
        trainer._compute_loss(trainer.model, inputs)


@pytest.mark.parametrize("overrides", [
    {"top_entropy_quantile": 0.5},
    {"off_policy_mask_threshold": 0.01},
    {"epsilon": 0.1, "epsilon_high": 0.3, "delta": 1.2},
    {"entropy_coef": 0.3},
    {"entropy_coef": 0.3, "top_entropy_quantile": 0.5},
])
def test_honoured_options_act_as_in_grpo(tmp_path, char_tokenizer, overrides):
    trainer = _trainer(tmp_path, char_tokenizer, clip_surrogate=True, **overrides)
    trainer.beta = 0.2
    trainer.args.use_bias_correction_kl = True
    inputs = _inputs(LENGTHS, [0, 0, 0, 0], ADVANTAGES)
    with torch.no_grad():
        current = _logps(trainer, inputs)
    inputs["old_per_token_logps"] = current + torch.linspace(-0.3, 0.3, current.numel()).view_as(current)
    inputs["ref_per_token_logps"] = current - 0.1
    got = _grads(trainer, trainer._compute_loss(trainer.model, inputs))
    trainer.loss_type = "grpo"
    grpo = _grads(trainer, GRPOTrainer._compute_loss(trainer, trainer.model, inputs))
    assert torch.allclose(got, grpo, rtol=1e-5, atol=1e-6)
    trainer.top_entropy_quantile, trainer.off_policy_mask_threshold, trainer.entropy_coef = 1.0, None, 0.0
    trainer.epsilon_low = trainer.epsilon_high = 0.2
    trainer.args.delta = None
    assert not torch.allclose(got, _grads(trainer, trainer._compute_loss(trainer.model, inputs)), rtol=1e-3)


def test_per_token_advantages_replace_the_rows_advantage(tmp_path, char_tokenizer):
    """Comparison-based credit hands one advantage per token (``token_advantages``); the loss then reads those."""
    trainer = _trainer(tmp_path, char_tokenizer)
    inputs = _inputs(LENGTHS, PREFIXES, ADVANTAGES)
    per_token = torch.linspace(-1.0, 2.0, inputs["completion_ids"].numel()).view_as(inputs["completion_ids"])
    inputs["token_advantages"] = per_token
    got = _grads(trainer, trainer._compute_loss(trainer.model, inputs))
    unit = dict(inputs, advantages=torch.ones(len(LENGTHS)))  # -1 * per_token * log pi, by hand
    assert torch.allclose(got, _grads(trainer, _by_hand(trainer, unit, ratio=per_token)), rtol=1e-5, atol=1e-6)


def test_vllm_importance_sampling_weights_act_as_in_grpo(tmp_path, char_tokenizer):
    """With vLLM's importance-sampling correction each token's policy term is weighted by its ratio to vLLM's
    sampling policy (TRL computes the ratio when vLLM samples; here it comes with the inputs)."""
    trainer = _trainer(tmp_path, char_tokenizer)
    inputs = _inputs(LENGTHS, PREFIXES, ADVANTAGES)
    weights = torch.linspace(0.25, 1.75, inputs["completion_ids"].numel()).view_as(inputs["completion_ids"])
    inputs["importance_sampling_ratio"] = weights
    trainer.use_vllm = trainer.vllm_importance_sampling_correction = True
    got = _grads(trainer, trainer._compute_loss(trainer.model, inputs))
    assert torch.allclose(got, _grads(trainer, _by_hand(trainer, inputs, ratio=weights)), rtol=1e-5, atol=1e-6)
    trainer.loss_type = "grpo"
    inputs["tool_mask"] = torch.ones_like(inputs["tool_mask"])  # GRPO has no prefix mask: compare on base rows
    grpo = _grads(trainer, GRPOTrainer._compute_loss(trainer, trainer.model, inputs))
    assert torch.allclose(_grads(trainer, trainer._compute_loss(trainer.model, inputs)), grpo, rtol=1e-5, atol=1e-6)
    trainer.vllm_importance_sampling_correction = False  # correction off: the ratio is not read
    off = _grads(trainer, trainer._compute_loss(trainer.model, inputs))
    assert torch.allclose(off, _grads(trainer, _by_hand(trainer, inputs)), rtol=1e-5, atol=1e-6)


def test_off_policy_mask_reads_the_sampling_policy_as_grpo_does(tmp_path, char_tokenizer):
    """A row with a negative advantage whose mean KL from the sampling policy exceeds the threshold is dropped. The
    sampling policy is vLLM's log-probabilities when TRL hands them over, else the old policy's, else the current
    one (on-policy: nothing is dropped)."""
    trainer = _trainer(tmp_path, char_tokenizer, off_policy_mask_threshold=0.1)
    inputs = _inputs(LENGTHS, [0, 0, 0, 0], ADVANTAGES)  # advantages 1.5, -0.5, 0.7, -1.2
    with torch.no_grad():
        current = _logps(trainer, inputs)
    on_policy = _grads(trainer, trainer._compute_loss(trainer.model, inputs))
    assert torch.allclose(on_policy, _grads(trainer, _by_hand(trainer, inputs)), rtol=1e-5, atol=1e-6)
    trainer.loss_type = "grpo"
    for key, shift, dropped in (("sampling_per_token_logps", [0.5, 0.5, 0.0, 0.0], 1),
                                ("old_per_token_logps", [0.0, 0.0, 0.0, 0.5], 3)):
        shifted = dict(inputs, **{key: current + torch.tensor(shift).unsqueeze(1)})
        got = _grads(trainer, trainer._compute_loss(trainer.model, shifted))
        keep = torch.ones_like(current)
        keep[dropped] = 0.0
        ratio = torch.exp(current - shifted.get("old_per_token_logps", current))
        assert torch.allclose(got, _grads(trainer, _by_hand(trainer, shifted, ratio=ratio * keep)), rtol=1e-5,
                              atol=1e-6), key
        grpo = _grads(trainer, GRPOTrainer._compute_loss(trainer, trainer.model, shifted))
        assert torch.allclose(got, grpo, rtol=1e-5, atol=1e-6), key


def _entropies(trainer, inputs):
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    attention = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    with torch.no_grad():
        _, entropies, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, ids, attention, inputs["completion_ids"].size(1), compute_entropy=True)
    return entropies


def test_training_divides_by_the_generation_batch_rows_and_logs_the_entropy_over_active_tokens(tmp_path,
                                                                                              char_tokenizer):
    trainer = _trainer(tmp_path, char_tokenizer, steps_per_generation=2)
    trainer.current_gradient_accumulation_steps = 4
    inputs = _inputs(LENGTHS, PREFIXES, ADVANTAGES)
    inputs["num_loss_rows"] = torch.tensor(4)  # rows that carry loss in the whole generation batch
    loss = trainer._compute_loss(trainer.model, inputs)
    # on-policy: each row's mean is -A; the row sum is divided by 4 rows / 1 process * 4 accumulated / 2 steps
    assert loss.item() == pytest.approx(-sum(ADVANTAGES) / (4 * 4 / 2), rel=1e-5)
    mask = (inputs["completion_mask"] * inputs["tool_mask"]).bool()
    entropy = _entropies(trainer, inputs)[mask].mean().item()
    assert trainer._metrics["train"]["entropy"][-1] == pytest.approx(entropy, rel=1e-5)
    assert trainer._metrics["train"]["policy_loss"][-1] == pytest.approx(-sum(ADVANTAGES) / 4, rel=1e-5)
    assert "kl" not in trainer._metrics["train"] and "entropy_coef" not in trainer._metrics["train"]


def test_entropy_bonus_is_scaled_for_accumulation_and_its_coefficient_logged(tmp_path, char_tokenizer):
    trainer = _trainer(tmp_path, char_tokenizer, entropy_coef=0.3)
    trainer.current_gradient_accumulation_steps = 2
    inputs = _inputs(LENGTHS, PREFIXES, ADVANTAGES)
    mask = (inputs["completion_mask"] * inputs["tool_mask"]).bool()
    bonus = _entropies(trainer, inputs)[mask].mean().item()
    with_bonus = trainer._compute_loss(trainer.model, inputs).item()
    assert trainer._metrics["train"]["entropy_coef"] == [0.3]
    trainer.entropy_coef = 0.0
    without = trainer._compute_loss(trainer.model, inputs).item()
    assert with_bonus - without == pytest.approx(-0.3 * bonus / 2, rel=1e-4)


def test_evaluation_loss_is_the_mean_over_the_batch_rows_logged_under_eval(tmp_path, char_tokenizer):
    trainer = _trainer(tmp_path, char_tokenizer, entropy_coef=0.3)
    trainer.model.eval()
    trainer.current_gradient_accumulation_steps = 2  # training's accumulation does not scale evaluation's bonus
    inputs = _inputs(LENGTHS, PREFIXES, ADVANTAGES)
    inputs["num_loss_rows"] = torch.tensor(8)  # evaluation averages over this batch's 4 rows instead
    mask = (inputs["completion_mask"] * inputs["tool_mask"]).bool()
    bonus = _entropies(trainer, inputs)[mask].mean().item()
    loss = trainer._compute_loss(trainer.model, inputs)
    assert loss.item() == pytest.approx(-sum(ADVANTAGES) / 4 - 0.3 * bonus, rel=1e-5)
    assert trainer._metrics["eval"]["entropy"][-1] == pytest.approx(bonus, rel=1e-5)
    assert trainer._metrics["eval"]["policy_loss"][-1] == pytest.approx(-sum(ADVANTAGES) / 4, rel=1e-5)
    assert "entropy_coef" not in trainer._metrics["eval"] and not trainer._metrics["train"]


def _tiny_moe(tok):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                           output_router_logits=True, router_aux_loss_coef=0.5, pad_token_id=tok.pad_token_id,
                           eos_token_id=tok.eos_token_id, bos_token_id=None)
    return MixtralForCausalLM(config)


def test_moe_router_loss_is_added_as_grpo_adds_it(tmp_path, char_tokenizer):
    args = SRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=8, max_completion_length=16,
                      report_to="none", use_cpu=True, bf16=False)
    trainer = SRPOTrainer(model=_tiny_moe(char_tokenizer), reward_funcs=_reward, args=args,
                          train_dataset=Dataset.from_dict({"prompt": ["a"] * 8}), processing_class=char_tokenizer)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    assert trainer.aux_loss_enabled and trainer.router_aux_loss_coef == 0.5
    inputs = _inputs(LENGTHS, [0, 0, 0, 0], ADVANTAGES)
    loss = trainer._compute_loss(trainer.model, inputs)
    got = _grads(trainer, loss)
    aux = trainer._metrics["train"]["aux_loss"][-1]
    assert aux > 0
    grpo_loss = GRPOTrainer._compute_loss(trainer, trainer.model, inputs)  # on-policy: same policy term
    assert loss.item() == pytest.approx(grpo_loss.item(), rel=1e-5)
    assert torch.allclose(got, _grads(trainer, grpo_loss), rtol=1e-5, atol=1e-6)


def test_moe_policy_that_returns_router_logits_samples_rollouts(tmp_path, char_tokenizer):
    """A MoE policy whose config returns router logits (so that training adds the router loss) still samples: the
    decoding steps ask for no router logits, whose load-balancing loss the step's attention mask cannot match."""
    args = SRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=8, max_completion_length=6,
                      report_to="none", use_cpu=True, bf16=False)
    trainer = SRPOTrainer(model=_tiny_moe(char_tokenizer), reward_funcs=_reward, args=args,
                          train_dataset=Dataset.from_dict({"prompt": ["a"] * 8}), processing_class=char_tokenizer)
    assert trainer.model.config.output_router_logits
    contexts = [char_tokenizer("ab")["input_ids"], char_tokenizer("a longer one")["input_ids"]]
    with trainer._sampler() as sampler:
        rollouts = sampler.sample(contexts)
    assert len(rollouts) == 2 and all(len(r.token_ids) > 1 for r in rollouts)
