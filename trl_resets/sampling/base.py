"""The interfaces every sampling backend offers to the reset algorithm."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from ..thoughts import Rollout, ThoughtFormat, ThoughtTracker


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


class ThoughtDecoding:
    """The set-up every backend shares: the tokenizer, the thought format, the tokens that end a rollout (the
    tokenizer's EOS unless given), and one `ThoughtTracker` per rollout, which decides its stop from its token ids."""

    def __init__(self, tokenizer, fmt: ThoughtFormat, eos_ids: list[int] | None = None):
        self.tokenizer, self.fmt = tokenizer, fmt
        if eos_ids is None:
            eos_ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        self.eos_ids = frozenset(eos_ids)

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def _tracker(self, start_thoughts: int, token_budget: int) -> ThoughtTracker:
        """A rollout's tracker: ``start_thoughts`` already in its context, at least one token to draw."""
        return ThoughtTracker(self.fmt, self._decode, self.eos_ids, start_thoughts, max(token_budget, 1))


def derive_seed(*parts) -> int:
    """A 63-bit seed fixed by ``parts`` (their text joined by ``/``), distinct for distinct parts: the seed of one
    row's own random generator."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # vLLM seeds are signed 64-bit integers


@dataclass
class DecodeRequest:
    """One unit of work for a `DecodingStream`: a rollout (thought by thought, ``start_thoughts`` already in the
    context, at most ``token_budget`` new tokens), or, when ``reply_tokens`` is set, a free reply of at most that
    many tokens at ``temperature`` (the localization reply), cut after its first EOS.

    ``seed`` set: the request's tokens are drawn from a random generator of its own, seeded with it, so they
    depend neither on the other requests decoded beside it nor on the process (a stream that cannot do that
    refuses the request). None: from the backend's shared generator."""

    context: list[int]
    start_thoughts: int = 0
    token_budget: int = 0
    reply_tokens: int | None = None
    temperature: float = 0.0
    seed: int | None = None

    @property
    def is_reply(self) -> bool:
        return self.reply_tokens is not None


class DecodingStream(Protocol):
    """Continuous decoding: requests join while others are decoding, and each comes back as soon as it is done.

    ``submit`` queues requests and returns one handle each; ``step`` advances decoding by one step (a forward pass,
    or one request round of an engine) and returns ``(handle, result)`` for every request that finished, a
    `Rollout` for a rollout and the reply's token ids for a reply. ``busy`` says whether anything is queued or
    decoding. ``collective`` says whether every process must make the same number of ``step`` calls (ZeRO-3
    decoding, a vLLM server shared by the processes): the caller then keeps stepping, with nothing to do, while
    any process is busy.
    """

    collective: bool

    @property
    def busy(self) -> bool:
        ...

    def submit(self, requests: list[DecodeRequest]) -> list[int]:
        ...

    def step(self) -> list[tuple[int, Rollout | list[int]]]:
        ...


def decode(stream: DecodingStream, requests: list[DecodeRequest],
           sync_any: Callable[[bool], bool] = bool) -> list[Rollout | list[int]]:
    """Every request decoded to its end through ``stream``, in the order given. A collective stream keeps stepping
    while ``sync_any`` says some process is still busy."""
    done: dict[int, Rollout | list[int]] = {}
    handles = stream.submit(requests)
    collective = getattr(stream, "collective", True)
    while sync_any(stream.busy) if collective else stream.busy:
        done.update(stream.step())
    return [done[h] for h in handles]


class StepCounter:
    """A `DecodingStream` that counts the ``step`` calls made on it (``steps``); everything else is the inner
    stream's. On a stream that draws one token per running row and step (``one_token_per_step``, the compact
    decoder) the count is the generation's sequential decoding steps."""

    def __init__(self, inner: DecodingStream):
        self.inner, self.steps = inner, 0

    def step(self) -> list[tuple[int, Rollout | list[int]]]:
        self.steps += 1
        return self.inner.step()

    def __getattr__(self, name):
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)


class PhasedStream:
    """A `DecodingStream` over any `ThoughtSampler`: each ``step`` samples everything queued so far in one
    ``sample`` call (rollouts) and one ``complete`` call per reply setting, so work found during a call joins the
    next call rather than the running one. Every step makes the ``sample`` call and at least one ``complete`` call,
    empty ones included, so that samplers whose calls are collective (ZeRO-3, vLLM server mode) stay in step."""

    collective = True  # its sampler's calls may be

    def __init__(self, sampler: ThoughtSampler):
        self.sampler = sampler
        self._queue: list[tuple[int, DecodeRequest]] = []
        self._handles = 0

    @property
    def busy(self) -> bool:
        return bool(self._queue)

    def submit(self, requests: list[DecodeRequest]) -> list[int]:
        if any(r.seed is not None for r in requests):
            raise ValueError(
                "a request with a seed of its own reached a phased stream, whose sampler draws every row from one "
                "shared generator (transformers' generate, collective decoding), so its seed would be ignored. "
                "Decode seeded rows with the compact decoder (compact_decoding=True, no ZeRO-3 collective decoding) "
                "or vLLM in colocate mode, or turn per_row_sampling_seed off.")
        handles = list(range(self._handles, self._handles + len(requests)))
        self._handles += len(requests)
        self._queue.extend(zip(handles, requests))
        return handles

    def step(self) -> list[tuple[int, Rollout | list[int]]]:
        queue, self._queue = self._queue, []
        rollouts = [(h, r) for h, r in queue if not r.is_reply]
        sampled = self.sampler.sample([r.context for _, r in rollouts], [r.start_thoughts for _, r in rollouts],
                                      [r.token_budget for _, r in rollouts])
        done: list[tuple[int, Rollout | list[int]]] = [(h, s) for (h, _), s in zip(rollouts, sampled)]
        settings: dict[tuple[int, float], list[tuple[int, DecodeRequest]]] = {}
        for h, r in queue:
            if r.is_reply:
                settings.setdefault((r.reply_tokens, r.temperature), []).append((h, r))
        for (max_new, temperature), replies in settings.items() or [((1, 0.0), [])]:
            out = self.sampler.complete([r.context for _, r in replies], max_new, temperature)
            done.extend((h, reply) for (h, _), reply in zip(replies, out))
        return done
