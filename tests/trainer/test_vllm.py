"""The vLLM backends (colocate and server) through TRL's own wrapper, against a fake engine."""

import math
import threading
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset

from tests.conftest import make_tiny_llama
from tests.helpers import fake_vllm
from tests.trainer.test_trainer import _args, contains_seven
from trl_resets import SRPOConfig, SRPOTrainer
from trl_resets.sampling import TransformersThoughtSampler, VLLMThoughtSampler, prefix_caching_enabled
from trl_resets.sampling.vllm_backend import row_seed, sampled_logprob
from trl_resets.thoughts import ThoughtFormat

SCRIPT = "a1</thought>b22</thought>c3</thought>\\boxed{7}</thought>"
PROMPT = "Q:x?"


def position_scripted_llama(tokenizer, script_ids, prompt_len):
    """A Llama whose greedy choice at absolute position p is script[p + 1 - prompt_len] (then EOS).

    It depends on the position only, so any backend that feeds it the right positions (padded batch
    generation with a KV cache, or one full forward per token) must produce the same tokens.
    """
    from transformers import LlamaForCausalLM

    script = torch.tensor(script_ids)

    class _Scripted(LlamaForCausalLM):
        def forward(self, input_ids=None, position_ids=None, attention_mask=None, **kwargs):
            out = super().forward(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                                  **kwargs)
            if position_ids is None:
                position_ids = attention_mask.long().cumsum(-1)[:, -input_ids.shape[1]:] - 1
            steps = position_ids.to(out.logits.device) + 1 - prompt_len
            steps = steps[:, -out.logits.shape[1]:]
            valid = (steps >= 0) & (steps < len(script_ids))
            tokens = torch.where(valid, script[steps.clamp(0, len(script_ids) - 1)], self.config.eos_token_id)
            logits = torch.full_like(out.logits, -1e4).scatter_(-1, tokens[..., None], 1e4)
            out.logits = logits
            return out

    model = _Scripted(make_tiny_llama(tokenizer).config)
    model.generation_config.do_sample = False
    return model.eval()


def _engine(llm, mode="colocate", **settings):
    """The minimum of a ``VLLMGeneration`` the sampler touches, around a FakeLLM (server: through a FakeVLLMClient)."""
    engine = object.__new__(fake_vllm.VLLMGeneration)
    engine.mode = mode
    if mode == "colocate":
        engine.llm = llm
    else:
        engine.vllm_client = fake_vllm.FakeVLLMClient(llm)
    engine.temperature, engine.top_p, engine.top_k, engine.min_p = 0.0, 1.0, 0, 0.0
    engine.repetition_penalty, engine.max_completion_length, engine.logprobs = 1.0, 16, 0
    engine.generation_kwargs, engine.structured_outputs_regex = {}, None
    engine.tensor_parallel_size, engine.enable_sleep_mode = 1, False
    engine.model, engine.accelerator = llm.model, SimpleNamespace(process_index=0, local_process_index=0)
    for name, value in settings.items():
        setattr(engine, name, value)
    return engine


class _Colocated:
    def __init__(self, llm):
        self.engine = _engine(llm)


@pytest.fixture
def scripted(char_tokenizer):
    prompt = char_tokenizer(PROMPT)["input_ids"]
    script = char_tokenizer(SCRIPT)["input_ids"]
    return prompt, script, position_scripted_llama(char_tokenizer, script, len(prompt))


def _thought_ends(script, tok):
    text, ends = "", []
    for i, t in enumerate(script):
        text += tok.decode([t])
        if text.endswith("</thought>"):
            ends.append(i + 1)
    return ends


@pytest.mark.parametrize("per_thought", [True, False])
def test_vllm_sampler_matches_the_transformers_sampler(monkeypatch, char_tokenizer, scripted, per_thought):
    monkeypatch.setattr(fake_vllm.vllm_generation, "SamplingParams", fake_vllm.FakeSamplingParams, raising=False)
    prompt, script, model = scripted
    ends = _thought_ends(script, char_tokenizer)
    assert len(ends) == 4
    cases = [  # (context, start thoughts, budget)
        (prompt, 0, 200),  # runs to the boxed answer
        (prompt + script[: ends[1]], 2, 200),  # reset after two thoughts
        (prompt, 0, 7),  # token budget inside the second thought
    ]
    wide = ThoughtFormat(max_completion_tokens=200, max_thought_tokens=50, max_thoughts=10)
    narrow = ThoughtFormat(max_completion_tokens=200, max_thought_tokens=3, max_thoughts=3)
    expected_stops = {wide: ["answer", "answer", "max_tokens"], narrow: ["max_thoughts", "max_thoughts", "max_tokens"]}
    for fmt in (wide, narrow):
        reference = TransformersThoughtSampler(model, char_tokenizer, fmt, eos_ids=[char_tokenizer.eos_token_id])
        llm = fake_vllm.FakeLLM(model, char_tokenizer, prefix_caching=per_thought)
        sampler = VLLMThoughtSampler(_Colocated(llm).engine, char_tokenizer, fmt, eos_ids=[char_tokenizer.eos_token_id],
                                     per_thought=per_thought)
        args = ([c for c, _, _ in cases], [s for _, s, _ in cases], [b for _, _, b in cases])
        want, got = reference.sample(*args), sampler.sample(*args)
        for w, g in zip(want, got):
            assert (g.token_ids, g.thought_spans, g.stop_reason) == (w.token_ids, w.thought_spans, w.stop_reason)
            assert len(g.logprobs) == len(g.token_ids) and all(abs(x) < 1e-3 for x in g.logprobs)
        assert [w.stop_reason for w in want] == expected_stops[fmt]
    # narrow format: thoughts are cut every 3 tokens and the third thought ends the rollout
    assert [len(g.token_ids) for g in got[:2]] == [9, 3] and got[1].num_thoughts == 1


