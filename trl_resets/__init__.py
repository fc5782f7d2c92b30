"""trl-resets: reset-based credit assignment (SRPO, RRPO) for Hugging Face TRL."""

from . import tasks  # noqa: F401  the shipped tasks register their oracle checker and state key
from .advantages import group_advantages
from .config import ResetConfig, RRPOConfig, SRPOConfig
from .localizers import CallableLocalizer, Localizer, OracleLocalizer, RandomLocalizer, SelfLocalizer
from .loss import reset_pg_loss
from .resets import ResetAlgorithm, Split
from .thoughts import Rollout, ThoughtFormat
from .trainer import GRPOBaselineTrainer, ResetTrainer, RRPOTrainer, SRPOTrainer

__version__ = "0.1.0"

__all__ = [
    "CallableLocalizer",
    "GRPOBaselineTrainer",
    "Localizer",
    "OracleLocalizer",
    "RRPOConfig",
    "RRPOTrainer",
    "RandomLocalizer",
    "ResetAlgorithm",
    "ResetConfig",
    "ResetTrainer",
    "Rollout",
    "SRPOConfig",
    "SRPOTrainer",
    "SelfLocalizer",
    "Split",
    "ThoughtFormat",
    "group_advantages",
    "reset_pg_loss",
]
