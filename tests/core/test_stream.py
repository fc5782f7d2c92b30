"""The compact decoder as a stream: rows that join a running batch decode what they decode alone."""

import random

import torch
from transformers import GenerationConfig

from tests.conftest import make_tiny_llama
from trl_resets.localizers import Localization, SelfLocalizer
from trl_resets.resets import ResetAlgorithm, Split
from trl_resets.sampling import TransformersThoughtSampler
from trl_resets.sampling.base import DecodeRequest
from trl_resets.scheduler import run_overlapped
from trl_resets.thoughts import Rollout, ThoughtFormat

FMT = ThoughtFormat(max_thoughts=4, max_thought_tokens=5, max_completion_tokens=14)


def _sampler(tok, seed=3, **kwargs):
    model = make_tiny_llama(tok, seed=seed).eval()
    return TransformersThoughtSampler(model, tok, FMT, GenerationConfig(do_sample=False), [tok.eos_token_id],
                                      **kwargs)


def _plain(result):
    return (result.token_ids, result.thought_spans, result.stop_reason) if isinstance(result, Rollout) else result


def test_rows_joining_a_running_batch_decode_as_they_do_alone(char_tokenizer):
    tok = char_tokenizer
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]
    waves = [  # requests submitted before steps 0, 2 and 5: rollouts, a reset suffix, replies
        [DecodeRequest(enc("Q: 12+7?"), 0, 14), DecodeRequest(enc("Q: 12+7?"), 0, 14), DecodeRequest(enc("Q: 1?"), 0, 9)],
        [DecodeRequest(enc("Q: 3*4, then 5 and some?"), 1, 10), DecodeRequest(enc("which step? 2"), reply_tokens=6)],
        [DecodeRequest(enc("Q: 12+7?ab"), 2, 7), DecodeRequest(enc("x"), reply_tokens=3)],
    ]
    alone = _sampler(tok)
    expected = [_plain(alone.complete([r.context], r.reply_tokens, 0.0)[0]) if r.is_reply else
                _plain(alone.sample([r.context], [r.start_thoughts], [r.token_budget])[0]) for w in waves for r in w]
    sampler = _sampler(tok)
    stream = sampler.stream()
    passes, widths = [], []
    hook = sampler.model.model.embed_tokens.register_forward_hook(lambda m, a, out: widths.append(a[0].shape))
    handles, done, step = [], {}, 0
    while step <= 5 or stream.busy:
        if step in (0, 2, 5):
            handles += stream.submit(waves[(0, 2, 5).index(step)])
        done.update(stream.step())
        step += 1
        passes.append(len(stream.rows))
    hook.remove()
    assert [_plain(done[h]) for h in handles] == expected
    prefills = [w for w in widths if w[1] > 1]
    assert [w[0] for w in prefills] == [2, 2, 2]  # three joins; the repeated context is encoded once
    assert max(passes) >= 4  # the late rows decoded together with the first ones


def test_sampled_rows_that_never_join_later_draw_what_sample_draws(char_tokenizer):
    tok = char_tokenizer
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]
    model = make_tiny_llama(tok, seed=5).eval()
    config = GenerationConfig(do_sample=True, temperature=0.8, top_k=30)
    contexts = [enc("Q: 12+7?"), enc("Q: 3?"), enc("Q: 3?")]
    outs = []
    for streamed in (False, True):
        sampler = TransformersThoughtSampler(model, tok, FMT, config, [tok.eos_token_id])
        torch.manual_seed(4)
        if streamed:
            stream = sampler.stream()
            handles, done = stream.submit([DecodeRequest(c, 0, 14) for c in contexts]), {}
            while stream.busy:
                done.update(stream.step())
            outs.append([done[h].token_ids for h in handles])
        else:
            outs.append([r.token_ids for r in sampler.sample(contexts)])
    assert outs[0] == outs[1]


class _ReplyLocalizer(SelfLocalizer):
    """Reads the step from the reply's token count (a random tiny model writes no boxed answer)."""

    def read(self, requests, replies):
        return [Localization(1 + tokens % r.num_steps, tokens, text) for r, (text, tokens) in zip(requests, replies)]


class _Codec:
    def __init__(self, tok):
        self.tok = tok

    def encode(self, prompts, requests):
        return [self.tok(p[-60:], add_special_tokens=False)["input_ids"] for p in prompts]

    def decode(self, ids):
        return self.tok.decode(ids, skip_special_tokens=True)

    def complete(self, prompts, max_new_tokens, temperature):
        raise AssertionError("the overlapped run decodes localization replies in the stream")