@pytest.mark.parametrize("block_size", [1, 16])
def test_per_thought_rounds_re_encode_at_most_the_last_block(monkeypatch, char_tokenizer, scripted, block_size):
    """vLLM caches whole blocks and has no KV for the last sampled token, so each round re-encodes the tail of its
    prompt after the last full cached block: one token at block size 1, up to a block at vLLM's default 16."""
    monkeypatch.setattr(fake_vllm.vllm_generation, "SamplingParams", fake_vllm.FakeSamplingParams, raising=False)
    prompt, script, model = scripted
    fmt = ThoughtFormat(max_completion_tokens=200, max_thought_tokens=50, max_thoughts=10)
    llm = fake_vllm.FakeLLM(model, char_tokenizer, prefix_caching=True, block_size=block_size)
    sampler = VLLMThoughtSampler(_Colocated(llm).engine, char_tokenizer, fmt, eos_ids=[char_tokenizer.eos_token_id])
    (rollout,) = sampler.sample([prompt])
    assert rollout.stop_reason == "answer" and rollout.num_thoughts == 4
    assert sampler.rounds == 4  # one request per thought
    lengths = [len(prompt)] + [len(prompt) + end for end in _thought_ends(script, char_tokenizer)[:3]]
    cached = [0] + [(n - 1) // block_size * block_size for n in lengths[1:]]
    assert llm.prefill_tokens == sum(n - c for n, c in zip(lengths, cached))
    if block_size == 1:
        assert llm.prefill_tokens == len(prompt) + 3  # the prompt once, then each round's last sampled token
    assert sampler.discarded_tokens == 0 and llm.decoded_tokens == len(rollout.token_ids)
    assert all(p.stop == ["</thought>"] and p.skip_special_tokens is False for p in llm.calls)


def test_one_pass_without_prefix_cache_discards_what_follows_the_stop(monkeypatch, char_tokenizer, scripted):
    monkeypatch.setattr(fake_vllm.vllm_generation, "SamplingParams", fake_vllm.FakeSamplingParams, raising=False)
    prompt, _, model = scripted
    fmt = ThoughtFormat(max_completion_tokens=60, max_thought_tokens=50, max_thoughts=2)
    llm = fake_vllm.FakeLLM(model, char_tokenizer, prefix_caching=False)
    engine = _Colocated(llm).engine
    assert prefix_caching_enabled(engine) is False
    sampler = VLLMThoughtSampler(engine, char_tokenizer, fmt, eos_ids=[char_tokenizer.eos_token_id], per_thought=False)
    (rollout,) = sampler.sample([prompt])
    assert rollout.stop_reason == "max_thoughts" and rollout.num_thoughts == 2
    assert sampler.rounds == 1 and llm.prefill_tokens == len(prompt)
    assert sampler.discarded_tokens == llm.decoded_tokens - len(rollout.token_ids) > 0
    assert engine.max_completion_length == 16 and engine.generation_kwargs == {}  # the wrapper is left as it was


def test_complete_cuts_at_eos_and_uses_the_given_temperature(monkeypatch, char_tokenizer, scripted):
    monkeypatch.setattr(fake_vllm.vllm_generation, "SamplingParams", fake_vllm.FakeSamplingParams, raising=False)
    prompt, script, model = scripted
    llm = fake_vllm.FakeLLM(model, char_tokenizer)
    engine = _Colocated(llm).engine
    engine.temperature = 1.0
    sampler = VLLMThoughtSampler(engine, char_tokenizer, ThoughtFormat(), eos_ids=[char_tokenizer.eos_token_id])
    (reply,) = sampler.complete([prompt + script[:-3]], max_new_tokens=10, temperature=0.0)
    assert reply == script[-3:] + [char_tokenizer.eos_token_id]
    assert llm.calls[-1].temperature == 0.0 and llm.calls[-1].max_tokens == 10 and not llm.calls[-1].stop
    assert engine.temperature == 1.0


def _vllm_train(tmp_path, tok, monkeypatch, mode, prefix_caching=True, **overrides):
    engines = fake_vllm.install(monkeypatch, prefix_caching=prefix_caching)
    data = Dataset.from_dict({"prompt": ["2+5?", "3+4?"], "answer": ["7"] * 2})
    args = _args(tmp_path, SRPOConfig, **{"use_vllm": True, "vllm_mode": mode, "max_steps": 2, **overrides})
    model = make_tiny_llama(tok)
    trainer = SRPOTrainer(model=model, reward_funcs=contains_seven, args=args, train_dataset=data, processing_class=tok)
    trainer.train()
    return trainer, engines[0], [e for e in trainer.state.log_history if "loss" in e]


@pytest.mark.parametrize("mode", ["colocate", "server"])
def test_srpo_trains_with_vllm(tmp_path, char_tokenizer, monkeypatch, mode):
    trainer, engine, logs = _vllm_train(tmp_path, char_tokenizer, monkeypatch, mode)
    llm = engine.fake_llm
    assert trainer.state.global_step == 2 and len(logs) == 2
    # weights were pushed into the engine before each step's generation
    assert llm.weights.loads >= 2 * len(list(trainer.model.parameters()))
    assert llm.requests > 0 and trainer._vllm_per_thought is True
    for entry in logs:
        assert entry["resets/tokens_suffix"] > 0 and math.isfinite(entry["loss"])
        # the engine runs the policy's weights, so its sampling logprobs match the trainer's own on every
        # trained token (prefix tokens are masked): the logprobs reached TRL aligned with the tokens
        assert entry["sampling/sampling_logp_difference/mean"] < 1e-3
        assert abs(entry["sampling/importance_sampling_ratio/mean"] - 1.0) < 1e-3


def test_vllm_without_prefix_caching_warns_and_samples_in_one_pass(tmp_path, char_tokenizer, monkeypatch):
    with pytest.warns(UserWarning, match="prefix caching"):
        trainer, engine, logs = _vllm_train(tmp_path, char_tokenizer, monkeypatch, "colocate", prefix_caching=False)
    assert trainer._vllm_per_thought is False and len(logs) == 2
    assert all(not p.stop for p in engine.fake_llm.calls)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"vllm_enable_sleep_mode": True}, "sleep_mode"),
        ({"vllm_structured_outputs_regex": "a+"}, "structured_outputs"),
        ({"vllm_tensor_parallel_size": 2}, "tensor_parallel"),
    ],
)
def test_unsupported_vllm_settings_fail_before_the_engine_starts(tmp_path, char_tokenizer, monkeypatch, overrides,
                                                                  message):
    engines = fake_vllm.install(monkeypatch)
    with pytest.raises(ValueError, match=message):  # refused by the config, before a trainer or an engine exists
        _args(tmp_path, SRPOConfig, use_vllm=True, vllm_mode="colocate", **overrides)
    assert engines == []


