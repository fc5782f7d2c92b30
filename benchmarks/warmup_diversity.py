"""What the format warm-up leaves for RL to explore: the policy's entropy and its zero-variance groups.

    python -m benchmarks.warmup_diversity                                   # base model and the default warm-up
    python -m benchmarks.warmup_diversity --variant lr=5e-4 --variant lr=2e-4,epochs=2
    python -m benchmarks.warmup_diversity --quick                           # 4 prompts, 8 held-out problems

For each policy (``base``: the embedded SmolLM2-135M-Instruct with no warm-up; ``default``: the main job's
warm-up; each ``--variant``: the main job's warm-up with some of its settings changed, keys ``lr``, ``epochs``,
``examples``, ``localization``), on the main job's training problems and with its rollout settings (prompt,
thought caps, temperature, top-p):

* ``entropy``: the mean per-token entropy (nats) of the sampling distribution (logits over the temperature) over
  every sampled completion token, pooled, as the trainer logs ``entropy``;
* ``zero_std_8`` / ``zero_std_4``: the share of groups (8 rollouts of a prompt, or 4 of them: SRPO's base group
  G1) whose rewards are all equal, which give no gradient (the trainer's ``frac_reward_zero_std``);
* ``distinct``: distinct completion texts per prompt, over 8;
* ``sampled_pass`` / ``boxed`` / ``length``: the rollouts' pass rate, share with a boxed answer, mean tokens;
* ``greedy_pass``: the greedy pass rate on the held-out problems (the main job's validation).

Warm-ups are cached as the main job caches them (a variant is trained once). Writes ``--out`` (default: a temp
folder) ``warmup_diversity.json``; prints one JSON line per policy.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

VARIANT_KEYS = {"lr": "--warmup_learning_rate", "epochs": "--warmup_epochs", "examples": "--warmup_examples",
                "localization": "--warmup_localization_examples"}


def variant_argv(spec: str) -> list[str]:
    """``lr=5e-4,epochs=2`` as the main job's flags."""
    argv = []
    for part in filter(None, spec.split(",")):
        key, _, value = part.partition("=")
        if key not in VARIANT_KEYS or not value:
            raise ValueError(f"variant {spec!r}: each part must be key=value with key in {sorted(VARIANT_KEYS)}.")
        argv += [VARIANT_KEYS[key], value]
    return argv


