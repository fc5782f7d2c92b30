"""A training callback: greedy pass rate on a held-out set every N steps, logged through the trainer's log.

The values reach every ``report_to`` logger as ``validation/pass_rate`` (rows whose reward reaches 1),
``validation/reward`` (the mean reward) and ``validation/seconds`` (the evaluation's wall time): the
validation curves of the paper's Figure 3.
"""

from __future__ import annotations

import math
import time

import torch
from transformers import TrainerCallback

from .generation import GenerationSettings, transformers_completer
from .scoring import summarize

PREFIX = "validation/"


def _trainer_settings(args, max_completion_tokens: int | None, batch_size: int | None = None) -> GenerationSettings:
    """Greedy decoding with the trainer's thought format and rollout prompt (the package's defaults otherwise);
    ``batch_size`` rows decode together (default: the trainer's ``per_device_eval_batch_size``), their prompts'
    shared opening encoded once."""
    defaults = GenerationSettings()
    return GenerationSettings(
        template=getattr(args, "rollout_template", defaults.template),
        answer_format=getattr(args, "answer_format", defaults.answer_format),
        delimiter=getattr(args, "thought_delimiter", defaults.delimiter),
        max_thoughts=getattr(args, "max_thoughts", defaults.max_thoughts),
        max_thought_tokens=getattr(args, "max_thought_tokens", defaults.max_thought_tokens),
        max_completion_tokens=max_completion_tokens or getattr(args, "max_completion_length", None)
        or defaults.max_completion_tokens,
        batch_size=batch_size or getattr(args, "per_device_eval_batch_size", defaults.batch_size),
        share_prompt_prefix=True,
    )


def paired_rise(first: list[float], last: list[float]) -> dict:
    """The change of the pass rate between two evaluations of the same problems (1 for a pass, else 0), with its
    standard error paired over the problems: ``rise`` = mean of (last - first) per problem, ``se`` = their sample
    standard deviation / sqrt(n) (0 for one problem)."""
    if len(first) != len(last) or not first:
        raise ValueError(f"paired_rise needs the same problems twice, got {len(first)} and {len(last)} scores.")
    diffs = [b - a for a, b in zip(first, last)]
    n = len(diffs)
    mean = sum(diffs) / n
    se = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1) / n) if n > 1 else 0.0
    return {"start": sum(first) / n, "end": sum(last) / n, "rise": mean, "se": se, "problems": n}


