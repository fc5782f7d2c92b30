"""Pipelined resets (reset_lag 1 and 2) with vLLM, colocated and as a server, on the stand-in engine: a lagged run
builds Algorithm 2's groups one or two generations later, its carried rows are scored with their origin's columns,
and (server mode) their suffixes are sent in the same wave as the new prompts' draws."""

import dataclasses
import math
import warnings

import pytest

from tests.conftest import make_tiny_llama
from tests.helpers import fake_vllm
from tests.trainer.test_trainer import _args, _dataset
from trl_resets import SRPOConfig, SRPOTrainer
from trl_resets.sampling import VLLMThoughtSampler


def _run(tmp_path, tok, monkeypatch, mode, lag, steps, localizer="callable", prefix_caching=True, **overrides):
    """A run on the stand-in engine; returns each generation's (groups, advantages of its rows, the rollout's output
    to TRL), the (prompt, answer) of every row scored per generation, and the logged steps."""
    engines = fake_vllm.install(monkeypatch, prefix_caching=prefix_caching)
    args = _args(tmp_path / f"{mode}-{lag}", SRPOConfig, use_vllm=True, vllm_mode=mode, max_steps=steps,
                 reset_lag=lag, seed_budget=0, **overrides)
    scored = []

    def reward(completions, prompts, answer, **kwargs):  # passes by length parity: advantages, and seeds
        scored[-1].extend(zip(prompts, answer))
        return [float(len(c) % 2) for c in completions]

    data = _dataset().map(lambda row, i: {"answer": f"a{i}"}, with_indices=True)  # one answer per prompt
    trainer = SRPOTrainer(model=make_tiny_llama(tok), reward_funcs=reward, args=args, train_dataset=data,
                          processing_class=tok,
                          localizer=(lambda q, thoughts: len(thoughts)) if localizer == "callable" else None)
    generations, summarize, rollout = [], trainer._summarize, trainer._reset_rollout
    waves, send = [], VLLMThoughtSampler._wave  # per generation, the prompts of each engine wave

    def recorded_wave(sampler, batches):
        waves[-1].append([list(p) for batch in batches for p in batch.prompts])
        return send(sampler, batches)

    monkeypatch.setattr(VLLMThoughtSampler, "_wave", recorded_wave)

    def recorded_summary(groups, questions, policy):
        state = summarize(groups, questions, policy)
        generations.append((groups, state["advantages"].tolist()))
        return state

    def recorded_rollout(prompts):
        scored.append([])
        waves.append([])
        out = rollout(prompts)
        generations[-1] += (out,)
        return out

    trainer._summarize = recorded_summary
    trainer._reset_rollout = recorded_rollout
    trainer.train()
    assert engines and engines[0].fake_llm.requests > 0  # the stand-in engine sampled
    return generations, scored, waves, trainer, [e for e in trainer.state.log_history if "loss" in e]


def _reset_groups(groups, advantages):
    """A generation's trained reset groups, in order: (rows without their origin fields, advantages, origin,
    origin prompt ids)."""
    out, start = [], 0
    for prompt in groups:
        for number in sorted({r.group for r in prompt.rows if r.group and r.weight}):
            members = [i for i, r in enumerate(prompt.rows) if r.group == number]
            rows = [prompt.rows[i] for i in members]
            out.append(([dataclasses.replace(r, origin=None, context=None) for r in rows],
                        [advantages[start + i] for i in members], rows[0].origin, rows[0].context))
        start += len(prompt.rows)
    return out


@pytest.mark.parametrize("lag, localizer, per_thought", [(1, "callable", True), (2, "self", False)])
def test_colocated_lagged_run_builds_algorithm_2s_groups_lag_generations_later(tmp_path, char_tokenizer, monkeypatch,
                                                                               lag, localizer, per_thought):
    """At a fixed policy (learning rate 0) with a seed per row, Algorithm 2's run (reset_lag=0) and a lagged one
    sample the same first generation; the lagged run trains generation 0's reset groups in generation ``lag``: the
    same seeds' prefixes (h*), suffixes, rewards and advantages, under generation 0's prompts. Lag 2 localizes with
    the policy in generation 1's first wave. Sampled thought by thought (prefix caching on) and in one pass."""
    settings = {"learning_rate": 0.0, "per_row_sampling_seed": True, "prefix_caching": per_thought}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*prefix caching.*")  # one pass per rollout without it
        [(groups, advantages, output)], *_ = _run(tmp_path, char_tokenizer, monkeypatch, "colocate", 0, 1,
                                                  localizer, **settings)
        lagged, *_, logs = _run(tmp_path, char_tokenizer, monkeypatch, "colocate", lag, lag + 1, localizer,
                                **settings)
    expected = _reset_groups(groups, advantages)
    assert expected  # generation 0 found seeds
    assert lagged[0][2]["completion_ids"][:4] == output["completion_ids"][:4]  # the same draws
    assert [[r for r in g.rows if r.group == 0] for g in lagged[0][0]] == [[r for r in g.rows if r.group == 0]
                                                                          for g in groups]
    assert all(r.weight == 0 for g in lagged[0][0] for r in g.rows if r.group)  # no state yet: fillers
    carried = _reset_groups(*lagged[lag][:2])
    assert [c[0] for c in carried] == [e[0] for e in expected]  # prefixes, suffixes, rewards, spans, logprobs
    assert [a for c in carried for a in c[1]] == pytest.approx([a for e in expected for a in e[1]])  # advantages
    origins = [(p, number) for p, g in enumerate(groups) for number in range(len(g.resets))]
    assert [(c[2].generation, c[2].prompt) for c in carried] == [(0, p) for p, _ in origins]
    n = len(groups[0].rows)
    assert [c[3] for c in carried] == [output["prompt_ids"][p * n] for p, _ in origins]  # generation 0's prompts
    records = [dataclasses.replace(r, origin=None) for g in groups for r in g.resets]
    assert [dataclasses.replace(r, origin=None) for g in lagged[lag][0] for r in g.resets] == records
    assert logs[lag]["resets/reset_age"] == lag


