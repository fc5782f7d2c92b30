"""Thought segmentation and the transformers thought sampler."""

import pytest
import torch
from transformers import Cache, GenerationConfig

from tests.conftest import ScriptedLlama, make_tiny_llama
from trl_resets.sampling import TransformersThoughtSampler
from trl_resets.sampling.transformers_backend import cache_kwarg
from trl_resets.thoughts import (
    STOP_ANSWER,
    STOP_EOS,
    STOP_MAX_THOUGHTS,
    STOP_MAX_TOKENS,
    STOP_NONE,
    ThoughtFormat,
    ThoughtTracker,
    contains_final_answer,
    segment_thoughts,
    strip_delimiter,
    wrap_question,
)


def _segment(tok, text, fmt, **kw):
    ids = tok(text, add_special_tokens=False)["input_ids"]
    return ids, segment_thoughts(ids, tok.decode, fmt, [tok.eos_token_id], **kw)


def _texts(tok, rollout):
    return [tok.decode(rollout.thought_ids(h)) for h in range(rollout.num_thoughts)]


def _tokens_and_forward_shapes(model, sampler, contexts):
    """The rollouts' token ids and the input shape of every forward pass the sampler made for them."""
    seen = []
    hook = model.model.embed_tokens.register_forward_hook(lambda m, a, out: seen.append(a[0].shape))
    try:
        rollouts = sampler.sample(contexts)
    finally:
        hook.remove()
    return [r.token_ids for r in rollouts], seen


def test_delimiter_spans_cover_each_thought(char_tokenizer):
    fmt = ThoughtFormat(max_completion_tokens=500)
    ids, r = _segment(char_tokenizer, "a=1</thought> b=2</thought> so \\boxed{3}</thought> extra", fmt)
    assert _texts(char_tokenizer, r) == ["a=1</thought>", " b=2</thought>", " so \\boxed{3}</thought>"]
    assert r.stop_reason == STOP_ANSWER
    assert r.token_ids == ids[: r.thought_spans[-1][1]]  # the text after the answer thought is dropped


def test_a_code_rollout_ends_at_its_closed_program_never_at_a_box(char_tokenizer):
    """LiveCodeBench: a thought that boxes a number does not end the rollout; the closed fenced block does, even when
    the thought token cap cuts the program across thoughts."""
    fmt = ThoughtFormat(max_completion_tokens=500, max_thought_tokens=12, answer="code")
    text = ("n is \\boxed{3}</thought> so loop</thought> ```python\nprint(3)\n```</thought> more")
    ids, r = _segment(char_tokenizer, text, fmt)
    decoded = char_tokenizer.decode(r.token_ids)
    assert r.stop_reason == STOP_ANSWER and "print(3)\n```" in decoded and "more" not in decoded
    assert r.num_thoughts > 3  # the cap cut the program into several thoughts; the rule still found its end
    assert len(r.token_ids) < len(ids)  # what follows the program is not sampled
    boxed = ThoughtFormat(max_completion_tokens=500, max_thought_tokens=40)
    _, early = _segment(char_tokenizer, text, boxed)
    early_text = char_tokenizer.decode(early.token_ids)  # the math rule stops at the box, before the program
    assert early.stop_reason == STOP_ANSWER and "\\boxed{3}" in early_text and "print" not in early_text
    _, open_block = _segment(char_tokenizer, "```python\nprint(3)</thought> x=1</thought>", fmt)
    assert open_block.stop_reason != STOP_ANSWER  # an unclosed block is not a program yet
    with pytest.raises(ValueError, match="answer format"):
        ThoughtFormat(answer="latex")


def test_thought_token_cap_cuts_and_continues(char_tokenizer):
    fmt = ThoughtFormat(max_thought_tokens=4, max_completion_tokens=500)
    _, r = _segment(char_tokenizer, "abcdefghij</thought>", fmt)
    texts = _texts(char_tokenizer, r)
    assert texts[:2] == ["abcd", "efgh"]
    assert all(end - start <= 4 for start, end in r.thought_spans)


def test_max_thoughts_counts_prefix_thoughts(char_tokenizer):
    fmt = ThoughtFormat(max_thoughts=3, max_completion_tokens=500)
    text = "x</thought>y</thought>z</thought>w</thought>"
    _, fresh = _segment(char_tokenizer, text, fmt)
    assert fresh.num_thoughts == 3 and fresh.stop_reason == STOP_MAX_THOUGHTS
    _, after_prefix = _segment(char_tokenizer, text, fmt, start_thoughts=2)
    assert after_prefix.num_thoughts == 1 and after_prefix.stop_reason == STOP_MAX_THOUGHTS


