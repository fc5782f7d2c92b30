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
