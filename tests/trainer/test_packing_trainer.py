"""`pack_shared_prefixes` in the trainer: the same log-probabilities, loss and gradients as the unpacked rows."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from tests.trainer.test_trainer import _args, _dataset, contains_seven
from trl_resets import SRPOConfig, SRPOTrainer, packing


def _trainer(tmp_path, tok, model, peft_config=None, **overrides):
    """One step of SRPO with a KL term (so a reference model, loaded from the model's folder, or the policy without
    its adapter, is forwarded too)."""
    args = _args(tmp_path, SRPOConfig, **{"max_steps": 1, "beta": 0.04, **overrides})
    return SRPOTrainer(model=model, reward_funcs=contains_seven, args=args, train_dataset=_dataset(),
                       processing_class=tok, localizer=lambda q, thoughts: len(thoughts), peft_config=peft_config)


def _captured_batch(trainer):
    """Trains one step, keeping the inputs of its loss calls (micro-batches)."""
    seen, compute_loss = [], trainer._compute_loss
    trainer._compute_loss = lambda m, inputs: seen.append(inputs) or compute_loss(m, inputs)
    trainer.train()
    del trainer._compute_loss
    return seen


def _loss_and_grads(trainer, inputs):
    trainer.model.zero_grad()
    loss = trainer._compute_loss(trainer.model, inputs)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora-checkpointing"])
def test_packing_gives_the_unpacked_loss_gradients_and_reference_logps(tmp_path, char_tokenizer, tiny_model_dir,
                                                                        lora):
    from peft import LoraConfig

    settings = {}
    if lora:
        settings = {"gradient_checkpointing": True, "peft_config": LoraConfig(
            r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], init_lora_weights=False)}
    trainer = _trainer(tmp_path, char_tokenizer, tiny_model_dir, **settings)
    calls, pack = [], packing.pack
    packing.pack = lambda *a, **k: calls.append(1) or pack(*a, **k)
    try:
        (inputs,) = _captured_batch(trainer)  # pack_shared_prefixes off: TRL's unpacked passes
    finally:
        packing.pack = pack
    assert not calls
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    group_ids, shared = packing.groups_by_content(ids, mask)
    assert len(set(group_ids)) < ids.size(0)  # the batch has rows to pack
    assert min(shared) >= inputs["prompt_mask"].sum(1).max()  # rows share at least their prompt

    trainer.args.pack_shared_prefixes = False
    ref_loss, ref_grads = _loss_and_grads(trainer, inputs)
    with torch.no_grad():
        ref_logps = trainer._get_per_token_logps_and_entropies(trainer.model, ids, mask, inputs["completion_ids"].size(1),
                                                               batch_size=3)[0]
    trainer.args.pack_shared_prefixes = True
    calls, pack = [], packing.pack
    packing.pack = lambda *a, **k: calls.append(1) or pack(*a, **k)
    try:
        loss, grads = _loss_and_grads(trainer, inputs)
        with torch.no_grad():
            logps = trainer._get_per_token_logps_and_entropies(trainer.model, ids, mask,
                                                               inputs["completion_ids"].size(1), batch_size=3)[0]
    finally:
        packing.pack = pack
    assert calls  # the packed path ran
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-5)
    assert grads.keys() == ref_grads.keys() and (not lora or all("lora_" in n for n in grads))
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], atol=1e-6, rtol=1e-4, msg=name)
    torch.testing.assert_close(logps, ref_logps, atol=1e-5, rtol=0)


def _rows(micro):
    return torch.cat([torch.cat([m["prompt_ids"], m["completion_ids"]], 1) for m in micro]), torch.cat(
        [torch.cat([m["prompt_mask"], m["completion_mask"]], 1) for m in micro])


def _assert_groups_whole(micro, rows_per_batch=4):
    """Every group of these micro-batches lies in as few of them as its size allows."""
    group_ids, _ = packing.groups_by_content(*_rows(micro))
    for group in set(group_ids):
        members = [r for r, g in enumerate(group_ids) if g == group]
        assert len({r // rows_per_batch for r in members}) == -(-len(members) // rows_per_batch)


def _packed_and_unpacked(tmp_path, char_tokenizer, tiny_model_dir, **geometry):
    runs = {}
    for pack in (False, True):
        trainer = _trainer(tmp_path / str(pack), char_tokenizer, tiny_model_dir, per_device_train_batch_size=4,
                           pack_shared_prefixes=pack, **{"max_steps": 2, **geometry})
        micro = _captured_batch(trainer)
        runs[pack] = ([e for e in trainer.state.log_history if "loss" in e], micro)
    return runs[False], runs[True]


def test_a_packed_run_logs_the_unpacked_runs_loss_gradient_norm_and_entropy(tmp_path, char_tokenizer,
                                                                           tiny_model_dir):
    """Two micro-batches per generation and per optimizer step (laid out again, groups whole), one generation
    trained twice (``num_iterations=2``); the old-policy and reference passes packed too."""
    (off_logs, off_micro), (on_logs, on_micro) = _packed_and_unpacked(
        tmp_path, char_tokenizer, tiny_model_dir, steps_per_generation=2, gradient_accumulation_steps=2,
        num_iterations=2)
    assert len(on_logs) == len(off_logs) == 2 and len(on_micro) == 4
    for on, off in zip(on_logs, off_logs):
        for key in ("loss", "grad_norm", "entropy", "kl"):
            assert on[key] == pytest.approx(off[key], abs=1e-5, rel=1e-4), key
    assert on_logs[0]["grad_norm"] > 0 and on_logs[1]["kl"] > 0
    assert on_micro[0]["old_per_token_logps"] is not None and on_micro[0]["ref_per_token_logps"] is not None
    for step in (0, 2):  # an optimizer step trains the same rows, its groups in as few micro-batches as they allow
        assert sorted(_rows(on_micro[step:step + 2])[0].tolist()) == sorted(_rows(off_micro[step:step + 2])[0].tolist())
        _assert_groups_whole(on_micro[step:step + 2])


def test_groups_stay_whole_across_the_optimizer_steps_of_a_generation(tmp_path, char_tokenizer, tiny_model_dir):
    """Four micro-batches per generation, two per optimizer step: TRL's row shuffle scatters a group over both
    steps; packed, each group is whole in one micro-batch of the generation where it fits."""
    (_, off_micro), (on_logs, on_micro) = _packed_and_unpacked(
        tmp_path, char_tokenizer, tiny_model_dir, steps_per_generation=4, gradient_accumulation_steps=2)
    assert len(on_logs) == 2 and len(on_micro) == 4
    assert sorted(_rows(on_micro)[0].tolist()) == sorted(_rows(off_micro)[0].tolist())  # the generation's rows
    _assert_groups_whole(on_micro)


def test_a_model_that_cannot_take_the_mask_warns_once_and_trains_unpacked(tmp_path, char_tokenizer):
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    config = MistralConfig(vocab_size=len(char_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=8,
                           pad_token_id=char_tokenizer.pad_token_id, eos_token_id=char_tokenizer.eos_token_id)
    model = MistralForCausalLM(config)
    trainer = _trainer(tmp_path, char_tokenizer, model, max_steps=2, beta=0.0, pack_shared_prefixes=True)
    calls, pack = [], packing.pack
    packing.pack = lambda *a, **k: calls.append(1) or pack(*a, **k)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.train()
    finally:
        packing.pack = pack
    said = [w for w in caught if "forwarded unpacked" in str(w.message)]
    assert len(said) == 1 and "sliding window (8 tokens)" in str(said[0].message)
    assert not calls and trainer.state.global_step == 2


def test_a_lagged_packed_run_logs_the_lagged_unpacked_runs_loss_gradient_norm_and_drift(tmp_path, char_tokenizer,
                                                                                      tiny_model_dir, monkeypatch):
    """Pipelined resets (``reset_lag=1``): a generation's carried suffixes share their origin prompt and prefix,
    not the batch prompt of their slot; packing finds their groups from the tokens, so the packed run trains as the
    unpacked one, the carried prefix's drift included."""
    calls, pack = [], packing.pack
    monkeypatch.setattr(packing, "pack", lambda *a, **k: calls.append(1) or pack(*a, **k))
    (off_logs, off_micro), (on_logs, on_micro) = _packed_and_unpacked(
        tmp_path, char_tokenizer, tiny_model_dir, steps_per_generation=2, gradient_accumulation_steps=2,
        reset_lag=1, seed_budget=0, max_steps=3, beta=0.0)  # no KL: a step with all-equal rewards has no gradient
    assert calls  # the packed run forwarded packs (the unpacked one never calls pack)
    assert len(on_logs) == len(off_logs) == 3
    drift = "resets/carried_prefix_drift"

    def absent(value):  # no carried row in the step: logged as NaN (None in the log history)
        return value is None or math.isnan(value)

    assert absent(on_logs[0][drift]) and absent(off_logs[0][drift])  # the first generation carries nothing
    assert all(not absent(entry[drift]) for entry in on_logs[1:])  # the next ones train carried rows
    for on, off in zip(on_logs, off_logs):
        for key, tolerance in (("loss", 1e-5), ("grad_norm", 1e-5), ("entropy", 1e-5), (drift, 1e-4)):
            if absent(off[key]):
                assert absent(on[key]), key
                continue
            assert on[key] == pytest.approx(off[key], abs=tolerance, rel=1e-4), key
    for step in (2, 4):  # a generation with carried rows: the same rows, each group whole where it fits
        assert sorted(_rows(on_micro[step:step + 2])[0].tolist()) == sorted(_rows(off_micro[step:step + 2])[0].tolist())
        _assert_groups_whole(on_micro[step:step + 2])
