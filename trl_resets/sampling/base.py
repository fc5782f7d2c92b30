"""The interface every sampling backend offers to the reset algorithm."""

from __future__ import annotations

from typing import Protocol

from ..thoughts import Rollout


class ThoughtSampler(Protocol):
    """Samples thought-level rollouts and short free-text replies from the current policy."""

    def sample(
        self,
        contexts: list[list[int]],
        start_thoughts: list[int] | None = None,
        token_budgets: list[int] | None = None,
    ) -> list[Rollout]:
        """One rollout per context (token ids), continuing it thought by thought.

        ``start_thoughts[i]`` thoughts already sit in context ``i`` (a reset prefix) and count
        toward ``max_thoughts``; ``token_budgets[i]`` caps the tokens rollout ``i`` may add, and a
        backend asks its engine for no more than that (context plus budget must fit the engine).
        """
        ...

    def complete(self, prompts: list[list[int]], max_new_tokens: int, temperature: float) -> list[list[int]]:
        """Free continuations (no thought structure), e.g. the localization reply."""
        ...