# ---------------------------------------------------------------------------------------------------- settings
REFUSED = ["temperature", "top_p", "max_tokens", "n", "stop", "stop_token_ids", "logprobs", "structured_outputs",
           "min_tokens", "presence_penalty", "frequency_penalty", "thinking_token_budget"]


@pytest.mark.parametrize("mode", ["colocate", "server"])
@pytest.mark.parametrize("key", REFUSED)
def test_generation_kwargs_that_override_or_restart_per_request_fail_at_construction(tmp_path, char_tokenizer,
                                                                                      monkeypatch, mode, key):
    engines = fake_vllm.install(monkeypatch)
    with pytest.raises(ValueError, match=rf"generation_kwargs\['{key}'\].*Fix:"):  # the config refuses it
        _args(tmp_path, SRPOConfig, use_vllm=True, vllm_mode=mode, generation_kwargs={key: 1})
    assert engines == []


def test_a_seed_is_refused_in_server_mode_and_accepted_in_colocate_mode(tmp_path, char_tokenizer, monkeypatch):
    engines = fake_vllm.install(monkeypatch)
    data = Dataset.from_dict({"prompt": ["a"], "answer": ["7"]})
    build = lambda mode: SRPOTrainer(
        model=make_tiny_llama(char_tokenizer), reward_funcs=contains_seven, processing_class=char_tokenizer,
        args=_args(tmp_path, SRPOConfig, use_vllm=True, vllm_mode=mode, generation_kwargs={"seed": 3}),
        train_dataset=data)
    with pytest.raises(ValueError, match=r"seed.*vllm_mode='server'.*--seed"):
        build("server")
    assert engines == []
    assert build("colocate").vllm_generation.generation_kwargs == {"seed": 3}
    llm = fake_vllm.FakeLLM(make_tiny_llama(char_tokenizer), char_tokenizer)
    with pytest.raises(ValueError, match="seed"):  # the backend refuses it too when built by hand
        VLLMThoughtSampler(_engine(llm, "server", generation_kwargs={"seed": 3}), char_tokenizer, ThoughtFormat())


def test_a_user_seed_becomes_one_seed_per_row_so_rollouts_differ_and_runs_repeat(monkeypatch, char_tokenizer):
    monkeypatch.setattr(fake_vllm.vllm_generation, "SamplingParams", fake_vllm.FakeSamplingParams, raising=False)
    model = make_tiny_llama(char_tokenizer)
    context = char_tokenizer(PROMPT)["input_ids"]
    fmt = ThoughtFormat(max_completion_tokens=12, max_thought_tokens=4, max_thoughts=3)

    def rollouts(engine_seed, user_seed=5, steps=2):
        llm = fake_vllm.FakeLLM(model, char_tokenizer, seed=engine_seed)
        engine = _engine(llm, temperature=1.0, generation_kwargs={"seed": user_seed})
        out = []
        for _ in range(steps):  # a new sampler per training step, as the trainer builds them
            sampler = VLLMThoughtSampler(engine, char_tokenizer, fmt, eos_ids=[char_tokenizer.eos_token_id])
            out.append([r.token_ids for r in sampler.sample([context] * 4)])
        return out, llm

    (first, second), llm = rollouts(engine_seed=0)
    assert len({tuple(r) for r in first}) > 1  # the rollouts of one context differ ...
    assert first != second  # ... and so do the next step's
    assert len({p.seed for p in llm.calls}) == len(llm.calls)  # every request had a seed of its own
    assert rollouts(engine_seed=123)[0] == [first, second]  # the run repeats, whatever the engine's own seed
    assert rollouts(engine_seed=0, user_seed=6)[0][0] != first
    # what vLLM does with one seed for every copy of a context: identical samples
    same = llm.generate([{"prompt_token_ids": context}] * 3,
                        fake_vllm.FakeSamplingParams(temperature=1.0, seed=5, max_tokens=8))
    assert len({tuple(r.outputs[0].token_ids) for r in same}) == 1


def test_row_seeds_are_distinct_per_process_and_row():
    seeds = {row_seed(0, p, r) for p in range(4) for r in range(1000)}
    assert len(seeds) == 4000 and all(0 <= s < 2**63 for s in seeds)
    assert row_seed(1, 0, 0) != row_seed(0, 0, 0) and row_seed(0, 0, 0) == row_seed(0, 0, 0)


