"""Run by tests/distributed/test_world_size.py: one generation over a global batch of 4 prompts, on 1 process (run directly)
or 2 (accelerate launch, CPU). Writes this process's prompts, reset choices, rows and advantages.

``worker.py OUT``: RRPO with a scripted policy. ``worker.py OUT MODEL_DIR``: SRPO sampling (temperature 1, a
sampled localization reply) from the random-weight model saved in MODEL_DIR, with the transformers backend and
with vLLM in colocate mode (the stand-in engine), each once with ``per_row_sampling_seed`` and once without, then
one evaluation batch.
"""

import os
import sys

from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from trl_resets import RRPOConfig, RRPOTrainer, SRPOConfig, SRPOTrainer
from trl_resets import trainer as trainer_module

sys.path.insert(0, __file__.rsplit("/", 3)[0])
from tests.conftest import ScriptedLlama, make_char_tokenizer
from tests.distributed.distributed_worker import exit_at_once, write_report

GLOBAL_ROWS = 32  # 4 prompts x 8 rows (split 0 x 2 x 4)


def reward(completions, answer, **kwargs):
    return [1.0 if a in c else 0.0 for c, a in zip(completions, answer)]


def generation(trainer, batches=None) -> dict:
    """One generation step of ``trainer``: the prompts it sampled for, its resets and localization replies, and the
    rows and advantages TRL received (``batches``: an iterator over the train dataloader, for a later generation)."""
    seen, generated, replies = [], [], []
    rollout, score, summarize = trainer._reset_rollout, trainer._generate_and_score_completions, trainer._summarize
    trainer._reset_rollout = lambda prompts: seen.extend(prompts) or rollout(prompts)
    trainer._generate_and_score_completions = lambda inputs: generated.append(score(inputs)) or generated[-1]
    trainer._summarize = lambda groups, *a: replies.extend(r.reply for g in groups for r in g.resets) or summarize(
        groups, *a)
    trainer.model.train()
    trainer._prepare_inputs(next(batches or iter(trainer.get_train_dataloader())))  # TRL shuffles its rows after this
    trainer._reset_rollout, trainer._generate_and_score_completions, trainer._summarize = rollout, score, summarize
    (output,) = generated
    return {
        "prompts": list(seen),
        "resets": trainer.reset_history[-1]["resets"],
        "replies": replies,
        "completion_ids": [ids[mask.bool()].tolist() for ids, mask in
                           zip(output["completion_ids"], output["completion_mask"])],
        "advantages": output["advantages"].tolist(),
    }


def evaluation(trainer) -> list[list[int]]:
    """This process's block of a global evaluation batch of 8 rollouts (4 prompts x 2), sampled as evaluation
    samples them (TRL hands each process a contiguous block)."""
    prompts = [f"{i}*3?" for i in range(4) for _ in range(2)]
    block = len(prompts) // trainer.accelerator.num_processes
    first = trainer.accelerator.process_index * block
    trainer.model.eval()
    return trainer._reset_rollout(prompts[first:first + block])["completion_ids"]


def distinct_characters(completions, **kwargs):
    return [len(set(c)) / 24 for c in completions]


def sampled(out_dir, model_dir):
    from tests.helpers import fake_vllm

    fake_vllm.install(prefix_caching=True)  # for the vLLM runs: colocated stand-in engines
    tok = AutoTokenizer.from_pretrained(model_dir)
    data = Dataset.from_dict({"prompt": [f"{i}+{7 - i}?" for i in range(8)]})
    world = int(os.environ.get("WORLD_SIZE", "1"))
    report = {}
    for backend in ("transformers", "vllm"):
        for seeded in (True, False):
            args = SRPOConfig(
                output_dir=out_dir, per_device_train_batch_size=16 // world, max_steps=1, report_to="none",
                use_cpu=True, bf16=False, save_strategy="no", num_base_generations=2, num_reset_prefixes=1,
                num_reset_generations=2, max_thought_tokens=5, max_thoughts=3, max_completion_length=15,
                seed_budget=2, temperature=1.0, localization_max_tokens=4, localization_temperature=1.0,
                per_row_sampling_seed=seeded, use_vllm=backend == "vllm", vllm_mode="colocate",
            )
            trainer = SRPOTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir),
                                  reward_funcs=distinct_characters, args=args, train_dataset=data,
                                  processing_class=tok)
            report[f"{backend}/{'seeded' if seeded else 'unseeded'}"] = generation(trainer) | {
                "eval": evaluation(trainer)}
    report["transformers/lagged"] = lagged(out_dir, model_dir, tok, data, world)
    report["num_processes"] = trainer.accelerator.num_processes
    write_report(trainer, out_dir, report)