def test_response_token_budget(char_tokenizer):
    fmt = ThoughtFormat(max_completion_tokens=6)
    _, r = _segment(char_tokenizer, "abc</thought>def</thought>", fmt)
    assert len(r.token_ids) == 6 and r.stop_reason == STOP_MAX_TOKENS
    _, budgeted = _segment(char_tokenizer, "abc</thought>def</thought>", ThoughtFormat(), token_budget=2)
    assert len(budgeted.token_ids) == 2


def test_paragraph_mode_splits_at_blank_lines_after_content(char_tokenizer):
    fmt = ThoughtFormat(split="paragraph", max_completion_tokens=500)
    _, r = _segment(char_tokenizer, "\n\nfirst step\n\nsecond\n\nso \\boxed{4}\n\nmore", fmt)
    assert _texts(char_tokenizer, r) == ["\n\nfirst step\n\n", "second\n\n", "so \\boxed{4}\n\n"]
    assert r.stop_reason == STOP_ANSWER


def test_model_that_never_writes_the_delimiter(char_tokenizer):
    fmt = ThoughtFormat(max_thought_tokens=5, max_thoughts=20, max_completion_tokens=12)
    _, r = _segment(char_tokenizer, "1. add two numbers and keep going", fmt)
    assert [e - s for s, e in r.thought_spans] == [5, 5, 2]
    assert r.stop_reason == STOP_MAX_TOKENS


def test_eos_after_a_thought_joins_that_thought(char_tokenizer):
    tok = char_tokenizer
    ids = tok("ab</thought>", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    r = segment_thoughts(ids, tok.decode, ThoughtFormat(), [tok.eos_token_id])
    assert r.num_thoughts == 1 and r.thought_spans[0] == (0, len(ids)) and r.stop_reason == STOP_EOS


def test_final_answer_detection():
    assert contains_final_answer("so \\boxed{12}")
    assert contains_final_answer("\\boxed{\\frac{1}{2}}")
    assert not contains_final_answer("\\boxed{12")
    assert not contains_final_answer("boxed 12")


def test_template_errors_are_clear():
    assert "Problem: 2+2" in wrap_question("2+2")
    with pytest.raises(ValueError, match="placeholder"):
        wrap_question("q", "{problem}")


def test_generate_hands_the_kv_cache_to_forward_under_the_name_the_sampler_uses(char_tokenizer, tiny_model):
    """The sampler's prefill, shared prefill and compact loop hand the cache to ``forward`` and ``generate`` by
    name (``cache`` since transformers 5.24, ``past_key_values`` before). If ``generate`` moves it again, this
    names the cause instead of leaving rollouts that come out shifted."""
    expected = cache_kwarg(tiny_model)
    seen = []
    forward = tiny_model.forward

    def spy(*args, **kwargs):
        caches = {name: value for name, value in kwargs.items() if isinstance(value, Cache)}
        seen.append((sorted(caches), [c.get_seq_length() for c in caches.values()], kwargs["input_ids"].shape[1]))
        return forward(*args, **kwargs)

    tiny_model.forward = spy
    ids = torch.tensor([[7, 8, 9]])
    tiny_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False,
                        pad_token_id=char_tokenizer.pad_token_id)
    names = {tuple(n) for n, _, _ in seen}
    assert names == {(expected,)}, (
        f"transformers' generate passed the KV cache to forward as {names}, the sampler uses {expected!r}: "
        "update cache_kwarg in trl_resets/sampling/transformers_backend.py")
    assert [(lengths, width) for _, lengths, width in seen] == [([0], 3), ([3], 1), ([4], 1)], (
        f"generate's prefill/decoding steps changed shape (cache length before, new tokens): {seen}")


def test_cache_kwarg_refuses_a_forward_without_a_cache_argument():
    class NoCache(torch.nn.Module):
        def forward(self, input_ids=None, attention_mask=None):
            return input_ids

    with pytest.raises(TypeError, match="neither `cache` nor `past_key_values`"):
        cache_kwarg(NoCache())


def _sampler(tok, scripts, fmt, compact=True):
    model = ScriptedLlama.build(tok, scripts)
    return TransformersThoughtSampler(model, tok, fmt, GenerationConfig(do_sample=False), [tok.eos_token_id],
                                      compact=compact)