# ---------------------------------------------------------------------------------------------------- lengths
@pytest.mark.parametrize("mode", ["colocate", "server"])
def test_every_request_asks_for_at_most_the_rows_remaining_budget(monkeypatch, char_tokenizer, scripted, mode):
    monkeypatch.setattr(fake_vllm.vllm_generation, "SamplingParams", fake_vllm.FakeSamplingParams, raising=False)
    prompt, script, model = scripted
    ends = _thought_ends(script, char_tokenizer)
    fmt = ThoughtFormat(max_completion_tokens=200, max_thought_tokens=50, max_thoughts=10)
    contexts, starts, budgets = [prompt, prompt + script[: ends[1]]], [0, 2], [7, 200 - ends[1]]
    for per_thought in (False, True):
        llm = fake_vllm.FakeLLM(model, char_tokenizer, prefix_caching=per_thought)
        engine = _engine(llm, mode)
        sampler = VLLMThoughtSampler(engine, char_tokenizer, fmt, eos_ids=[char_tokenizer.eos_token_id],
                                     per_thought=per_thought)
        got = sampler.sample(contexts, starts, budgets)
        assert [len(r.token_ids) for r in got] == [7, len(script) - ends[1]]
        asked = [p.max_tokens for p in llm.calls]
        if per_thought:  # first round: the 7-token row asks for 7, the other for one thought's cap
            assert asked[:2] == [7, 50] and all(m <= 50 for m in asked)
        else:
            assert sorted(asked) == sorted(budgets)
        if mode == "server":  # one call per distinct budget (the server applies one to a whole call)
            first = sorted(b["max_tokens"] for b in engine.vllm_client.bodies[:2])  # in flight together: any order
            assert first == [7, 50 if per_thought else budgets[1]]


@pytest.mark.parametrize("per_thought", [True, False])
@pytest.mark.parametrize("mode", ["colocate", "server"])
def test_a_prompt_plus_budget_past_max_model_len_fails_before_sending_naming_the_row(monkeypatch, char_tokenizer,
                                                                                    scripted, mode, per_thought):
    """Per-thought rounds would fit at first (5 tokens a round) and pass the limit later: the whole budget is
    checked before the first round."""
    monkeypatch.setattr(fake_vllm.vllm_generation, "SamplingParams", fake_vllm.FakeSamplingParams, raising=False)
    prompt, script, model = scripted
    llm = fake_vllm.FakeLLM(model, char_tokenizer, max_model_len=40, prefix_caching=per_thought)
    engine = _engine(llm, mode)
    fmt = ThoughtFormat(max_completion_tokens=30, max_thought_tokens=5, max_thoughts=10)
    sampler = VLLMThoughtSampler(engine, char_tokenizer, fmt, eos_ids=[char_tokenizer.eos_token_id],
                                 per_thought=per_thought)
    flag = "vllm_max_model_length" if mode == "colocate" else "--max-model-len"
    long_context = prompt + script[:20]  # 24 tokens + a 30-token budget > 40; the short row fits
    with pytest.raises(ValueError, match=rf"rollout row 1.*24 tokens plus up to 30.*max_model_len=40.*{flag} to at "
                                         r"least 54"):
        sampler.sample([prompt, long_context])
    with pytest.raises(ValueError, match=rf"localization row 0.*{flag}"):
        sampler.complete([long_context], max_new_tokens=20, temperature=0.0)
    assert llm.requests == 0  # nothing was sent
    assert [len(r.token_ids) for r in sampler.sample([prompt, long_context], token_budgets=[30, 16])] == [30, 16]


def test_the_stand_in_enforces_max_model_len_as_vllm_does(char_tokenizer, scripted):
    prompt, script, model = scripted
    llm = fake_vllm.FakeLLM(model, char_tokenizer, max_model_len=10)
    params = fake_vllm.FakeSamplingParams(temperature=0.0, max_tokens=30)
    (out,) = llm.generate([{"prompt_token_ids": prompt}], params)  # offline: the rest is cut short silently
    assert len(out.outputs[0].token_ids) == 6 and out.outputs[0].finish_reason == "length"
    with pytest.raises(ValueError, match="longer than the maximum model length"):  # offline: a too-long prompt raises
        llm.generate([{"prompt_token_ids": prompt + script[:7]}], params)
    client = fake_vllm.FakeVLLMClient(llm)
    with pytest.raises(Exception, match="Request failed: 400"):  # the server rejects the whole request
        client.generate([prompt[:1], prompt], max_tokens=7, temperature=0.0)
    assert llm.requests == 1


