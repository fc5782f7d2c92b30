"""Pipelined resets in the trainer (reset_lag=1): on a tiny model, the second generation's reset slots hold the
first generation's reset states, shown and scored with their origin prompt; the queue's metrics are logged."""

import math
from contextlib import contextmanager

import pytest

from tests.conftest import make_tiny_llama
from tests.trainer.test_trainer import _args, _dataset
from trl_resets import SRPOConfig, SRPOTrainer
from trl_resets.metrics import PREFIX
from trl_resets.thoughts import Rollout


@pytest.mark.parametrize("accumulation", [1, 2])  # 2: the generation's 8 rows over two micro-batches of 4
def test_a_lagged_run_trains_the_previous_generations_resets_with_their_origin(tmp_path, char_tokenizer, accumulation):
    args = _args(tmp_path, SRPOConfig, max_steps=3, reset_lag=1, seed_budget=0,
                 per_device_train_batch_size=8 // accumulation, gradient_accumulation_steps=accumulation)
    answers = []  # the answer column of each reward call

    def reward(completions, answer, **kwargs):  # passes by length parity: advantages, and seeds in 5 draws
        answers.append(list(answer))
        return [float(len(c) % 2) for c in completions]

    data = _dataset().map(lambda row, i: {"answer": f"a{i}"}, with_indices=True)  # one answer per prompt
    answer_of = dict(zip(data["prompt"], data["answer"]))
    trainer = SRPOTrainer(model=make_tiny_llama(char_tokenizer), reward_funcs=reward, args=args, train_dataset=data,
                          processing_class=char_tokenizer, localizer=lambda q, thoughts: len(thoughts))
    outputs, prompts, calls = [], [], []
    rollout = trainer._reset_rollout

    def recorded(batch):
        prompts.append(batch[0])
        outputs.append(rollout(batch))
        calls.append(len(answers))
        return outputs[-1]

    trainer._reset_rollout = recorded
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 3 and len(set(prompts)) == 3
    first, second, last = logs
    assert first["resets/fallback_rate"] == 1.0 and _missing(first["resets/reset_age"])  # no state yet
    assert first["resets/queue_fill"] == 1.0  # the first prompt's seed, localized
    assert second["resets/reset_age"] == 1.0 and second["resets/fallback_rate"] == 0.0
    assert last["resets/unused_states"] == 1.0 and last["resets/queue_fill"] == 0.0  # the last seed: not localized
    assert all(entry["resets/dropped_states"] == 0.0 for entry in logs)
    # the carried prefix was sampled by generation 1's policy; one update later its log-ratio has moved
    assert _missing(first["resets/carried_prefix_drift"]) and abs(second["resets/carried_prefix_drift"]) > 1e-3
    assert math.isfinite(second["resets/carried_prefix_drift"])
    # generation 2's reset rows (4-7): generation 1's prompt, scored with generation 1's answer
    out1, out2 = outputs[0], outputs[1]
    assert all(out2["prompt_ids"][i] == out1["prompt_ids"][0] for i in range(4, 8))
    assert out2["prompt_ids"][0] != out1["prompt_ids"][0]
    scored = {a for call in answers[calls[0]:calls[1]] for a in call}
    assert scored == {answer_of[prompts[0]], answer_of[prompts[1]]}
    assert trainer.reset_history[1]["resets"][0][3:] == (0, 0)  # origin: generation 0, prompt 0
    assert trainer.reset_history[0]["resets"] == []
    shown = list(trainer._logs["prompt"])[-8:]  # the completions table (the last generation): each row's prompt
    assert shown == [prompts[2]] * 4 + [prompts[1]] * 4


def _missing(value) -> bool:
    """A metric with nothing counted: NaN, which TRL may log as None."""
    return value is None or math.isnan(value)


def _lagged_generations(tmp_path, char_tokenizer, **overrides):
    """A lagged run at learning rate 0 (the policy never changes) with a generator per row: the rows of each
    generation and the resets/* metrics logged at its first optimizer step."""
    args = _args(tmp_path, SRPOConfig, reset_lag=1, seed_budget=0, per_row_sampling_seed=True, learning_rate=0.0,
                 **overrides)
    trainer = SRPOTrainer(model=make_tiny_llama(char_tokenizer), args=args, train_dataset=_dataset(),
                          reward_funcs=lambda completions, **kw: [float(len(c) % 2) for c in completions],
                          processing_class=char_tokenizer, localizer=lambda q, thoughts: len(thoughts))
    outputs, rollout = [], trainer._reset_rollout
    trainer._reset_rollout = lambda prompts: outputs.append(rollout(prompts)) or outputs[-1]
    trainer.train()
    metrics = [{k: v for k, v in entry.items() if k.startswith("resets/") and k != "resets/carried_prefix_drift"}
               for entry in trainer.state.log_history if "resets/queue_fill" in entry]
    return outputs, metrics


@pytest.mark.parametrize("overrides", [
    {"num_iterations": 2},  # two optimization passes over each generation
    {"per_device_train_batch_size": 4, "steps_per_generation": 2},  # each generation spans two optimizer steps
])
def test_a_lagged_generation_trained_for_several_optimizer_steps_builds_the_rows_of_one_step_per_generation(
        tmp_path, char_tokenizer, overrides):
    """The queue advances once per generation, whatever the optimizer steps in it: at a fixed policy, a run with
    two optimizer steps per generation builds every generation's rows as the run with one does, and knows its last
    generation (no seed localized for nothing, the same unused states)."""
    once, once_metrics = _lagged_generations(tmp_path / "once", char_tokenizer, max_steps=3)
    twice, twice_metrics = _lagged_generations(tmp_path / "twice", char_tokenizer, max_steps=6, **overrides)
    assert len(once) == len(twice) == 3
    assert twice == once
    assert twice_metrics == once_metrics and len(once_metrics) == 3
    assert once_metrics[1]["resets/reset_age"] == 1.0  # carried states were used
    assert once_metrics[-1]["resets/unused_states"] > 0  # the last generation's seeds, not localized


@pytest.mark.parametrize("lag, localizer", [(1, "callable"), (2, "self"), (0, "callable"), (0, "self")])
def test_a_lagged_generation_decodes_in_one_wave_and_logs_its_decoding_steps(tmp_path, char_tokenizer, lag,
                                                                             localizer):
    """``resets/decode_steps`` under a lag: no request waits for another of its generation (lag 1: the carried
    suffixes start beside the new draws, a localizer without the policy answers at once; lag 2: the carried seeds'
    localization replies start there too), so the generation's decoding steps are its longest request's tokens.
    Without a lag the same run decodes chains (a seed, then its reply, then its suffixes): more steps than that."""
    args = _args(tmp_path, SRPOConfig, max_steps=3, reset_lag=lag, seed_budget=0, localization_max_tokens=10)
    trainer = SRPOTrainer(model=make_tiny_llama(char_tokenizer), args=args, train_dataset=_dataset(),
                          reward_funcs=lambda completions, **kw: [float(len(c) % 2) for c in completions],
                          processing_class=char_tokenizer,
                          localizer=(lambda q, thoughts: len(thoughts)) if localizer == "callable" else None)
    lengths = []  # per generation: the tokens of every request decoded (rollouts and replies)
    open_sampler = trainer._sampler

    @contextmanager
    def recorded_sampler():
        with open_sampler() as sampler:
            make_stream = sampler.stream

            def stream():
                inner = make_stream()
                step = inner.step

                def recorded_step():
                    done = step()
                    lengths[-1] += [len(r.token_ids) if isinstance(r, Rollout) else len(r) for _, r in done]
                    return done

                inner.step = recorded_step
                return inner

            sampler.stream = stream
            lengths.append([])
            yield sampler

    trainer._sampler = recorded_sampler
    trainer.train()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    logged = [e[PREFIX + "decode_steps"] for e in logs]
    longest = [float(max(generation)) for generation in lengths]
    assert len(logged) == len(lengths) == 3
    if lag == 0:
        assert all(s >= n for s, n in zip(logged, longest)) and logged != longest
        return
    assert logged == longest
    assert logs[-1]["resets/reset_age"] == lag  # carried states were decoded in the last generation
    if localizer == "self":  # generation 0's seed, localized in generation 1 beside its draws
        assert len(lengths[1]) == len(lengths[0]) + 1
