"""Localization prompt and reply parsing against garbage."""

import random

import pytest

from trl_resets.localizers import (
    CallableLocalizer,
    Localization,
    LocalizationRequest,
    OracleLocalizer,
    RandomLocalizer,
    SelfLocalizer,
    as_localizer,
    localization_prompt,
    parse_step_index,
    resolve_reset_index,
)
from trl_resets.scheduler import can_overlap


@pytest.mark.parametrize(
    "reply, expected",
    [
        ("\\boxed{2}", 2),
        ("Step 3 looks wrong.\n\\boxed{3}", 3),
        ("\\boxed{ Step 4 }", 4),
        ("no box here, step 2", None),
        ("\\boxed{two}", None),
        ("\\boxed{-1}", None),
        ("\\boxed{0}", None),
        ("\\boxed{6}", None),  # only 5 steps
        ("\\boxed{1} then \\boxed{5}", 5),  # the last box counts
        ("\\boxed{}", None),
        ("", None),
        (None, None),
        ("\\boxed{2.5}", None),
    ],
)
def test_parse_step_index(reply, expected):
    assert parse_step_index(reply, num_steps=5) == expected


def test_unparsed_answers_fall_back_to_random_and_are_flagged():
    rng = random.Random(0)
    seen = set()
    for _ in range(200):
        index, failed = resolve_reset_index(Localization(None), 4, rng)
        assert failed and 1 <= index <= 4
        seen.add(index)
    assert seen == {1, 2, 3, 4}
    assert resolve_reset_index(Localization(3), 4, rng) == (3, False)
    assert resolve_reset_index(Localization(5), 4, rng)[1] is True
    assert resolve_reset_index(Localization(True), 4, rng)[1] is True


class EchoPolicy:
    def __init__(self, replies):
        self.replies, self.prompts = replies, []

    def complete(self, prompts, max_new_tokens, temperature):
        self.prompts.append(prompts)
        return [(r, 7) for r in self.replies]


def test_self_localizer_batches_and_parses():
    policy = EchoPolicy(["\\boxed{2}", "I think step three", "\\boxed{9}"])
    reqs = [LocalizationRequest("What is 2+3?", ["2+3=6", "so \\boxed{6}"])] * 3
    answers = SelfLocalizer().locate(reqs, policy, random.Random(0))
    assert len(policy.prompts) == 1 and len(policy.prompts[0]) == 3  # one batched call
    assert [a.index for a in answers] == [2, None, None] and all(a.tokens == 7 for a in answers)
    prompt = policy.prompts[0][0]
    assert "What is 2+3?" in prompt and "Step 1: 2+3=6\nStep 2: so \\boxed{6}" in prompt and "1 and 2" in prompt


def test_templates_and_names_are_checked():
    with pytest.raises(ValueError, match="placeholder"):
        SelfLocalizer(template="{problem}")
    with pytest.raises(ValueError, match="unknown localizer"):
        as_localizer("prm")
    assert as_localizer("oracle").name == "oracle"
    assert as_localizer(None, default="random").name == "random"
    assert as_localizer(lambda q, t: 1).locate([LocalizationRequest("q", ["a"])])[0].index == 1
    text = localization_prompt(LocalizationRequest("Q", ["a", "b", "c"]))
    assert "Step 3: c" in text and "between 1 and 3" in text


def _problem_row():
    from trl_resets.tasks import make_arithmetic_dataset

    return make_arithmetic_dataset(1, num_steps=3, seed=5)[0]


def test_oracle_localizer_points_at_the_checkers_first_wrong_step():
    from trl_resets.localizers import OracleLocalizer

    row = _problem_row()
    good = list(row["solution_steps"])
    assert len(good) == 3  # three operations, the last one boxes the answer
    wrong_second = [good[0], "90 + 3 = 94", "94 + 6 = 100, so the answer is \\boxed{100}"]
    assert good[0].startswith("18 * 5 = 90")
    requests = [
        LocalizationRequest("q", wrong_second, row),
        LocalizationRequest("q", ["I am not sure.", *good[1:]], row),
        LocalizationRequest("q", good[:2], row),  # right so far, stopped early: reset at its last thought
        LocalizationRequest("q", good, row),  # the checker finds no error: no answer, random reset
    ]
    answers = OracleLocalizer().locate(requests, None, random.Random(0))
    assert [a.index for a in answers] == [2, 1, 2, None]
    assert resolve_reset_index(answers[3], 3, random.Random(0))[1] is True


def test_oracle_localizer_needs_rows_and_accepts_a_custom_checker():
    from trl_resets.localizers import OracleLocalizer

    with pytest.raises(ValueError, match="dataset row"):
        OracleLocalizer().locate([LocalizationRequest("q", ["a"])])
    seen = []
    custom = OracleLocalizer(lambda row, thoughts: seen.append((row, thoughts)) or "3")
    assert custom.locate([LocalizationRequest("q", ["a", "b", "c"], {"k": 1})])[0].index == 3
    assert seen == [({"k": 1}, ["a", "b", "c"])]
    with pytest.raises(TypeError):
        OracleLocalizer(checker=5)