# ---------------------------------------------------------------------------------------------------- logprobs
@pytest.mark.parametrize("mode", ["colocate", "server"])
def test_the_sampled_tokens_logprob_is_picked_by_its_id_when_more_are_returned(monkeypatch, char_tokenizer, mode):
    monkeypatch.setattr(fake_vllm.vllm_generation, "SamplingParams", fake_vllm.FakeSamplingParams, raising=False)
    model = make_tiny_llama(char_tokenizer)
    context = char_tokenizer(PROMPT)["input_ids"]
    fmt = ThoughtFormat(max_completion_tokens=16, max_thought_tokens=8, max_thoughts=4)
    runs, first_entries = {}, []
    for top in (0, 5):
        llm = fake_vllm.FakeLLM(model, char_tokenizer)
        engine = _engine(llm, mode, temperature=1.0, logprobs=top,
                         generation_kwargs={"seed": 1} if mode == "colocate" else {})
        if top:  # keep what the engine hands back (server: ranked lists, most likely first)
            owner = engine.vllm_client if mode == "server" else llm
            owner.generate = lambda *a, send=owner.generate, **kw: first_entries.append(out := send(*a, **kw)) or out
        sampler = VLLMThoughtSampler(engine, char_tokenizer, fmt, eos_ids=[char_tokenizer.eos_token_id])
        runs[top] = sampler.sample([context] * 3)
    for small, large in zip(runs[0], runs[5]):
        assert small.token_ids == large.token_ids
        assert small.logprobs == pytest.approx(large.logprobs)
    # at temperature 1 a random model often samples a token that is not the most likely one, so the first entry
    # of a position is often another token's logprob
    if mode == "server":
        misses = sum(ids[0] != tok for out in first_entries for row_ids, row in
                     zip(out["logprob_token_ids"], out["completion_ids"]) for ids, tok in zip(row_ids, row))
    else:
        misses = sum(min(entry, key=lambda t: entry[t].rank) != tok for results in first_entries for r in results
                     for entry, tok in zip(r.outputs[0].logprobs, r.outputs[0].token_ids))
    assert misses > 0
    assert sampled_logprob([4, 9], [-0.1, -2.0], 9) == -2.0 and math.isnan(sampled_logprob([4], [-0.1], 9))


def test_the_stand_ins_logprobs_follow_min_p_top_k_and_top_p():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()

    def lp(**kw):
        return fake_vllm.processed_logprobs(logits, fake_vllm.FakeSamplingParams(**kw)).exp()

    assert torch.allclose(lp(temperature=1.0), probs)
    assert torch.allclose(lp(temperature=1.0, top_p=0.8), torch.tensor([0.625, 0.375, 0, 0]))
    assert torch.allclose(lp(temperature=1.0, top_k=3), torch.tensor([0.5, 0.3, 0.15, 0]) / 0.95)
    assert torch.allclose(lp(temperature=1.0, min_p=0.4), torch.tensor([0.625, 0.375, 0, 0]))
    assert torch.allclose(lp(temperature=0.5), probs**2 / (probs**2).sum())
    assert torch.allclose(lp(temperature=1.0, top_p=0.01), torch.tensor([1.0, 0, 0, 0]))


def test_the_stand_ins_sampled_logprobs_are_the_processed_ones(char_tokenizer):
    model = make_tiny_llama(char_tokenizer)
    llm = fake_vllm.FakeLLM(model, char_tokenizer)
    context = char_tokenizer(PROMPT)["input_ids"]
    params = fake_vllm.FakeSamplingParams(temperature=0.8, top_k=5, top_p=0.9, max_tokens=6, logprobs=0, seed=2)
    sample = llm.generate([{"prompt_token_ids": context}], params)[0].outputs[0]
    ids = list(context)
    for token, entry in zip(sample.token_ids, sample.logprobs):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1].float()
        expected = fake_vllm.processed_logprobs(logits, params)
        assert torch.topk(logits, 5).indices.tolist().count(token) == 1  # top-k held
        assert entry[token].logprob == pytest.approx(float(expected[token]), abs=1e-5)
        ids.append(token)


# ------------------------------------------------------------------------------------------ per-request options
def test_repetition_penalty_is_honoured_across_rounds_while_per_request_penalties_would_restart(monkeypatch,
                                                                                               char_tokenizer):
    """vLLM's repetition penalty counts the prompt, so rounds sample what one pass samples; a presence penalty
    counts one request's tokens only (the reason it is refused)."""
    monkeypatch.setattr(fake_vllm.vllm_generation, "SamplingParams", fake_vllm.FakeSamplingParams, raising=False)
    model = make_tiny_llama(char_tokenizer)
    context = char_tokenizer(PROMPT)["input_ids"]
    fmt = ThoughtFormat(max_completion_tokens=20, max_thought_tokens=5, max_thoughts=10)

    def tokens(per_thought, generation_kwargs=None, **settings):
        llm = fake_vllm.FakeLLM(model, char_tokenizer, prefix_caching=per_thought)
        engine = _engine(llm, **settings)
        sampler = VLLMThoughtSampler(engine, char_tokenizer, fmt, eos_ids=[char_tokenizer.eos_token_id],
                                     per_thought=per_thought)
        engine.generation_kwargs = generation_kwargs or {}  # set after the refusal, to show its reason
        (rollout,) = sampler.sample([context])
        return rollout.token_ids, sampler.rounds

    rounds, one_pass = tokens(True, repetition_penalty=1.1), tokens(False, repetition_penalty=1.1)
    assert rounds[0] == one_pass[0] != tokens(False)[0] and (rounds[1], one_pass[1]) == (4, 1)
    for options in ({"presence_penalty": -2.0}, {"min_tokens": 8}):
        settings = {"repetition_penalty": 1.3, "generation_kwargs": options}
        assert tokens(True, **settings)[0] != tokens(False, **settings)[0]


