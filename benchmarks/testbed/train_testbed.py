"""Trains the fast testbed policy from scratch (about 15 minutes on 2 shared CPU cores) and saves it with its tokenizer.

    python benchmarks/testbed/train_testbed.py                      # writes benchmarks/testbed/policy/
    python benchmarks/testbed/train_testbed.py --step_error_rate 0.1 --localization_accuracy 0.8 --out /tmp/p

Half of each batch is rollouts (the testbed's rollout prompt, then a chain whose steps are wrong with
probability ``--step_error_rate``), half localization examples (the localization prompt about a wrong
chain, then ``\\boxed{N}`` with N the first wrong step with probability ``--localization_accuracy``).
The loss covers the completions only. Seeded: the same flags give the same policy.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.testbed import (  # noqa: E402
    MAX_NUMBER,
    POLICY_DIR,
    TASK,
    TRAIN_SEED,
    corrupt_chain,
    localization_label,
    localization_reply,
    localization_request,
    make_tokenizer,
    rollout_prompt,
)
from trl_resets.tasks.arithmetic import sample_problem  # noqa: E402


def examples(rng: random.Random, error_rate: float, loc_accuracy: float):
    """Endless (prompt, completion) pairs, rollouts and localizations alternating."""
    while True:
        problem = sample_problem(rng, rng.choice(TASK["num_steps"]), TASK["max_operand"], TASK["max_start"],
                                 TASK["max_value"], ("+", "-", "*", "/"))
        chain = corrupt_chain(problem, error_rate, rng)
        yield rollout_prompt(problem.question()), chain.completion()
        wrong = chain
        while wrong.first_wrong is None:  # localization is only ever asked about a failed chain
            wrong = corrupt_chain(problem, max(error_rate, 0.5), rng)
        label = localization_label(wrong.first_wrong, len(wrong.steps), loc_accuracy, rng)
        yield localization_request(problem.question(), wrong.steps), localization_reply(label)


def batch_tensors(pairs, tokenizer):
    """Right-padded input ids, attention mask and labels (-100 outside the completion)."""
    rows = []
    for prompt, completion in pairs:
        p = tokenizer(prompt)["input_ids"]
        c = tokenizer(completion)["input_ids"] + [tokenizer.eos_token_id]
        rows.append((p + c, [-100] * len(p) + c))
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    labels = torch.full((len(rows), width), -100)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (seq, lab) in enumerate(rows):
        ids[i, : len(seq)] = torch.tensor(seq)
        labels[i, : len(lab)] = torch.tensor(lab)
        mask[i, : len(seq)] = 1
    return ids, mask, labels


def build_model(tokenizer, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=96, intermediate_size=256, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256, tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
    )
    return LlamaForCausalLM(config)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--step_error_rate", type=float, default=0.25, help="p: chance a step's result is wrong")
    parser.add_argument("--localization_accuracy", type=float, default=0.6, help="q: chance the label is right")
    parser.add_argument("--steps", type=int, default=2500)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(POLICY_DIR))
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core CPU)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    rng = random.Random(f"testbed-{TRAIN_SEED}-{args.seed}")
    stream = examples(rng, args.step_error_rate, args.localization_accuracy)
    # The vocabulary: words of a large sample of both example kinds, plus every number.
    vocab_rng = random.Random(f"testbed-vocab-{args.seed}")
    tokenizer = make_tokenizer(
        text for pair in zip(range(4000), examples(vocab_rng, 0.5, 0.5)) for text in pair[1]
    )
    model = build_model(tokenizer, args.seed)
    print(f"testbed policy: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
          f"vocabulary {len(tokenizer)}")
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(args.steps // 30, 1)

    def lr_at(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(args.steps - warmup, 1)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    model.train()
    start = time.time()
    for step in range(args.steps):
        ids, mask, labels = batch_tensors([next(stream) for _ in range(args.batch_size)], tokenizer)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 250 == 0 or step == args.steps - 1:
            print(f"step {step:5d}  loss {loss.item():.4f}  {time.time() - start:6.0f}s", flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config.do_sample = True
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    settings = {**vars(args), "out": None, "max_number": MAX_NUMBER, "task": TASK,
                "train_seconds": round(time.time() - start)}
    (out / "testbed.json").write_text(json.dumps(settings, indent=2) + "\n")
    print(f"saved to {out} ({time.time() - start:.0f}s)")


if __name__ == "__main__":
    main()
