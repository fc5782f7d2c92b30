"""How every option of TRL's ``GRPOConfig`` stands with the reset trainers: the one table the config, the trainer and
``docs/configuration.md`` read.

Each field ``GRPOConfig`` adds to transformers' ``TrainingArguments`` has one `Option`: who honours it (``"loss"``: the
package's advantages and loss act on it as GRPO's do; ``"sampler"``: the package's thought sampler or its vLLM
backend does; ``"trl"``: TRL acts on it unchanged, around the hooks the trainers override; ``"refused"``: no value
but its default can be honoured) and, where some values cannot be honoured, a ``refuse`` rule that returns the
error (the value, why, and the fix) for a config. `check` runs every rule when a config is built, before any compute.
The fields of ``TrainingArguments`` itself (optimizer, schedule, logging, saving) act as in any Trainer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

from transformers import TrainingArguments
from trl import GRPOConfig

STANDS = {
    "loss": "honoured by the package's advantages and loss, as GRPO's act on it",
    "sampler": "honoured by the package's thought sampler (transformers or vLLM)",
    "trl": "TRL acts on it unchanged",
    "refused": "no value but the default can be honoured: any other is refused, with the fix",
}


@dataclass(frozen=True)
class Option:
    stands: str
    note: str = ""
    refuse: Callable[[object], str | None] | None = None


def grpo_default(name: str):
    return next(f.default for f in fields(GRPOConfig) if f.name == name)


def _unless(name: str, allowed, why: str, fix: str):
    """A rule refusing any value of ``name`` outside ``allowed``."""
    def rule(config):
        value = getattr(config, name)
        return None if value in allowed else f"{name}={value!r} is not supported: {why}. {fix}."
    return rule


def _clip(name: str):
    def rule(config):
        value = getattr(config, name)
        if config.clip_surrogate or value == grpo_default(name):
            return None
        return (f"{name}={value} sets a clip, but clip_surrogate=False trains the unclipped surrogate, which has "
                f"none. Set clip_surrogate=True to clip, or leave {name} unset.")
    return rule


def _generation_kwargs(config):
    kwargs = config.generation_kwargs if isinstance(config.generation_kwargs, dict) else {}
    if config.use_vllm:
        from .sampling.vllm_backend import check_vllm_generation_kwargs

        check_vllm_generation_kwargs(kwargs, config.vllm_mode)
        return None
    why = {
        "num_beams": "beam search keeps several hypotheses per row; rollouts are sampled one token at a time",
        "num_beam_groups": "beam search keeps several hypotheses per row; rollouts are sampled one token at a time",
        "num_return_sequences": "each row is one rollout; num_generations sets the rollouts per prompt",
        "penalty_alpha": "contrastive search is not sampling; rollouts are sampled one token at a time",
        "max_new_tokens": "the sampler sets each thought's budget (max_completion_length, max_thought_tokens)",
        "max_length": "the sampler sets each thought's budget (max_completion_length, max_thought_tokens)",
    }
    for key, reason in why.items():
        value = kwargs.get(key)
        if value is None or (key in ("num_beams", "num_beam_groups", "num_return_sequences") and value == 1):
            continue
        return (f"generation_kwargs={{{key!r}: {value!r}}} cannot be honoured by the thought sampler: {reason}. "
                f"Remove {key!r} from generation_kwargs.")
    return None


def _cache_implementation(config):
    if config.cache_implementation is None or config.use_vllm:
        return None  # with vLLM the engine keeps its own cache, as in GRPO
    if config.compact_decoding or config.share_prefill:
        return (f"cache_implementation={config.cache_implementation!r} is not supported with compact_decoding or "
                "share_prefill on: both build a dynamic KV cache of their own. Set compact_decoding=False and "
                "share_prefill=False to decode with transformers' generate, which builds that cache, or unset "
                "cache_implementation.")
    return None


def _vllm_tensor_parallel(config):
    if config.use_vllm and config.vllm_mode == "colocate" and config.vllm_tensor_parallel_size > 1:
        return ("vllm_tensor_parallel_size > 1 in colocate mode is not supported (processes have different numbers "
                "of unfinished rollouts per round). Use vllm_mode='server' for tensor parallelism.")
    return None


def _transformers_generation_path(name: str):
    def rule(config):
        value = getattr(config, name)
        if value in (None, False, {}) or config.use_vllm:
            return None
        return (f"{name}={value!r} is not supported: the reset trainers sample thought by thought with their own "
                "decoder, not through TRL's transformers generation path. Unset it; compact_decoding=True (the "
                "default) already drops finished rollouts from the batch, and use_vllm=True serves large batches.")
    return rule


_NO_LOSS_TYPE = "read only by loss types other than 'grpo', which are refused, so it changes nothing (as in GRPO)"
_NO_ADAPTIVE = "read only by the adaptive entropy controller, which is refused, so it changes nothing (as in GRPO)"

OPTIONS: dict[str, Option] = {
    # ------------------------------------------------------------------ the loss and advantages
    "loss_type": Option("loss", "only 'grpo': each row's mean over its active tokens, then the mean over the rows "
                        "that carry loss in the generation batch (see docs/concepts.md)", _unless(
                            "loss_type", ("grpo",), "the reset loss averages each row over its active tokens, then "
                            "over the rows that carry loss (the paper's aggregation)",
                            "Set loss_type='grpo'; use clip_surrogate=True for the clipped ratio")),
    "importance_sampling_level": Option("loss", "only 'token'", _unless(
        "importance_sampling_level", ("token",), "the reset loss weights each token by its own ratio",
        "Set importance_sampling_level='token'")),
    "epsilon": Option("loss", "the lower clip, with clip_surrogate=True", _clip("epsilon")),
    "epsilon_high": Option("loss", "the upper clip, with clip_surrogate=True", _clip("epsilon_high")),
    "delta": Option("loss", "the two-sided clip's bound, with clip_surrogate=True", _clip("delta")),
    "scale_rewards": Option("loss", "'group' (normalized in each reset or base group) or 'none'", _unless(
        "scale_rewards", ("group", "none"), "reset trainers normalize inside each group",
        "Use scale_rewards='group' or 'none'")),
    "multi_objective_aggregation": Option("loss", "only 'sum_then_normalize'", _unless(
        "multi_objective_aggregation", ("sum_then_normalize",),
        "reset trainers sum the weighted rewards, then normalize in each group",
        "Set multi_objective_aggregation='sum_then_normalize'")),
    "mask_truncated_completions": Option("refused", "", _unless(
        "mask_truncated_completions", (False,),
        "thought rollouts that stop at a final answer carry no EOS and would all be masked", "Leave it False")),
    "use_adaptive_entropy": Option("refused", "", _unless(
        "use_adaptive_entropy", (False,), "the reset loss has no adaptive entropy controller",
        "Set use_adaptive_entropy=False; a fixed entropy bonus (entropy_coef) works as in GRPO")),
    "beta": Option("loss", "KL to the reference model, per active token"),
    "use_bias_correction_kl": Option("loss"),
    "top_entropy_quantile": Option("loss", "the policy term on each row's highest-entropy active tokens"),
    "off_policy_mask_threshold": Option("loss"),
    "entropy_coef": Option("loss", "a fixed entropy bonus on the active tokens"),
    "num_iterations": Option("loss", "later iterations are weighted by pi / pi_old"),
    "router_aux_loss_coef": Option("loss", "MoE load-balancing loss, scaled for accumulation as GRPO does"),
    "vllm_importance_sampling_correction": Option("loss"),
    "vllm_importance_sampling_mode": Option("loss"),
    "vllm_importance_sampling_clip_max": Option("loss"),
    "vllm_importance_sampling_clip_min": Option("loss"),
    "vllm_importance_sampling_cap": Option("loss"),
    "sapo_temperature_neg": Option("trl", _NO_LOSS_TYPE),
    "sapo_temperature_pos": Option("trl", _NO_LOSS_TYPE),
    "vespo_k_pos": Option("trl", _NO_LOSS_TYPE),
    "vespo_lambda_pos": Option("trl", _NO_LOSS_TYPE),
    "vespo_k_neg": Option("trl", _NO_LOSS_TYPE),
    "vespo_lambda_neg": Option("trl", _NO_LOSS_TYPE),
    "entropy_coef_min": Option("trl", _NO_ADAPTIVE),
    "entropy_coef_max": Option("trl", _NO_ADAPTIVE),
    "entropy_coef_delta": Option("trl", _NO_ADAPTIVE),
    "entropy_target": Option("trl", _NO_ADAPTIVE),
    # ------------------------------------------------------------------ sampling
    "max_completion_length": Option("sampler", "each rollout's token budget (a reset prefix counts toward it)"),
    "temperature": Option("sampler", "also divides the logits of the loss's log-probabilities, as in GRPO"),
    "top_p": Option("sampler"),
    "top_k": Option("sampler"),
    "min_p": Option("sampler"),
    "repetition_penalty": Option("sampler"),
    "generation_kwargs": Option("sampler", "keys that cannot hold per thought or per row are refused",
                                _generation_kwargs),
    "cache_implementation": Option("sampler", "with transformers' generate (compact_decoding=False, "
                                   "share_prefill=False)", _cache_implementation),
    # the deprecated alias first: TRL turns it into use_transformers_continuous_batching
    "use_transformers_paged": Option("refused", "", _transformers_generation_path("use_transformers_paged")),
    "transformers_continuous_batching_config": Option(
        "refused", "", _transformers_generation_path("transformers_continuous_batching_config")),
    "use_transformers_continuous_batching": Option(
        "refused", "", _transformers_generation_path("use_transformers_continuous_batching")),
    "ds3_gather_for_generation": Option("sampler"),
    "use_vllm": Option("sampler", "thoughts sampled through TRL's vLLM wrapper (docs/vllm.md)"),
    "vllm_mode": Option("sampler"),
    "vllm_model_impl": Option("trl"),
    "vllm_enable_sleep_mode": Option("refused", "", _unless(
        "vllm_enable_sleep_mode", (False,),
        "a reset step makes several vLLM calls (seed search, localization, suffixes, per-thought rounds) and sleep "
        "mode would reload the weights before each one", "Set vllm_enable_sleep_mode=False")),
    "vllm_structured_outputs_regex": Option("refused", "", _unless(
        "vllm_structured_outputs_regex", (None,),
        "thoughts are sampled in rounds, and a regex would be applied to each round separately", "Unset it")),
    "vllm_server_base_url": Option("trl"),
    "vllm_server_host": Option("trl"),
    "vllm_server_port": Option("trl"),
    "vllm_server_timeout": Option("trl"),
    "vllm_group_port": Option("trl"),
    "vllm_gpu_memory_utilization": Option("trl"),
    "vllm_max_model_length": Option("trl", "prompts too long for it are refused by the vLLM backend"),
    "vllm_tensor_parallel_size": Option("sampler", "server mode; colocate mode needs 1", _vllm_tensor_parallel),
    "max_tool_calling_iterations": Option("trl", "read only with tools, which the reset trainers refuse"),
    # ------------------------------------------------------------------ around the hooks
    "num_generations": Option("sampler", "derived from the split; a different value is refused"),
    "model_init_kwargs": Option("trl"),
    "trust_remote_code": Option("trl"),
    "disable_dropout": Option("trl"),
    "cast_lm_head_to_fp32": Option("trl"),
    "num_generations_eval": Option("trl"),
    "shuffle_dataset": Option("trl"),
    "pad_to_multiple_of": Option("trl"),
    "generation_batch_size": Option("trl"),
    "steps_per_generation": Option("trl", "whole prompts per process are required"),
    "chat_template_kwargs": Option("trl"),
    "reward_weights": Option("trl", "weights the reward functions before the per-group normalization"),
    "sync_ref_model": Option("trl"),
    "ref_model_mixup_alpha": Option("trl"),
    "ref_model_sync_steps": Option("trl"),
    "log_completions": Option("trl"),
    "log_multimodal": Option("trl", "image prompts are refused, so there is nothing multimodal to log"),
    "num_completions_to_print": Option("trl"),
    "log_unique_prompts": Option("trl"),
    "log_completions_hub_repo": Option("trl"),
}


def stands(name: str) -> str | None:
    """How a GRPOConfig field stands (a key of `STANDS`, or ``"trainer"`` for a ``TrainingArguments`` field); None
    for a field nobody has classified."""
    if name in OPTIONS:
        return OPTIONS[name].stands
    if name in {f.name for f in fields(TrainingArguments)}:
        return "trainer"
    return None


def refusal(config) -> str | None:
    """The first option of ``config`` that cannot be honoured, as its error message; None when all can."""
    for option in OPTIONS.values():
        if option.refuse is not None and (message := option.refuse(config)):
            return message
    return None


def check(config) -> None:
    """Raises ValueError, naming the option and the fix, for the first option ``config`` sets that the reset
    trainers cannot honour."""
    if message := refusal(config):
        raise ValueError(message)
