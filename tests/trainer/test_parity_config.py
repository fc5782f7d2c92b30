"""Every GRPOConfig option is honoured, refused at construction, or classified as not acting on the loss."""

import dataclasses

import pytest
from trl import GRPOConfig

from trl_resets import SRPOConfig, options

# A value of each option that the reset trainers cannot honour, with what else the value needs to reach its rule.
REFUSED_EXAMPLES = {
    "loss_type": {"loss_type": "dapo"},
    "importance_sampling_level": {"importance_sampling_level": "sequence"},
    "use_adaptive_entropy": {"use_adaptive_entropy": True},
    "epsilon": {"epsilon": 0.3},
    "epsilon_high": {"epsilon_high": 0.28},
    "delta": {"delta": 2.0},
    "mask_truncated_completions": {"mask_truncated_completions": True},
    "scale_rewards": {"scale_rewards": "batch"},
    "multi_objective_aggregation": {"multi_objective_aggregation": "normalize_then_sum"},
    "generation_kwargs": {"generation_kwargs": {"num_beams": 4}},
    "cache_implementation": {"cache_implementation": "static"},
    "use_transformers_continuous_batching": {"use_transformers_continuous_batching": True},
    "transformers_continuous_batching_config": {"transformers_continuous_batching_config": {"max_batch_tokens": 64}},
    "use_transformers_paged": {"use_transformers_paged": True},
    "vllm_enable_sleep_mode": {"use_vllm": True, "vllm_enable_sleep_mode": True},
    "vllm_structured_outputs_regex": {"use_vllm": True, "vllm_structured_outputs_regex": "[0-9]+"},
    "vllm_tensor_parallel_size": {"use_vllm": True, "vllm_mode": "colocate", "vllm_tensor_parallel_size": 2},
}
FIX_WORDS = ("Set ", "Use ", "Unset ", "Leave ", "Remove ", "unset ")


def _config(tmp_path, **overrides):
    return SRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=8, max_completion_length=16,
                      report_to="none", use_cpu=True, bf16=False, **overrides)


def test_every_grpo_config_field_is_classified():
    """A TRL upgrade that adds an option fails here until someone says how the reset trainers treat it."""
    unclassified = [f.name for f in dataclasses.fields(GRPOConfig) if options.stands(f.name) is None]
    assert not unclassified, f"GRPOConfig fields with no place in trl_resets.options: {unclassified}"
    assert set(options.OPTIONS) <= {f.name for f in dataclasses.fields(GRPOConfig)}  # no stale names either
    assert {option.stands for option in options.OPTIONS.values()} == set(options.STANDS)


def test_every_option_with_a_refusal_rule_has_an_example_here():
    ruled = {name for name, option in options.OPTIONS.items() if option.refuse is not None}
    assert ruled == set(REFUSED_EXAMPLES)
    assert all(options.OPTIONS[name].refuse for name, o in options.OPTIONS.items() if o.stands == "refused")


@pytest.mark.parametrize("name", sorted(REFUSED_EXAMPLES))
def test_refused_options_fail_at_construction_naming_the_option_and_the_fix(tmp_path, name):
    assert options.refusal(_config(tmp_path)) is None  # the defaults are all honoured
    with pytest.raises(ValueError) as error:
        _config(tmp_path, **REFUSED_EXAMPLES[name])
    message = str(error.value)
    assert name in message and any(word in message for word in FIX_WORDS), message


def test_the_cache_implementation_is_honoured_by_generate(tmp_path):
    args = _config(tmp_path, cache_implementation="static", compact_decoding=False, share_prefill=False)
    assert args.cache_implementation == "static"


def test_clip_settings_are_accepted_with_the_clipped_surrogate(tmp_path):
    args = _config(tmp_path, clip_surrogate=True, epsilon=0.3, epsilon_high=0.28, delta=2.0)
    assert (args.epsilon, args.epsilon_high, args.delta) == (0.3, 0.28, 2.0)
    assert _config(tmp_path).loss_type == "grpo"  # the paper's aggregation is the default


@pytest.mark.parametrize("overrides", [
    {"num_iterations": 2},  # later iterations are importance-weighted by pi / pi_old
    {"top_entropy_quantile": 0.2},
    {"off_policy_mask_threshold": 0.5},
    {"beta": 0.1, "use_bias_correction_kl": True},
    {"entropy_coef": 0.01},
])
def test_honoured_options_construct(tmp_path, overrides):
    args = _config(tmp_path, **overrides)
    assert all(getattr(args, k) == v for k, v in overrides.items())
    assert {options.stands(name) for name in overrides} <= {"loss", "sampler", "trl"}


def test_an_unknown_localizer_name_is_refused_by_the_config(tmp_path):
    with pytest.raises(ValueError, match=r"localizer='prm' is not one of \['self', 'random', 'oracle'\]"):
        _config(tmp_path, localizer="prm")


LAG_REFUSALS = [  # (settings beside reset_lag=1, what the message names)
    ({"num_base_generations": 8, "num_reset_prefixes": 0}, "Set reset_lag=0, or num_reset_prefixes >= 1"),
    ({"reset_max_age": 0}, "Set reset_max_age >= 1"),
    ({"seed_budget": 8}, "Set seed_budget=0"),
    ({"seed_budget": 0, "credit": "diff"}, "Set credit='uniform'"),
    ({"seed_budget": 0, "gradient_accumulation_steps": 2, "steps_per_generation": 3},
     "Set steps_per_generation to a multiple of gradient_accumulation_steps"),
]


@pytest.mark.parametrize("overrides, fix", LAG_REFUSALS)
def test_pipelined_resets_refuse_what_they_do_not_honour_naming_the_fix(tmp_path, overrides, fix):
    with pytest.raises(ValueError, match="reset_lag=1 cannot be honoured") as error:
        _config(tmp_path, **{"reset_lag": 1, **overrides})
    assert fix in str(error.value)


def test_pipelined_resets_construct_and_an_unknown_lag_is_refused(tmp_path):
    args = _config(tmp_path, reset_lag=2, seed_budget=0)
    assert (args.reset_lag, args.reset_max_age) == (2, 2)
    assert _config(tmp_path, reset_lag=1, seed_budget=0, pack_shared_prefixes=True).pack_shared_prefixes
    # several optimizer steps per generation: the queue advances per generation (tests/trainer/test_pipelined_trainer)
    args = _config(tmp_path, reset_lag=1, seed_budget=0, num_iterations=2, steps_per_generation=2)
    assert (args.num_iterations, args.steps_per_generation, args.gradient_accumulation_steps) == (2, 2, 1)
    for mode in ("colocate", "server"):  # vLLM: tests/trainer/test_pipelined_vllm.py
        args = _config(tmp_path, reset_lag=2, seed_budget=0, use_vllm=True, vllm_mode=mode)
        assert (args.reset_lag, args.use_vllm, args.vllm_mode) == (2, True, mode)
    with pytest.raises(ValueError, match=r"reset_lag=3 is not one of \[0, 1, 2\]"):
        _config(tmp_path, reset_lag=3, seed_budget=0)