# ------------------------------------------------------------------------------------------ stand-in fidelity
def test_the_stand_in_stops_at_generation_config_eos_and_reports_finish_and_stop_reasons(char_tokenizer, scripted):
    prompt, script, model = scripted
    llm = fake_vllm.FakeLLM(model, char_tokenizer)
    greedy = {"temperature": 0.0, "max_tokens": 60}
    run = lambda **kw: llm.generate([{"prompt_token_ids": prompt}], fake_vllm.FakeSamplingParams(**kw))[0].outputs[0]
    full = run(**greedy)
    assert full.token_ids == script + [char_tokenizer.eos_token_id]
    assert (full.finish_reason, full.stop_reason) == ("stop", None)  # EOS kept in the ids
    cut = run(**{**greedy, "max_tokens": 5})
    assert (len(cut.token_ids), cut.finish_reason) == (5, "length")
    by_string = run(**greedy, stop=["</thought>"])
    assert (by_string.stop_reason, char_tokenizer.decode(by_string.token_ids)) == ("</thought>", "a1</thought>")
    by_token = run(**greedy, stop_token_ids=[script[1]])
    assert (by_token.token_ids, by_token.stop_reason) == (script[:2], script[1])
    late = run(**greedy, min_tokens=13, stop=["</thought>"])  # stops are held back until min_tokens
    assert char_tokenizer.decode(late.token_ids) == "a1</thought>b22</thought>"
    model.generation_config.eos_token_id = [char_tokenizer.eos_token_id, script[2]]  # vLLM reads the generation config
    other = fake_vllm.FakeLLM(model, char_tokenizer)
    out = other.generate([{"prompt_token_ids": prompt}], fake_vllm.FakeSamplingParams(**greedy))[0].outputs[0]
    assert out.token_ids == script[:3] and out.finish_reason == "stop"


def test_the_stand_in_matches_stop_strings_on_text_without_special_tokens(char_tokenizer, scripted):
    prompt = scripted[0]
    special = char_tokenizer.convert_tokens_to_ids("<|user|>")
    talk = char_tokenizer("ab")["input_ids"] + [special] + char_tokenizer("cd")["input_ids"]
    scripted_talk = position_scripted_llama(char_tokenizer, talk, len(prompt))
    llm = fake_vllm.FakeLLM(scripted_talk, char_tokenizer)
    run = lambda **kw: llm.generate(
        [{"prompt_token_ids": prompt}], fake_vllm.FakeSamplingParams(temperature=0.0, max_tokens=10, stop=["<|user|>"],
                                                                    **kw))[0].outputs[0]
    assert run().token_ids == talk + [char_tokenizer.eos_token_id]  # skipped from the text: never matched
    assert run(skip_special_tokens=False).token_ids == talk[:3]


def test_the_stand_ins_seeds_give_n_children_seed_plus_index(char_tokenizer):
    model = make_tiny_llama(char_tokenizer)
    llm = fake_vllm.FakeLLM(model, char_tokenizer)
    context = [{"prompt_token_ids": char_tokenizer(PROMPT)["input_ids"]}]
    params = lambda **kw: fake_vllm.FakeSamplingParams(temperature=1.0, max_tokens=8, **kw)
    (two,) = llm.generate(context, params(n=2, seed=10))
    singles = [llm.generate(context, params(seed=s))[0].outputs[0].token_ids for s in (10, 11)]
    assert [o.token_ids for o in two.outputs] == singles and singles[0] != singles[1]
    with pytest.raises(NotImplementedError, match="logit_bias"):
        fake_vllm.FakeSamplingParams(logit_bias={1: 2.0})


def test_the_stand_in_client_merges_generation_kwargs_last_and_omits_unasked_logprobs(char_tokenizer, scripted):
    prompt, script, model = scripted
    client = fake_vllm.FakeVLLMClient(fake_vllm.FakeLLM(model, char_tokenizer))
    out = client.generate([prompt], temperature=1.0, max_tokens=4, logprobs=None,
                          generation_kwargs={"temperature": 0.0})
    assert client.bodies[-1]["temperature"] == 0.0 and out["completion_ids"] == [script[:4]]
    assert out["logprobs"] is None and out["logprob_token_ids"] is None
    out = client.generate([prompt, prompt], temperature=0.0, max_tokens=3, logprobs=2)
    assert [len(pos) for pos in out["logprobs"][0]] == [2, 2, 2] and out["logprob_token_ids"][1][0][0] == script[0]
    assert client.get_server_info()["model_config"]["max_model_len"] == 4096


def test_in_server_mode_every_process_stops_when_one_row_is_too_long(monkeypatch, char_tokenizer, scripted):
    """Server requests are collective: a process whose rows fit must raise too, or it would wait forever."""
    monkeypatch.setattr(fake_vllm.vllm_generation, "SamplingParams", fake_vllm.FakeSamplingParams, raising=False)
    prompt, _, model = scripted
    llm = fake_vllm.FakeLLM(model, char_tokenizer, max_model_len=40)
    fmt = ThoughtFormat(max_completion_tokens=30, max_thought_tokens=5, max_thoughts=10)
    other_process_failed = lambda flag: True  # what the all-reduce returns when another process's row fails
    sampler = VLLMThoughtSampler(_engine(llm, "server"), char_tokenizer, fmt, eos_ids=[char_tokenizer.eos_token_id],
                                 sync_any=other_process_failed)
    with pytest.raises(ValueError, match="another process.*max_model_len"):
        sampler.sample([prompt])
    assert llm.requests == 0


def test_srpo_with_a_seed_in_colocate_mode_samples_distinct_rollouts_and_repeats(tmp_path, char_tokenizer,
                                                                                 monkeypatch):
    original = fake_vllm.FakeLLM.generate

    def run():
        seen = []

        def recording(self, prompts, sampling_params=None, use_tqdm=False):
            results = original(self, prompts, sampling_params, use_tqdm)
            seen.extend((tuple(r.prompt_token_ids), tuple(r.outputs[0].token_ids)) for r in results)
            return results

        monkeypatch.setattr(fake_vllm.FakeLLM, "generate", recording)
        _, engine, logs = _vllm_train(tmp_path, char_tokenizer, monkeypatch, "colocate", max_steps=1,
                                      generation_kwargs={"seed": 11})
        return seen, engine.fake_llm, logs

    first, llm, logs = run()
    assert len(logs) == 1 and all(p.seed is not None for p in llm.calls)
    by_prompt = {}
    for prompt, completion in first:
        by_prompt.setdefault(prompt, set()).add(completion)
    assert max(len(c) for c in by_prompt.values()) > 1  # copies of one context got different samples
    assert run()[0] == first


