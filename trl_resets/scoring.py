"""Scoring whole trajectories with TRL-style reward functions and reward models, while generating (the seed search
needs rewards before the rows exist, so TRL's ``_calculate_rewards`` cannot do it): the same contract as GRPO's
(dataset columns as keyword arguments, None for a completion a function cannot score, async functions, reward
models scored by their first logit in their own tokenizer's format)."""

from __future__ import annotations

import asyncio
import inspect
import math

import torch
from torch import nn
from trl.data_utils import apply_chat_template
from trl.trainer.grpo_trainer import logger as _trl_logger

# keywords the trainer itself passes to every reward function (besides the dataset's columns)
REWARD_KEYWORDS = {"prompts", "completions", "completion_ids", "trainer_state", "log_metric", "log_extra"}


def reward_values(name: str, out, count: int) -> list[float]:
    """One reward function's output as floats: None and NaN mean unscored (NaN); anything that is not a finite
    number, or a wrong number of rewards, is an error naming the function, the completion and the value."""
    try:
        out = list(out)
    except TypeError:
        raise TypeError(f"reward function {name!r} returned {type(out).__name__}, not a list of rewards.") from None
    if len(out) != count:
        raise ValueError(
            f"reward function {name!r} returned {len(out)} rewards for {count} completions; "
            "it must return one reward per completion."
        )
    values = []
    for i, reward in enumerate(out):
        if reward is None:
            values.append(math.nan)
            continue
        try:
            value = float(reward)
        except (TypeError, ValueError):
            raise TypeError(
                f"reward function {name!r} returned {reward!r} for completion {i}: a reward is a number, or None "
                "for a completion it cannot score."
            ) from None
        if math.isinf(value):
            raise ValueError(
                f"reward function {name!r} returned {value} for completion {i}: rewards must be finite (an infinite "
                "reward would make its whole group's advantages NaN); return None for a completion it cannot score."
            )
        values.append(value)
    return values


@torch.inference_mode()
def score_with_model(model, tokenizer, prompts: list, completions: list, device, chat_template_kwargs: dict,
                     conversational: bool, batch_size: int = 16) -> list[float]:
    """A reward model's score (its first logit) for each prompt + completion, in the reward tokenizer's format."""
    if conversational:
        texts = [apply_chat_template({"messages": p + c}, tokenizer, **chat_template_kwargs)["text"]
                 for p, c in zip(prompts, completions)]
    else:
        texts = [p + c for p, c in zip(prompts, completions)]
    scores = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(text=texts[start:start + batch_size], return_tensors="pt", padding=True,
                          padding_side="right", add_special_tokens=False)
        batch = {k: v.to(device) for k, v in batch.items()}
        scores.extend(model(**batch).logits[:, 0].float().tolist())
    return scores


def call_reward_functions(funcs, names, tokenizers, prompts: list, completions: list, completion_ids: list,
                          columns: dict, device, chat_template_kwargs: dict, conversational: bool,
                          async_loop=None) -> list[list[float]]:
    """Each completion's rewards, one per function (NaN: unscored). An exception in a function is re-raised naming
    it and the contract (None for a completion it cannot score)."""
    per_func = []
    for func, name, func_tokenizer in zip(funcs, names, tokenizers):
        if isinstance(func, nn.Module):
            per_func.append(score_with_model(func, func_tokenizer, prompts, completions, device, chat_template_kwargs,
                                             conversational))
            continue
        try:
            out = func(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns)
            if inspect.isawaitable(out):
                out = asyncio.run_coroutine_threadsafe(out, async_loop).result() if async_loop else asyncio.run(out)
        except Exception as error:
            raise RuntimeError(
                f"reward function {name!r} raised {type(error).__name__}: {error}. A completion it cannot score "
                "should get None (left out of its group, counted in resets/unscored_rate), not an exception."
            ) from error
        per_func.append(reward_values(name, out, len(completions)))
    return [list(values) for values in zip(*per_func)]


def unscored(rows: list[list[float]]) -> list[int]:
    """The completions no reward function scored."""
    return [i for i, values in enumerate(rows) if values and all(math.isnan(v) for v in values)]


class TrajectoryScorer:
    """A trainer's reward functions called on whole trajectories while it generates: the dataset columns as keyword
    arguments, plus ``trainer_state``, ``log_metric`` and ``log_extra`` (columns for the completions table, handed
    to TRL one value per training row by `log_row_extras`); counts the completions no function scored (this
    generation's ``unscored``: (unscored, scored)) and warns on TRL's logger with the first of them."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.unscored = [0, 0]
        self._pending: list = []  # (column, completion ids, values) logged by reward functions

    def __call__(self, rows_inputs: list[dict], prompts: list, completion_ids: list[list[int]]) -> list[list[float]]:
        from .checks import is_conversational  # (checks imports this module's REWARD_KEYWORDS)

        t = self.trainer
        texts = t.processing_class.batch_decode(completion_ids, skip_special_tokens=True)
        conversational = is_conversational(prompts[0])
        completions = [[{"role": "assistant", "content": text}] for text in texts] if conversational else texts
        keys = [k for k in rows_inputs[0] if k not in ("prompt", "completion", "completion_ids")]
        columns = {k: [row[k] for row in rows_inputs] for k in keys}
        columns["trainer_state"] = t.state
        columns["log_metric"] = t._log_metric
        columns["log_extra"] = lambda column, values: self._pending.append(
            (column, [tuple(ids) for ids in completion_ids], list(values)))
        rows = call_reward_functions(t.reward_funcs, t.reward_func_names, t.reward_processing_classes, prompts,
                                     completions, completion_ids, columns, t.accelerator.device,
                                     t.chat_template_kwargs, conversational, getattr(t, "async_loop", None))
        missing = unscored(rows)
        self.unscored[0] += len(missing)
        self.unscored[1] += len(rows)
        if missing:
            i = missing[0]
            row = {k: v[i] for k, v in columns.items() if isinstance(v, list)}
            _trl_logger.warning(  # on TRL's logger, where GRPOTrainer's own warning of this goes
                f"No reward function gave a reward to {len(missing)} of {len(rows)} completions (their rows get no "
                f"reward and no advantage); the first: {dict(row, prompt=prompts[i], completion=completions[i])}. "
                "Make at least one reward function return a reward for every completion."
            )
        return rows

    def log_row_extras(self, rows) -> None:
        """Hands TRL's completions table the columns reward functions logged with ``log_extra``, one value per
        training row (the value logged when its trajectory was scored; None for filler rows)."""
        pending, self._pending = self._pending, []
        by_column: dict[str, dict[tuple, object]] = {}
        for column, keys, values in pending:
            by_column.setdefault(column, {}).update(zip(keys, values))
        for column, values in by_column.items():
            self.trainer._log_completion_extra(
                column, [values.get(tuple(row.completion_ids)) if row.weight > 0 else None for row in rows])
