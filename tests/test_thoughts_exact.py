"""Thought text helpers and the format's validation, value by value."""

import pytest

from trl_resets.thoughts import (
    STOP_ANSWER,
    STOP_NONE,
    ThoughtFormat,
    ThoughtTracker,
    contains_final_answer,
    segment_thoughts,
    strip_delimiter,
    wrap_question,
)


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
