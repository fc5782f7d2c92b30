"""Tokens an SRPO step forwards with and without `pack_shared_prefixes`, and the update pass's CPU cost.

    python -m benchmarks.forward_tokens                          # everything; writes to a scratch folder
    python -m benchmarks.forward_tokens --out benchmarks/results # the run docs/results.md cites
    python -m benchmarks.forward_tokens --tokens-only            # part 1 only (seconds)

Part 1, forward tokens per prompt and pass. Each setting's rows are laid out as the trainer lays them out
(`ResetTrainer._reset_rollout`: every row's prompt, a reset row's completion = the seed's prefix + its suffix) and
padded as TRL pads them (prompts left, completions right); the packed counts come from the trainer's own grouping
and packing (`packing.groups_by_content`, `packing.pack`). Each of the old-policy, reference and update passes
forwards these tokens (an SRPO step runs the update pass, plus the old-policy pass when it is off-policy or under
vLLM importance sampling, plus the reference pass when beta > 0). Lengths are fixed per setting: every response is
the setting's response length, every reset prefix and suffix its prefix and suffix lengths. GRPO is the recipe's
baseline at the same rollout budget per prompt: 8 rows from the prompt (G1 = 8, k = 0). "Packed" packs every
shared prefix (the fewest tokens); "dense-mask choice (1.5B)" is what the trainer packs for Qwen2.5-1.5B with SDPA
or eager attention, whose masked square grows with the square of a pack's length (`packing.pair_cost`).

Part 2, the update pass (forward and backward through TRL's fused LM head, as the trainer runs it) of one prompt's
8 SRPO rows (1x4 split) on a small random Llama, at a scaled-down shape with the paper's length ratios: unpacked,
packed as the trainer packs them (`packing.plan` for this model), and with every shared prefix packed. Timing: the
variants take turns in one process (one warm-up pass each, then ``--repeats`` rounds, each in a new order; the
median), so that the load of a shared machine falls on all of them alike. Memory: each variant runs two passes in
a fresh process; its peak resident memory (RSS) minus the RSS before the first pass. The packed log-probabilities
are checked against the unpacked ones.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from trl_resets import packing

MIB = 2**20
# (prompt, response, reset prefix, reset suffix) tokens per setting
SETTINGS = {
    "main job (CPU recipe)": (60, 128, 40, 88),
    "paper, prompt 300": (300, 2500, 790, 1720),
    "paper, prompt 2048": (2048, 2500, 790, 1720),
}
SPLIT = (4, 1, 4)  # G1 base rows, k reset states, G2 suffixes each: the 1x4 split
GRPO_ROWS = 8
SCALE = 8  # part 2 divides the paper's lengths by this
# `packing.pair_cost` of Qwen2.5-1.5B (28 layers, hidden 1536, 1.54B parameters): the grouping the trainer picks for
# SDPA or eager attention, whose dense masked square grows with the square of a pack's length
QWEN_1P5B_PAIR_COST = 2.0 * 28 * 1536 / 1.54e9
VARIANTS = ("unpacked", "packed", "packed, every prefix")  # packed: as the trainer plans it for the model


def layout(prompt_len: int, response: int, prefix: int, suffix: int, split=SPLIT, seed: int = 0):
    """One prompt's rows as the trainer hands them to TRL: (prompt ids, completion ids) per row."""
    g = torch.Generator().manual_seed(seed)

    def tokens(n):
        return torch.randint(3, 1000, (n,), generator=g).tolist()

    base, k, per_prefix = split
    prompt = tokens(prompt_len)
    rows = [(prompt, tokens(response)) for _ in range(base)]
    for _ in range(k):
        shared = tokens(prefix)
        rows += [(prompt, shared + tokens(suffix)) for _ in range(per_prefix)]
    return rows


