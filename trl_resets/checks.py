"""Construction checks of the reset trainers: what would fail deep in a run (a delimiter the tokenizer cannot give
back, no pad token, a dataset without a reward function's columns or with images) fails when the trainer is built,
naming the fix."""

from __future__ import annotations

import inspect

from torch import nn

from .scoring import REWARD_KEYWORDS
from .thoughts import ThoughtFormat


def is_conversational(prompt) -> bool:
    return isinstance(prompt, list) and bool(prompt) and isinstance(prompt[0], dict)


def has_image(prompt) -> bool:
    """Whether a conversational prompt carries an image part (TRL's multimodal message format)."""
    return is_conversational(prompt) and any(
        isinstance(message.get("content"), list)
        and any(isinstance(part, dict) and part.get("type") == "image" for part in message["content"])
        for message in prompt
    )


def check_delimiter(tokenizer, fmt: ThoughtFormat) -> None:
    """Fails unless the tokenizer gives back the thought boundary when it follows text: the sampler finds the end of
    a thought by decoding, so a boundary that does not survive encode-decode could never end a thought."""
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
    probe = "Step one: 2 + 3 = 5." + fmt.boundary
    ids = tokenizer(probe, add_special_tokens=False)["input_ids"]
    if fmt.boundary not in tokenizer.decode(ids, skip_special_tokens=False):
        field = "thought_delimiter" if fmt.split == "delimiter" else "thought_split"
        value = fmt.delimiter if fmt.split == "delimiter" else fmt.split
        raise ValueError(
            f"{field}={value!r}: the tokenizer does not reproduce {fmt.boundary!r} after text (encoded and decoded, "
            f"{probe!r} comes back as {tokenizer.decode(ids, skip_special_tokens=False)!r}), so no thought could "
            "ever end there. Use a delimiter the tokenizer keeps (the default </thought>), or "
            "thought_split='paragraph'."
        )


def check_pad_token(tokenizer) -> None:
    """Fails when the tokenizer has no pad token. GRPOTrainer falls back to the EOS token (as this package does
    through it), so this is a tokenizer with neither: the sampler could not pad a batch, nor end a rollout at EOS."""
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
    if tokenizer.pad_token_id is None:
        raise ValueError(
            f"the tokenizer ({type(tokenizer).__name__}) has no pad_token and no eos_token, so batches cannot be "
            "padded. Set one before building the trainer: tokenizer.add_special_tokens({'pad_token': '<pad>'}) "
            "followed by model.resize_token_embeddings(len(tokenizer)), or tokenizer.pad_token = a token that never "
            "occurs in text."
        )


