"""Packed groups (`trl_resets.packing`) give the unpacked rows' log-probabilities, entropies and gradients."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from trl_resets import packing

VOCAB = 61


def _llama(implementation="sdpa", seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    config._attn_implementation = implementation
    return LlamaForCausalLM(config).float()


def _tokens(generator, n):
    return torch.randint(3, VOCAB, (n,), generator=generator).tolist()


def _rows(kind, seed=0):
    """(rows as (prompt, completion) token lists, the reset prefix length of each row) for one layout."""
    g = torch.Generator().manual_seed(seed)
    prompt, other_prompt = _tokens(g, 7), _tokens(g, 4)
    prefix = _tokens(g, 5)
    reset = [(prompt, prefix + _tokens(g, n)) for n in (6, 3, 8, 1)]
    base = [(prompt, _tokens(g, n)) for n in (9, 4, 12)]
    if kind == "reset":
        return reset
    if kind == "base":
        return base
    return base + reset + [(other_prompt, prefix + _tokens(g, n)) for n in (5, 2)] + [(other_prompt, _tokens(g, 7))]


def _batch(rows):
    """TRL's layout: prompts left-padded to one width, completions right-padded; (ids, mask, logits_to_keep)."""
    width = max(len(p) for p, _ in rows)
    keep = max(len(c) for _, c in rows)
    ids = torch.zeros(len(rows), width + keep, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, (p, c) in enumerate(rows):
        ids[r, width - len(p):width + len(c)] = torch.tensor(p + c)
        mask[r, width - len(p):width + len(c)] = 1
    return ids, mask, keep


def _unpacked(model, ids, mask, keep):
    """Today's pass: every row forwarded whole; the log-probability and entropy of each scored token."""
    logps_all = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()[:, :-1].log_softmax(-1)
    logps = logps_all.gather(-1, ids[:, 1:, None]).squeeze(-1)[:, -keep:]
    entropy = -(logps_all.exp() * logps_all).sum(-1)[:, -keep:]
    live = mask[:, -keep:].bool()
    return logps * live, entropy * live


def _packed(model, ids, mask, keep):
    group_ids, shared = packing.groups_by_content(ids, mask)
    batch = packing.pack(ids, mask, keep, group_ids, shared, packing.mask_kind(model))
    return packing.packed_logps_and_entropies(packing.logits_forward(model), batch), batch


def _grads(model, logps, entropy, weights):
    model.zero_grad()
    ((logps * weights).sum() + 0.1 * (entropy * weights).sum()).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("kind", ["reset", "base", "mixed"])
def test_packed_pass_equals_unpacked_logps_entropies_and_gradients(kind, implementation):
    model = _llama(implementation)
    ids, mask, keep = _batch(_rows(kind))
    weights = torch.randn(ids.size(0), keep, generator=torch.Generator().manual_seed(1))
    ref_logps, ref_entropy = _unpacked(model, ids, mask, keep)
    ref_grads = _grads(model, ref_logps, ref_entropy, weights)
    (logps, entropy), batch = _packed(model, ids, mask, keep)
    assert logps.shape == ref_logps.shape == entropy.shape
    torch.testing.assert_close(logps, ref_logps, atol=1e-5, rtol=0)
    torch.testing.assert_close(entropy, ref_entropy, atol=1e-5, rtol=0)
    grads = _grads(model, logps, entropy, weights)
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], atol=1e-5, rtol=1e-4, msg=name)
    assert batch.input_ids.size(0) < ids.size(0)  # rows were packed
    assert int((batch.input_ids != 0).sum()) < int(mask.sum())  # and the shared tokens forwarded once