def test_overlapped_srpo_decodes_replies_and_suffixes_in_the_rollouts_batch(char_tokenizer):
    """Greedy SRPO, overlapped and phased: the same groups; overlapped, localization replies decode in the same
    forward passes as phase-1 rollouts, and the decoding loop takes no more steps."""
    tok = char_tokenizer
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]
    algo = ResetAlgorithm(Split(2, 1, 2), FMT, seed_budget=2)
    contexts = [enc("Q: 12+7?"), enc("Q: 3*4, then 5?"), enc("Q: 1?"), enc("Q: 99-4 and 2?")]
    questions = [f"q{p}" for p in range(len(contexts))]
    args = (lambda owners, completions: [[0.0] for _ in completions], _ReplyLocalizer(max_new_tokens=4))
    kwargs = {"describe": lambda r: ["step"] * r.num_thoughts, "policy": _Codec(tok)}
    runs, mixed = {}, []
    for overlapped in (True, False):
        sampler = _sampler(tok, seed=1)  # greedy rollouts of 5 to 14 tokens on these contexts
        shapes = []
        hook = sampler.model.model.embed_tokens.register_forward_hook(
            lambda m, a, out, shapes=shapes: shapes.append(a[0].shape))
        if overlapped:
            stream = sampler.stream()
            step = stream.step

            def watched_step(step=step, stream=stream):
                replies = sum(row.tracker is None for row in stream.rows)
                mixed.append((len(stream.rows) - replies, replies))
                return step()

            stream.step = watched_step
            groups = run_overlapped(algo, contexts, questions, stream, *args, rng=random.Random(0), **kwargs)
        else:
            kwargs["policy"].complete = lambda prompts, n, t, s=sampler, c=kwargs["policy"]: [
                (c.decode(r), len(r)) for r in s.complete(c.encode(prompts, None), n, t)]
            groups = algo.run(contexts, questions, sampler, *args, rng=random.Random(0), **kwargs)
        hook.remove()
        runs[overlapped] = (groups, sum(shape[1] == 1 for shape in shapes))
    (groups, steps), (phased, phased_steps) = runs[True], runs[False]
    assert [[r.completion_ids for r in g.rows] for g in groups] == [[r.completion_ids for r in g.rows] for g in phased]
    assert [g.resets for g in groups] == [g.resets for g in phased]
    assert all(len(g.resets) == 1 and g.resets[0].localization_tokens > 0 for g in groups)
    assert not any(g.resets[0].localizer_failed for g in groups)
    assert any(rollouts and replies for rollouts, replies in mixed)  # replies decoded beside rollouts
    assert steps <= phased_steps


def test_a_row_cap_refills_the_batch_as_rows_finish(char_tokenizer):
    tok = char_tokenizer
    contexts = [tok(s, add_special_tokens=False)["input_ids"] for s in ("Q: 12+7?", "Q: 3*4, then 5?", "Q: 1?", "a")]
    free = _sampler(tok, seed=1).sample(contexts)
    capped = _sampler(tok, seed=1, batch_size=2)
    shapes = []
    hook = capped.model.model.embed_tokens.register_forward_hook(lambda m, a, out: shapes.append(a[0].shape))
    rollouts = capped.sample(contexts)
    hook.remove()
    assert [r.token_ids for r in rollouts] == [r.token_ids for r in free]
    assert max(shape[0] for shape in shapes) == 2 and sum(shape[1] > 1 for shape in shapes) >= 2


def test_a_model_with_recurrent_layers_samples_with_generate(char_tokenizer):
    """A hybrid state-space model (NemotronH: mamba and attention layers): its cache cannot drop or copy single rows,
    so the sampler decodes with ``generate``, says so, and the rollouts follow the caps."""
    import pytest
    from transformers import AutoConfig, AutoModelForCausalLM

    tok = char_tokenizer
    config = AutoConfig.for_model(
        "nemotron_h", vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        bos_token_id=None, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=4, max_position_embeddings=128)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with pytest.warns(UserWarning, match="recurrent layers"):
        sampler = TransformersThoughtSampler(model, tok, FMT, GenerationConfig(do_sample=True), [tok.eos_token_id])
    assert not sampler.compact and not sampler.share_prefill
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]
    rollouts = sampler.sample([enc("Q: 12+7?"), enc("Q: 12+7?"), enc("Q: 1?")])
    assert len(rollouts) == 3 and all(0 < len(r.token_ids) <= FMT.max_completion_tokens for r in rollouts)


def test_recorded_logprobs_are_the_policys_at_the_sampling_temperature(char_tokenizer):
    """With ``record_logprobs``, each sampled token's logprob equals log-softmax(logits / temperature) of a forward
    pass over the context and the tokens before it; without it, rollouts carry none."""
    tok = char_tokenizer
    context = tok("Q: 12+7?", add_special_tokens=False)["input_ids"]
    model = make_tiny_llama(tok, seed=3).eval()
    config = GenerationConfig(do_sample=True, temperature=0.7, top_k=0)
    sampler = TransformersThoughtSampler(model, tok, FMT, config, [tok.eos_token_id], record_logprobs=True)
    torch.manual_seed(0)
    rollouts = sampler.sample([context, context[:5]])
    for ctx, rollout in zip([context, context[:5]], rollouts):
        assert rollout.logprobs is not None and len(rollout.logprobs) == len(rollout.token_ids) > 0
        ids = torch.tensor([ctx + rollout.token_ids])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, len(ctx) - 1:-1] / 0.7
        expected = torch.log_softmax(logits, -1).gather(1, torch.tensor(rollout.token_ids)[:, None])[:, 0]
        assert torch.allclose(torch.tensor(rollout.logprobs), expected, atol=1e-4)
    plain = TransformersThoughtSampler(model, tok, FMT, config, [tok.eos_token_id])
    assert plain.sample([context])[0].logprobs is None
