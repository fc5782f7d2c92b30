"""Thought-level samplers: one protocol, several backends."""

from .base import ThoughtSampler
from .transformers_backend import TransformersThoughtSampler

__all__ = ["ThoughtSampler", "TransformersThoughtSampler"]
