"""Run by tests/test_world_size.py: one RRPO generation over a global batch of 4 prompts, on 1 process (run
directly) or 2 (accelerate launch, CPU). Writes this process's prompts, reset choices, rows and advantages."""

import os
import sys

from datasets import Dataset

from trl_resets import RRPOConfig, RRPOTrainer
from trl_resets import trainer as trainer_module

sys.path.insert(0, __file__.rsplit("/", 2)[0])
from tests.conftest import ScriptedLlama, make_char_tokenizer
from tests.distributed_worker import exit_at_once, write_report

GLOBAL_ROWS = 32  # 4 prompts x 8 rows (split 0 x 2 x 4)


def reward(completions, answer, **kwargs):
    return [1.0 if a in c else 0.0 for c, a in zip(completions, answer)]


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
    # the phased run (tests/test_scheduler.py shows the overlapped run builds the same groups).
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
    seen = []
    original = trainer._reset_rollout
    trainer._reset_rollout = lambda prompts: seen.extend(prompts) or original(prompts)
    generated = []
    score = trainer._generate_and_score_completions
    trainer._generate_and_score_completions = lambda inputs: generated.append(score(inputs)) or generated[-1]
    trainer.model.train()
    trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))  # TRL shuffles its rows after this
    (output,) = generated
    report = {
        "num_processes": trainer.accelerator.num_processes,
        "prompts": seen,
        "resets": trainer.reset_history[-1]["resets"],
        "completion_ids": [ids[mask.bool()].tolist() for ids, mask in
                           zip(output["completion_ids"], output["completion_mask"])],
        "advantages": output["advantages"].tolist(),
    }
    write_report(trainer, out_dir, report)


if __name__ == "__main__":
    main(sys.argv[1])
    exit_at_once()
