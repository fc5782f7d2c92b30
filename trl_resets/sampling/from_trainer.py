"""The thought sampler a `ResetTrainer` generates with, built from the trainer's own state: TRL's vLLM engine
(colocated or a server, weights already synced by TRL) or the training model itself, unwrapped as GRPOTrainer
unwraps it for generation (ZeRO-3 gathering, FSDP's full parameters, the LoRA adapter merged or not)."""

from __future__ import annotations

import warnings
from contextlib import contextmanager

import torch
from accelerate.utils import broadcast_object_list, gather_object
from trl.models.utils import unwrap_model_for_generation

from .transformers_backend import TransformersThoughtSampler, sampling_weights
from .vllm_backend import VLLMThoughtSampler, prefix_caching_enabled


def is_zero3(trainer) -> bool:
    return trainer.is_deepspeed_enabled and trainer.accelerator.state.deepspeed_plugin.zero_stage == 3


def probe_prefix_caching(trainer) -> bool:
    """Per-thought vLLM rounds only with prefix caching on; otherwise one pass per rollout (see vllm_backend)."""
    found = [prefix_caching_enabled(trainer.vllm_generation)]
    if trainer.args.vllm_mode == "server":
        broadcast_object_list(found, from_process=0)
    if not found[0]:
        warnings.warn(
            "vLLM prefix caching is off or could not be confirmed, so thoughts are not sampled in per-thought "
            "rounds: each rollout is one request for its whole budget, cut at its stop point afterwards (same "
            "distribution, some tokens discarded). To sample thought by thought, turn prefix caching on: "
            "`trl vllm-serve --enable_prefix_caching`, or plain `vllm serve --enable-prefix-caching`. vLLM turns "
            "it on by default for plain decoder models and off for hybrid and attention-free ones; it caches "
            "whole 16-token blocks, so each round re-encodes up to one block (docs/vllm.md).",
            stacklevel=4,
        )
    return bool(found[0])


def vllm_sampler(trainer, per_thought: bool) -> VLLMThoughtSampler:
    def broadcast(obj):
        box = [obj]
        broadcast_object_list(box, from_process=0)
        return box[0]

    return VLLMThoughtSampler(
        trainer.vllm_generation,
        trainer.processing_class,
        trainer.thought_format,
        eos_ids=list(trainer.eos_token_ids),
        per_thought=per_thought,
        sync_any=trainer._any_process,
        gather=lambda items: gather_object([items]),
        broadcast=broadcast,
        is_main_process=trainer.accelerator.is_main_process,
        process_index=trainer.accelerator.process_index,
    )


def transformers_sampler(trainer, model) -> TransformersThoughtSampler:
    return TransformersThoughtSampler(
        model,
        trainer.processing_class,
        trainer.thought_format,
        generation_config=trainer.generation_config,
        eos_ids=list(trainer.eos_token_ids),
        collective=is_zero3(trainer),
        share_prefill=trainer.args.share_prefill,
        compact=trainer.args.compact_decoding,
        record_logprobs=bool(trainer.args.reset_lag),  # pipelined resets: the carried prefixes' drift
    )


@contextmanager
def open_sampler(trainer, vllm_per_thought: bool = False):
    """The trainer's sampler for one generation (TRL has synced vLLM's weights before calling the rollout
    function; the transformers path unwraps the model as GRPOTrainer's ``_generate`` does)."""
    if trainer.use_vllm:
        yield vllm_sampler(trainer, vllm_per_thought)
        return
    zero3 = is_zero3(trainer)
    args = trainer.args
    with (
        unwrap_model_for_generation(
            trainer.model_wrapped,
            trainer.accelerator,
            gather_deepspeed3_params=args.ds3_gather_for_generation,
            generation_kwargs=trainer.generation_kwargs,
            gradient_checkpointing_kwargs=args.gradient_checkpointing_kwargs,
        ) as model,
        torch.no_grad(),
        trainer._dist.summon_full_params(trainer.model_wrapped, recurse=False),
        sampling_weights(model, merge=args.merge_adapter_for_sampling and not zero3 and not trainer.is_fsdp_enabled),
    ):
        yield transformers_sampler(trainer, model)