@pytest.mark.parametrize("checkpointing", [False, True])
def test_lora_and_gradient_checkpointing_give_the_unpacked_gradients(checkpointing):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                init_lora_weights=False))
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.train()  # Llama's dropouts are 0: train mode is deterministic
    ids, mask, keep = _batch(_rows("mixed"))
    weights = torch.randn(ids.size(0), keep, generator=torch.Generator().manual_seed(2))
    ref_logps, ref_entropy = _unpacked(model, ids, mask, keep)
    ref_grads = _grads(model, ref_logps, ref_entropy, weights)
    (logps, entropy), _ = _packed(model, ids, mask, keep)
    torch.testing.assert_close(logps, ref_logps, atol=1e-5, rtol=0)
    grads = _grads(model, logps, entropy, weights)
    assert grads and all("lora" in n for n in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_bf16_packed_pass_is_as_close_to_fp32_as_the_unpacked_one(implementation):
    """In bf16 the two passes round differently; each must stay as close to the fp32 result as the other does."""
    model = _llama(implementation)
    ids, mask, keep = _batch(_rows("mixed"))
    with torch.no_grad():
        exact = _unpacked(model, ids, mask, keep)[0]
        model.to(torch.bfloat16)
        unpacked_error = (_unpacked(model, ids, mask, keep)[0] - exact).abs().max()
        packed_error = (_packed(model, ids, mask, keep)[0][0] - exact).abs().max()
    assert 0 < unpacked_error < 0.1
    assert packed_error <= 2 * unpacked_error


def test_groups_are_found_from_the_tokens():
    rows = _rows("mixed")
    ids, mask, _ = _batch(rows)
    group_ids, shared = packing.groups_by_content(ids, mask)
    base, reset, other_reset, other_base = [0, 1, 2], [3, 4, 5, 6], [7, 8], [9]
    assert len({group_ids[r] for r in reset}) == 1 and shared[reset[0]] >= 7 + 5  # prompt + prefix
    assert len({group_ids[r] for r in base}) == 1 and shared[base[0]] == 7  # the prompt
    assert group_ids[base[0]] != group_ids[reset[0]]
    assert len({group_ids[r] for r in other_reset}) == 1 and shared[other_reset[0]] >= 4 + 5
    assert group_ids[other_base[0]] not in {group_ids[r] for r in base + reset + other_reset}


def test_one_pack_for_a_prompt_when_its_groups_share_little_beyond_it():
    g = torch.Generator().manual_seed(3)
    prompt = _tokens(g, 20)
    prefix = [1]  # a token no base completion starts with (they draw from 3 up)
    rows = [(prompt, _tokens(g, 5)) for _ in range(3)] + [(prompt, prefix + _tokens(g, 4)) for _ in range(2)]
    ids, mask, _ = _batch(rows)
    group_ids, shared = packing.groups_by_content(ids, mask)
    assert len(set(group_ids)) == 1 and set(shared) == {20}  # a 1-token prefix is not worth a pack of its own


def test_attention_pairs_cost_can_split_or_cancel_a_pack():
    """4 rows of 44 tokens sharing 4: one pack saves 9 tokens for 20,145 extra attention pairs, two packs of two
    save 6 for 6,706."""
    g = torch.Generator().manual_seed(4)
    prompt = _tokens(g, 4)
    ids, mask, _ = _batch([(prompt, _tokens(g, 40)) for _ in range(4)])
    packs = {}
    for cost in (0.0, 5e-4, 1e-2):
        group_ids, _ = packing.groups_by_content(ids, mask, cost)
        packs[cost] = sorted(group_ids.count(x) for x in set(group_ids))
    assert packs == {0.0: [4], 5e-4: [2, 2], 1e-2: [1, 1, 1, 1]}
    group_ids, _, batches = packing.plan(ids, mask, 4, 5e-4)
    assert sorted(group_ids.count(x) for x in set(group_ids)) == [2, 2] and batches == [[0, 1, 2, 3]]
    assert packing.plan(ids, mask, 4, 1e-2) is None  # unpacked costs least
    assert packing.plan(ids, mask, 1, 0.0) is None  # one row per micro-batch: nothing to share
    assert 0 < packing.pair_cost(_llama()) < 1e-2


def test_micro_batches_keep_groups_whole():
    assert packing.micro_batches([0, 0, 1, 1, 1, 2, 3, 3], 4) == [[0, 1], [2, 3, 4, 5], [6, 7]]
    assert packing.micro_batches([5, 5, 5, 5, 5, 1], 2) == [[0, 1], [2, 3], [4, 5]]  # a big group is cut
    with pytest.raises(ValueError, match="rows_per_batch=0"):
        packing.micro_batches([0], 0)


def test_regroup_lays_micro_batches_out_again_with_groups_whole():
    rows = torch.arange(12)
    batches = [{"x": rows[i:i + 4].unsqueeze(1), "names": [f"r{j}" for j in range(i, i + 4)], "n": torch.tensor(7),
                "none": None} for i in (0, 4, 8)]
    group_ids = [0, 1, 2, 1, 0, 3, 1, 0, 2, 3, 0, 1]  # as a shuffle leaves them
    out = packing.regroup(batches, group_ids)
    assert [b["x"].squeeze(1).tolist() for b in out] == [[0, 4, 7, 10], [1, 3, 6, 11], [2, 8, 5, 9]]
    assert out[0]["names"] == ["r0", "r4", "r7", "r10"] and all(b["n"] == 7 and b["none"] is None for b in out)
    spread = packing.regroup(batches, [0] * 6 + [1] * 6)  # groups larger than a micro-batch fill them in turn
    assert [b["x"].squeeze(1).tolist() for b in spread] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    with pytest.raises(ValueError, match="covering the 5 group ids"):
        packing.regroup(batches, [0] * 5)


def test_pack_refuses_rows_that_do_not_share_what_they_claim():
    ids, mask, keep = _batch(_rows("base"))
    with pytest.raises(ValueError, match="do not share their first 9 tokens"):
        packing.pack(ids, mask, keep, [0, 0, 0], [9, 9, 9])
    with pytest.raises(ValueError, match="one entry per row"):
        packing.pack(ids, mask, keep, [0, 0], [7, 7])
    holes = mask.clone()
    holes[0, -keep + 1] = 0
    with pytest.raises(ValueError, match="not contiguous"):
        packing.pack(ids, holes, keep, [0, 1, 2], [0, 0, 0])
    assert packing.groups_by_content(ids, holes) is None


def test_refusals_name_why():
    from transformers import MambaConfig, MambaForCausalLM, MistralConfig, MistralForCausalLM

    assert packing.packing_refusal(_llama("sdpa")) is None
    assert packing.packing_refusal(_llama("eager")) is None
    flash = _llama()
    flash.config._attn_implementation_internal = "flash_attention_2"
    assert "flash_attention_2" in packing.packing_refusal(flash)
    mistral = MistralForCausalLM(MistralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                               num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                               sliding_window=16))
    mistral.config._attn_implementation = "sdpa"
    assert "sliding window (16 tokens)" in packing.packing_refusal(mistral, max_length=40)
    assert packing.packing_refusal(mistral, max_length=16) is None  # the window covers every row: no-op
    mamba = MambaForCausalLM(MambaConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, state_size=4))
    assert "recurrent" in packing.packing_refusal(mamba)