def check_dataset(dataset, reward_funcs, reward_names) -> None:
    """Fails before any compute on an empty dataset, or one without a column that a reward function requires (a
    parameter with no default and no ``**kwargs`` to absorb its absence)."""
    if dataset is None:
        return
    try:
        size = len(dataset)
    except TypeError:  # an IterableDataset
        size = None
    if size == 0:
        raise ValueError("train_dataset is empty: give it at least one row with a 'prompt' column.")
    columns = getattr(dataset, "column_names", None)
    if not columns:
        return
    images = [column for column in ("image", "images") if column in columns]
    if not images and "prompt" in columns and size:
        images = ["prompt (image parts in its messages)"] if has_image(dataset[0]["prompt"]) else []
    if images:
        raise ValueError(
            f"train_dataset has the image column(s) {images}, but the reset trainers sample and score text only: the "
            "images would be dropped from generation and from the loss. Train vision-language prompts with TRL's "
            "GRPOTrainer, or remove the image columns to train on the text alone."
        )
    for func, name in zip(reward_funcs, reward_names):
        if isinstance(func, nn.Module):
            continue
        try:
            params = inspect.signature(func).parameters.values()
        except (TypeError, ValueError):
            continue
        required = [p.name for p in params if p.default is p.empty and p.name not in REWARD_KEYWORDS
                    and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        missing = [column for column in required if column not in columns]
        if missing:
            raise ValueError(
                f"reward function {name!r} needs the column(s) {missing}, which train_dataset lacks (its columns: "
                f"{list(columns)}). Add them to the dataset, or give the parameter a default."
            )




def no_loss_message(split, args, first_round: int) -> str:
    """Why a step in which no row carries loss did not train (num_base_generations=0 and every seed slot fell back), and the fix."""
    return (
        f"no row of this step carries loss, so it does not train: no prompt found a seed (a phase-1 rollout whose "
        f"reward is below success_threshold={args.success_threshold}, with a thought to reset to) within its "
        f"{first_round} draws and seed_budget={args.seed_budget} more, and the split "
        f"{split.num_base_generations} + {split.num_reset_prefixes}x{split.num_reset_generations} has no base group (num_base_generations=0) to "
        "train on instead. If a correct rollout's reward is not success_threshold or more (rewards on another "
        "scale), set success_threshold to the reward that marks a correct rollout; to train such steps as GRPO, "
        "set num_base_generations >= 2. resets/fallback_rate logs the share of seed slots left empty per step "
        "(this warning is given once per run)."
    )


def overlong_prompts_message(prompt_ids: list[list[int]], room: int, limit: int) -> str | None:
    """The warning for prompts too long for the model's context (prompt tokens + ``room`` > ``limit``): past it a
    model with learned positions fails and one with rotary positions degrades. None when every prompt fits."""
    lengths = [len(ids) for ids in {tuple(ids): ids for ids in prompt_ids}.values()]
    overlong = [n for n in lengths if n + room > limit]
    if not overlong:
        return None
    return (f"{len(overlong)} of the {len(lengths)} distinct prompts of this batch are too long for the model's "
            f"context: prompt tokens + max_completion_length={room} > max_position_embeddings={limit} (the "
            f"longest prompt has {max(overlong)} tokens). Filter long prompts out of the dataset or lower "
            "max_completion_length. (Warned once per run.)")


def check_trainer(trainer, train_dataset) -> None:
    """The checks a `ResetTrainer` runs once TRL's GRPOTrainer is built: the rollout template, the tokenizer, the
    dataset, reward models under ZeRO-3, and what ``per_row_sampling_seed`` needs beyond the config (the localizer
    and the sampler as the trainer builds it)."""
    from .scheduler import can_overlap
    from .thoughts import wrap_question

    args, name = trainer.args, type(trainer).__name__
    if args.rollout_template is not None:
        wrap_question("probe", args.rollout_template, args.thought_delimiter)  # fail now on a broken template
    check_pad_token(trainer.processing_class)
    check_delimiter(trainer.processing_class, trainer.thought_format)
    check_dataset(train_dataset, trainer.reward_funcs, trainer.reward_func_names)
    if trainer._zero3 and any(isinstance(f, nn.Module) for f in trainer.reward_funcs):
        raise ValueError(
            f"reward models under DeepSpeed ZeRO-3 are not supported by {name}: processes score different numbers "
            "of rollouts per round, and a sharded reward model needs them in step. Use ZeRO-2, or wrap the reward "
            "model in a function that runs an unsharded copy."
        )
    if not args.per_row_sampling_seed:
        return
    from .policy_text import PolicyText

    refused = None
    # the trainer's policy always encodes and decodes text: whether a localizer streams is the localizer's say
    if not trainer.split.is_grpo and not can_overlap(trainer.localizer, PolicyText):
        refused = (f"localizer {trainer.localizer.name!r}, which needs the policy for a whole batch at once and so "
                   "decodes its replies outside the per-row stream. Use a localizer that streams its prompts "
                   "(prompts/read) or answers without the policy (uses_policy = False)")
    elif not trainer.use_vllm:
        reason = trainer._transformers_sampler(trainer.model).row_seed_refusal()
        if reason is not None:
            refused = f"this trainer's sampling (the settings the compact decoder hands to `generate`): {reason}"
    if refused:
        raise ValueError(f"per_row_sampling_seed=True cannot be honoured with {refused}; or set "
                         "per_row_sampling_seed=False.")
