"""Thought-level samplers: one protocol, several backends."""

from .base import ThoughtSampler
from .transformers_backend import TransformersThoughtSampler, sampling_weights
from .vllm_backend import VLLMThoughtSampler, prefix_caching_enabled

__all__ = [
    "ThoughtSampler", "TransformersThoughtSampler", "VLLMThoughtSampler", "prefix_caching_enabled", "sampling_weights",
]