@pytest.mark.parametrize("mode", ["colocate", "server"])
def test_srpo_names_the_length_fix_when_the_engines_max_model_len_is_too_small(tmp_path, char_tokenizer, monkeypatch,
                                                                              mode):
    engines = fake_vllm.install(monkeypatch, server_max_model_len=30)
    args = _args(tmp_path, SRPOConfig, use_vllm=True, vllm_mode=mode, max_steps=1, vllm_max_model_length=30)
    trainer = SRPOTrainer(model=make_tiny_llama(char_tokenizer), reward_funcs=contains_seven, args=args,
                          train_dataset=Dataset.from_dict({"prompt": ["2+5?", "3+4?"], "answer": ["7"] * 2}),
                          processing_class=char_tokenizer)
    flag = "vllm_max_model_length" if mode == "colocate" else "--max-model-len"
    with pytest.raises(ValueError, match=rf"rollout row 0.*max_model_len=30.*Fix: raise .*{flag}"):
        trainer.train()
    assert engines[0].fake_llm.requests == 0


@pytest.mark.parametrize("per_thought", [True, False])
@pytest.mark.parametrize("mode", ["colocate", "server"])
def test_vllm_stream_rows_join_the_next_round_and_decode_as_sample_does(monkeypatch, char_tokenizer, scripted,
                                                                       per_thought, mode):
    """A reset suffix and a localization reply submitted mid-chain join the next request round (per-thought) or go
    out at once (one pass), and come back as `sample` and `complete` would give them."""
    from trl_resets.sampling.base import DecodeRequest

    monkeypatch.setattr(fake_vllm.vllm_generation, "SamplingParams", fake_vllm.FakeSamplingParams, raising=False)
    prompt, script, model = scripted
    ends = _thought_ends(script, char_tokenizer)
    fmt = ThoughtFormat(max_completion_tokens=200, max_thought_tokens=50, max_thoughts=10)
    eos = [char_tokenizer.eos_token_id]

    def sampler():
        llm = fake_vllm.FakeLLM(model, char_tokenizer, prefix_caching=per_thought)
        return VLLMThoughtSampler(_engine(llm, mode), char_tokenizer, fmt, eos_ids=eos, per_thought=per_thought), llm

    first = DecodeRequest(prompt, 0, 200)
    late = [DecodeRequest(prompt + script[: ends[1]], 2, 200), DecodeRequest(prompt, reply_tokens=5, temperature=0.0)]
    reference, _ = sampler()
    want = [reference.sample([first.context])[0], reference.sample([late[0].context], [2], [200])[0],
            reference.complete([late[1].context], 5, 0.0)[0]]
    streamed, llm = sampler()
    stream = streamed.stream()
    handles = stream.submit([first])
    done = dict(stream.step())
    calls_before = llm.requests
    handles += stream.submit(late)
    done.update(stream.step())
    if per_thought:  # the first row is mid-chain; the suffix joined its round, the reply went out beside them
        assert handles[0] not in done and handles[1] not in done and handles[2] in done
        assert llm.requests - calls_before == 3
    while stream.busy:
        done.update(stream.step())
    got = [done[h] for h in handles]
    for w, g in zip(want[:2], got[:2]):
        assert (g.token_ids, g.thought_spans, g.stop_reason) == (w.token_ids, w.thought_spans, w.stop_reason)
        assert len(g.logprobs) == len(g.token_ids)
    assert got[2] == want[2] and len(got[2]) == 5


class _WaveClient(fake_vllm.FakeVLLMClient):
    """A server that serves its first ``parties`` calls only once they are all in flight at the same time: calls sent
    one after another break its barrier (`threading.BrokenBarrierError`)."""

    def __init__(self, llm, parties):
        super().__init__(llm)
        self.barrier, self.arrived, self.count = threading.Barrier(parties, timeout=20), 0, threading.Lock()

    def generate(self, prompts, **kwargs):
        with self.count:
            self.arrived += 1
            waits = self.arrived <= self.barrier.parties
        if waits:
            self.barrier.wait()
        return super().generate(prompts, **kwargs)


@pytest.mark.parametrize("per_thought", [True, False])
def test_in_server_mode_a_steps_calls_are_in_flight_together(monkeypatch, char_tokenizer, scripted, per_thought):
    """A stream step's new draws, a reset suffix (a smaller token budget: a call of its own in one pass) and a
    localization reply (another temperature, no stop strings: a call of its own) reach the server as calls in flight
    at the same time, which its scheduler decodes together, and come back as `sample` and `complete` give them."""
    from trl_resets.sampling.base import DecodeRequest

    monkeypatch.setattr(fake_vllm.vllm_generation, "SamplingParams", fake_vllm.FakeSamplingParams, raising=False)
    prompt, script, model = scripted
    ends = _thought_ends(script, char_tokenizer)
    fmt = ThoughtFormat(max_completion_tokens=200, max_thought_tokens=50, max_thoughts=10)
    eos = [char_tokenizer.eos_token_id]
    requests = [DecodeRequest(prompt, 0, 200), DecodeRequest(prompt, 0, 200),
                DecodeRequest(prompt + script[: ends[1]], 2, 200 - ends[1]),
                DecodeRequest(prompt, reply_tokens=5, temperature=0.0)]
    parties = 2 if per_thought else 3  # per thought, the suffix's first round asks for one thought, as the draws
    engine = _engine(fake_vllm.FakeLLM(model, char_tokenizer, prefix_caching=per_thought), "server", temperature=1.0)
    engine.vllm_client = _WaveClient(engine.vllm_client.llm, parties)
    stream = VLLMThoughtSampler(engine, char_tokenizer, fmt, eos_ids=eos, per_thought=per_thought).stream()
    handles = stream.submit(requests)
    done = dict(stream.step())
    first_wave = engine.vllm_client.bodies[:parties]
    assert sorted((b["max_tokens"], b["temperature"]) for b in first_wave) == sorted(
        {(50 if per_thought else 200, 1.0), (50 if per_thought else 200 - ends[1], 1.0), (5, 0.0)})
    while stream.busy:
        done.update(stream.step())
    got = [done[h] for h in handles]
    assert [(r.token_ids, r.stop_reason) for r in got[:3]] == [(script, "answer")] * 2 + [(script[ends[1]:], "answer")]
    assert got[3] == script[:5]


