"""Thought-level sampling against plain generation: same backend, model, prompts and token budget.

    python -m benchmarks.sampler_throughput            # embedded SmolLM2-135M-Instruct
    python -m benchmarks.sampler_throughput --quick    # fewer prompts and tokens (under two minutes), to a temp folder

Prints tokens per second for both and, as its last line, the ratio (thought sampler / plain).
Writes benchmarks/results/sampler_throughput.{json,md,png} (the plot needs matplotlib; without it, no PNG).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from trl_resets.sampling import TransformersThoughtSampler
from trl_resets.tasks import make_arithmetic_dataset
from trl_resets.thoughts import ThoughtFormat, wrap_question

RESULTS = Path(__file__).parent / "results"
TARGET = 0.9


def plot(rates: dict[str, list[float]], ratio: float, path: Path, title: str) -> bool:
    """Bar per sampler (best run) with every run as a dot; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    names = {"plain": "plain generate", "thought": "thought sampler"}
    fig, ax = plt.subplots(figsize=(6.5, 4.6))
    best = [max(rates[k]) for k in names]
    ax.bar(list(names.values()), best, color=["#8c8c8c", "#4c72b0"], width=0.55, label="best run")
    for i, key in enumerate(names):
        ax.scatter([i] * len(rates[key]), rates[key], color="black", s=14, zorder=3,
                   label="each run" if i == 0 else None)
        ax.text(i, best[i], f"{best[i]:.1f}", ha="center", va="bottom", fontsize=9)
    ax.axhline(best[0] * TARGET, color="grey", ls="--", lw=1, label=f"target: {TARGET} x plain")
    ax.set_ylabel("generated tokens per second")
    ax.set_ylim(0, max(best) * 1.25)
    ax.set_title(f"thought / plain = {ratio:.3f}", fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    fig.suptitle(title.replace(", load", "\nload"), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model folder or id (default: the embedded SmolLM2)")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128, help="token budget per rollout")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--replot", action="store_true", help="redraw the PNG from the saved JSON")
    args = parser.parse_args()
    if args.replot:
        saved = json.loads((RESULTS / "sampler_throughput.json").read_text())
        plot(saved["runs_tokens_per_s"], saved["ratio"], RESULTS / "sampler_throughput.png",
             f"{Path(saved['model']).name}: {saved['prompts']} prompts x {saved['tokens']} tokens\n{saved['machine']}")
        print(f"thought/plain throughput ratio: {saved['ratio']:.3f}")
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.prompts, args.tokens, args.repeats = 4, 48, 2
    if args.model is None:
        from trl_resets.app.models import default_model_path

        args.model = default_model_path()
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model).eval()
    rows = make_arithmetic_dataset(args.prompts, num_steps=3, seed=1)
    prompts = [
        tok.apply_chat_template([{"role": "user", "content": wrap_question(q)}], add_generation_prompt=True,
                                tokenize=True, return_dict=True)["input_ids"]
        for q in rows["prompt"]
    ]
    # EOS is suppressed and the thought caps are loose, so both paths decode the full budget.
    config = GenerationConfig(do_sample=True, temperature=0.7, top_p=0.95, suppress_tokens=[tok.eos_token_id],
                              pad_token_id=tok.pad_token_id)
    fmt = ThoughtFormat(max_thoughts=10_000, max_thought_tokens=32, max_completion_tokens=args.tokens)
    sampler = TransformersThoughtSampler(model, tok, fmt, config, eos_ids=[])

    def plain():
        ids = sampler._generate(prompts, config={"max_new_tokens": args.tokens, "min_new_tokens": args.tokens})
        return ids.numel()

    def thoughts():
        rollouts = sampler.sample(prompts)
        return sum(len(r.token_ids) for r in rollouts)

    rates = {"plain": [], "thought": []}
    thoughts()  # warm-up
    for _ in range(args.repeats):
        for name, run in (("plain", plain), ("thought", thoughts)):
            start = time.perf_counter()
            tokens = run()
            rates[name].append(tokens / (time.perf_counter() - start))
    best = {k: max(v) for k, v in rates.items()}
    ratio = best["thought"] / best["plain"]
    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
               f"({torch.get_num_threads()} thread(s))")
    load = os.getloadavg()
    machine += f", load average {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} (1/5/15 min) at the end"
    result = {"model": args.model, "prompts": args.prompts, "tokens": args.tokens, "repeats": args.repeats,
              "tokens_per_s": best, "runs_tokens_per_s": rates, "ratio": ratio, "machine": machine}
    results = Path(tempfile.mkdtemp(prefix="trl-resets-sampler-")) if args.quick else RESULTS  # smoke: scratch
    results.mkdir(exist_ok=True)
    (results / "sampler_throughput.json").write_text(json.dumps(result, indent=2))
    table = (
        "| sampler | tokens/s (best of runs) |\n|---|---|\n"
        f"| plain generate | {best['plain']:.1f} |\n| thought sampler | {best['thought']:.1f} |\n"
    )
    (results / "sampler_throughput.md").write_text(
        f"{table}\nratio {ratio:.3f}; {args.prompts} prompts x {args.tokens} tokens; {machine}\n"
    )
    plot(rates, ratio, results / "sampler_throughput.png",
         f"{Path(args.model).name}: {args.prompts} prompts x {args.tokens} tokens\n{machine}")
    print(f"results in {results}")
    print(table)
    print(f"thought/plain throughput ratio: {ratio:.3f}")


if __name__ == "__main__":
    main()