# ---------------------------------------- exact checks (Localizers' exact answers and messages: boundaries of the step index, the oracle)

# the end of every message refusing a localizer object: how to write one that follows the interface
FIX = (r"Define `name = '\.\.\.'` and `def locate\(self, requests, policy=None, rng=None\)` returning one "
       r"Localization per request \(see trl_resets\.localizers\.Localizer\), or pass a function "
       r"fn\(question, thoughts\)\.$")


def test_step_index_bounds_are_one_and_the_number_of_steps():
    assert parse_step_index(r"\boxed{1}", 3) == 1
    assert parse_step_index(r"\boxed{3}", 3) == 3
    assert parse_step_index(r"\boxed{0}", 3) is None and parse_step_index(r"\boxed{4}", 3) is None


def test_an_answer_of_one_or_of_the_last_thought_is_kept_without_a_random_draw():
    rng = random.Random(0)
    state = rng.getstate()
    assert resolve_reset_index(Localization(1), 3, rng) == (1, False)  # h*=1: reset to the prompt itself
    assert resolve_reset_index(Localization(3), 3, rng) == (3, False)
    assert rng.getstate() == state


def test_callable_localizer_sees_question_and_thoughts_and_is_named_after_the_function():
    seen = []

    def grader(question, thoughts):
        seen.append((question, thoughts))
        return "2"

    loc = CallableLocalizer(grader)
    assert loc.name == "grader" and CallableLocalizer(grader, name="prm").name == "prm"
    answers = loc.locate([LocalizationRequest("q?", ("a", "b", "c"))])
    assert seen == [("q?", ["a", "b", "c"])] and answers == [Localization(2)]
    assert [a.index for a in loc.locate([LocalizationRequest("q", ["a"])] * 1)] == [2]
    assert CallableLocalizer(lambda q, t: 2.0).locate([LocalizationRequest("q", ["a"])]) == [Localization(2)]

    class Nameless:
        def __call__(self, question, thoughts):
            return 1

    assert CallableLocalizer(Nameless()).name == "callable"
    with pytest.raises(TypeError, match="localizer must be callable or have a .locate method, got int"):
        CallableLocalizer(3)


def test_oracle_clamps_an_index_past_the_last_thought_and_boxes_its_answer():
    past_the_end = OracleLocalizer(lambda row, thoughts: len(thoughts) + 1)
    assert past_the_end.locate([LocalizationRequest("q", ["only"], {"answer": 1})]) == [
        Localization(1, 0, r"\boxed{1}")]
    assert past_the_end.locate([LocalizationRequest("q", ["a", "b"], {"answer": 1})]) == [
        Localization(2, 0, r"\boxed{2}")]
    none = OracleLocalizer(lambda row, thoughts: None)
    assert none.locate([LocalizationRequest("q", ["a"], {"answer": 1})]) == [Localization(None, 0, None)]
    with pytest.raises(ValueError, match=r"^OracleLocalizer needs the prompt's dataset row \(answer, reference steps\) "
                                         r"with each request; the trainers pass it, a direct caller must set "
                                         r"LocalizationRequest\.row\.$"):
        none.locate([LocalizationRequest("q", ["a"])])
    with pytest.raises(TypeError, match="checker must be callable, got str"):
        OracleLocalizer("check")


def test_random_localizer_draws_within_the_seed_and_needs_no_rng():
    requests = [LocalizationRequest("q", ["a"])] * 20
    assert {a.index for a in RandomLocalizer().locate(requests)} == {1}
    assert {a.index for a in RandomLocalizer().locate(requests, rng=random.Random(0))} == {1}


def test_as_localizer_resolves_names_objects_and_the_default():
    assert isinstance(as_localizer(None), SelfLocalizer)
    assert isinstance(as_localizer("self", max_new_tokens=5), SelfLocalizer)
    assert as_localizer("self", max_new_tokens=5).max_new_tokens == 5
    assert SelfLocalizer().max_new_tokens == 32 and SelfLocalizer().temperature == 0.0
    assert isinstance(as_localizer(None, default="random"), RandomLocalizer)
    oracle = OracleLocalizer()
    assert as_localizer(oracle) is oracle
    with pytest.raises(ValueError, match=r"unknown localizer 'prm'; use one of \['self', 'random', 'oracle'\] .* Localizer object"):
        as_localizer("prm")