@pytest.mark.parametrize("mode, per_thought, lag", [("colocate", True, 1), ("server", False, 1), ("server", True, 2)])
def test_carried_rows_are_scored_and_shown_with_their_origin_and_sampled_in_the_first_wave(
        tmp_path, char_tokenizer, monkeypatch, mode, per_thought, lag):
    """Generation ``lag``'s reset slot holds generation 0's state; its rows go to TRL under generation 0's prompt,
    are scored with its dataset columns, and their suffixes are requested in the generation's first engine wave,
    beside the new prompt's draws (server mode without prefix caching: one pass, so a suffix's budget, the rollout's
    less the prefix, differs from a draw's and its call is sent in flight with theirs). Lag 2 (the policy localizes):
    generation 0's seed's localization reply is in generation 1's first wave. The policy moves between generations,
    so the carried prefix's drift is measured."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*prefix caching.*")
        generations, scored, waves, trainer, logs = _run(tmp_path, char_tokenizer, monkeypatch, mode, lag, 3,
                                                         "callable" if lag == 1 else "self",
                                                         prefix_caching=per_thought)
    (groups0, _, out0), (groups, _, out) = generations[0], generations[lag]
    origin_prompt, new_prompt = out0["prompt_ids"][0], out["prompt_ids"][0]
    assert origin_prompt != new_prompt and sum(len(g.resets) for g in groups0) == 0
    carried = [(i, row) for i, row in enumerate(r for g in groups for r in g.rows) if row.origin is not None]
    assert len(carried) == 4 and all(row.weight == 1.0 for _, row in carried)  # generation 0's seed, 4 suffixes
    assert all(out["prompt_ids"][i] == origin_prompt for i, _ in carried)  # shown to TRL under its origin prompt
    assert all(out["prompt_ids"][i] == new_prompt for i in range(4))
    # scored with their origin's columns: generation 0's prompt and answer, for the 4 carried rows exactly
    truth = {q: f"a{i}" for i, q in enumerate(_dataset()["prompt"])}
    (origin_question,) = {q for q, _ in scored[0]}
    (new_question,) = {q for q, _ in scored[lag]} - {origin_question}
    assert all(answer == truth[q] for q, answer in scored[0] + scored[lag])
    assert sorted(scored[lag]) == sorted([(new_question, truth[new_question])] * 5
                                         + [(origin_question, truth[origin_question])] * 4)
    assert trainer.reset_history[lag]["resets"][0][3:] == (0, 0)  # origin: generation 0, prompt 0
    # the carried suffixes' contexts (origin prompt + prefix) and the new draws are in the generation's first wave
    prefix = carried[0][1].completion_ids[: carried[0][1].prefix_len]
    first_wave = waves[lag][0]
    assert first_wave.count(origin_prompt + prefix) == 4 and first_wave.count(new_prompt) == 5
    if lag == 2:  # generation 1's first wave: its 5 draws and generation 0's seed's localization reply
        assert len(waves[1][0]) == 6 and waves[1][0].count(generations[1][2]["prompt_ids"][0]) == 5
    assert logs[lag]["resets/reset_age"] == lag
    drift = logs[lag]["resets/carried_prefix_drift"]
    if lag == 1:  # the callable localizer resets to the seed's last thought: a prefix sampled by generation 0's policy
        assert prefix and math.isfinite(drift) and abs(drift) > 0
    else:  # NaN (logged as None) when the reset is to the first thought: no carried prefix token
        assert (drift is None or math.isnan(drift)) if not prefix else math.isfinite(drift)