@pytest.mark.parametrize("compact", [True, False])
def test_sampler_decodes_each_rollout_in_one_pass_with_caps(char_tokenizer, compact):
    tok = char_tokenizer
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]
    scripts = [enc("a</thought>b</thought>\\boxed{1}</thought>zzz"), enc("abcdefghij" * 5)]
    fmt = ThoughtFormat(max_thought_tokens=20, max_completion_tokens=60)
    sampler = _sampler(tok, scripts, fmt, compact)
    calls, widths = [], []
    original = sampler.model.generate
    sampler.model.generate = lambda *a, **k: calls.append(1) or original(*a, **k)
    hook = sampler.model.model.embed_tokens.register_forward_hook(lambda m, a, out: widths.append(a[0].shape[1]))
    prompts = [enc("Q1:"), enc("Question 2:")]
    rollouts = sampler.sample(prompts)
    hook.remove()
    # one decoding pass for the whole batch, not one per thought: a single prefill, then one token per step
    assert len(calls) == (0 if compact else 1) and sum(w > 1 for w in widths) == 1
    first, second = rollouts
    assert tok.decode(first.token_ids) == "a</thought>b</thought>\\boxed{1}</thought>"
    assert first.stop_reason == STOP_ANSWER and first.num_thoughts == 3
    assert [e - s for s, e in second.thought_spans] == [20, 20, 11]  # 10 letters + EOS
    assert second.stop_reason == STOP_EOS  # script ran out, the model emitted EOS


def test_sampler_respects_budgets_and_start_thoughts(char_tokenizer):
    tok = char_tokenizer
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]
    scripts = [enc("a</thought>b</thought>c</thought>d</thought>")]
    sampler = _sampler(tok, scripts, ThoughtFormat(max_thoughts=3, max_completion_tokens=100))
    capped, budgeted = sampler.sample([enc("P"), enc("P")], start_thoughts=[2, 0], token_budgets=[100, 3])
    assert capped.num_thoughts == 1 and capped.stop_reason == STOP_MAX_THOUGHTS
    assert len(budgeted.token_ids) == 3 and budgeted.stop_reason == STOP_MAX_TOKENS


def test_sampler_complete_stops_at_eos(char_tokenizer):
    tok = char_tokenizer
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]
    sampler = _sampler(tok, [enc("\\boxed{2}")], ThoughtFormat())
    (reply,) = sampler.complete([enc("which step?")], max_new_tokens=20, temperature=0.0)
    assert tok.decode(reply, skip_special_tokens=True) == "\\boxed{2}"
    assert sampler.complete([], 5, 0.0) == []


@pytest.mark.parametrize("compact", [True, False])
def test_shared_prefill_samples_what_each_row_own_prefill_samples(char_tokenizer, compact):
    """Rows that repeat a context share one prefill: greedy decoding gives the same tokens as the
    unshared path, and only the distinct contexts are encoded."""

    tok = char_tokenizer
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]
    model = make_tiny_llama(tok, seed=3).eval()
    fmt = ThoughtFormat(max_thought_tokens=6, max_completion_tokens=14)
    config = GenerationConfig(do_sample=False)
    contexts = [enc("Q: 12+7?")] * 3 + [enc("Q: 3*4, then 5?")] * 2 + [enc("Q: 1?")]
    runs = {share: _tokens_and_forward_shapes(
        model, TransformersThoughtSampler(model, tok, fmt, config, [tok.eos_token_id], share_prefill=share,
                                          compact=compact), contexts) for share in (False, True)}
    assert runs[True][0] == runs[False][0]
    assert all(len(ids) > 0 for ids in runs[True][0])
    width = max(len(c) for c in contexts)
    assert runs[False][1][0] == torch.Size([6, width])  # unshared: every row's context
    if compact:  # the 3 distinct contexts, whole; every row decodes from the copied cache
        assert runs[True][1][0] == torch.Size([3, width]) and runs[True][1][1] == torch.Size([6, 1])
    else:  # generate feeds each row's last context token itself
        assert runs[True][1][0] == torch.Size([3, width - 1]) and runs[True][1][1] == torch.Size([6, 1])


def test_shared_prefill_is_off_for_collective_decoding(char_tokenizer, tiny_model):
    sampler = TransformersThoughtSampler(tiny_model, char_tokenizer, ThoughtFormat(), collective=True)
    assert not sampler.share_prefill  # an extra forward on some ZeRO-3 processes only would hang the others