def padded(rows):
    """TRL's batch: prompts left-padded, completions right-padded; (ids, mask, completion width)."""
    width, keep = max(len(p) for p, _ in rows), max(len(c) for _, c in rows)
    ids = torch.zeros(len(rows), width + keep, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, (p, c) in enumerate(rows):
        ids[r, width - len(p):width + len(c)] = torch.tensor(p + c)
        mask[r, width - len(p):width + len(c)] = 1
    return ids, mask, keep


def count(rows, pair_cost: float | None = None) -> dict:
    """Real and padded tokens of one pass over the rows (one micro-batch), unpacked and packed: every shared prefix
    (``pair_cost=None``), or as the trainer packs them for a model of that `packing.pair_cost` (`packing.plan`,
    which may leave them unpacked)."""
    ids, mask, keep = padded(rows)
    unpacked = {"rows": len(rows), "unpacked": int(mask.sum()), "unpacked_padded": ids.numel()}
    if pair_cost is None:
        group_ids, shared = packing.groups_by_content(ids, mask)
    else:
        found = packing.plan(ids, mask, len(rows), pair_cost)
        if found is None:
            return {**unpacked, "packs": 0, "packed": unpacked["unpacked"], "packed_padded": ids.numel()}
        group_ids, shared, _ = found
    batch = packing.pack(ids, mask, keep, group_ids, shared)
    return {**unpacked, "packs": len(batch.lengths), "packed": sum(batch.lengths), "packed_padded": batch.num_tokens}


def tokens_table() -> tuple[list[dict], str]:
    records = []
    for name, (prompt, response, prefix, suffix) in SETTINGS.items():
        srpo_rows = layout(prompt, response, prefix, suffix)
        grpo_rows = layout(prompt, response, prefix, suffix, split=(GRPO_ROWS, 0, 0))
        records.append({"setting": name, "prompt": prompt, "response": response, "prefix": prefix,
                        "suffix": suffix, "srpo": count(srpo_rows), "grpo": count(grpo_rows),
                        "srpo_dense_1p5b": count(srpo_rows, QWEN_1P5B_PAIR_COST),
                        "grpo_dense_1p5b": count(grpo_rows, QWEN_1P5B_PAIR_COST)})
    lines = [
        ("| setting: prompt / response / reset prefix + suffix | SRPO unpacked | SRPO packed | packed / unpacked "
         "| SRPO packed, dense-mask choice (1.5B) | GRPO unpacked | GRPO packed | GRPO packed, dense-mask choice (1.5B) "
         "| SRPO packed / GRPO unpacked | SRPO unpacked / GRPO unpacked |"),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for rec in records:
        s, g, sd, gd = rec["srpo"], rec["grpo"], rec["srpo_dense_1p5b"], rec["grpo_dense_1p5b"]
        lines.append(
            f"| {rec['setting']}: {rec['prompt']} / {rec['response']} / {rec['prefix']} + {rec['suffix']} "
            f"| {s['unpacked']:,} | {s['packed']:,} | {s['packed'] / s['unpacked']:.3f} "
            f"| {sd['packed']:,} ({sd['packed'] / sd['unpacked']:.3f}) | {g['unpacked']:,} | {g['packed']:,} "
            f"| {gd['packed']:,} ({gd['packed'] / gd['unpacked']:.3f}) "
            f"| {s['packed'] / g['unpacked']:.3f} | {s['unpacked'] / g['unpacked']:.3f} |")
    return records, "\n".join(lines)


def _model(vocab: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096)
    config._attn_implementation = "sdpa"
    model = LlamaForCausalLM(config).train()
    add_fused_lm_head(model, outputs=("log_probs", "entropy"))  # as GRPOTrainer patches the policy
    return model


def update_pass(model, ids, mask, keep, variant: str):
    """Per-token log-probabilities and entropies of the rows, then backward of a loss over them; the log-probs."""
    if variant == "unpacked":
        labels = ids.masked_fill(mask == 0, -100)
        labels[:, :-keep] = -100
        out = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
        logps, entropy = out.log_probs[:, -keep:], out.entropy[:, -keep:]
    else:
        if variant == "packed":  # the trainer's plan; it packs here (checked by update_table)
            group_ids, shared, _ = packing.plan(ids, mask, ids.size(0), packing.pair_cost(model))
        else:
            group_ids, shared = packing.groups_by_content(ids, mask)
        batch = packing.pack(ids, mask, keep, group_ids, shared, packing.mask_kind(model))
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                    shift_labels=batch.labels, fused_lm_head=True)
        logps, entropy = packing.unpack(out.log_probs, batch), packing.unpack(out.entropy, batch)
    live = mask[:, -keep:]
    loss = -(logps * live).sum() / live.sum() - 0.01 * (entropy * live).sum() / live.sum()
    loss.backward()
    model.zero_grad(set_to_none=True)
    return logps.detach()


def _shape_rows(prompt_len: int):
    _, response, prefix, suffix = SETTINGS["paper, prompt 300"]
    return layout(prompt_len, response // SCALE, prefix // SCALE, suffix // SCALE)


def worker(variant: str, prompt_len: int, vocab: int) -> dict:
    """Peak RSS of two update passes of one variant (a fresh process each), and its log-probabilities."""
    import psutil

    torch.set_num_threads(1)
    ids, mask, keep = padded(_shape_rows(prompt_len))
    model = _model(vocab)
    process = psutil.Process()
    baseline = process.memory_info().rss
    peak = [baseline]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            time.sleep(0.002)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    logps = update_pass(model, ids, mask, keep, variant)
    update_pass(model, ids, mask, keep, variant)
    stop.set()
    thread.join()
    return {"peak_mib": (peak[0] - baseline) / MIB, "logps": logps.tolist()}


def run_worker(variant: str, prompt_len: int, vocab: int) -> dict:
    command = [sys.executable, __file__, "--worker", variant, "--prompt", str(prompt_len), "--vocab", str(vocab)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(command, capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def timings(prompt_len: int, variants: list[str], repeats: int, vocab: int) -> dict[str, list[float]]:
    """Seconds per update pass of each variant, in this process, the variants taking turns (each round in a new
    order) so that the load of the shared machine falls on all of them alike; one warm-up pass each first."""
    torch.set_num_threads(1)
    ids, mask, keep = padded(_shape_rows(prompt_len))
    model = _model(vocab)
    for variant in variants:
        update_pass(model, ids, mask, keep, variant)
    seconds: dict[str, list[float]] = {v: [] for v in variants}
    for round_ in range(repeats):
        for variant in variants[round_ % len(variants):] + variants[:round_ % len(variants)]:
            start = time.perf_counter()
            update_pass(model, ids, mask, keep, variant)
            seconds[variant].append(time.perf_counter() - start)
    return seconds


def update_table(repeats: int, vocab: int) -> tuple[list[dict], str]:
    _, response, prefix, suffix = SETTINGS["paper, prompt 300"]
    records = []
    for prompt_len in (300 // SCALE, 2048 // SCALE):
        rows = _shape_rows(prompt_len)
        cost = packing.pair_cost(_model(vocab))
        ids, mask, _ = padded(rows)
        variants = [v for v in VARIANTS if v != "packed" or packing.plan(ids, mask, len(rows), cost) is not None]
        results = {v: run_worker(v, prompt_len, vocab) for v in variants}
        for variant, seconds in timings(prompt_len, variants, repeats, vocab).items():
            results[variant].update(seconds=statistics.median(seconds), all_seconds=seconds)
        reference = torch.tensor(results["unpacked"].pop("logps"))
        for variant in variants:
            if variant != "unpacked":
                logps = torch.tensor(results[variant].pop("logps"))
                results[variant]["max_abs_logp_diff"] = (logps - reference).abs().max().item()
        records.append({"prompt": prompt_len, "response": response // SCALE, "prefix": prefix // SCALE,
                        "suffix": suffix // SCALE, "pair_cost": cost,
                        "tokens": {"packed": count(rows, cost), "packed, every prefix": count(rows)},
                        "variants": variants, **results})
    lines = [
        ("| shape: prompt / response / prefix + suffix, 8 rows | variant | tokens (padded) | update pass "
         "| / unpacked | peak RSS | max abs log-prob diff |"),
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for rec in records:
        base = rec["unpacked"]
        if "packed" not in rec["variants"]:
            lines.append(f"| {rec['prompt']} / {rec['response']} / {rec['prefix']} + {rec['suffix']} | packed "
                         "| the trainer's plan: unpacked (packing would cost more) | | | | |")
        for variant in rec["variants"]:
            t = rec["tokens"].get(variant, rec["tokens"]["packed"])  # "unpacked" reads the unpacked counts
            tokens = (f"{t['unpacked']:,} ({t['unpacked_padded']:,})" if variant == "unpacked"
                      else f"{t['packed']:,} ({t['packed_padded']:,})")
            r = rec[variant]
            diff = f"{r['max_abs_logp_diff']:.1e}" if "max_abs_logp_diff" in r else "-"
            lines.append(
                f"| {rec['prompt']} / {rec['response']} / {rec['prefix']} + {rec['suffix']} | {variant} | {tokens} "
                f"| {r['seconds']:.2f} s | {r['seconds'] / base['seconds']:.2f} | {r['peak_mib']:.0f} MiB | {diff} |")
    return records, "\n".join(lines)


def machine() -> str:
    import platform

    load = os.getloadavg()
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"1 thread, load average {load[0]:.1f} at the end (other jobs share the cores)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="folder for forward_tokens.{json,md} (default: a scratch folder)")
    parser.add_argument("--tokens-only", action="store_true", help="part 1 only")
    parser.add_argument("--repeats", type=int, default=5, help="timed update passes per variant (median)")
    parser.add_argument("--vocab", type=int, default=8192, help="vocabulary of the random model of part 2")
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--prompt", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.prompt, args.vocab)))
        return
    if args.repeats < 1:
        raise ValueError(f"--repeats={args.repeats}: time at least one pass.")
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="forward_tokens_"))
    out.mkdir(parents=True, exist_ok=True)
    token_records, token_lines = tokens_table()
    print("Forward tokens per prompt and pass (1x4 split, 8 rows; GRPO: 8 rows)\n" + token_lines)
    report = {"tokens": token_records}
    text = ["## Forward tokens per prompt and pass", "", token_lines]
    if not args.tokens_only:
        update_records, update_lines = update_table(args.repeats, args.vocab)
        print(f"\nUpdate pass, scaled down 1/{SCALE} (random Llama: 4 layers, hidden 256, vocab {args.vocab}; sdpa, "
              f"fp32; median of {args.repeats})\n" + update_lines)
        report["update_pass"] = update_records
        text += ["", f"## Update pass, scaled down 1/{SCALE}", "", update_lines]
    report["machine"] = machine()
    text += ["", f"Machine: {report['machine']}"]
    print(f"\nMachine: {report['machine']}")
    (out / "forward_tokens.json").write_text(json.dumps(report, indent=1))
    (out / "forward_tokens.md").write_text("\n".join(text) + "\n")
    print(f"wrote {out / 'forward_tokens.json'} and {out / 'forward_tokens.md'}")


if __name__ == "__main__":
    main()