def test_a_template_with_an_unknown_placeholder_names_the_allowed_ones():
    with pytest.raises(ValueError, match=r"unknown placeholder 'answer'; it may use \{question\}, \{steps\} and "
                                         r"\{num_steps\} \(write literal braces as \{\{ and \}\}\)\."):
        localization_prompt(LocalizationRequest("q", ["s"]), "{answer}")
    with pytest.raises(ValueError, match="unknown placeholder"):
        SelfLocalizer(template="{answer}")


def test_a_template_may_format_the_question_with_a_spec():
    loc = SelfLocalizer(template="Q={question:.3} N={num_steps}\n{steps}")  # the question cut to 3 characters
    assert loc.prompts([LocalizationRequest("abcdef", ["x"])]) == ["Q=abc N=1\nStep 1: x"]


class RecordingPolicy:
    def __init__(self, replies):
        self.replies, self.calls = replies, []

    def complete(self, prompts, max_new_tokens, temperature):
        self.calls.append((prompts, max_new_tokens, temperature))
        return self.replies


def test_self_localizer_asks_the_policy_with_its_template_and_settings_and_keeps_the_reply():
    loc = SelfLocalizer(template="Q={question} N={num_steps}\n{steps}", max_new_tokens=7, temperature=0.5)
    policy = RecordingPolicy([(r"so \boxed{2}", 4), ("no idea", 2)])
    requests = [LocalizationRequest("1+1?", ["a", "b"]), LocalizationRequest("2+2?", ["c"])]
    answers = loc.locate(requests, policy)
    assert policy.calls == [(["Q=1+1? N=2\nStep 1: a\nStep 2: b", "Q=2+2? N=1\nStep 1: c"], 7, 0.5)]
    assert answers == [Localization(2, 4, r"so \boxed{2}"), Localization(None, 2, "no idea")]
    with pytest.raises(ValueError, match=r"^SelfLocalizer needs the policy to query; the trainer passes it in\.$"):
        loc.locate(requests, None)


def test_a_localizer_off_the_interface_is_refused_naming_it_and_the_fix():
    class NoName:
        def locate(self, requests, policy=None, rng=None):
            return [None for _ in requests]

    class OneArgument:
        name = "one"

        def locate(self, requests):
            return [None for _ in requests]

    class NotAMethod:
        name, locate = "flat", 3

    class NumberName:
        name = 3

        def locate(self, requests, policy=None, rng=None):
            return [None for _ in requests]

    class NoRng:
        name = "no rng"

        def locate(self, requests, policy=None):
            return [None for _ in requests]

    with pytest.raises(TypeError, match=r"^localizer NoName: its name is None, not a str\. " + FIX):
        as_localizer(NoName())
    with pytest.raises(TypeError, match=r"^localizer NumberName: its name is 3, not a str\. " + FIX):
        as_localizer(NumberName())
    with pytest.raises(TypeError, match=r"^localizer NoRng: .*NoRng\.locate\(requests, policy=None\) cannot be "
                                        r"called as locate\(requests, policy, rng\)\. " + FIX):
        as_localizer(NoRng())
    with pytest.raises(TypeError, match=r"localizer OneArgument: .*OneArgument\.locate\(requests\) cannot be called "
                                        r"as locate\(requests, policy, rng\)"):
        as_localizer(OneArgument())
    with pytest.raises(TypeError, match="localizer NotAMethod: its locate is a int, not a method"):
        as_localizer(NotAMethod())
    with pytest.raises(TypeError, match=r"localizer=.*<lambda>\(thoughts\): a function localizer is called as "
                                        r"fn\(question, thoughts\)"):
        as_localizer(lambda thoughts: 1)
    named = NoName()
    named.name = "named"
    assert as_localizer(named) is named
    assert as_localizer(lambda question, thoughts, extra=0: 1).name == "<lambda>"


def test_a_callable_object_taking_the_wrong_arguments_is_refused_by_its_class_name():
    class ThoughtsOnly:
        def __call__(self, thoughts):
            return 1

    with pytest.raises(TypeError, match=r"^localizer=ThoughtsOnly\(thoughts\): a function localizer is called as "
                                        r"fn\(question, thoughts\) and returns the 1-based first wrong thought; give "
                                        r"it those two parameters, or pass an object with locate\(requests, policy, "
                                        r"rng\) \(see trl_resets\.localizers\.Localizer\)\.$"):
        as_localizer(ThoughtsOnly())


def test_a_builtin_whose_signature_cannot_be_read_is_taken_as_a_function_localizer():
    loc = as_localizer(max)
    assert isinstance(loc, CallableLocalizer) and loc.name == "max"


def test_a_function_localizer_answers_without_the_policy_so_the_overlapped_scheduler_can_drive_it():
    loc = as_localizer(lambda question, thoughts: 1)
    assert loc.uses_policy is False and can_overlap(loc, policy=None)
    assert not can_overlap(SelfLocalizer(), policy=None)  # it queries the policy, which here cannot stream
