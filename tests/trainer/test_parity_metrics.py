"""Logged metrics describe the rows that were trained: groups, whole trajectories, no filler rows."""

import math

import pytest

from tests.conftest import make_tiny_llama
from tests.trainer.test_trainer import _args, _dataset
from trl_resets import SRPOConfig, SRPOTrainer
from trl_resets.metrics import PREFIX, completion_stats, step_sums, zero_std_group_fraction
from trl_resets.resets import PromptGroups, TrainingRow
from trl_resets.thoughts import STOP_ANSWER, STOP_EOS


def _row(n, group, reward, weight=1.0, stop=STOP_ANSWER, prefix=0):
    return TrainingRow(list(range(n)), prefix, group, [reward], reward, weight, 1, stop)


def test_rollouts_that_end_at_their_answer_are_not_clipped():
    stats = completion_stats([5.0, 9.0], [True, True])
    assert stats["completions/clipped_ratio"] == 0.0 and stats["completions/mean_terminated_length"] == 7.0
    stats = completion_stats([5.0, 9.0, 4.0], [True, False, False])
    assert stats["completions/clipped_ratio"] == pytest.approx(2 / 3)
    assert stats["completions/max_terminated_length"] == 5.0 and stats["completions/min_length"] == 4.0


def test_zero_std_fraction_counts_groups_and_policy_pass_rate_counts_the_first_draws():
    # prompt 0: base group degenerate (all 1), one shared-prefix group with signal; prompt 1: base group with
    # signal, its seed slot empty (fillers, no group)
    p0 = PromptGroups([_row(3, 0, 1.0), _row(3, 0, 1.0), _row(4, 1, 0.0), _row(4, 1, 1.0)],
                      first_draws=3, first_draws_passed=2)
    p1 = PromptGroups([_row(3, 0, 0.0), _row(3, 0, 1.0), _row(3, 1, math.nan, 0.0), _row(3, 1, math.nan, 0.0)],
                      fallbacks=1, first_draws=3, first_draws_passed=1)
    sums = step_sums([p0, p1], [[0, 0, -1, 1], [-1, 1, 0, 0]], success_threshold=1.0)
    assert zero_std_group_fraction(sums) == pytest.approx(1 / 3)  # 3 groups, 1 of them all equal
    from trl_resets.metrics import finalize

    values = finalize(sums)
    assert values[PREFIX + "policy_pass_rate"] == pytest.approx(3 / 6)
    assert values[PREFIX + "base_pass_rate"] == pytest.approx(3 / 4)


