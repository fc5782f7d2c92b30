"""The vLLM backends (colocate and server) through TRL's own wrapper, against a fake engine."""

import math
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset

from trl_resets import SRPOConfig, SRPOTrainer
from trl_resets.sampling import TransformersThoughtSampler, VLLMThoughtSampler, prefix_caching_enabled
from trl_resets.thoughts import ThoughtFormat

from . import fake_vllm
from .conftest import make_tiny_llama
from .test_trainer import _args, contains_seven

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
    prompt, script, model = scripted
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
    args = _args(tmp_path, SRPOConfig, use_vllm=True, vllm_mode=mode, max_steps=2, **overrides)
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
    args = _args(tmp_path, SRPOConfig, use_vllm=True, vllm_mode="colocate", **overrides)
    with pytest.raises(ValueError, match=message):
        SRPOTrainer(model=make_tiny_llama(char_tokenizer), reward_funcs=contains_seven, args=args,
                    train_dataset=Dataset.from_dict({"prompt": ["a"], "answer": ["7"]}),
                    processing_class=char_tokenizer)
    assert engines == []
