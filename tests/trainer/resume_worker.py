"""Run by tests/trainer/test_resume.py in a subprocess: SRPO on the tiny model, a checkpoint every 2 steps.

    python tests/trainer/resume_worker.py OUT kill     # SIGKILLs itself right after checkpoint-2 is written
    python tests/trainer/resume_worker.py OUT resume   # resumes from OUT/checkpoint-2 and runs to the end
    python tests/trainer/resume_worker.py OUT full     # the uninterrupted run
    python tests/trainer/resume_worker.py OUT kill-in-files    # SIGKILLs itself while checkpoint-4's files are written
    python tests/trainer/resume_worker.py OUT kill-before-marker   # ... once they are all written, before the marker
    python tests/trainer/resume_worker.py OUT resume-latest    # resume_from_checkpoint=True
    python tests/trainer/resume_worker.py OUT full lag=1       # any mode with pipelined resets (reset_lag=1)
    python tests/trainer/resume_worker.py OUT full iters=3     # any mode with num_iterations=3

At most one checkpoint is kept (save_total_limit=1).

Every log line goes to OUT/logs-<mode>.jsonl as it is logged (a killed process keeps what it wrote).
"""

import json
import os
import signal
import sys

import torch
from datasets import Dataset
from transformers import TrainerCallback

sys.path.insert(0, __file__.rsplit("/", 3)[0])
from tests.conftest import make_char_tokenizer, make_tiny_llama
from trl_resets import SRPOConfig, SRPOTrainer, checkpoints


def reward(completions, answer, **kwargs):
    return [1.0 if a in c else 0.0 for c, a in zip(completions, answer)]


class Record(TrainerCallback):
    def __init__(self, path, kill_at=None):
        self.path, self.kill_at = path, kill_at

    def on_log(self, args, state, control, logs=None, **kwargs):
        with open(self.path, "a") as handle:
            handle.write(json.dumps({"step": state.global_step, **logs}) + "\n")

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)


def _die():
    os.kill(os.getpid(), signal.SIGKILL)


def _kill_during_save(mode):
    """Make the save of checkpoint-4 die at the given point, after checkpoint-2 was saved completely."""
    write, mark = checkpoints.write_atomically, checkpoints.mark_complete

    def write_then_die(path, writer):
        if "checkpoint-4" in str(path) and "generation_buffer" in str(path):  # the rest of the checkpoint is written
            return write(path, lambda tmp: (writer(tmp), _die()))
        return write(path, writer)

    def die_before_marker(folder, step):
        if step == 4:
            _die()
        return mark(folder, step)

    if mode == "kill-in-files":
        checkpoints.write_atomically = write_then_die
    else:
        checkpoints.mark_complete = die_before_marker


def main(out_dir, mode, steps_per_generation=None, reset_lag=0, num_iterations=1):
    if mode.startswith("kill-"):
        _kill_during_save(mode)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    tok = make_char_tokenizer()
    data = Dataset.from_dict({"prompt": [f"{i}+{7 - i}?" for i in range(8)], "answer": ["7"] * 8})
    extra = {} if steps_per_generation is None else {"steps_per_generation": steps_per_generation}
    if reset_lag:
        extra.update(reset_lag=reset_lag, seed_budget=0)
    if num_iterations != 1:
        extra.update(num_iterations=num_iterations)
    args = SRPOConfig(
        output_dir=out_dir, per_device_train_batch_size=8, max_steps=4, max_completion_length=16,
        max_thought_tokens=5, max_thoughts=4, learning_rate=1e-2, logging_steps=1, report_to="none",
        use_cpu=True, bf16=False, save_strategy="steps", save_steps=2, save_total_limit=1, temperature=1.0, seed=3,
        localization_max_tokens=6, disable_tqdm=True, **{"seed_budget": 2, **extra},
    )
    trainer = SRPOTrainer(model=make_tiny_llama(tok), reward_funcs=reward, args=args, train_dataset=data,
                          processing_class=tok, localizer="random",
                          callbacks=[Record(os.path.join(out_dir, f"logs-{mode}.jsonl"), 2 if mode == "kill" else None)])
    resume = {"resume": os.path.join(out_dir, "checkpoint-2"), "resume-latest": True}.get(mode)
    trainer.train(resume_from_checkpoint=resume)


if __name__ == "__main__":
    named = dict(a.split("=") for a in sys.argv[3:] if "=" in a)
    numbers = [int(a) for a in sys.argv[3:] if "=" not in a]
    main(sys.argv[1], sys.argv[2], steps_per_generation=numbers[0] if numbers else None,
         reset_lag=int(named.get("lag", 0)), num_iterations=int(named.get("iters", 1)))