def rollout_entropy(model, contexts, rollouts, temperature: float, batch_size: int = 16):
    """The summed entropy (nats) and the count of the sampled completion tokens."""
    import torch

    total, count = 0.0, 0
    pairs = [(c, r.token_ids) for c, r in zip(contexts, rollouts) if r.token_ids]
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        width = max(len(c) + len(t) for c, t in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for i, (c, t) in enumerate(chunk):
            ids[i, :len(c) + len(t)] = torch.tensor(c + list(t))
            mask[i, :len(c) + len(t)] = 1
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits.float() / temperature
        for i, (c, t) in enumerate(chunk):
            # positions len(c)-1 .. len(c)+len(t)-2 predict the completion tokens
            step = logits[i, len(c) - 1:len(c) + len(t) - 1]
            logp = torch.log_softmax(step, dim=-1)
            total += float(-(logp.exp() * logp).sum())
            count += len(t)
    return total, count


def measure(path: str, args, task, run, prompts: int, group: int, seed: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from trl_resets.app import harness
    from trl_resets.evaluation.callback import _trainer_settings
    from trl_resets.evaluation.generation import eos_ids, prompt_ids, transformers_completer
    from trl_resets.rewards import boxed_answer_reward
    from trl_resets.sampling import TransformersThoughtSampler

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    settings = _trainer_settings(args, None)
    rows = harness.load_problems(task).select(range(prompts))
    contexts = [prompt_ids(tokenizer, row["prompt"], settings) for row in rows for _ in range(group)]
    answers = [row["answer"] for row in rows for _ in range(group)]
    config = GenerationConfig(do_sample=True, temperature=args.temperature, top_p=args.top_p, top_k=0)
    sampler = TransformersThoughtSampler(model, tokenizer, settings.thought_format(), generation_config=config,
                                         eos_ids=eos_ids(model.generation_config, tokenizer), batch_size=64)
    tic = time.perf_counter()
    rollouts = sampler.sample(contexts)
    texts = [tokenizer.decode(r.token_ids, skip_special_tokens=True) for r in rollouts]
    rewards = boxed_answer_reward(completions=texts, answer=answers)
    entropy, tokens = rollout_entropy(model, contexts, rollouts, args.temperature)

    def zero_std(size):
        groups = [rewards[i:i + size] for i in range(0, len(rewards), size)]
        return sum(len(set(g)) == 1 for g in groups) / len(groups)

    held_out = harness.load_validation(task, run, harness.load_problems(task))
    greedy = transformers_completer(model, tokenizer, type(settings)(**{**settings.__dict__, "batch_size": 64}))
    with torch.no_grad():
        greedy_texts = [s[0] for s in greedy.complete(list(held_out["prompt"]))]
    greedy_scores = boxed_answer_reward(completions=greedy_texts, answer=held_out["answer"])
    return {
        "entropy": round(entropy / max(tokens, 1), 4),
        "zero_std_8": round(zero_std(group), 3),
        "zero_std_4": round(zero_std(group // 2), 3),
        "distinct": round(sum(len(set(texts[i:i + group])) for i in range(0, len(texts), group)) / prompts, 2),
        "sampled_pass": round(sum(r >= 1 for r in rewards) / len(rewards), 3),
        "boxed": round(sum("\\boxed" in t for t in texts) / len(texts), 3),
        "length": round(tokens / len(texts), 1),
        "greedy_pass": round(sum(s >= 1 for s in greedy_scores) / len(greedy_scores), 3),
        "held_out": len(greedy_scores),
        "rollouts": len(texts),
        "seconds": round(time.perf_counter() - tic, 1),
        "load_average": round(os.getloadavg()[0], 2),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", action="append", default=[], help="warm-up settings, e.g. lr=5e-4,epochs=2")
    parser.add_argument("--no_base", action="store_true", help="leave out the base model")
    parser.add_argument("--no_default", action="store_true", help="leave out the default warm-up")
    parser.add_argument("--prompts", type=int, default=16, help="training problems sampled")
    parser.add_argument("--group", type=int, default=8, help="rollouts per problem (even)")
    parser.add_argument("--validation_problems", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="4 prompts, 8 held-out problems")
    parser.add_argument("--out", default=None)
    parser.add_argument("job_args", nargs="*", help="further flags of the main job (after --)")
    opts = parser.parse_args()
    if opts.quick:
        opts.prompts, opts.validation_problems = 4, 8
    if opts.prompts < 1 or opts.group < 2 or opts.group % 2:
        raise ValueError(f"prompts={opts.prompts}, group={opts.group}: need prompts >= 1 and an even group >= 2.")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import torch
    import transformers

    torch.set_num_threads(opts.threads)
    transformers.utils.logging.set_verbosity_error()
    from trl_resets.app import harness

    policies = ([] if opts.no_base else [("base", ["--warmup", "false"])]) + \
        ([] if opts.no_default else [("default", [])]) + [(v, variant_argv(v)) for v in opts.variant]
    results = []
    for name, flags in policies:
        argv = ["--output_dir", tempfile.mkdtemp(prefix="diversity-"), "--validation_problems",
                str(opts.validation_problems), *opts.job_args, *flags]
        args, model_args, task, run = harness.parse("srpo", argv)
        tic = time.perf_counter()
        path = harness.prepare_model(args, model_args, task, run)
        warmup_seconds = round(time.perf_counter() - tic, 1)
        record = {"policy": name, "flags": flags, "warmup_seconds": warmup_seconds,
                  **measure(path, args, task, run, opts.prompts, opts.group, opts.seed)}
        print(json.dumps(record), flush=True)
        results.append(record)
    out = Path(opts.out or tempfile.mkdtemp(prefix="warmup-diversity-"))
    out.mkdir(parents=True, exist_ok=True)
    payload = {"command": " ".join(["python", "benchmarks/warmup_diversity.py", *sys.argv[1:]]),
               "machine": f"{os.cpu_count()} cores, {opts.threads} thread(s), shared", "policies": results}
    (out / "warmup_diversity.json").write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {out / 'warmup_diversity.json'}")


if __name__ == "__main__":
    main()