def _compare_backends(model, tok, contexts, config, fmt, seed=0, **kwargs):

    out = {}
    for compact in (True, False):
        sampler = TransformersThoughtSampler(model, tok, fmt, config, [tok.eos_token_id], compact=compact, **kwargs)
        sampler.shapes = []  # the input shape of every forward pass, for the tests
        hook = model.model.embed_tokens.register_forward_hook(lambda m, a, o, s=sampler: s.shapes.append(a[0].shape))
        torch.manual_seed(seed)
        out[compact] = (sampler.sample(contexts), sampler)
        hook.remove()
    return out


def test_compact_decoding_draws_what_generate_draws_while_every_row_runs(char_tokenizer):
    """Same processors (temperature, top-k, top-p), same draws: with the same seed and no row stopping early,
    the compact loop samples exactly the tokens generate samples."""
    tok = char_tokenizer
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]
    model = make_tiny_llama(tok, seed=5).eval()
    config = GenerationConfig(do_sample=True, temperature=0.7, top_k=30, top_p=0.9)
    fmt = ThoughtFormat(max_thoughts=50, max_thought_tokens=50, max_completion_tokens=12)
    contexts = [enc("Q: 12+7?"), enc("Q: 3*4, then 5?"), enc("Q: 1?"), enc("Q: 1?")]
    runs = _compare_backends(model, tok, contexts, config, fmt, seed=12)
    compact, plain = runs[True][0], runs[False][0]
    assert all(r.stop_reason == STOP_MAX_TOKENS for r in compact)  # no row stopped early (so no compaction)
    assert [r.token_ids for r in compact] == [r.token_ids for r in plain]
    assert len({tuple(r.token_ids) for r in compact}) > 1  # sampled, not one greedy path


def test_compact_decoding_drops_stopped_rows_and_keeps_each_rows_tokens(char_tokenizer):
    """Rows stop at different steps (answer, thought cap, budget, EOS): greedy rollouts are identical to
    generate's, in the callers' order, and the model computes only the rows still running."""
    tok = char_tokenizer
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]
    scripts = [enc("a</thought>\\boxed{1}</thought>"), enc("abcdefghij" * 5), enc("x</thought>y</thought>z"),
               enc("a</thought>b</thought>c</thought>d</thought>e</thought>")]
    fmt = ThoughtFormat(max_thoughts=4, max_thought_tokens=12, max_completion_tokens=40)
    model = ScriptedLlama.build(tok, scripts)
    contexts = [enc("Q1:"), enc("Question 2:"), enc("Q3"), enc("Q4: go")]
    runs = _compare_backends(model, tok, contexts, GenerationConfig(do_sample=False), fmt, share_prefill=False)
    (compact, fast), (plain, slow) = runs[True], runs[False]
    assert [(r.token_ids, r.thought_spans, r.stop_reason) for r in compact] == [
        (r.token_ids, r.thought_spans, r.stop_reason) for r in plain]
    assert len({r.stop_reason for r in compact}) >= 3
    lengths = [len(r.token_ids) for r in compact]
    def decoded_rows(sampler):  # rows fed to the model over the decoding steps (one new token each)
        return sum(shape[0] for shape in sampler.shapes if shape[1] == 1)

    assert decoded_rows(fast) == sum(n - 1 for n in lengths)  # a row's last token is never fed back
    assert decoded_rows(slow) == len(contexts) * (max(lengths) - 1)  # generate runs every row to the longest


def test_compact_decoding_falls_back_to_generate_for_row_state_processors(char_tokenizer):
    tok = char_tokenizer
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]
    model = make_tiny_llama(tok, seed=5).eval()
    config = GenerationConfig(do_sample=False, repetition_penalty=1.3)
    fmt = ThoughtFormat(max_completion_tokens=10)
    with pytest.warns(UserWarning, match="RepetitionPenalty"):
        runs = _compare_backends(model, tok, [enc("Q: 1?"), enc("Q: 22+3?")], config, fmt)
    (compact, fast), (plain, _) = runs[True], runs[False]
    assert fast.generate_calls == 1 and [r.token_ids for r in compact] == [r.token_ids for r in plain]


def _lora_model(tok, **lora):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(make_tiny_llama(tok, seed=4), LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.3, target_modules=["q_proj", "v_proj", "up_proj"], **lora))
    with torch.no_grad():  # a trained-looking adapter: B is zero at initialisation
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    return model