# ---------------------------------------------------------------------------------------------------- per-row seeds
@pytest.mark.parametrize("per_thought", [True, False])
def test_seeded_requests_sample_the_same_tokens_whatever_shares_their_calls(monkeypatch, char_tokenizer, per_thought):
    """Colocate mode with `DecodeRequest.seed`: each request goes to vLLM with a seed of its own (per-thought rounds:
    one derived per round), so a row's tokens follow from its seed, not from the engine's generator or the rows
    beside it."""
    from dataclasses import replace

    from trl_resets.sampling.base import DecodeRequest

    monkeypatch.setattr(fake_vllm.vllm_generation, "SamplingParams", fake_vllm.FakeSamplingParams, raising=False)
    model = make_tiny_llama(char_tokenizer)
    context = char_tokenizer(PROMPT)["input_ids"]
    fmt = ThoughtFormat(max_completion_tokens=12, max_thought_tokens=4, max_thoughts=3)

    def run(requests, engine_seed):
        llm = fake_vllm.FakeLLM(model, char_tokenizer, prefix_caching=per_thought, seed=engine_seed)
        stream = VLLMThoughtSampler(_engine(llm, temperature=1.0), char_tokenizer, fmt,
                                    eos_ids=[char_tokenizer.eos_token_id], per_thought=per_thought).stream()
        handles, done = stream.submit(requests), {}
        while stream.busy:
            done.update(stream.step())
        return [getattr(done[h], "token_ids", done[h]) for h in handles], llm

    rows = [DecodeRequest(context, 0, 12, seed=s) for s in (1, 2, 3)]
    rows.append(DecodeRequest(context, reply_tokens=5, temperature=1.0, seed=4))
    together, llm = run(rows, engine_seed=0)
    assert together == [run([row], engine_seed=1 + i)[0][0] for i, row in enumerate(rows)]
    assert len({tuple(t) for t in together[:3]}) == 3 and len(together[3]) == 5
    assert len({p.seed for p in llm.calls}) == len(llm.calls) and None not in {p.seed for p in llm.calls}
    if per_thought:
        assert len(llm.calls) > len(rows)  # several rounds per rollout, each with a seed of its own
    unseeded = [replace(row, seed=None) for row in rows]
    assert run(unseeded, engine_seed=0)[0] != run(unseeded[::-1], engine_seed=0)[0][::-1]


def test_per_row_sampling_seeds_are_refused_where_vllm_cannot_honour_them(tmp_path, char_tokenizer):
    from trl_resets.sampling.base import DecodeRequest

    with pytest.raises(ValueError, match="per_row_sampling_seed=True cannot be honoured with vllm_mode='server'"):
        _args(tmp_path, SRPOConfig, use_vllm=True, vllm_mode="server", per_row_sampling_seed=True)
    with pytest.raises(ValueError, match=r"per_row_sampling_seed=True .*generation_kwargs\['seed'\]"):
        _args(tmp_path, SRPOConfig, use_vllm=True, per_row_sampling_seed=True, generation_kwargs={"seed": 1})
    assert _args(tmp_path, SRPOConfig, use_vllm=True, per_row_sampling_seed=True).per_row_sampling_seed
    llm = fake_vllm.FakeLLM(make_tiny_llama(char_tokenizer), char_tokenizer)
    stream = VLLMThoughtSampler(_engine(llm, "server"), char_tokenizer, ThoughtFormat()).stream()
    stream.submit([DecodeRequest(char_tokenizer(PROMPT)["input_ids"], 0, 8, seed=1)])
    with pytest.raises(ValueError, match="cannot go to a vLLM server"):
        stream.step()
    assert llm.requests == 0


@pytest.mark.parametrize("peft", [False, True])
def test_the_stand_in_samples_from_its_own_copy_not_the_trainers_live_model(char_tokenizer, peft):
    """TRL patches the policy's forward with a fused LM head whose closure holds the original model's forward; the
    engine's copy must not follow it back to the live model (train mode, LoRA dropout, weights not yet synced)."""
    from trl.trainer.utils import add_fused_lm_head

    model = make_tiny_llama(char_tokenizer)
    if peft:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.5, target_modules=["q_proj"],
                                                 init_lora_weights=False, task_type="CAUSAL_LM"))
    add_fused_lm_head(model.get_base_model() if peft else model, outputs=("log_probs", "entropy"))
    model.train()
    llm = fake_vllm.FakeLLM(model, char_tokenizer)
    x = torch.tensor([char_tokenizer(PROMPT)["input_ids"]])
    before = llm.model(input_ids=x).logits
    assert torch.equal(llm.model(input_ids=x).logits, before)  # no dropout: the engine's copy is in eval mode
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.5)
    assert torch.equal(llm.model(input_ids=x).logits, before)  # the trainer's weights reach it only when loaded