def test_logged_metrics_describe_the_trained_rows(tmp_path, char_tokenizer, monkeypatch):
    from trl_resets import trainer as trainer_module
    from trl_resets.sampling import transformers_backend

    generated = []
    result = transformers_backend._RowState.result

    def counting_result(self):  # every rollout and reply the sampler decodes ends here
        out = result(self)
        generated.append(len(out.token_ids) if hasattr(out, "token_ids") else len(out))
        return out

    monkeypatch.setattr(transformers_backend._RowState, "result", counting_result)
    results = []
    run = trainer_module.run_overlapped
    monkeypatch.setattr(trainer_module, "run_overlapped", lambda *a, **kw: results.append(run(*a, **kw)) or results[-1])
    args = _args(tmp_path, SRPOConfig, max_steps=1, seed_budget=1, success_threshold=0.5)

    def half_right(completions, **kwargs):
        return [float(len(c) % 2) for c in completions]

    trainer = SRPOTrainer(model=make_tiny_llama(char_tokenizer), reward_funcs=half_right, args=args,
                          train_dataset=_dataset(), processing_class=char_tokenizer)
    handed_to_trl = []
    rollout = trainer._reset_rollout
    trainer._reset_rollout = lambda prompts: handed_to_trl.append(rollout(prompts)) or handed_to_trl[-1]
    trainer.train()
    log = next(e for e in trainer.state.log_history if "loss" in e)
    rows = [row for groups in results[0] for row in groups.rows if row.weight > 0]
    lengths = [len(r.completion_ids) for r in rows]
    assert log["completions/mean_length"] == pytest.approx(sum(lengths) / len(lengths))
    assert log["completions/min_length"] == min(lengths) > 0
    assert log["completions/max_length"] == max(lengths)
    clipped = [r.stop_reason not in (STOP_EOS, STOP_ANSWER) for r in rows]
    assert log["completions/clipped_ratio"] == pytest.approx(sum(clipped) / len(clipped))
    groups = {}
    for p, result in enumerate(results[0]):
        for row in result.rows:
            if row.weight > 0:
                groups.setdefault((p, row.group), []).append(row.reward)
    zero = [len(set(g)) == 1 for g in groups.values()]
    assert log["frac_reward_zero_std"] == pytest.approx(sum(zero) / len(zero))
    first = [g.first_draws for g in results[0]]
    assert first == [args.num_base_generations + args.num_reset_prefixes] * len(results[0])
    assert log[PREFIX + "policy_pass_rate"] == pytest.approx(
        sum(g.first_draws_passed for g in results[0]) / sum(first))
    tokens = ("tokens_base", "tokens_suffix", "tokens_seed", "tokens_localization", "tokens_unused")
    assert sum(log[PREFIX + k] for k in tokens) == sum(generated)  # every token the policy generated, once
    assert log[PREFIX + "generated_tokens"] == sum(generated) > log[PREFIX + "tokens_base"] + log[PREFIX + "tokens_suffix"]
    # num_tokens, as in GRPO: each row's prompt, plus every token the policy generated (seeds, localization replies
    # and unused draws too; a reset row's prefix once, in its seed)
    (output,) = handed_to_trl
    assert log["num_tokens"] == sum(len(ids) for ids in output["prompt_ids"]) + sum(generated)


def test_rollouts_ending_at_their_answer_log_as_terminated_and_fillers_stay_out(tmp_path, char_tokenizer):
    """Every rollout writes its boxed answer and stops there: nothing is clipped; every prompt falls back (no
    seed), and its zero-weight filler rows do not drag the minimum length to 0."""
    from tests.conftest import ScriptedLlama
    from tests.trainer.test_trainer import contains_seven

    script = char_tokenizer("so \\boxed{7}</thought>", add_special_tokens=False)["input_ids"]
    args = _args(tmp_path, SRPOConfig, max_steps=1, seed_budget=0, max_thought_tokens=40, max_completion_length=40)
    trainer = SRPOTrainer(model=ScriptedLlama.build(char_tokenizer, [script]), reward_funcs=contains_seven,
                          args=args, train_dataset=_dataset(), processing_class=char_tokenizer)
    trainer.model.train()
    trainer._generate_and_score_completions([{"prompt": "2+5?", "answer": "7"}] * 8)
    metrics = trainer._metrics["train"]
    assert metrics[PREFIX + "fallback_rate"][-1] == 1.0
    assert metrics["completions/clipped_ratio"][-1] == 0.0
    assert metrics["completions/mean_terminated_length"][-1] == len(script)
    assert metrics["completions/min_length"][-1] == len(script)
    assert metrics["frac_reward_zero_std"][-1] == 1.0  # the one group (the base group) is all correct


def test_the_trl_log_statements_the_trainer_restates_are_where_it_expects_them():
    """`ResetTrainer._restate_trl_logs` rewrites what these statements of GRPOTrainer logged; a TRL upgrade that
    moves or renames one must fail here, not leave a metric silently describing the wrong rows."""
    import inspect

    from trl import GRPOTrainer

    from trl_resets.trainer import ResetTrainer

    for method, statements in ResetTrainer.TRL_LOG_STATEMENTS.items():
        source = inspect.getsource(getattr(GRPOTrainer, method))
        missing = [statement for statement in statements if statement not in source]
        assert not missing, f"GRPOTrainer.{method} no longer has {missing}"
