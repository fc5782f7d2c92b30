"""Pipelined resets: the queue of reset states carried from one generation to the next.

Under a lag (`resets.LagStep`), a seed found in generation t has its suffixes sampled in generation t + lag, by the
policy of that generation, in the same first decoding wave as that generation's new prompts. Between generations
the states wait in one `ResetQueue`, which every process holds identically: each process hands its new states to
`ResetQueue.put` after they are gathered from all processes (their order is fixed by origin generation, global prompt
index and seed number, so it does not depend on the number of processes), and each takes its own slice of the
states `ResetQueue.take` returns. The queue is first in, first out; a state older than ``max_age`` generations when
it would be used is dropped and counted. It is saved with each checkpoint (`state_dict` / `load_state_dict`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .resets import LagStep, ResetState


def _order(state: ResetState) -> tuple[int, int, int]:
    return state.origin.generation, state.origin.prompt, state.seed_number


@dataclass
class ResetQueue:
    """Reset states waiting for a later generation: ``ready`` (localized, for reset slots) and, under a
    two-generation lag, ``seeds`` (to be localized in the next generation's first wave).

    Args:
        lag: 1 or 2 generations between a seed and its suffixes.
        max_age: a ready state whose age (generation of use minus generation found) exceeds it is dropped.
    """

    lag: int
    max_age: int
    ready: list[ResetState] = field(default_factory=list)
    seeds: list[ResetState] = field(default_factory=list)
    dropped: int = 0  # states dropped for their age, over the run
    discarded: int = 0  # seeds and states that would be ready only after the last generation, over the run

    def __post_init__(self):
        if self.lag not in (1, 2):
            raise ValueError(f"reset_lag={self.lag}: a queue carries resets 1 or 2 generations.")
        if self.max_age < self.lag:
            raise ValueError(f"reset_max_age={self.max_age} is below reset_lag={self.lag}: every state would be "
                             f"dropped before use. Set reset_max_age >= {self.lag}.")

    def step(self, generation: int, slots: int, generations_left: int | None = None,
             prompt_indices=None) -> tuple[LagStep, int]:
        """This generation's `LagStep` for the whole batch (``slots``: prompts x reset prefixes, all processes):
        the oldest ready states not too old, at most ``slots``, and (lag 2) every carried seed. Returns it with the
        number of states dropped for their age now. A process runs its `process_slice` of it."""
        dropped = [s for s in self.ready if generation - s.origin.generation > self.max_age]
        self.ready = [s for s in self.ready if generation - s.origin.generation <= self.max_age]
        self.dropped += len(dropped)
        taken, self.ready = self.ready[:slots], self.ready[slots:]
        seeds, self.seeds = self.seeds, []
        return LagStep(self.lag, generation, taken, seeds, prompt_indices, generations_left), len(dropped)

    def put(self, localized: list[ResetState], found: list[ResetState], discarded: int = 0) -> None:
        """Every process's new states of one generation (gathered): ready ones join the queue's end, and found
        seeds wait for the next generation; each list is put in its fixed order first."""
        self.ready.extend(sorted(localized, key=_order))
        self.seeds.extend(sorted(found, key=_order))
        self.discarded += discarded

    @property
    def fill(self) -> int:
        """Ready states waiting."""
        return len(self.ready)

    def state_dict(self) -> dict:
        return {"lag": self.lag, "max_age": self.max_age, "ready": list(self.ready), "seeds": list(self.seeds),
                "dropped": self.dropped, "discarded": self.discarded}

    def load_state_dict(self, state: dict) -> None:
        if (state["lag"], state["max_age"]) != (self.lag, self.max_age):
            raise ValueError(f"the checkpoint's reset queue was saved with reset_lag={state['lag']}, "
                             f"reset_max_age={state['max_age']}; resume with the same values.")
        self.ready, self.seeds = list(state["ready"]), list(state["seeds"])
        self.dropped, self.discarded = state["dropped"], state["discarded"]


def process_slice(step: LagStep, process: int, num_prompts: int, k: int) -> LagStep:
    """The part of a whole batch's `LagStep` that one process runs, when each holds ``num_prompts`` prompts
    (process ``process`` the block from ``process * num_prompts``): its prompts' slots, and (lag 2) the carried seeds
    found by prompts of the same block, so each seed is localized by exactly one process."""
    first = process * num_prompts * k
    indices = range(process * num_prompts, (process + 1) * num_prompts)
    return LagStep(step.lag, step.generation, step.ready[first: first + num_prompts * k],
                   [s for s in step.seeds if s.origin.prompt in indices], indices, step.generations_left)


class Pipeline:
    """A trainer's pipelined resets: the queue, and what each generation takes from it and gives back.

    Args:
        lag, max_age: as `ResetQueue`.
        num_reset_prefixes: reset slots per prompt.
        process, num_processes: this process and how many there are; each holds the same number of prompts.
        gather: ``list -> the concatenation of every process's list, in process order`` (identity on one process).
    """

    def __init__(self, lag: int, max_age: int, num_reset_prefixes: int, process: int = 0, num_processes: int = 1,
                 gather=lambda items: list(items)):
        self.queue = ResetQueue(lag, max_age)
        self.k, self.process, self.num_processes, self.gather = num_reset_prefixes, process, num_processes, gather
        self._ages: list[int] = []
        self._dropped = 0

    def begin(self, generation: int, num_prompts: int, generations_left: int | None) -> LagStep:
        """This process's `LagStep` for a generation of ``num_prompts`` prompts per process."""
        slots = num_prompts * self.num_processes * self.k
        whole, self._dropped = self.queue.step(generation, slots, generations_left)
        self._ages = [generation - s.origin.generation for s in whole.ready]
        return process_slice(whole, self.process, num_prompts, self.k)

    def end(self, step: LagStep, groups) -> dict[str, float]:
        """Puts every process's new states into the queue; returns the generation's pipeline metrics (the same on
        every process): the mean age of the carried states used, the ready states waiting, the states dropped for
        their age, the seed searches ended without a seed, and the states made that no later generation uses."""
        localized, found = self.gather(step.localized), self.gather(step.found)
        counts = self.gather([[step.discarded, sum(g.searches_ended for g in groups)]])
        discarded, ended = (sum(c[i] for c in counts) for i in range(2))
        self.queue.put(localized, found, discarded)
        last = step.generations_left == 0
        return {
            "resets/reset_age": sum(self._ages) / len(self._ages) if self._ages else math.nan,
            "resets/queue_fill": float(self.queue.fill),
            "resets/dropped_states": float(self._dropped),
            "resets/searches_ended": float(ended),
            # at the last generation: every state still queued, and those never made, go unused
            "resets/unused_states": float(discarded + (self.queue.fill + len(self.queue.seeds) if last else 0)),
        }
