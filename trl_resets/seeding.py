"""Where the randomness of a generation comes from: keyed by the run's seed, the generation and each prompt's (or
row's) index in the global batch, never by the process, so a run draws the same resets and rows on any number of
processes, and a resumed run the same as the uninterrupted one, with no generator state to save."""

from __future__ import annotations

import random

from .sampling.base import derive_seed


def prompt_generators(seed: int, generation: int, indices) -> list[random.Random]:
    """One generator per prompt (its global batch index in ``indices``), for its reset choices and localizer
    draws."""
    return [random.Random(f"trl-resets:{seed}:{generation}:{i}") for i in indices]


def prompt_sampling_seeds(seed: int, generation: int, indices) -> list[int]:
    """One seed per prompt, keyed as `prompt_generators` are, from which each of the prompt's rows derives the seed
    of its tokens (``per_row_sampling_seed``, see `scheduler.run_overlapped`)."""
    return [derive_seed("trl-resets-tokens", seed, generation, i) for i in indices]


def eval_sampling_seeds(seed: int, step: int, batch: int, indices) -> list[int]:
    """One seed per evaluation rollout, keyed by the training step, the evaluation batch's number at that step and
    the row's index in the global evaluation batch."""
    return [derive_seed("trl-resets-eval-tokens", seed, step, batch, i) for i in indices]


class TrainerKeys:
    """A `ResetTrainer`'s keys for the functions above: the generation (TRL's ``_step`` over the steps one
    generation is trained for), the global batch indices of this process's prompts (TRL hands each process a
    contiguous block of the global batch), and the evaluation batches counted per training step."""

    def __init__(self, trainer):
        self.trainer = trainer
        self._eval_batches = (-1, -1)  # (training step, evaluation batches at it)

    def global_prompts(self, num_prompts: int) -> tuple[int, range]:
        """(the generation, the global batch indices of this process's prompts)."""
        t = self.trainer
        generation = t._step // (t.args.steps_per_generation * t.num_iterations)
        first = t.accelerator.process_index * num_prompts
        return generation, range(first, first + num_prompts)

    def prompt_generators(self, num_prompts: int) -> list[random.Random]:
        """One generator per prompt of this process's generation batch (`prompt_generators`)."""
        return prompt_generators(self.trainer.args.seed, *self.global_prompts(num_prompts))

    def prompt_sampling_seeds(self, num_prompts: int) -> list[int] | None:
        """With ``per_row_sampling_seed``, one token seed per prompt (`prompt_sampling_seeds`); else None."""
        if not self.trainer.args.per_row_sampling_seed:
            return None
        return prompt_sampling_seeds(self.trainer.args.seed, *self.global_prompts(num_prompts))

    def eval_sampling_seeds(self, num_rows: int) -> list[int] | None:
        """With ``per_row_sampling_seed``, one seed per evaluation rollout (`eval_sampling_seeds`), counting the
        evaluation batches of a training step; else None."""
        t = self.trainer
        if not t.args.per_row_sampling_seed:
            return None
        step = t.state.global_step
        batch = self._eval_batches[1] + 1 if self._eval_batches[0] == step else 0
        self._eval_batches = (step, batch)
        first = t.accelerator.process_index * num_rows
        return eval_sampling_seeds(t.args.seed, step, batch, range(first, first + num_rows))
