"""Configurations for the reset trainers: `GRPOConfig` plus the reset-specific settings."""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import GRPOConfig

from . import options
from .comparison import DEFAULT_REPAIR_TEMPLATE, ESTIMATORS, STATE_KEYS, Repairer
from .localizers import CODE_LOCALIZATION_TEMPLATE, DEFAULT_LOCALIZATION_TEMPLATE, LOCALIZERS
from .resets import BASE_GROUP_MODES, Split
from .thoughts import ANSWER_FORMATS, CODE_ROLLOUT_TEMPLATE, DEFAULT_DELIMITER, DEFAULT_ROLLOUT_TEMPLATE


@dataclass
class ResetConfig(GRPOConfig):
    r"""
    Configuration shared by [`SRPOTrainer`] and [`RRPOTrainer`]. Every [`~trl.GRPOConfig`] field works as in
    GRPO; the fields below are added.

    > Group split (Algorithm 2)

    num_base_generations (`int`, defaults to `4`):
        iid rollouts from the prompt in the base group (the paper's G1). May be 0 (the 1x8 split), not 1 (a
        group of one teaches nothing).
    num_reset_prefixes (`int`, defaults to `1`):
        seeds (failed rollouts) per prompt, each giving one reset state (the paper's k). 0 turns resets off:
        plain GRPO on the base rollouts with the same thought sampler, the like-for-like baseline.
    num_reset_generations (`int`, defaults to `4`):
        suffixes sampled from each reset state (the paper's G2); at least 2 when `num_reset_prefixes > 0`. A
        split is named `{num_reset_prefixes}x{num_reset_generations}`, e.g. 1x4.
    num_generations (`int` or `None`, defaults to `None`):
        Rows per prompt. Derived as `num_base_generations + num_reset_prefixes * num_reset_generations` when
        unset; when set it must equal that sum.
    seed_budget (`int`, defaults to `8`):
        Extra iid rollouts per prompt that may be drawn to find the `num_reset_prefixes` seeds. A prompt that still lacks a seed
        falls back to GRPO on its base group (counted in `resets/fallback_rate`).
    success_threshold (`float`, defaults to `1.0`):
        A rollout is incorrect (a seed candidate) when its summed, weighted reward is below this value.
    base_group (`str`, defaults to `"algorithm2"`):
        `"algorithm2"`: the paper's base group, the first `num_base_generations` phase-1 draws that are not seeds
        (its expected pass rate sits above the policy's; see docs/concepts.md). `"iid"`: the first
        `num_base_generations` draws in sampling order, an iid sample; the seed is the first failure among them
        and stays a base row too, and more draws (within `seed_budget`) are made only when they hold fewer than
        `num_reset_prefixes` failures: phase 1 starts with max(num_base_generations, num_reset_prefixes) draws, not
        their sum.

    > Pipelined resets

    reset_lag (`int`, defaults to `0`):
        Generations between finding a seed and sampling its suffixes. `0`: Algorithm 2 exactly. `1`: a seed is
        found and localized in its generation, and its suffixes are sampled in the next one, by the updated policy,
        in the same decoding wave as that generation's new prompts. `2`: the localization moves to the next
        generation's first wave too, and the suffixes to the one after. The first generations' reset slots are
        zero-weight fillers; there is no seed search (`seed_budget=0`); see docs/concepts.md.
    reset_max_age (`int`, defaults to `2`):
        With `reset_lag > 0`: a carried reset state older than this many generations when its slot comes is
        dropped (counted in `resets/dropped_states`). At least `reset_lag`.

    > Thought MDP

    thought_delimiter (`str`, defaults to `"</thought>"`):
        Text that closes a thought.
    thought_split (`str`, defaults to `"delimiter"`):
        `"delimiter"`: thoughts end at `thought_delimiter`. `"paragraph"`: thoughts end at a blank line, for
        models that never write the delimiter.
    answer_format (`str`, defaults to `"boxed"`):
        What ends a rollout as answered. `"boxed"`: a thought that holds a closed `\\boxed{...}` (math).
        `"code"`: a closed fenced code block, the program (LiveCodeBench); a box never ends it. With `"code"`,
        `rollout_template` and `localization_template` left at the package's math instructions become its code
        instructions (the program whole in the last step; a program that fails its tests).
    max_thoughts (`int`, defaults to `20`):
        Thoughts per rollout, a reset prefix's thoughts included.
    max_thought_tokens (`int`, defaults to `256`):
        Tokens per thought; a longer thought is cut there and the next one begins.
    share_prefill (`bool`, defaults to `True`):
        Without vLLM: rows with the same context (a prompt's rollouts, a reset prefix's suffixes) share one
        prefill of it. Decoding is unchanged; `False` encodes each row's context separately.
    compact_decoding (`bool`, defaults to `True`):
        Without vLLM: decode with the sampler's own loop, which drops each rollout from the batch (and the KV
        cache) as soon as it stops, so the work follows the tokens drawn; `False` uses transformers'
        `generate`, which computes every row until the batch's longest ends. Same logits processors and
        draws; configs with per-row processors (repetition penalty, minimum lengths) use `generate`.
    per_row_sampling_seed (`bool`, defaults to `False`):
        Draw each row's tokens from a random generator of its own, seeded from `seed`, the generation, the prompt's
        index in the global batch and the row's place in the prompt's groups (phase-1 draw, localization reply,
        suffix of a reset), so that a sampled row does not depend on the rows decoded beside it nor on the
        process: a run samples the same rows on 1 process as on 2, evaluation rollouts included (see
        docs/scaling.md). The compact decoder then draws one multinomial per row and step; vLLM in colocate mode
        gets one seed per request. Refused where it
        cannot be honoured: `compact_decoding=False`, ZeRO-3, settings the compact decoder hands to `generate`,
        vLLM server mode, `generation_kwargs["seed"]`, sampled repair replies, localizers that need the policy
        for a whole batch at once.
    merge_adapter_for_sampling (`bool`, defaults to `True`):
        Without vLLM: sample from the policy in eval mode (no dropout, as vLLM samples) with its LoRA adapters
        merged into the base weights, one matmul per layer instead of three. The base weights are restored bit
        for bit after sampling. Adapters that cannot be merged exactly (DoRA, quantized or tied base weights)
        are sampled unmerged, with a warning; off under ZeRO-3 and FSDP, whose weights are sharded.
    rollout_template (`str` or `None`, defaults to the package's thought-by-thought instruction):
        Wraps each question; placeholders `{question}` and `{delimiter}`. `None` uses the dataset's prompts as
        they are (for prompts that already carry the instruction).

    > Localization

    localizer (`str`, defaults to `"self"` for SRPO and `"random"` for RRPO):
        `"self"`, `"random"`, or `"oracle"` (the arithmetic task's exact step checker, see [`OracleLocalizer`]);
        a `localizer=` object passed to the trainer takes precedence.
    localization_template (`str`, defaults to the package's localization instruction):
        Placeholders `{question}`, `{steps}` (the seed as `Step 1: ...` lines) and `{num_steps}`.
    localization_max_tokens (`int`, defaults to `32`):
        Most tokens of one localization reply.
    localization_temperature (`float`, defaults to `0.0`):
        Sampling temperature of the localization reply; 0 decodes greedily.

    > Comparison-based credit (see `trl_resets.comparison` and docs/credit.md)

    credit (`str`, defaults to `"uniform"`):
        How a row's advantage is spread over its tokens. `"uniform"`: every token of the row carries it (GRPO's and
        the paper's credit). `"diff"`: onto the thoughts that no rollout of the group with another reward shares.
        `"state"`: per thought, from a trie of the group's rollouts by thought key. `"repair"`: the policy writes a
        minimal correction of each failed rollout beside a correct one of its group, and the failed rollout's credit
        goes to the thoughts it edits (`"diff"` where the reply does not parse). Our own instantiation of IBPO's
        description; its exact estimator is not public.
    state_key (`str`, defaults to `"text"`):
        The key thoughts are compared by. `"text"`: a thought's text with surrounding whitespace stripped. `"arithmetic"`: the value the thought
        computes (`trl_resets.tasks.arithmetic.thought_value`, registered by that task); a task registers its own
        with `trl_resets.comparison.register_state_key`. A `state_key=` callable (thought text -> hashable
        key) passed to the trainer takes precedence.
    shared_thought_weight (`float`, defaults to `0.0`):
        With `"diff"` and `"repair"`: the weight, in [0, 1], of the thoughts a reference shares (or a correction
        leaves unedited) against 1 for the others; a row's total credit stays GRPO's. 1 is uniform credit.
    credit_groups (`str`, defaults to `"base"`):
        The groups the estimator applies to: `"base"` (the base group; shared-prefix groups already localize by
        construction and keep uniform credit) or `"all"` (every group). In GRPO mode (`num_reset_prefixes=0`) the
        base group is every row.
    repair_template (`str`, defaults to the package's compare-and-correct instruction):
        Placeholders `{question}`, `{reference}` (the correct rollout as `Step 1: ...` lines), `{steps}` (the failed
        one) and `{num_steps}`. The reply must list the corrected steps as `Step N: ...` lines.
    repair_max_tokens (`int`, defaults to `256`):
        Most tokens of one repair reply.
    repair_temperature (`float`, defaults to `0.0`):
        Sampling temperature of the repair reply; 0 decodes greedily.

    > Loss

    clip_surrogate (`bool`, defaults to `False`):
        `False`: the paper's loss, per row the mean over active tokens of `-A * pi / pi_old` (pi_old, detached, is
        the policy that sampled the row; on an on-policy step its gradient is that of `-A * log pi`), then the mean
        over the rows that carry loss. `True`: PPO's clipped ratio (`epsilon`, `epsilon_high`, `delta`) in the same
        aggregation and on the same masks.
    loss_type (`str`, defaults to `"grpo"`):
        Only `"grpo"` is accepted: the paper's aggregation, each row's mean over its active tokens, then the mean
        over the rows that carry loss in the whole generation batch (all processes and micro-batches of it, so a
        micro-batch's share does not depend on how many of its rows are fallback fillers). TRL's `"grpo"` divides
        by the rows of each micro-batch instead; the two agree when every row carries loss.

    > Forward passes

    pack_shared_prefixes (`bool`, defaults to `False`):
        Forward the tokens a group's rows share (the prompt; a reset group's prompt and prefix) once, in the
        old-policy, reference and update passes: each group is one sequence under a 4D attention mask in which a
        row's continuation sees the shared tokens and itself (`trl_resets.packing`). A generation's micro-batches
        keep each group whole where it fits: where a generation spans several optimizer steps
        (`steps_per_generation` > `gradient_accumulation_steps`), TRL's shuffle of rows becomes a shuffle of groups,
        so a step trains other rows than the unpacked run's (the same rows when a generation is one step). The
        log-probabilities, entropies and loss of a micro-batch are those of its unpacked rows (within float
        rounding). SDPA and eager attention compute a pack's
        whole masked square, so a batch is packed only where that and its tokens cost less than the unpacked rows
        (`trl_resets.packing.plan`), which can cut a group into smaller packs or leave it unpacked. Needs
        `attn_implementation="sdpa"` or `"eager"`; models that cannot take the mask (recurrent layers, sliding
        windows shorter than the rows, FlashAttention-2, MoE load-balancing loss, multimodal inputs), and runs with
        sharded weights (ZeRO-3, FSDP), are forwarded unpacked, with one warning naming why.
    """

    loss_type: str = field(
        default="grpo", metadata={"help": "Only 'grpo' (per-row mean, then mean over the rows that carry loss)."}
    )

    num_generations: int | None = field(
        default=None,
        metadata={"help": "Rows per prompt; derived from the split when unset, checked against it when set."},
    )
    num_base_generations: int = field(default=4, metadata={"help": "iid rollouts in the base group (may be 0)."})
    num_reset_prefixes: int = field(default=1, metadata={"help": "Seeds, hence reset states, per prompt."})
    num_reset_generations: int = field(default=4, metadata={"help": "Suffixes sampled from each reset state."})
    seed_budget: int = field(
        default=8, metadata={"help": "Extra iid rollouts per prompt that may be drawn to find the seeds."}
    )
    success_threshold: float = field(
        default=1.0, metadata={"help": "A rollout whose reward is below this value is incorrect."}
    )
    base_group: str = field(
        default="algorithm2",
        metadata={"help": "'algorithm2' (the first non-seed draws) or 'iid' (the first draws, the seed included).",
                  "choices": list(BASE_GROUP_MODES)},
    )
    reset_lag: int = field(
        default=0, metadata={"help": "Generations between a seed and its suffixes: 0 (Algorithm 2), 1 or 2.",
                             "choices": [0, 1, 2]},
    )
    reset_max_age: int = field(
        default=2, metadata={"help": "With reset_lag > 0: drop carried reset states older than this (generations)."}
    )
    thought_delimiter: str = field(default=DEFAULT_DELIMITER, metadata={"help": "Text that closes a thought."})
    thought_split: str = field(
        default="delimiter",
        metadata={"help": "'delimiter' or 'paragraph' (thoughts end at a blank line).", "choices": ["delimiter", "paragraph"]},
    )
    answer_format: str = field(
        default="boxed",
        metadata={"help": "'boxed' (math) or 'code' (a closed fenced code block ends a rollout).",
                  "choices": list(ANSWER_FORMATS)},
    )
    max_thoughts: int = field(default=20, metadata={"help": "Thoughts per rollout, prefix included."})
    max_thought_tokens: int = field(default=256, metadata={"help": "Tokens per thought."})
    share_prefill: bool = field(
        default=True, metadata={"help": "Without vLLM: encode a context shared by several rows once."}
    )
    compact_decoding: bool = field(
        default=True, metadata={"help": "Without vLLM: drop stopped rollouts from the decoding batch at once."}
    )
    per_row_sampling_seed: bool = field(
        default=False,
        metadata={"help": "Draw each row's tokens from its own generator, so runs do not depend on the world size."},
    )
    merge_adapter_for_sampling: bool = field(
        default=True, metadata={"help": "Without vLLM: sample in eval mode with LoRA adapters merged (exact restore)."}
    )
    rollout_template: str | None = field(
        default=DEFAULT_ROLLOUT_TEMPLATE,
        metadata={"help": "Wraps each question; placeholders {question} and {delimiter}. None: prompts as given."},
    )
    localizer: str = field(
        default="self", metadata={"help": "'self', 'random' or 'oracle'.", "choices": list(LOCALIZERS)}
    )
    localization_template: str = field(
        default=DEFAULT_LOCALIZATION_TEMPLATE,
        metadata={"help": "Localization prompt; placeholders {question}, {steps}, {num_steps}."},
    )
    localization_max_tokens: int = field(default=32, metadata={"help": "Most tokens of a localization reply."})
    localization_temperature: float = field(
        default=0.0, metadata={"help": "Temperature of the localization reply (0: greedy)."}
    )
    credit: str = field(
        default="uniform",
        metadata={"help": "Per-token credit: 'uniform', 'diff', 'state' or 'repair'.",
                  "choices": list(ESTIMATORS)},
    )
    state_key: str = field(
        default="text", metadata={"help": "Thought key: 'text', 'arithmetic' or one a task registered."}
    )
    shared_thought_weight: float = field(
        default=0.0, metadata={"help": "Weight in [0, 1] of shared (diff) or unedited (repair) thoughts."}
    )
    credit_groups: str = field(
        default="base", metadata={"help": "Groups the credit estimator applies to: 'base' or 'all'.",
                                  "choices": ["base", "all"]}
    )
    repair_template: str = field(
        default=DEFAULT_REPAIR_TEMPLATE,
        metadata={"help": "Repair prompt; placeholders {question}, {reference}, {steps}, {num_steps}."},
    )
    repair_max_tokens: int = field(default=256, metadata={"help": "Most tokens of a repair reply."})
    repair_temperature: float = field(default=0.0, metadata={"help": "Temperature of the repair reply (0: greedy)."})
    clip_surrogate: bool = field(
        default=False, metadata={"help": "Clip the importance ratio as PPO does (same masks, same aggregation)."}
    )
    pack_shared_prefixes: bool = field(
        default=False, metadata={"help": "Forward each group's shared tokens once (prompt, reset prefix)."}
    )

    def __post_init__(self):
        Split(self.num_base_generations, self.num_reset_prefixes, self.num_reset_generations)  # the split's rules
        if self.answer_format not in ANSWER_FORMATS:
            raise ValueError(f"answer_format={self.answer_format!r} is not one of {list(ANSWER_FORMATS)}.")
        split_sum = self.num_base_generations + self.num_reset_prefixes * self.num_reset_generations
        if self.num_generations is None:
            self.num_generations = split_sum
        elif self.num_generations != split_sum:
            raise ValueError(
                f"num_generations={self.num_generations} does not match the split: num_base_generations "
                f"({self.num_base_generations}) + num_reset_prefixes ({self.num_reset_prefixes}) x "
                f"num_reset_generations ({self.num_reset_generations}) = {split_sum}. Leave num_generations unset "
                "to derive it, or change the split."
            )
        if self.max_completion_length is None:
            raise ValueError("max_completion_length must be set: it is the token budget of a rollout.")
        if self.answer_format == "code":
            if self.rollout_template == DEFAULT_ROLLOUT_TEMPLATE:
                self.rollout_template = CODE_ROLLOUT_TEMPLATE
            if self.localization_template == DEFAULT_LOCALIZATION_TEMPLATE:
                self.localization_template = CODE_LOCALIZATION_TEMPLATE
        if self.base_group not in BASE_GROUP_MODES:
            raise ValueError(f"base_group={self.base_group!r} is not one of {list(BASE_GROUP_MODES)}: use "
                             "'algorithm2' (the paper's base group) or 'iid' (the first draws, the seed included).")
        super().__post_init__()
        local_rows = self.per_device_train_batch_size * self.steps_per_generation
        if local_rows % self.num_generations != 0:
            raise ValueError(
                f"each process generates {local_rows} rows per step (per_device_train_batch_size="
                f"{self.per_device_train_batch_size} x steps_per_generation={self.steps_per_generation}), which is not "
                f"a multiple of num_generations={self.num_generations}: a prompt's rows would be split across "
                "processes, but the reset groups of a prompt are built on one process. Make "
                "per_device_train_batch_size x steps_per_generation (or gradient_accumulation_steps) a multiple of "
                f"{self.num_generations}."
            )
        options.check(self)
        self._check_reset_lag()
        self._check_credit_options()
        if self.per_row_sampling_seed:
            self._check_per_row_sampling_seed()

    def _check_per_row_sampling_seed(self):
        """Settings under which some rows would still be drawn from a shared generator fail here, naming the fix."""
        kwargs = self.generation_kwargs if isinstance(self.generation_kwargs, dict) else {}
        refused = None
        if self.use_vllm and self.vllm_mode == "server":
            refused = ("vllm_mode='server': the server applies one seed to every prompt of a call. Use "
                       "vllm_mode='colocate'")
        elif self.use_vllm and kwargs.get("seed") is not None:
            refused = ("generation_kwargs['seed'] sets the vLLM seeds too (one per row and process). Unset it; the "
                       "row seeds derive from `seed`")
        elif not self.use_vllm and not self.compact_decoding:
            refused = ("compact_decoding=False: transformers' generate draws every row from one generator. Set "
                       "compact_decoding=True")
        elif self.credit == "repair" and self.repair_temperature > 0:
            refused = (f"credit='repair' with repair_temperature={self.repair_temperature}: repair replies are drawn "
                       "from the process's generator. Set repair_temperature=0 (greedy)")
        if refused:
            raise ValueError(f"per_row_sampling_seed=True cannot be honoured with {refused}, or set "
                             "per_row_sampling_seed=False.")

    def _check_reset_lag(self):
        """Pipelined resets: the combinations that are built and tested pass; every other one fails here, naming
        the fix."""
        if self.reset_lag not in (0, 1, 2):
            raise ValueError(f"reset_lag={self.reset_lag!r} is not one of [0, 1, 2]: 0 is Algorithm 2, 1 and 2 lag "
                             "the resets by that many generations.")
        if self.reset_lag == 0:
            return
        lag = f"reset_lag={self.reset_lag}"
        rules = [
            (self.num_reset_prefixes == 0, ("num_reset_prefixes=0: GRPO has no resets to carry. Set reset_lag=0, or "
             "num_reset_prefixes >= 1")),
            (self.reset_max_age < self.reset_lag, (f"reset_max_age={self.reset_max_age}: every carried state would be "
             f"dropped before its slot comes. Set reset_max_age >= {self.reset_lag}")),
            (self.seed_budget != 0, (f"seed_budget={self.seed_budget}: a lagged run draws no seed-search rounds (a "
             "prompt whose first draws hold no failure hands on no seed). Set seed_budget=0")),
            (self.credit != "uniform", (f"credit={self.credit!r}: comparison-based credit reads each row's question "
             "from its batch prompt, which a carried row does not share. Set credit='uniform', or reset_lag=0")),
            (self.steps_per_generation % self.gradient_accumulation_steps != 0,
             (f"steps_per_generation={self.steps_per_generation}, not a multiple of gradient_accumulation_steps="
             f"{self.gradient_accumulation_steps}: a generation would end inside an optimizer step, and the run's "
             "number of generations, which decides when the last one comes, would depend on where epochs end. Set "
             "steps_per_generation to a multiple of gradient_accumulation_steps (or leave it unset), or "
             "reset_lag=0")),
        ]
        for refused, why in rules:
            if refused:
                raise ValueError(f"{lag} cannot be honoured with {why}.")

    def _check_credit_options(self):
        """Comparison-based credit settings that cannot work fail here, each naming the fix."""
        choices = {"localizer": LOCALIZERS, "credit": ESTIMATORS, "state_key": tuple(STATE_KEYS),
                   "credit_groups": ("base", "all")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} is not one of {list(allowed)}.")
        if not 0.0 <= self.shared_thought_weight <= 1.0:
            raise ValueError(
                f"shared_thought_weight={self.shared_thought_weight} is outside [0, 1]: it weighs shared thoughts "
                "against 1 for the others (0: all credit on the differing thoughts, 1: uniform credit)."
            )
        if self.credit != "uniform" and self.credit_groups == "base" and self.num_base_generations == 0:
            raise ValueError(
                f"credit={self.credit!r} with credit_groups='base' and num_base_generations=0: there is no base "
                "group to apply it to. Set credit_groups='all', or give the split a base group."
            )
        if self.repair_max_tokens < 1:
            raise ValueError(f"repair_max_tokens={self.repair_max_tokens}: a repair reply needs at least 1 token.")
        if self.repair_temperature < 0:
            raise ValueError(f"repair_temperature={self.repair_temperature} is negative; use 0 (greedy) or more.")
        Repairer(self.repair_template, self.repair_max_tokens)  # a broken template or budget fails now


@dataclass
class SRPOConfig(ResetConfig):
    __doc__ = "Configuration for [`SRPOTrainer`] (self-localized resets). " + (ResetConfig.__doc__ or "")


@dataclass
class RRPOConfig(ResetConfig):
    __doc__ = "Configuration for [`RRPOTrainer`] (random resets). " + (ResetConfig.__doc__ or "")

    localizer: str = field(
        default="random", metadata={"help": "'self', 'random' or 'oracle'.", "choices": list(LOCALIZERS)}
    )
