"""Every GRPOConfig option is honoured, refused at construction, or classified as not acting on the loss."""

import dataclasses

import pytest
from trl import GRPOConfig

from trl_resets import SRPOConfig
from trl_resets.config import HONOURED_OPTIONS, NO_LOSS_EFFECT, REFUSED_OPTIONS, loss_option_class

# A value of each refused option that the reset trainers cannot honour (the fix is in the error message).
REFUSED_EXAMPLES = {
    "loss_type": "dapo",
    "importance_sampling_level": "sequence",
    "use_adaptive_entropy": True,
    "epsilon": 0.3,
    "epsilon_high": 0.28,
    "delta": 2.0,
    "mask_truncated_completions": True,
    "scale_rewards": "batch",
    "multi_objective_aggregation": "normalize_then_sum",
    "num_generations": 6,
}


def _config(tmp_path, **overrides):
    return SRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=8, max_completion_length=16,
                      report_to="none", use_cpu=True, bf16=False, **overrides)


def test_every_grpo_config_field_is_classified():
    """A TRL upgrade that adds an option fails here until someone says how the reset loss treats it."""
    unclassified = [f.name for f in dataclasses.fields(GRPOConfig) if loss_option_class(f.name) is None]
    assert not unclassified, f"GRPOConfig fields with no place in trl_resets.config's classification: {unclassified}"
    assert not (HONOURED_OPTIONS & REFUSED_OPTIONS or HONOURED_OPTIONS & NO_LOSS_EFFECT
                or REFUSED_OPTIONS & NO_LOSS_EFFECT)
    names = {f.name for f in dataclasses.fields(GRPOConfig)}
    assert (HONOURED_OPTIONS | REFUSED_OPTIONS | NO_LOSS_EFFECT) <= names  # no stale names either


@pytest.mark.parametrize("name", sorted(REFUSED_OPTIONS))
def test_refused_options_fail_at_construction_naming_the_option(tmp_path, name):
    assert set(REFUSED_EXAMPLES) == REFUSED_OPTIONS
    with pytest.raises(ValueError) as error:
        _config(tmp_path, **{name: REFUSED_EXAMPLES[name]})
    assert name in str(error.value)


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
    assert set(overrides) <= HONOURED_OPTIONS
