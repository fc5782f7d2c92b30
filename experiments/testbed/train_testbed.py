"""Trains the fast testbed policy from scratch (about 23 minutes on 2 shared CPU cores) and saves it with its tokenizer.

    python -m experiments.testbed.train_testbed                      # writes experiments/testbed/policy/
    python -m experiments.testbed.train_testbed --hard_ops '*/' --hard_error_rate 0.5 --step_error_rate 0.05 \
        --out experiments/testbed/policy-critical                    # the critical-step testbed
    python -m experiments.testbed.train_testbed --step_error_rate 0.1 --localization_accuracy 0.8 --out /tmp/p
    python -m experiments.testbed.train_testbed --num_steps 8 9 10 --step_error_rate 0.12 \
        --init experiments/testbed/policy --steps 1200 --out experiments/testbed/policy-long
                                                                    # the long-chain testbed
    python -m experiments.testbed.train_testbed --fillers 8 --out experiments/testbed/policy-fillers
                                                                    # the prefix-entropy testbed

Half of each batch is rollouts (the testbed's rollout prompt, then a chain whose steps are wrong with
probability ``--step_error_rate``, or per operator with ``--hard_ops``), half localization examples (the
localization prompt about a wrong chain, then a check line per step and ``\boxed{N}``, N the first wrong
step with probability ``--localization_accuracy``). The loss is the mean of the two halves' token losses
over the completions only. Seeded: the same flags give the same policy.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch

from experiments.testbed import (
    FILLERS,
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
from trl_resets.tasks.arithmetic import sample_problem


def examples(rng: random.Random, error_rate, loc_accuracy: float, task: dict = TASK, fillers=()):
    """Endless (prompt, completion) pairs, rollouts and localizations alternating (``fillers``: see
    `corrupt_chain`)."""
    while True:
        problem = sample_problem(rng, rng.choice(task["num_steps"]), task["max_operand"], task["max_start"],
                                 task["max_value"], ("+", "-", "*", "/"))
        chain = corrupt_chain(problem, error_rate, rng, fillers)
        yield rollout_prompt(problem.question()), chain.completion()
        wrong, tries = chain, 0
        while wrong.first_wrong is None:  # localization is only ever asked about a failed chain: the
            tries += 1  # policy's own failures, at its own error rates (a problem that almost never fails
            wrong = corrupt_chain(problem, error_rate if tries < 100 else 0.5, rng, fillers)  # uniform slips)
        label = localization_label(wrong.first_wrong, len(wrong.steps), loc_accuracy, rng)
        yield localization_request(problem.question(), wrong.steps), localization_reply(wrong.steps, label)


def batch_tensors(pairs, tokenizer):
    """Right-padded input ids, attention mask and labels (-100 outside the completion).

    Pairs alternate rollout, localization (see `examples`).
    """
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


def balanced_loss(logits, labels):
    """Mean token loss of the rollout rows plus that of the localization rows (even and odd rows).

    A localization reply is 4 tokens against about 40 for a rollout: a plain token mean would give the
    localization skill a tenth of the gradient, and the tiny policy would barely learn it.
    """
    losses = torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100, reduction="none"
    ).view(labels.shape[0], -1)
    mask = (labels[:, 1:] != -100).float()
    parts = [losses[k::2].sum() / mask[k::2].sum().clamp(min=1) for k in (0, 1)]
    return (parts[0] + parts[1]) / 2, parts


def build_model(tokenizer, seed: int, layers: int = 4, hidden: int = 96):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 8 // 3, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256, tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
    )
    return LlamaForCausalLM(config)


def save(model, tokenizer, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config.do_sample = True
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--step_error_rate", type=float, default=0.3, help="p: chance a step's result is wrong")
    parser.add_argument("--hard_ops", default="",
                        help="critical-step testbed: these operators' steps (e.g. '*/') slip with --hard_error_rate, "
                             "the others with --step_error_rate")
    parser.add_argument("--hard_error_rate", type=float, default=0.5)
    parser.add_argument("--localization_accuracy", type=float, default=0.7, help="q: chance the label is right")
    parser.add_argument("--num_steps", type=int, nargs="+", default=TASK["num_steps"],
                        help="chain lengths of the task (saved in testbed.json; the benchmarks read it back)")
    parser.add_argument("--fillers", type=int, default=0, choices=range(len(FILLERS) + 1),
                        help="each step opens with one of the first N filler words, drawn uniformly: entropy in "
                             "correct steps that has no bearing on the outcome (0: none)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=96)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(POLICY_DIR))
    parser.add_argument("--init", default=None, help="start from this saved policy instead of from scratch")
    parser.add_argument("--checkpoint_every", type=int, default=0, help="also save every N steps (0: never)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core CPU)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    rng = random.Random(f"testbed-{TRAIN_SEED}-{args.seed}")
    error_rate = args.step_error_rate
    if args.hard_ops:
        error_rate = {op: args.hard_error_rate if op in args.hard_ops else args.step_error_rate for op in "+-*/"}
    task = {**TASK, "num_steps": sorted(args.num_steps)}
    fillers = FILLERS[: args.fillers]
    stream = examples(rng, error_rate, args.localization_accuracy, task, fillers)
    # The vocabulary: words of a large sample of both example kinds, plus every number.
    vocab_rng = random.Random(f"testbed-vocab-{args.seed}")
    tokenizer = make_tokenizer(
        text for pair in zip(range(4000), examples(vocab_rng, 0.5, 0.5, fillers=fillers)) for text in pair[1]
    )
    if args.init:  # go on from a saved policy (same flags otherwise; the data stream starts afresh)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.init)
        model = AutoModelForCausalLM.from_pretrained(args.init)
    else:
        model = build_model(tokenizer, args.seed, args.layers, args.hidden)
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
        loss, parts = balanced_loss(model(input_ids=ids, attention_mask=mask).logits, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if args.checkpoint_every and step and step % args.checkpoint_every == 0:
            save(model, tokenizer, Path(args.out) / f"checkpoint-{step}")
        if step % 250 == 0 or step == args.steps - 1:
            print(f"step {step:5d}  loss {loss.item():.4f} (rollouts {parts[0].item():.4f}, localization "
                  f"{parts[1].item():.4f})  {time.time() - start:6.0f}s", flush=True)

    out = Path(args.out)
    save(model, tokenizer, out)
    settings = {**vars(args), "out": None, "max_number": MAX_NUMBER, "task": task,
                "train_seconds": round(time.time() - start)}
    (out / "testbed.json").write_text(json.dumps(settings, indent=2) + "\n")
    print(f"saved to {out} ({time.time() - start:.0f}s)")


if __name__ == "__main__":
    main()
