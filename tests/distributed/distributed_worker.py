"""Run by tests/distributed/test_distributed.py as 2 CPU processes (accelerate launch, or torchrun for DeepSpeed).

Modes: none (plain data parallel), "server" (vLLM server mode against the fake engine), "server-lag" (the same
with pipelined resets, reset_lag=1, for three generations), "zero2" (DeepSpeed
ZeRO-2: optimizer states and gradients sharded), "zero3" (DeepSpeed ZeRO-3: parameters sharded, so generation
is a collective on every process), "zero3-peft" (ZeRO-3 with a LoRA adapter).
"""

import hashlib
import json
import os
import sys

import torch
from datasets import Dataset

from trl_resets import SRPOConfig, SRPOTrainer

sys.path.insert(0, __file__.rsplit("/", 3)[0])
from tests.conftest import make_char_tokenizer, make_tiny_llama


def reward(completions, answer, **kwargs):
    return [1.0 if a in c else 0.0 for c, a in zip(completions, answer)]


def main(out_dir, mode=None):
    stage = {"zero2": 2, "zero3": 3, "zero3-peft": 3}.get(mode)
    zero3 = stage == 3
    lag = mode == "server-lag"
    vllm_mode = "server" if lag else mode if mode in ("server", "colocate") else None
    if stage:
        os.environ.setdefault("ACCELERATE_USE_DEEPSPEED", "true")
        # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce kernel on first use (about two minutes
        # of C++ per suite, in the session's temporary extensions folder); without it DeepSpeed reduces through
        # torch.distributed (gloo here), which is what these tests check against.
        import importlib

        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    engines = []
    if vllm_mode:
        from tests.helpers import fake_vllm

        engines = fake_vllm.install(prefix_caching=True)
    tok = make_char_tokenizer()
    # Different seeds per prompt make some processes find seeds and others not.
    data = Dataset.from_dict({"prompt": [f"{i}+{7 - i}?" for i in range(8)], "answer": ["7"] * 8})
    args = SRPOConfig(
        output_dir=out_dir, per_device_train_batch_size=8, max_steps=3 if lag else 2, max_completion_length=16,
        max_thought_tokens=5, max_thoughts=4, learning_rate=1e-3, logging_steps=1, report_to="none",
        use_cpu=True, bf16=False, seed_budget=0 if lag else 2, localization_max_tokens=6, reset_lag=int(lag),
        # plain data parallel saves a checkpoint at the end: every process writes its files before the marker
        save_strategy="steps" if mode is None else "no", save_steps=2,
        use_vllm=bool(vllm_mode), vllm_mode=vllm_mode or "colocate",
        deepspeed={"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 1,
                   "zero_optimization": {"stage": stage}, "bf16": {"enabled": False}} if stage else None,
    )
    peft_config = None
    if mode == "zero3-peft":
        from peft import LoraConfig

        peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = SRPOTrainer(model=make_tiny_llama(tok), reward_funcs=reward, args=args, train_dataset=data,
                          processing_class=tok, peft_config=peft_config)
    seen = []
    original = trainer._reset_rollout
    trainer._reset_rollout = lambda prompts: seen.extend(prompts) or original(prompts)
    trainer.train()
    if zero3:
        import deepspeed

        trained = [p for p in trainer.model.parameters() if p.requires_grad]
        with deepspeed.zero.GatheredParameters(trained):
            params = torch.cat([p.detach().flatten().clone() for p in trained])
    else:
        params = torch.cat([p.detach().flatten() for p in trainer.model.parameters() if p.requires_grad])
    rank = trainer.accelerator.process_index
    report = {
        "rank": rank,
        "num_processes": trainer.accelerator.num_processes,
        "global_step": trainer.state.global_step,
        "prompts": seen,
        "param_hash": hashlib.sha256(params.numpy().tobytes()).hexdigest(),
        "logs": [e for e in trainer.state.log_history if "loss" in e],
        "engine_requests": engines[0].fake_llm.requests if engines else None,
        "zero_stage": trainer.accelerator.state.deepspeed_plugin.zero_stage if trainer.is_deepspeed_enabled else None,
        "num_params": int(params.numel()),
        "resets": [[list(r) for r in step["resets"]] for step in trainer.reset_history],
        "queue": None if trainer.pipeline is None else [
            [s.origin.generation, s.origin.prompt, s.seed_number] for s in trainer.pipeline.queue.ready],
    }
    write_report(trainer, out_dir, report)


def write_report(trainer, out_dir, report) -> None:
    """This rank's report as OUT/rank<r>.json, once every rank has finished; then the process group goes."""
    with open(f"{out_dir}/rank{trainer.accelerator.process_index}.json", "w") as f:
        json.dump(report, f)
    trainer.accelerator.wait_for_everyone()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def exit_at_once() -> None:
    """The report is written; skip interpreter teardown, where a background C++ thread of the CPU collectives
    occasionally aborts the process ("terminate called without an active exception")."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None)
    exit_at_once()
