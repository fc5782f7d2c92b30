"""Configurations for the reset trainers: `GRPOConfig` plus the reset-specific settings."""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import GRPOConfig

from .localizers import DEFAULT_LOCALIZATION_TEMPLATE
from .thoughts import DEFAULT_DELIMITER, DEFAULT_ROLLOUT_TEMPLATE


@dataclass
class ResetConfig(GRPOConfig):
    r"""
    Configuration shared by [`SRPOTrainer`] and [`RRPOTrainer`]. Every [`~trl.GRPOConfig`] field works as in
    GRPO; the fields below are added.

    > Group split (Algorithm 2)

    num_base_generations (`int`, defaults to `4`):
        G1: iid rollouts from the prompt in the base group. May be 0 (the 1x8 split).
    num_reset_prefixes (`int`, defaults to `1`):
        k: seeds (failed rollouts) per prompt, each giving one reset state. 0 turns resets off: plain GRPO on
        the G1 base rollouts with the same thought sampler, the like-for-like baseline.
    num_reset_generations (`int`, defaults to `4`):
        G2: suffixes sampled from each reset state.
    num_generations (`int` or `None`, defaults to `None`):
        Rows per prompt. Derived as G1 + k * G2 when unset; when set it must equal that sum.
    seed_budget (`int`, defaults to `8`):
        Extra iid rollouts per prompt that may be drawn to find the k seeds. A prompt that still lacks a seed
        falls back to GRPO on its base group (counted in `resets/fallback_rate`).
    success_threshold (`float`, defaults to `1.0`):
        A rollout is incorrect (a seed candidate) when its summed, weighted reward is below this value.

    > Thought MDP

    thought_delimiter (`str`, defaults to `"</thought>"`):
        Text that closes a thought.
    thought_split (`str`, defaults to `"delimiter"`):
        `"delimiter"`: thoughts end at `thought_delimiter`. `"paragraph"`: thoughts end at a blank line, for
        models that never write the delimiter.
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

    > Loss

    clip_surrogate (`bool`, defaults to `False`):
        `False`: the paper's loss, per row the mean over active tokens of `-A * log pi`, then the mean over rows.
        `True`: TRL's clipped-ratio GRPO loss on the same masks.
    """

    num_generations: int | None = field(
        default=None,
        metadata={"help": "Rows per prompt; derived as G1 + k * G2 when unset, checked against it when set."},
    )
    num_base_generations: int = field(default=4, metadata={"help": "G1: iid rollouts in the base group (may be 0)."})
    num_reset_prefixes: int = field(default=1, metadata={"help": "k: seeds, hence reset states, per prompt."})
    num_reset_generations: int = field(default=4, metadata={"help": "G2: suffixes sampled from each reset state."})
    seed_budget: int = field(
        default=8, metadata={"help": "Extra iid rollouts per prompt that may be drawn to find the seeds."}
    )
    success_threshold: float = field(
        default=1.0, metadata={"help": "A rollout whose reward is below this value is incorrect."}
    )
    thought_delimiter: str = field(default=DEFAULT_DELIMITER, metadata={"help": "Text that closes a thought."})
    thought_split: str = field(
        default="delimiter",
        metadata={"help": "'delimiter' or 'paragraph' (thoughts end at a blank line).", "choices": ["delimiter", "paragraph"]},
    )
    max_thoughts: int = field(default=20, metadata={"help": "Thoughts per rollout, prefix included."})
    max_thought_tokens: int = field(default=256, metadata={"help": "Tokens per thought."})
    share_prefill: bool = field(
        default=True, metadata={"help": "Without vLLM: encode a context shared by several rows once."}
    )
    compact_decoding: bool = field(
        default=True, metadata={"help": "Without vLLM: drop stopped rollouts from the decoding batch at once."}
    )
    merge_adapter_for_sampling: bool = field(
        default=True, metadata={"help": "Without vLLM: sample in eval mode with LoRA adapters merged (exact restore)."}
    )
    rollout_template: str | None = field(
        default=DEFAULT_ROLLOUT_TEMPLATE,
        metadata={"help": "Wraps each question; placeholders {question} and {delimiter}. None: prompts as given."},
    )
    localizer: str = field(
        default="self", metadata={"help": "'self', 'random' or 'oracle'.", "choices": ["self", "random", "oracle"]}
    )
    localization_template: str = field(
        default=DEFAULT_LOCALIZATION_TEMPLATE,
        metadata={"help": "Localization prompt; placeholders {question}, {steps}, {num_steps}."},
    )
    localization_max_tokens: int = field(default=32, metadata={"help": "Most tokens of a localization reply."})
    localization_temperature: float = field(
        default=0.0, metadata={"help": "Temperature of the localization reply (0: greedy)."}
    )
    clip_surrogate: bool = field(
        default=False, metadata={"help": "Use TRL's clipped-ratio loss instead of -A * log pi."}
    )

    def __post_init__(self):
        if self.num_reset_prefixes < 0 or self.num_base_generations < 0 or self.num_reset_generations < 1:
            raise ValueError(
                "num_base_generations and num_reset_prefixes must be >= 0 and num_reset_generations >= 1, got "
                f"{self.num_base_generations}, {self.num_reset_prefixes}, {self.num_reset_generations}."
            )
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
        if not self.clip_surrogate and self.num_iterations != 1:
            raise ValueError(
                f"num_iterations={self.num_iterations} reuses rollouts off-policy, which the unclipped loss "
                "(-A * log pi) does not correct for; set num_iterations=1 or clip_surrogate=True."
            )
        if self.mask_truncated_completions:
            raise ValueError(
                "mask_truncated_completions is not supported: thought rollouts that stop at a final answer carry no "
                "EOS and would all be masked. Leave it False."
            )
        if self.scale_rewards not in ("group", "none"):
            raise ValueError(
                f"scale_rewards={self.scale_rewards!r}: reset trainers normalize inside each group; use 'group' "
                "or 'none'."
            )
        if self.multi_objective_aggregation != "sum_then_normalize":
            raise ValueError("reset trainers need multi_objective_aggregation='sum_then_normalize'.")


@dataclass
class SRPOConfig(ResetConfig):
    __doc__ = "Configuration for [`SRPOTrainer`] (self-localized resets). " + (ResetConfig.__doc__ or "")


@dataclass
class RRPOConfig(ResetConfig):
    __doc__ = "Configuration for [`RRPOTrainer`] (random resets). " + (ResetConfig.__doc__ or "")

    localizer: str = field(
        default="random", metadata={"help": "'self', 'random' or 'oracle'.", "choices": ["self", "random", "oracle"]}
    )