def test_sampling_weights_merge_the_adapter_exactly_and_restore_the_base_weights(char_tokenizer):

    from trl_resets.sampling import sampling_weights

    tok = char_tokenizer
    model = _lora_model(tok).train()
    ids = torch.tensor([tok("Q: 12+7?", add_special_tokens=False)["input_ids"]])
    bases = {n: p for n, p in model.named_parameters() if "base_layer.weight" in n}
    before = {n: (p.data_ptr(), p.detach().clone()) for n, p in bases.items()}
    model.eval()
    with torch.no_grad():
        unmerged = model(input_ids=ids).logits
    model.train()
    with sampling_weights(model) as merged, torch.no_grad():
        assert merged and not model.training  # eval mode: no LoRA dropout while sampling
        assert any(not torch.equal(p, before[n][1]) for n, p in bases.items())  # weights swapped for W + BA
        logits = model(input_ids=ids).logits
    assert torch.allclose(logits, unmerged, atol=1e-5)  # what the unmerged adapter computes
    assert not torch.allclose(logits, make_tiny_llama(tok, seed=4).eval()(input_ids=ids).logits, atol=1e-3)
    assert model.training  # mode restored
    for n, p in bases.items():  # the very same tensors, bit for bit: no unmerge arithmetic
        assert p.data_ptr() == before[n][0] and torch.equal(p, before[n][1])
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, unmerged)  # the adapter is live again


def test_sampling_weights_sample_unmerged_when_an_exact_merge_is_not_possible(char_tokenizer):
    from trl_resets.sampling import sampling_weights

    model = _lora_model(char_tokenizer, use_dora=True).train()
    with pytest.warns(UserWarning, match="DoRA"), sampling_weights(model) as merged:
        assert not merged and not model.training
    assert model.training
    saved = _lora_model(char_tokenizer, modules_to_save=["lm_head"]).train()
    with pytest.warns(UserWarning, match="modules_to_save"), sampling_weights(saved) as merged:
        assert not merged  # disabling the adapter would put the original lm_head back while sampling
    plain = make_tiny_llama(char_tokenizer).train()
    with sampling_weights(plain) as merged:  # no adapter: eval mode only, no warning
        assert not merged and not plain.training
    with sampling_weights(_lora_model(char_tokenizer), merge=False) as merged:
        assert not merged
    assert plain.training


def test_plain_generate_baseline_takes_setting_overrides(char_tokenizer, tiny_model):
    """The benchmarks' plain-generate baseline: settings override the sampler's config for one call."""
    tok = char_tokenizer
    sampler = TransformersThoughtSampler(tiny_model.eval(), tok, ThoughtFormat(), GenerationConfig(do_sample=True))
    prompts = [tok("Q: 1?", add_special_tokens=False)["input_ids"], tok("Q: 22+3?", add_special_tokens=False)["input_ids"]]
    out = sampler._generate(prompts, config={"max_new_tokens": 5, "min_new_tokens": 5, "do_sample": False})
    assert out.shape == (2, 5) and sampler.generation_config.do_sample  # the sampler's own config is untouched


# ---------------------------------------- exact checks (Thought text helpers and the format's validation, value by value.)

def chars(text):
    """One token per character (its code point), decoded back by `decode`."""
    return [ord(c) for c in text]


def decode(ids):
    return "".join(map(chr, ids))


def test_strip_delimiter_removes_only_a_closing_delimiter_in_delimiter_mode():
    fmt = ThoughtFormat(delimiter="</t>")
    assert strip_delimiter("  2+3=5 </t> \n", fmt) == "2+3=5"
    assert strip_delimiter("</t> in the middle, kept", fmt) == "</t> in the middle, kept"
    paragraph = ThoughtFormat(delimiter="</t>", split="paragraph")
    assert strip_delimiter(" 2+3=5 </t>\n\n", paragraph) == "2+3=5 </t>"  # paragraph mode has no delimiter


def test_wrap_question_fills_question_and_delimiter():
    assert wrap_question("1+1?", "Q: {question} end each step with {delimiter}", "</t>") == (
        "Q: 1+1? end each step with </t>")
    with pytest.raises(ValueError, match=r"unknown placeholder 'answer'; it may use only \{question\} and "
                                         r"\{delimiter\} \(write literal braces as \{\{ and \}\}\)\."):
        wrap_question("q", "{answer}")