class ValidationCallback(TrainerCallback):
    """Evaluate ``dataset`` greedily with ``reward`` every ``every_steps`` steps (and before the first one).

    Args:
        trainer: the trainer it is attached to (add it with ``trainer.add_callback``); its model and tokenizer
            generate, its log records the values.
        dataset: held-out rows with a ``prompt`` (text or conversation) and the columns ``reward`` reads.
        reward: a TRL-style reward function.
        every_steps: evaluate after every this many optimizer steps; the last step is always evaluated.
        at_start: also evaluate before training (the curve's step 0).
        max_completion_tokens: the completion budget (default: the trainer's ``max_completion_length``).
        generation_args: the config whose thought format, rollout prompt, completion budget and
            ``per_device_eval_batch_size`` the decoding follows (default: the trainer's own ``args``). Give a
            `ResetConfig` to validate another trainer, such as TRL's own ``GRPOTrainer``, exactly as a reset
            trainer with that config would.
        batch_size: held-out problems decoded together (default: the trainer's ``per_device_eval_batch_size``).
            Greedy answers do not depend on it; a larger batch is faster on a CPU (one forward pass per token
            for all rows), at the cost of the batch's KV cache. The opening the batch's prompts share (chat
            template and rollout instruction) is encoded once and copied to the rows.

    After training, ``history`` lists each evaluation's metrics, ``passes`` each one's per-problem results, and
    ``rise()`` the change from the first evaluation to the last with its paired standard error.

    Generation runs on the trainer's own model with transformers (also when the trainer samples with vLLM),
    with LoRA adapters merged for the duration; every process evaluates the whole set. Not available under
    DeepSpeed ZeRO-3 or FSDP, whose sharded weights the decoding loop cannot read.
    """

    def __init__(self, trainer, dataset, reward, every_steps: int, at_start: bool = True,
                 max_completion_tokens: int | None = None, batch_size: int | None = None, generation_args=None):
        if every_steps < 1:
            raise ValueError(f"every_steps={every_steps}: evaluate at least every step (1) or more rarely.")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size={batch_size}: decode at least one problem at a time (or None for the "
                             "trainer's per_device_eval_batch_size).")
        if len(dataset) == 0 or "prompt" not in dataset.column_names:
            raise ValueError(f"the validation set needs rows with a 'prompt' column; got {len(dataset)} rows with "
                             f"columns {dataset.column_names}.")
        deepspeed = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
        if getattr(trainer, "is_fsdp_enabled", False) or (deepspeed is not None and deepspeed.zero_stage == 3):
            raise ValueError("ValidationCallback cannot generate from ZeRO-3 or FSDP sharded weights; evaluate the "
                             "saved checkpoints with `trl-resets-evaluate` instead.")
        self.trainer = trainer
        self.dataset = dataset
        self.reward = reward
        self.every_steps = every_steps
        self.at_start = at_start
        self.settings = _trainer_settings(generation_args if generation_args is not None else trainer.args,
                                          max_completion_tokens, batch_size)
        self.history: list[dict] = []
        # per step: 1.0 for each held-out problem passed, else 0.0 (an unscorable completion counts as not passed)
        self.passes: dict[int, list[float]] = {}
        self._last_passes: list[float] = []

    def evaluate(self) -> dict:
        """The held-out metrics for the model as it is now."""
        from ..sampling import sampling_weights

        start = time.perf_counter()
        model = self.trainer.accelerator.unwrap_model(self.trainer.model)
        tokenizer = self.trainer.processing_class
        with torch.no_grad(), sampling_weights(model, merge=True):
            completer = transformers_completer(model, tokenizer, self.settings)
            texts = [samples[0] for samples in completer.complete(list(self.dataset["prompt"]))]
        columns = {name: self.dataset[name] for name in self.dataset.column_names if name != "prompt"}
        scores = self.reward(completions=texts, prompts=list(self.dataset["prompt"]), **columns)
        result = summarize([{"id": str(i), "score": s} for i, s in enumerate(scores)])
        self._last_passes = [1.0 if s is not None and s >= 1 else 0.0 for s in scores]
        return {PREFIX + "pass_rate": result["accuracy"], PREFIX + "reward": result["mean_score"],
                PREFIX + "seconds": round(time.perf_counter() - start, 2)}

    def _record(self, step: int, metrics: dict) -> None:
        self.history.append({"step": step, **metrics})
        self.passes[step] = self._last_passes

    def rise(self) -> dict | None:
        """The pass rate's change from the first evaluation to the last, paired over the problems (`paired_rise`,
        with the two steps), or None before two evaluations."""
        if len(self.passes) < 2:
            return None
        first, last = min(self.passes), max(self.passes)
        return {"from_step": first, "to_step": last, **paired_rise(self.passes[first], self.passes[last])}

    def on_train_begin(self, args, state, control, **kwargs):
        if self.at_start and state.global_step == 0:
            metrics = self.evaluate()
            self._record(0, metrics)
            self.trainer.log(dict(metrics))  # nothing of a training step is pending yet

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every_steps and state.global_step != state.max_steps:
            return
        metrics = self.evaluate()
        self._record(state.global_step, metrics)
        pending = getattr(self.trainer, "_metrics", None)
        if isinstance(pending, dict) and "train" in pending:
            # TRL's trainers average their pending metrics into the step's log line: join it there
            for key, value in metrics.items():
                pending["train"][key].append(value)
            control.should_log = True
        else:
            self.trainer.log(dict(metrics))