def lagged(out_dir, model_dir, tok, data, world) -> dict:
    """Pipelined resets (reset_lag=1, per-row sampling seeds): the second generation, whose reset slots hold the
    first generation's reset states, gathered from every process."""
    args = SRPOConfig(
        output_dir=out_dir, per_device_train_batch_size=16 // world, max_steps=3, report_to="none", use_cpu=True,
        bf16=False, save_strategy="no", num_base_generations=0, num_reset_prefixes=2, num_reset_generations=2,
        max_thought_tokens=5, max_thoughts=3, max_completion_length=15, seed_budget=0, temperature=1.0,
        localization_max_tokens=4, localization_temperature=1.0, per_row_sampling_seed=True, reset_lag=1,
    )
    trainer = SRPOTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir), reward_funcs=distinct_characters,
                          args=args, train_dataset=data, processing_class=tok)
    batches = iter(trainer.get_train_dataloader())
    first = generation(trainer, batches)
    trainer._step += args.steps_per_generation  # the next generation
    second = generation(trainer, batches)
    return second | {"first_prompts": first["prompts"], "queue": [
        (s.origin.generation, s.origin.prompt, s.seed_number, s.outcome.prefix) for s in trainer.pipeline.queue.ready]}


def main(out_dir):
    tok = make_char_tokenizer()
    # Row j of a batch follows script j % 4 (the same on one process and two: each prompt's rows are a
    # multiple of 4). A prompt's two draws are scripts (0, 1) or (2, 3); the last answers 7, so half the
    # prompts find one seed and fall back once (5 to 8 thoughts a draw); the suffixes of each reset state score [0, 0, 0, 1]. Where a
    # seed is reset is the generator's choice alone.
    scripts = [tok("".join(f"{t}</thought>" for t in range(1, 5 + j)) + f"\\boxed{{{4 + j}}}</thought>",
                   add_special_tokens=False)["input_ids"] for j in range(4)]
    data = Dataset.from_dict({"prompt": [f"{i}+{7 - i}?" for i in range(8)], "answer": ["7"] * 8})
    # The scripted model follows its rows through the KV cache of one batch, so rows must not join a running batch:
    # the phased run (tests/core/test_scheduler.py shows the overlapped run builds the same groups).
    trainer_module.can_overlap = lambda localizer, policy: False
    world = int(os.environ.get("WORLD_SIZE", "1"))
    args = RRPOConfig(
        output_dir=out_dir, per_device_train_batch_size=GLOBAL_ROWS // world, max_steps=1, report_to="none",
        use_cpu=True, bf16=False, save_strategy="no", num_base_generations=0, num_reset_prefixes=2,
        num_reset_generations=4, max_thought_tokens=20, max_thoughts=12, max_completion_length=300, seed_budget=0,
        share_prefill=False,  # one prefill per row, so that row j of every batch is row j of the scripts
    )
    trainer = RRPOTrainer(model=ScriptedLlama.build(tok, scripts), reward_funcs=reward, args=args,
                          train_dataset=data, processing_class=tok)
    report = generation(trainer)
    report["num_processes"] = trainer.accelerator.num_processes
    write_report(trainer, out_dir, report)


if __name__ == "__main__":
    if len(sys.argv) > 2:
        sampled(sys.argv[1], sys.argv[2])
    else:
        main(sys.argv[1])
    exit_at_once()
