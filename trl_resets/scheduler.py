"""Algorithm 2 without barriers: each prompt's next step starts as soon as its inputs exist.

`ResetAlgorithm.run` samples in phases: every phase-1 rollout of the batch, then every localization reply, then
every suffix, each phase waiting for the slowest row of the one before. `run_overlapped` builds the same groups
from a `DecodingStream`, into which work joins while other rows are still decoding:

* a prompt's g-th seed is known once its draws 0..j, in sampling order, have finished and draw j is its g-th seed
  candidate (incorrect, with a thought to reset to); later draws need not be waited for, and the seeds are the
  ones `ResetAlgorithm.run` picks (nothing is biased toward rollouts that finish early);
* the seed's localization reply joins the stream at once (a self-localizer's prompt is decoded with the rollouts;
  a localizer that does not query the policy answers on the spot), then its suffixes;
* extra seed-search draws join as soon as a prompt is sure to need them: when even its unfinished draws could no
  longer bring it k seed candidates. They are the draws `ResetAlgorithm.run` would draw in its later rounds.

The rows, seeds, base groups and reset states equal `ResetAlgorithm.run`'s for the same draws and answers (with
either `ResetAlgorithm.base_group`), random resets included: both draw a seed's random reset (a random localizer,
an unusable answer) from that seed's own generator (`resets.SeedGenerators`), which does not depend on the order in
which seeds are found.

With ``sampling_seeds`` (one per prompt), every request carries a seed of its own (`DecodeRequest.seed`), derived
from its prompt's and its role there: phase-1 draw j, the localization reply of seed g, suffix j of seed g's reset
state. A stream that draws each request from its own generator then samples a row's tokens whatever else is
decoded beside it, and on whichever process.

Under a lag (`resets.LagStep`, pipelined resets) the first wave holds, beside the new prompts' first draws, the
carried states' suffixes and (lag 2) the carried seeds' localization replies; a seed found now is localized as soon
as it is confirmed (lag 1) or only handed on (lag 2). A carried request keeps the seed it would have had in its
origin generation (its origin prompt's sampling seed and its role there), so it samples the same tokens.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from .localizers import Localization, Localizer
from .resets import LagStep, PromptGroups, ResetAlgorithm, ResetState, Scored, ScoreFn, SeedGenerators, SeedOutcome
from .sampling.base import DecodeRequest, DecodingStream, derive_seed
from .thoughts import Rollout


def streams_localization(localizer, policy) -> bool:
    """Whether the localizer's replies can be decoded in the stream: it splits into prompts and reading
    (``prompts``, ``read``, ``max_new_tokens``, ``temperature``) and the policy encodes and decodes text."""
    return all(hasattr(localizer, a) for a in ("prompts", "read", "max_new_tokens", "temperature")) and all(
        hasattr(policy, a) for a in ("encode", "decode"))


def can_overlap(localizer, policy) -> bool:
    """Whether `run_overlapped` can drive this localizer: it streams its replies, or it answers without the
    policy (``uses_policy = False``: random, oracle, callable), so calling it one seed at a time starts no
    decoding of its own. Other localizers keep `ResetAlgorithm.run`, which calls them once per batch."""
    return streams_localization(localizer, policy) or getattr(localizer, "uses_policy", True) is False


@dataclass
class _Prompt:
    context: list[int]
    draws: list[Scored | None] = field(default_factory=list)
    pending: int = 0  # draws submitted and not finished
    frontier: int = 0  # draws[:frontier] have all finished
    seeds: list[int] = field(default_factory=list)  # positions of the confirmed seeds among the draws
    outcomes: list[SeedOutcome | None] = field(default_factory=list)  # per seed, once localized


def run_overlapped(
    algorithm: ResetAlgorithm,
    contexts: list[list[int]],
    questions: list[str],
    stream: DecodingStream,
    score: ScoreFn,
    localizer: Localizer,
    describe: Callable[[Rollout], list[str]],
    policy=None,
    rng: random.Random | Sequence[random.Random] | None = None,
    rows: Sequence[Mapping] | None = None,
    sampling_seeds: Sequence[int] | None = None,
    lag: LagStep | None = None,
) -> list[PromptGroups]:
    """Algorithm 2 for every prompt, as `ResetAlgorithm.run` (same arguments, a stream for the sampler).

    ``sampling_seeds``: one per prompt, from which each of its requests gets a seed of its own (see the module
    docstring); None leaves the requests unseeded."""
    if not algorithm.split.is_grpo and not can_overlap(localizer, policy):
        raise ValueError(
            f"localizer {getattr(localizer, 'name', type(localizer).__name__)!r} can be neither streamed (prompts/"
            "read with a policy that encodes and decodes) nor called one seed at a time (uses_policy = False); "
            "use ResetAlgorithm.run for it.")
    if sampling_seeds is not None and len(sampling_seeds) != len(contexts):
        raise ValueError(f"{len(sampling_seeds)} sampling seeds for {len(contexts)} prompts: pass one per prompt.")
    algorithm.check_lag(lag, len(contexts))
    return _Run(algorithm, contexts, questions, stream, score, localizer, describe, policy,
                SeedGenerators(rng, len(contexts)), rows, sampling_seeds, lag).run()


class _Run:
    def __init__(self, algorithm, contexts, questions, stream, score, localizer, describe, policy, seed_rng, rows,
                 sampling_seeds, lag):
        self.algo, self.stream, self.score, self.localizer = algorithm, stream, score, localizer
        self.questions, self.describe, self.policy, self._seed_rng, self.rows = questions, describe, policy, \
            seed_rng, rows
        self.sampling_seeds = sampling_seeds
        self.streamed = streams_localization(localizer, policy)
        self.prompts = [_Prompt(list(c)) for c in contexts]
        self.jobs: dict[int, tuple] = {}  # stream handle -> what it is for
        self.outbox: list[tuple[DecodeRequest, tuple]] = []
        self.first = algorithm.first_round
        self.lag = lag
        self.carried: list[list[SeedOutcome]] = [[] for _ in contexts]  # lag: each prompt's slots, carried states
        self.targets: dict[tuple, tuple[ResetState, random.Random]] = {}  # lag: seeds being localized
        self.localized: dict[tuple, ResetState] = {}
        self.found: dict[tuple, ResetState] = {}

    # ---------------------------------------------------------------- the loop
    def run(self) -> list[PromptGroups]:
        for p in range(len(self.prompts)):
            self._draw(p, self.first)
        if self.lag is not None:
            self._carry()
        self._flush()
        while self._busy():
            self._collect(self.stream.step())
            self._flush()
        for p, prompt in enumerate(self.prompts):
            if prompt.pending or any(o is None or None in o.suffixes for o in prompt.outcomes + self.carried[p]):
                raise RuntimeError(f"the decoding stream went idle with prompt {p}'s work unfinished.")
        if self.lag is None:
            return [self.algo.prompt_groups(list(prompt.draws), list(prompt.outcomes)) for prompt in self.prompts]
        if len(self.localized) != len(self.targets):
            raise RuntimeError("the decoding stream went idle with localization replies unfinished.")
        self.lag.localized.extend(self.localized[t] for t in sorted(self.localized))
        self.lag.found.extend(self.found[t] for t in sorted(self.found))
        return self.algo.count_localizations(self.lag, [self.algo.prompt_groups(list(prompt.draws), per, lagged=True)
                                                        for prompt, per in zip(self.prompts, self.carried)])

    def _busy(self) -> bool:
        """Whether to step again: while this stream is busy, or, for a collective stream, while any process's is."""
        if getattr(self.stream, "collective", True):
            return self.algo.sync_any(self.stream.busy)
        return self.stream.busy

    def _seeded(self, request: DecodeRequest, p: int, *role) -> DecodeRequest:
        """The request with its own seed, from prompt ``p``'s and the request's ``role`` there (unchanged without
        sampling seeds)."""
        return self._seeded_by(request, None if self.sampling_seeds is None else self.sampling_seeds[p], *role)

    @staticmethod
    def _seeded_by(request: DecodeRequest, sampling_seed: int | None, *role) -> DecodeRequest:
        if sampling_seed is None:
            return request
        return dataclasses.replace(request, seed=derive_seed(sampling_seed, *role))

    def _carry(self) -> None:
        """The first wave's carried work: each slot's suffixes, and (lag 2) the carried seeds' localizations."""
        k = self.algo.split.num_reset_prefixes
        for p in range(len(self.prompts)):
            for slot, state in enumerate(self.lag.slots(p, k)):
                outcome = self.algo.carried_outcome(state)
                requests = self.algo.suffix_requests(state.context, outcome)
                outcome.suffixes = [None] * len(requests)
                self.carried[p].append(outcome)
                for j, request in enumerate(requests):
                    request = self._seeded_by(request, state.sampling_seed, "suffix", state.seed_number, j)
                    self.outbox.append((request, ("carried", p, slot, j)))
        for i, (state, rng) in enumerate(self.algo.carried_seed_targets(self.lag)):
            self._ask(("carried", i), state, rng)

    def _flush(self) -> None:
        if self.outbox:
            outbox, self.outbox = self.outbox, []
            for handle, job in zip(self.stream.submit([r for r, _ in outbox]), (j for _, j in outbox)):
                self.jobs[handle] = job

    def _draw(self, p: int, count: int) -> None:
        prompt = self.prompts[p]
        budget = self.algo.fmt.max_completion_tokens
        for _ in range(count):
            request = self._seeded(DecodeRequest(prompt.context, 0, budget), p, "draw", len(prompt.draws))
            self.outbox.append((request, ("draw", p, len(prompt.draws))))
            prompt.draws.append(None)
            prompt.pending += 1

    def _collect(self, finished) -> None:
        draws, suffixes, replies, carried = [], [], [], []
        for handle, result in finished:
            job = self.jobs.pop(handle)
            {"draw": draws, "suffix": suffixes, "reply": replies, "carried": carried}[job[0]].append((job, result))
        touched = []
        if draws:
            owners = [p for (_, p, _), _ in draws]
            for ((_, p, at), _), scored in zip(draws, self.algo._score(self.score, owners, [r for _, r in draws])):
                self.prompts[p].draws[at] = scored
                self.prompts[p].pending -= 1
                touched.append(p)
        if suffixes:
            owners = [p for (_, p, _, _), _ in suffixes]
            prefixes = [self.prompts[p].outcomes[g].prefix for (_, p, g, _), _ in suffixes]
            scored = self.algo._score(self.score, owners, [r for _, r in suffixes], prefixes)
            for ((_, p, g, j), _), s in zip(suffixes, scored):
                self.prompts[p].outcomes[g].suffixes[j] = s
        if carried:
            k = self.algo.split.num_reset_prefixes
            owners = [self.lag.slots(p, k)[slot] for (_, p, slot, _), _ in carried]
            prefixes = [self.carried[p][slot].prefix for (_, p, slot, _), _ in carried]
            scored = self.algo._score(self.score, owners, [r for _, r in carried], prefixes)
            for ((_, p, slot, j), _), s in zip(carried, scored):
                self.carried[p][slot].suffixes[j] = s
        for (_, target, request), ids in replies:
            text = self.policy.decode(ids)
            (answer,) = self.localizer.read([request], [(text, len(ids))])
            self._answered(target, answer)
        for p in dict.fromkeys(touched):
            self._advance(p)

    # ---------------------------------------------------------------- one prompt's Algorithm 2
    def _advance(self, p: int) -> None:
        """Confirms the seeds that the finished draws settle, localizes them, and draws more when needed."""
        prompt, algo = self.prompts[p], self.algo
        k = algo.split.num_reset_prefixes
        while prompt.frontier < len(prompt.draws) and prompt.draws[prompt.frontier] is not None:
            scored = prompt.draws[prompt.frontier]
            if len(prompt.seeds) < k and algo.is_seed_candidate(scored):
                prompt.seeds.append(prompt.frontier)
                if self.lag is None:
                    prompt.outcomes.append(None)
                    self._localize(p, len(prompt.seeds) - 1)
                else:
                    self._hand_on(p, len(prompt.seeds) - 1)
            prompt.frontier += 1
        found = sum(algo.is_seed_candidate(s) for s in prompt.draws if s is not None)
        left = self.first + algo.seed_budget - len(prompt.draws)
        if k and found + prompt.pending < k and left > 0:  # even the unfinished draws cannot bring k seeds
            self._draw(p, min(left, self.first))

    def _localize(self, p: int, g: int) -> None:
        prompt = self.prompts[p]
        self._request(("own", p, g), self.questions[p], prompt.draws[prompt.seeds[g]],
                      None if self.rows is None else self.rows[p], self._seed_rng(p, g),
                      None if self.sampling_seeds is None else self.sampling_seeds[p], g)

    def _hand_on(self, p: int, g: int) -> None:
        """Under a lag: prompt p's g-th seed becomes a state for a later generation, localized now under lag 1."""
        prompt, lag = self.prompts[p], self.lag
        state = self.algo.new_state(lag, p, g, prompt.draws[prompt.seeds[g]], prompt.context, self.questions[p],
                                    None if self.rows is None else self.rows[p], self._seed_rng.key(p, g),
                                    None if self.sampling_seeds is None else self.sampling_seeds[p])
        if not lag.keeps_new():
            lag.discarded += 1
        elif lag.lag == 1:
            self._ask(("new", p, g), state, self._seed_rng(p, g))
        else:
            self.found[(p, g)] = state

    def _ask(self, target: tuple, state: ResetState, rng: random.Random) -> None:
        self.targets[target] = (state, rng)
        self._request(target, state.question, state.seed, state.columns, rng, state.sampling_seed,
                      state.seed_number)

    def _request(self, target: tuple, question, seed: Scored, row, rng, sampling_seed, g: int) -> None:
        """Asks the localizer about a seed: its reply joins the stream, or its answer comes at once."""
        request = self.algo.localization_request(question, seed, self.describe, row, rng)
        if self.streamed:
            (ids,) = self.policy.encode(self.localizer.prompts([request]), [request])
            reply = self._seeded_by(DecodeRequest(list(ids), reply_tokens=self.localizer.max_new_tokens,
                                                  temperature=self.localizer.temperature), sampling_seed, "reply", g)
            self.outbox.append((reply, ("reply", target, request)))
            return
        answers = self.localizer.locate([request], self.policy, rng)
        if len(answers) != 1:
            raise ValueError(f"localizer {self.localizer.name!r} answered {len(answers)} of 1 requests.")
        self._answered(target, answers[0])

    def _answered(self, target: tuple, answer: Localization | None) -> None:
        if target[0] == "own":
            self._reset(target[1], target[2], answer)
            return
        state, rng = self.targets[target]
        self.localized[target] = state.localized(self.algo.reset_of(state.seed, answer, rng))

    def _reset(self, p: int, g: int, answer: Localization | None) -> None:
        prompt = self.prompts[p]
        outcome = self.algo.reset_of(prompt.draws[prompt.seeds[g]], answer, self._seed_rng(p, g))
        requests = self.algo.suffix_requests(prompt.context, outcome)
        outcome.suffixes = [None] * len(requests)
        prompt.outcomes[g] = outcome
        for j, request in enumerate(requests):
            self.outbox.append((self._seeded(request, p, "suffix", g, j), ("suffix", p, g, j)))

