"""Algorithm 2 (RRPO / SRPO rollout construction) as plain functions.

Per prompt, with the split G1 / k / G2 (the paper's symbols for ``Split.num_base_generations``, ``num_reset_prefixes``,
``num_reset_generations``, used below for brevity):

1. Phase 1: draw iid rollouts from the prompt. The first k incorrect ones, in sampling order, are
   the seeds; they never enter the base group, which is the first G1 of the remaining rollouts.
   Up to ``seed_budget`` extra rollouts may be drawn to find the seeds.

   That base group is not an iid sample: a seed is removed because it failed, and a later draw takes its
   place. With ``base_group="iid"`` (opt-in) the base group is instead the first G1 draws in sampling order,
   whatever their rewards; the seeds are still the first k incorrect draws, so a seed among the first G1 is a
   base row too, and more draws are made only when the first G1 hold fewer than k seed candidates.
2. Phase 2: a localizer names each seed's reset index h*; the reset state is the prompt plus the
   seed's first h*-1 thoughts, as the exact sampled token ids; G2 suffixes are sampled from it.
3. A seed slot left empty (no incorrect rollout within the budget) falls back to GRPO on the base
   group: its rows are filled but carry zero loss weight, and the fallback is counted.

An incorrect rollout with no thoughts at all (an empty completion) has no step to reset to: it is never a
seed (it may still sit in the base group) and is counted in ``PromptGroups.empty_seeds``.

Sampling, scoring and localizing are injected, so the algorithm runs the same under a trainer,
a benchmark, or a scripted policy in a test. `ResetAlgorithm.run` samples phase by phase (all phase-1 rollouts,
then all localizations, then all suffixes); `scheduler.run_overlapped` builds the same groups from the same steps
(`seeds_of`, `reset_of`, `suffix_requests`, `prompt_groups`) without waiting between phases.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from .localizers import Localization, LocalizationRequest, Localizer, TextPolicy, resolve_reset_index
from .sampling.base import DecodeRequest, ThoughtSampler
from .thoughts import Rollout, ThoughtFormat

BASE_GROUP = 0
BASE_GROUP_MODES = ("algorithm2", "iid")


@dataclass(frozen=True)
class Split:
    """How one prompt's ``num_generations`` rows are spent: ``num_base_generations`` base rollouts plus
    ``num_reset_prefixes`` reset states x ``num_reset_generations`` suffixes each (the paper's G1 + k x G2; the
    config's fields of the same names). Named ``{num_reset_prefixes}x{num_reset_generations}``, e.g. the 1x4 split."""

    num_base_generations: int = 4
    num_reset_prefixes: int = 1
    num_reset_generations: int = 4

    def __post_init__(self):
        if self.num_base_generations < 0 or self.num_reset_prefixes < 0 or self.num_reset_generations < 1:
            raise ValueError(
                f"invalid split {self}: need num_base_generations >= 0, num_reset_prefixes >= 0, "
                "num_reset_generations >= 1."
            )
        one_row = [f"num_base_generations={self.num_base_generations}"] if self.num_base_generations == 1 else []
        if self.num_reset_prefixes > 0 and self.num_reset_generations == 1:
            one_row.append(f"num_reset_generations={self.num_reset_generations}")
        if one_row:
            raise ValueError(
                f"{' and '.join(one_row)} makes a group of one row, whose advantage is always 0: its rollouts cost "
                "compute and teach nothing. Use 2 or more rows per group (num_base_generations may be 0: no base "
                "group)."
            )
        if self.num_generations == 0:
            raise ValueError(
                f"split {self} has no rollouts; raise num_base_generations or num_reset_prefixes."
            )

    @property
    def num_generations(self) -> int:
        return self.num_base_generations + self.num_reset_prefixes * self.num_reset_generations

    @property
    def is_grpo(self) -> bool:
        """``num_reset_prefixes=0``: no resets, plain GRPO on the base rollouts (the like-for-like baseline)."""
        return self.num_reset_prefixes == 0


@dataclass
class Scored:
    """A rollout with its rewards (one per reward function) and the aggregate that decides correctness."""

    rollout: Rollout
    rewards: list[float]
    reward: float


@dataclass(frozen=True, order=True)
class Origin:
    """Where a carried reset state was found (pipelined resets): the generation, and its prompt's index in that
    generation's global batch."""

    generation: int
    prompt: int


@dataclass
class TrainingRow:
    """One row of the training batch.

    ``completion_ids`` is the whole response (a reset row's prefix, then its suffix); the first
    ``prefix_len`` tokens carry no loss. ``group`` is 0 for the base group and j for the j-th
    shared-prefix group. ``weight`` 0 marks a fallback filler row (no loss, no statistics).
    """

    completion_ids: list[int]
    prefix_len: int
    group: int
    rewards: list[float]
    reward: float
    weight: float = 1.0
    num_thoughts: int = 0
    stop_reason: str = ""
    logprobs: list[float] | None = None  # sampling logprob of each completion token, when the backend reports them
    thought_spans: list[tuple[int, int]] = field(default_factory=list)  # [start, end) of each thought, prefix's too
    origin: Origin | None = None  # a reset row whose state was carried from an earlier generation (pipelined resets)
    context: list[int] | None = None  # ...and its origin prompt's ids, which differ from this batch prompt's

    @property
    def active_tokens(self) -> int:
        return len(self.completion_ids) - self.prefix_len


@dataclass
class ResetRecord:
    """What happened to one seed: its length in thoughts, the reset index, how it was chosen."""

    num_thoughts: int
    reset_index: int
    localizer_failed: bool
    localization_tokens: int = 0
    reply: str | None = None
    seed_tokens: int = 0  # the seed's length; its first h*-1 thoughts are the reset prefix
    origin: Origin | None = None  # set on a reset carried from an earlier generation (pipelined resets)


@dataclass
class SeedOutcome:
    """One seed's reset: its record, the reset prefix (exact token ids) with their sampling logprobs, and the G2
    suffixes sampled from the reset state, scored on prefix + suffix."""

    record: ResetRecord
    prefix: list[int]
    prefix_logprobs: list[float] | None
    prefix_spans: list[tuple[int, int]] = field(default_factory=list)
    suffixes: list[Scored] = field(default_factory=list)
    context: list[int] | None = None  # a carried reset state's origin prompt ids (None: the batch prompt's own)


@dataclass
class ResetState:
    """A seed handed to a later generation (pipelined resets, `LagStep`): found from prompt ``origin.prompt`` of
    generation ``origin.generation`` as its ``seed_number``-th seed. Localized (``outcome`` set: the reset prefix,
    its sampling logprobs and thought spans, the record with h*) or, under a two-generation lag, not yet (``seed``
    kept for the localizer). Carries what its rows need wherever they are sampled: the origin prompt's ids, question
    and dataset columns (its suffixes are scored with them), the seed's random generator (``rng_key``) and the
    origin prompt's sampling seed."""

    origin: Origin
    seed_number: int
    context: list[int]
    question: str
    columns: Mapping | None
    rng_key: str
    sampling_seed: int | None = None
    seed: Scored | None = None
    outcome: SeedOutcome | None = None

    @property
    def ready(self) -> bool:
        return self.outcome is not None

    def localized(self, outcome: SeedOutcome) -> ResetState:
        """This state with its reset: the record names the origin, the seed itself is no longer kept."""
        outcome.record.origin = self.origin
        outcome.context = list(self.context)
        return ResetState(self.origin, self.seed_number, self.context, self.question, self.columns, self.rng_key,
                          self.sampling_seed, None, outcome)


@dataclass
class LagStep:
    """One generation of pipelined resets: a seed's suffixes are sampled ``lag`` generations after it was found
    (``lag`` 1: it is localized in its own generation; 2: localized in the next one's first wave).

    Inputs: ``ready``, the localized states that fill this process's reset slots in order (prompt p's slot g takes
    ``ready[p * k + g]``; slots beyond it get zero-weight fillers); ``seeds`` (lag 2), the previous generation's
    unlocalized seeds, localized now; ``prompt_indices``, each prompt's global batch index (default 0, 1, ...);
    ``generations_left``, how many generations follow this one (None: unknown): a state that would only be ready
    after the last generation is neither localized nor kept, and counted in ``discarded``.

    Outputs, written by the run in a fixed order: ``localized``, the states made ready in this generation (lag 2's
    carried seeds first, in their order, then this generation's seeds by prompt and seed number); ``found`` (lag 2),
    this generation's seeds, unlocalized."""

    lag: int
    generation: int
    ready: list[ResetState] = field(default_factory=list)
    seeds: list[ResetState] = field(default_factory=list)
    prompt_indices: Sequence[int] | None = None
    generations_left: int | None = None
    localized: list[ResetState] = field(default_factory=list)
    found: list[ResetState] = field(default_factory=list)
    discarded: int = 0

    def __post_init__(self):
        if self.lag not in (1, 2):
            raise ValueError(f"lag={self.lag}: a pipelined run lags its resets by 1 or 2 generations.")
        if any(not s.ready for s in self.ready) or any(s.ready for s in self.seeds):
            raise ValueError("LagStep.ready takes localized reset states, LagStep.seeds unlocalized ones.")
        if self.seeds and self.lag != 2:
            raise ValueError("only a two-generation lag carries unlocalized seeds.")

    def keeps_new(self) -> bool:
        """Whether this generation's seeds will be used: their suffixes fall ``lag`` generations later."""
        return self.generations_left is None or self.generations_left >= self.lag

    def localizes_carried(self) -> bool:
        return self.generations_left is None or self.generations_left >= 1

    def slots(self, p: int, k: int) -> list[ResetState]:
        return self.ready[p * k: (p + 1) * k]

    def prompt_index(self, p: int) -> int:
        return p if self.prompt_indices is None else self.prompt_indices[p]


@dataclass
class PromptGroups:
    """Algorithm 2's result for one prompt: the rows (base group first) and what it took to make them."""

    rows: list[TrainingRow]
    resets: list[ResetRecord] = field(default_factory=list)
    fallbacks: int = 0
    phase1_draws: int = 0
    unused_tokens: int = 0
    empty_seeds: int = 0  # incorrect phase-1 rollouts passed over as seeds because they have no thoughts
    first_draws: int = 0  # phase 1's first round of iid draws (`ResetAlgorithm.first_round`), seeds included
    first_draws_passed: int = 0
    phase1_draws_passed: int = 0  # of all phase1_draws (the seed search's extra draws too)
    seeds_found: int = 0  # pipelined resets: this prompt's seeds, handed to a later generation
    searches_ended: int = 0  # pipelined resets: seeds this prompt's first draws did not hold (no further search)
    # pipelined resets: tokens generated in this generation (this prompt's own seeds, the localization replies it
    # asked for); None without a lag, where the resets' records hold them
    seed_tokens: int | None = None
    localization_tokens: int | None = None


def choose_seeds(incorrect: Sequence[bool], split: Split, iid_base: bool = False) -> tuple[list[int], list[int]]:
    """Seeds = the first k incorrect rollouts in sampling order; base = the first G1 of the others (Algorithm 2),
    or with ``iid_base`` the first G1 rollouts, seeds among them included."""
    seeds = [i for i, bad in enumerate(incorrect) if bad][: split.num_reset_prefixes]
    if iid_base:
        return seeds, list(range(min(split.num_base_generations, len(incorrect))))
    rest = [i for i in range(len(incorrect)) if i not in seeds]
    return seeds, rest[: split.num_base_generations]


def reset_prefix(rollout: Rollout, reset_index: int) -> list[int]:
    """The seed's first ``reset_index - 1`` thoughts, as its exact sampled token ids (h*=1: empty)."""
    if not 1 <= reset_index <= rollout.num_thoughts:
        raise ValueError(f"reset index {reset_index} is outside 1..{rollout.num_thoughts} (the seed's thoughts).")
    return rollout.token_ids[: rollout.thought_spans[reset_index - 1][0]]


def _is_incorrect(scored: Scored, threshold: float) -> bool:
    return scored.reward < threshold  # NaN (unscorable) is never a seed


def _is_seed_candidate(scored: Scored, threshold: float) -> bool:
    """Incorrect, and with at least one thought to reset to."""
    return _is_incorrect(scored, threshold) and scored.rollout.num_thoughts > 0


def _row(scored: Scored, prefix_len: int, group: int, prefix_thoughts: int = 0) -> TrainingRow:
    return TrainingRow(
        completion_ids=list(scored.rollout.token_ids),
        prefix_len=prefix_len,
        group=group,
        rewards=list(scored.rewards),
        reward=scored.reward,
        num_thoughts=prefix_thoughts + scored.rollout.num_thoughts,
        stop_reason=scored.rollout.stop_reason,
        logprobs=None if scored.rollout.logprobs is None else list(scored.rollout.logprobs),
        thought_spans=list(scored.rollout.thought_spans),
    )


def _filler_rows(pool: list[Scored], count: int, group: int, num_rewards: int) -> list[TrainingRow]:
    """Rows that keep the batch shape for an empty seed slot: fully masked, zero weight, no reward."""
    rows = []
    for i in range(count):
        source = pool[i % len(pool)]
        ids = list(source.rollout.token_ids)
        lps = None if source.rollout.logprobs is None else list(source.rollout.logprobs)
        rows.append(
            TrainingRow(ids, len(ids), group, [math.nan] * num_rewards, math.nan, 0.0, source.rollout.num_thoughts,
                        logprobs=lps, thought_spans=list(source.rollout.thought_spans))
        )
    return rows


class SeedGenerators:
    """The generator of each seed's random draws (a random localizer's, and the random reset that replaces an
    unusable answer): ``generators(p, g)`` for prompt p's g-th seed (0-based, in sampling order).

    Each is derived from its prompt's generator (``rng``: one per prompt, or one shared by all) and the seed's
    number alone, so a seed's draws depend neither on the order in which seeds are found (the scheduler finds them
    as rollouts finish) nor on the other prompts of the batch."""

    def __init__(self, rng: random.Random | Sequence[random.Random] | None, num_prompts: int):
        rngs = [rng or random.Random(0)] * num_prompts if rng is None or isinstance(rng, random.Random) else rng
        if len(rngs) != num_prompts:
            raise ValueError(f"{len(rngs)} generators for {num_prompts} prompts: pass one per prompt, or one.")
        self.bases = [r.getrandbits(64) for r in rngs]
        self.made: dict[tuple[int, int], random.Random] = {}

    def key(self, prompt: int, seed: int) -> str:
        """What the seed's generator is seeded with (a carried seed is localized with ``random.Random(key)``)."""
        return f"{self.bases[prompt]}/{seed}"

    def __call__(self, prompt: int, seed: int) -> random.Random:
        if (prompt, seed) not in self.made:
            self.made[(prompt, seed)] = random.Random(self.key(prompt, seed))
        return self.made[(prompt, seed)]


ScoreFn = Callable[[list, list[list[int]]], list[list[float]]]
"""score(owners, completion_ids) -> rewards per reward function, one list per completion. An owner is the index of
a prompt of the batch, or, for a suffix of a carried reset state (pipelined resets), that `ResetState`: its rows are
scored with its origin prompt's columns."""


@dataclass
class ResetAlgorithm:
    """Runs Algorithm 2 for a batch of prompts.

    Args:
        split: G1 / k / G2.
        fmt: thought format (caps shared by seeds and suffixes).
        seed_budget: extra iid rollouts per prompt that may be drawn to find the seeds.
        success_threshold: a rollout whose aggregated reward is below it is incorrect.
        aggregate: per-function rewards -> one reward (default: sum, NaN-aware).
        sync_any: ``flag -> any process's flag``; keeps processes in the same number of sampling rounds.
        base_group: ``"algorithm2"``: the base group is the first G1 draws that are not seeds (Algorithm 2 as
            written; its pass rate is biased upward, see docs/concepts.md). ``"iid"``: the first G1 draws, a seed
            among them included, and phase 1 draws max(G1, k) rollouts before the seed search.
    """

    split: Split
    fmt: ThoughtFormat
    seed_budget: int = 8
    success_threshold: float = 1.0
    aggregate: Callable[[list[float]], float] | None = None
    sync_any: Callable[[bool], bool] = bool
    base_group: str = "algorithm2"

    def __post_init__(self):
        if self.base_group not in BASE_GROUP_MODES:
            raise ValueError(f"base_group={self.base_group!r} is not one of {list(BASE_GROUP_MODES)}: use "
                             "'algorithm2' (the paper's base group) or 'iid' (the first G1 draws).")

    @property
    def first_round(self) -> int:
        """Rollouts phase 1 draws per prompt whatever their rewards (and per round of the seed search): G1 + k,
        or max(G1, k) with the iid base group."""
        if self.base_group == "iid":
            return max(self.split.num_base_generations, self.split.num_reset_prefixes)
        return self.split.num_base_generations + self.split.num_reset_prefixes

    def _aggregate(self, rewards: list[float]) -> float:
        if self.aggregate is not None:
            return self.aggregate(rewards)
        finite = [r for r in rewards if not math.isnan(r)]
        return sum(finite) if finite else math.nan

    def _score(self, score: ScoreFn, owners: list[int], rollouts: list[Rollout], prefixes=None) -> list[Scored]:
        if prefixes is None:
            prefixes = [[] for _ in rollouts]
        completions = [p + r.token_ids for p, r in zip(prefixes, rollouts)]
        per_func = score(owners, completions) if completions else []
        if len(per_func) != len(completions):
            raise ValueError(f"score function returned {len(per_func)} results for {len(completions)} completions.")
        return [Scored(r, list(f), self._aggregate(list(f))) for r, f in zip(rollouts, per_func)]

    def phase1(self, contexts: list[list[int]], sampler: ThoughtSampler, score: ScoreFn) -> list[list[Scored]]:
        """Draws each prompt's iid rollouts: the first round at once, then more (within the budget) until k seeds."""
        k, first = self.split.num_reset_prefixes, self.first_round
        draws: list[list[Scored]] = [[] for _ in contexts]
        wanted = {i: first for i in range(len(contexts))}
        while self.sync_any(bool(wanted)):
            owners = [i for i, n in wanted.items() for _ in range(n)]
            rollouts = sampler.sample([contexts[i] for i in owners])
            for i, scored in zip(owners, self._score(score, owners, rollouts)):
                draws[i].append(scored)
            wanted = {}
            for i, drawn in enumerate(draws):
                found = sum(_is_seed_candidate(s, self.success_threshold) for s in drawn)
                left = first + self.seed_budget - len(drawn)
                if found < k and left > 0:
                    wanted[i] = min(left, first)
        return draws

    def run(
        self,
        contexts: list[list[int]],
        questions: list[str],
        sampler: ThoughtSampler,
        score: ScoreFn,
        localizer: Localizer,
        describe: Callable[[Rollout], list[str]],
        policy: TextPolicy | None = None,
        rng: random.Random | Sequence[random.Random] | None = None,
        rows: Sequence[Mapping] | None = None,
        lag: LagStep | None = None,
    ) -> list[PromptGroups]:
        """Algorithm 2 for every prompt; ``describe`` turns a seed into its thoughts' text for the localizer.

        ``lag`` (pipelined resets): the reset slots take the carried states of ``lag.ready`` instead of this
        generation's seeds, which are handed on through ``lag`` (see `LagStep`); None: Algorithm 2 exactly.

        ``rows`` (optional, one per prompt) are the prompts' dataset columns, handed to the localizer with
        each request (an oracle localizer grades the seed against them).

        ``rng`` is one generator for all prompts, or one per prompt (the trainer keys each by the prompt's global
        index, so that the reset choices do not depend on how prompts are spread over processes); see
        `SeedGenerators`. None stands for ``random.Random(0)``, so a run without one draws the same resets each time.
        """
        seed_rng = SeedGenerators(rng, len(contexts))
        split = self.split
        self.check_lag(lag, len(contexts))
        draws = self.phase1(contexts, sampler, score)
        if lag is not None:
            return self._run_lagged(lag, draws, contexts, questions, sampler, score, localizer, describe, policy,
                                    seed_rng, rows)
        seeds = [(i, drawn[j]) for i, drawn in enumerate(draws) for j in self.seeds_of(drawn)]
        outcomes: list[list[SeedOutcome]] = [[] for _ in contexts]
        if split.is_grpo:
            return [self.prompt_groups(drawn, []) for drawn in draws]
        requests, found = [], [0] * len(contexts)  # found[i]: prompt i's seeds so far, numbering its seeds
        for i, s in seeds:
            requests.append(self.localization_request(questions[i], s, describe, None if rows is None else rows[i],
                                                      seed_rng(i, found[i])))
            found[i] += 1
        answers = localizer.locate(requests, policy, requests[0].rng if requests else random.Random(0))
        if len(answers) != len(requests):
            raise ValueError(f"localizer {localizer.name!r} answered {len(answers)} of {len(requests)} requests.")
        for (i, seed), answer, request in zip(seeds, answers, requests):
            outcomes[i].append(self.reset_of(seed, answer, request.rng))
        suffix_requests = [request for i, outcome in ((i, o) for i, per in enumerate(outcomes) for o in per)
                           for request in self.suffix_requests(contexts[i], outcome)]
        suffixes = sampler.sample([r.context for r in suffix_requests], [r.start_thoughts for r in suffix_requests],
                                  [r.token_budget for r in suffix_requests])
        owners = [i for i, per in enumerate(outcomes) for o in per for _ in range(split.num_reset_generations)]
        prefixes = [o.prefix for per in outcomes for o in per for _ in range(split.num_reset_generations)]
        scored = iter(self._score(score, owners, suffixes, prefixes))
        for per in outcomes:
            for outcome in per:
                outcome.suffixes = [next(scored) for _ in range(split.num_reset_generations)]
        return [self.prompt_groups(drawn, per) for drawn, per in zip(draws, outcomes)]

    def _run_lagged(self, lag, draws, contexts, questions, sampler, score, localizer, describe, policy, seed_rng,
                    rows) -> list[PromptGroups]:
        """`run` under a lag, phase by phase: one localization call (lag 2's carried seeds, then lag 1's new seeds),
        then the carried states' suffixes."""
        k, g2 = self.split.num_reset_prefixes, self.split.num_reset_generations
        targets = self.carried_seed_targets(lag)
        for p, drawn in enumerate(draws):
            for g, j in enumerate(self.seeds_of(drawn)):
                state = self.new_state(lag, p, g, drawn[j], contexts[p], questions[p], None if rows is None else
                                       rows[p], seed_rng.key(p, g), None)
                if not lag.keeps_new():
                    lag.discarded += 1
                elif lag.lag == 1:
                    targets.append((state, seed_rng(p, g)))
                else:
                    lag.found.append(state)
        requests = [self.localization_request(s.question, s.seed, describe, s.columns, r) for s, r in targets]
        answers = localizer.locate(requests, policy, requests[0].rng) if requests else []
        if len(answers) != len(requests):
            raise ValueError(f"localizer {localizer.name!r} answered {len(answers)} of {len(requests)} requests.")
        lag.localized.extend(s.localized(self.reset_of(s.seed, a, r)) for (s, r), a in zip(targets, answers))
        outcomes = [[self.carried_outcome(s) for s in lag.slots(p, k)] for p in range(len(contexts))]
        carried = [(s, o) for p in range(len(contexts)) for s, o in zip(lag.slots(p, k), outcomes[p])]
        requests = [r for s, o in carried for r in self.suffix_requests(s.context, o)]
        suffixes = sampler.sample([r.context for r in requests], [r.start_thoughts for r in requests],
                                  [r.token_budget for r in requests])
        scored = iter(self._score(score, [s for s, _ in carried for _ in range(g2)], suffixes,
                                  [o.prefix for _, o in carried for _ in range(g2)]))
        for _, outcome in carried:
            outcome.suffixes = [next(scored) for _ in range(g2)]
        return self.count_localizations(lag, [self.prompt_groups(drawn, per, lagged=True)
                                              for drawn, per in zip(draws, outcomes)])

    # ------------------------------------------------------------------ the steps, shared with the scheduler
    def check_lag(self, lag: LagStep | None, num_prompts: int) -> None:
        if lag is None:
            return
        if self.split.is_grpo:
            raise ValueError("pipelined resets with num_reset_prefixes=0: GRPO has no resets to carry. Use "
                             "num_reset_prefixes >= 1, or no lag.")
        if self.seed_budget:
            raise ValueError(f"seed_budget={self.seed_budget} with pipelined resets: a lagged run draws no "
                             "seed-search rounds (a prompt whose first draws hold no failure hands on no seed). Set "
                             "seed_budget=0.")
        if len(lag.ready) > num_prompts * self.split.num_reset_prefixes:
            raise ValueError(f"{len(lag.ready)} carried reset states for {num_prompts} prompts x "
                             f"{self.split.num_reset_prefixes} reset slots: hand a process no more than its slots.")

    @staticmethod
    def new_state(lag: LagStep, p: int, g: int, seed: Scored, context, question, row, rng_key: str,
                  sampling_seed: int | None) -> ResetState:
        """Prompt p's g-th seed of this generation, to be handed on."""
        return ResetState(Origin(lag.generation, lag.prompt_index(p)), g, list(context), question, row, rng_key,
                          sampling_seed, seed)

    @staticmethod
    def carried_seed_targets(lag: LagStep) -> list[tuple[ResetState, random.Random]]:
        """Lag 2's carried seeds to localize now, each with its own generator (none in the last generation)."""
        if lag.localizes_carried():
            return [(s, random.Random(s.rng_key)) for s in lag.seeds]
        lag.discarded += len(lag.seeds)
        return []

    @staticmethod
    def count_localizations(lag: LagStep, groups: list[PromptGroups]) -> list[PromptGroups]:
        """Under a lag, each localization reply decoded in this generation counts toward the prompt at its origin
        prompt's place in this process's block (lag 2's carried seeds come from the same block)."""
        first = lag.prompt_index(0) if groups else 0
        for state in lag.localized:
            groups[(state.origin.prompt - first) % len(groups)].localization_tokens += \
                state.outcome.record.localization_tokens
        return groups

    @staticmethod
    def carried_outcome(state: ResetState) -> SeedOutcome:
        """A fresh outcome (no suffixes yet) for a carried, localized state; the state itself is left unchanged."""
        o = state.outcome
        record = dataclasses.replace(o.record)
        return SeedOutcome(record, list(o.prefix), None if o.prefix_logprobs is None else list(o.prefix_logprobs),
                           list(o.prefix_spans), [], list(state.context))

    def seeds_of(self, drawn: list[Scored]) -> list[int]:
        """The seeds' positions among a prompt's phase-1 draws (the first k seed candidates in sampling order)."""
        return self._seeds_and_base(drawn)[0]

    def _seeds_and_base(self, drawn: list[Scored]) -> tuple[list[int], list[int]]:
        return choose_seeds([_is_seed_candidate(s, self.success_threshold) for s in drawn], self.split,
                            iid_base=self.base_group == "iid")

    def is_seed_candidate(self, scored: Scored) -> bool:
        return _is_seed_candidate(scored, self.success_threshold)

    @staticmethod
    def localization_request(question: str, seed: Scored, describe, row=None, rng=None) -> LocalizationRequest:
        return LocalizationRequest(question, describe(seed.rollout), row, rng)

    def reset_of(self, seed: Scored, answer: Localization | None, rng: random.Random) -> SeedOutcome:
        """The seed's reset: the localizer's index (a random one, counted, when the answer is unusable), its record,
        and the reset prefix with its sampling logprobs."""
        index, failed = resolve_reset_index(answer or Localization(None), seed.rollout.num_thoughts, rng)
        record = ResetRecord(seed.rollout.num_thoughts, index, failed, answer.tokens if answer else 0,
                             answer.reply if answer else None, len(seed.rollout.token_ids))
        prefix = reset_prefix(seed.rollout, index)
        seed_lps = seed.rollout.logprobs
        return SeedOutcome(record, prefix, None if seed_lps is None else list(seed_lps[: len(prefix)]),
                           list(seed.rollout.thought_spans[: index - 1]))

    def suffix_requests(self, context: list[int], outcome: SeedOutcome) -> list[DecodeRequest]:
        """The G2 suffixes of one reset state (the prompt plus the reset prefix)."""
        budget = self.fmt.max_completion_tokens - len(outcome.prefix)
        return [DecodeRequest(context + outcome.prefix, outcome.record.reset_index - 1, budget)
                for _ in range(self.split.num_reset_generations)]

    def prompt_groups(self, drawn: list[Scored], outcomes: list[SeedOutcome], lagged: bool = False) -> PromptGroups:
        """One prompt's rows from its phase-1 draws and its seeds' resets: the base group, then each seed's
        shared-prefix group, then zero-weight filler groups for the seed slots left empty. ``lagged``: the resets
        are carried states (their rows name their origin), and this prompt's own seeds are counted as handed on."""
        split = self.split
        seed_idx, base_idx = self._seeds_and_base(drawn)
        rows = [_row(drawn[j], 0, BASE_GROUP) for j in base_idx]
        used = set(seed_idx) | set(base_idx)
        unused = sum(len(s.rollout.token_ids) for j, s in enumerate(drawn) if j not in used)
        empty = sum(_is_incorrect(s, self.success_threshold) and not s.rollout.num_thoughts for s in drawn)
        first = drawn[: self.first_round]
        passed = sum(s.reward >= self.success_threshold for s in first)  # NaN never passes
        result = PromptGroups(rows, phase1_draws=len(drawn), unused_tokens=unused, empty_seeds=empty,
                              first_draws=len(first), first_draws_passed=passed,
                              phase1_draws_passed=sum(s.reward >= self.success_threshold for s in drawn))
        if split.is_grpo:
            return result
        if lagged:
            result.seeds_found = len(seed_idx)
            result.searches_ended = split.num_reset_prefixes - len(seed_idx)
            result.seed_tokens = sum(len(drawn[j].rollout.token_ids) for j in seed_idx)
            result.localization_tokens = 0
        for group, outcome in enumerate(outcomes, start=1):
            result.resets.append(outcome.record)
            for suffix in outcome.suffixes:
                row = _row(suffix, 0, group, outcome.record.reset_index - 1)
                row.completion_ids = outcome.prefix + row.completion_ids
                row.prefix_len = len(outcome.prefix)
                row.thought_spans = outcome.prefix_spans + [
                    (start + row.prefix_len, end + row.prefix_len) for start, end in row.thought_spans]
                if row.logprobs is not None and outcome.prefix_logprobs is not None:
                    row.logprobs = outcome.prefix_logprobs + row.logprobs
                else:
                    row.logprobs = None
                if outcome.context is not None:
                    row.origin, row.context = outcome.record.origin, list(outcome.context)
                rows.append(row)
        missing = split.num_reset_prefixes - len(outcomes)
        if missing:
            result.fallbacks = missing
            num_rewards = len(drawn[0].rewards)  # a prompt always has its phase-1 draws
            for group in range(len(outcomes) + 1, split.num_reset_prefixes + 1):
                rows.extend(_filler_rows(drawn, split.num_reset_generations, group, num_rewards))
        return result