def test_format_validation_messages_and_bounds():
    ThoughtFormat(max_thoughts=1, max_thought_tokens=1, max_completion_tokens=1)  # 1 is allowed
    assert ThoughtFormat(delimiter="", split="paragraph").split == "paragraph"  # no delimiter needed there
    with pytest.raises(ValueError, match="thought split must be 'delimiter' or 'paragraph', got 'line'"):
        ThoughtFormat(split="line")
    with pytest.raises(ValueError, match=r"^thought_delimiter is empty; give a delimiter or use "
                                         r"thought_split='paragraph'\.$"):
        ThoughtFormat(delimiter="")
    for name in ("max_thoughts", "max_thought_tokens", "max_completion_tokens"):
        with pytest.raises(ValueError, match=f"{name} must be at least 1, got 0"):
            ThoughtFormat(**{name: 0})


def test_final_answer_needs_a_closed_box():
    assert contains_final_answer(r"so \boxed{7}") and contains_final_answer(r"\boxed{\frac{1}{2}}")
    assert not contains_final_answer(r"so \boxed{7") and not contains_final_answer(r"\boxed{\frac{1}{2}")


def test_a_rollout_the_decoder_stopped_early_is_closed_and_marked_unfinished():
    rollout = segment_thoughts(chars("ab</t>cd"), decode, ThoughtFormat(delimiter="</t>"))
    assert rollout.thought_spans == [(0, 6), (6, 8)] and rollout.stop_reason == STOP_NONE == "unfinished"


def test_a_finished_tracker_reports_done_and_takes_no_more_tokens():
    tracker = ThoughtTracker(ThoughtFormat(delimiter="</t>"), decode, frozenset())
    assert [tracker.push(t) for t in chars(r"\boxed{1}</t>")][-2:] == [False, True]
    assert tracker.stop_reason == STOP_ANSWER
    assert tracker.push(ord("x")) is True
    tracker.finish()
    assert decode(tracker.tokens) == r"\boxed{1}</t>" and tracker.spans == [(0, 13)]
    assert tracker.stop_reason == STOP_ANSWER


def test_a_delimiter_split_into_one_token_per_byte_still_closes_the_thought():
    """Byte-level tokenizers can spell a non-ASCII delimiter one UTF-8 byte per token: "。。" is 2 characters and 6
    tokens, and the tracker still sees it."""

    def utf8(ids):
        return bytes(ids).decode("utf-8", errors="replace")

    tracker = ThoughtTracker(ThoughtFormat(delimiter="。。", max_thought_tokens=64), utf8, frozenset())
    text = "1+1=2。。2+2=4"
    for byte in text.encode("utf-8"):
        tracker.push(byte)
    tracker.finish()
    assert [utf8(tracker.tokens[a:b]) for a, b in tracker.spans] == ["1+1=2。。", "2+2=4"]


def test_a_shared_prompt_prefix_is_encoded_once_and_changes_no_greedy_token(char_tokenizer):
    tok = char_tokenizer
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]
    model = make_tiny_llama(tok, seed=3).eval()
    with torch.no_grad():  # larger weights: each context's greedy continuation is its own
        for name, weight in model.named_parameters():
            if "norm" not in name:
                weight.mul_(10)
    fmt = ThoughtFormat(max_thought_tokens=6, max_completion_tokens=14)
    template = "Solve step by step. Q: "
    contexts = [enc(template + q) for q in ("12+7?", "3*4, then 5?", "1?", "12+7?", "100-99+1?")]
    runs = {share: _tokens_and_forward_shapes(
        model, TransformersThoughtSampler(model, tok, fmt, GenerationConfig(do_sample=False), [tok.eos_token_id],
                                          share_prompt_prefix=share), contexts) for share in (False, True)}
    assert runs[True][0] == runs[False][0]
    assert len({tuple(ids) for ids in runs[True][0]}) >= 3  # the contexts' continuations differ
    prefix = len(enc(template))
    width = max(len(c) for c in contexts)
    assert runs[False][1][0] == torch.Size([4, width])  # the 4 distinct contexts, whole
    # shared: the template once, then the 4 questions (left-padded), then every row decodes from the copied cache
    assert runs[True][1][:3] == [torch.Size([1, prefix]), torch.Size([4, width - prefix]), torch.Size([5, 1])]
    with pytest.raises(ValueError, match="share_prompt_prefix=True needs share_prefill=True"):
        TransformersThoughtSampler(model, tok, fmt, share_prefill=False, share_prompt_prefix=True)
