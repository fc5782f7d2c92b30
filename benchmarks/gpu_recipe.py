"""The paper's GPU recipe, run on a GPU machine that cannot reach the hub.

    python -m benchmarks.gpu_recipe --tokenizer DIR                  # Qwen2.5-1.5B's shape, 2 optimizer steps
    python -m benchmarks.gpu_recipe --tokenizer DIR --shape tiny -- --max_completion_length 64   # preflight

Launches what a GPU user runs,

    accelerate launch examples/train_srpo.py --config examples/recipes/srpo_qwen2.5-1.5b_numina_gpu.yaml

with every key of the recipe as written except the ones a machine without the hub cannot honour:

* ``model_name_or_path``: a local folder with Qwen2.5-1.5B-Instruct's architecture (Qwen2, 28 layers,
  width 1536, 12 query / 2 key-value heads, MLP 8960, 151936-entry vocabulary, tied embeddings) in
  bfloat16 with **random weights**, and the tokenizer given by ``--tokenizer`` (ids it does not know
  decode to nothing);
* ``dataset_name``: a local folder shaped like NuminaMath-CoT (``problem``, ``solution`` ending in a
  boxed answer, ``source``): 400 ``olympiads`` rows written from the arithmetic task, plus rows of
  another source that the recipe's ``dataset_source`` filter must drop;
* ``output_dir``, ``max_steps`` (default 2: two of the four optimizer steps one generation serves) and
  ``use_vllm`` (kept when vLLM imports, else ``false``).

Random weights never write the thought delimiter, a boxed answer or EOS, so every rollout runs to the
recipe's full 4096-token budget, every rollout fails, every seed is localized and no localization reply
parses: the worst case of the recipe for time and memory. It shows that the recipe runs on a GPU and
fits; it says nothing about learning (the CPU main job and ``learning_speed.py`` do).

The GPU memory peak is polled with ``nvidia-smi`` (memory in use on the device, so it includes PyTorch's
cache). Writes benchmarks/results/gpu_recipe_<shape>.{json,md} (the tiny smoke shape: a new temporary folder;
``--results_dir``: any folder); the last line printed is the headline:
steps done, wall-clock and the memory peak.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "examples" / "recipes" / "srpo_qwen2.5-1.5b_numina_gpu.yaml"
RESULTS = ROOT / "benchmarks" / "results"

# Qwen2.5-1.5B-Instruct's published architecture (its config.json); ``tiny`` keeps the vocabulary and
# the head layout at a width a preflight decodes in seconds.
SHAPES = {
    "qwen2.5-1.5b": {"hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
                     "num_attention_heads": 12, "num_key_value_heads": 2, "vocab_size": 151936,
                     "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "tie_word_embeddings": True},
    "tiny": {"hidden_size": 96, "intermediate_size": 192, "num_hidden_layers": 2, "num_attention_heads": 12,
             "num_key_value_heads": 2, "vocab_size": 151936, "max_position_embeddings": 32768,
             "rms_norm_eps": 1e-6, "tie_word_embeddings": True},
}
ROPE_THETA = 1_000_000.0


def build_model(shape: str, tokenizer_dir: str, folder: Path, device: str) -> int:
    """Writes a random-weight bfloat16 model of the named shape, with the tokenizer, to ``folder``."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    if tokenizer.eos_token_id is None or tokenizer.chat_template is None:
        raise ValueError(f"{tokenizer_dir}: the recipe needs a chat tokenizer with an EOS token.")
    config = Qwen2Config(**SHAPES[shape], bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, rope_parameters={"rope_type": "default",
                                                                               "rope_theta": ROPE_THETA})
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def build_dataset(folder: Path, num_problems: int = 400, other_source: int = 40, seed: int = 0) -> None:
    """A NuminaMath-CoT-shaped ``train.jsonl``: olympiads rows from the arithmetic task, then other rows."""
    from trl_resets.tasks import make_arithmetic_dataset

    rows = make_arithmetic_dataset(num_problems + other_source, num_steps=[3, 4, 5, 6], seed=seed)
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "train.jsonl").open("w") as f:
        for i, row in enumerate(rows):
            record = {"problem": row["prompt"], "solution": "\n".join(row["solution_steps"]),
                      "source": "olympiads" if i < num_problems else "amc_aime"}
            f.write(json.dumps(record) + "\n")


class MemoryPoller:
    """Samples the device's memory in use (MiB) with nvidia-smi every ``every`` seconds."""

    def __init__(self, every: float = 0.5):
        self.every, self.samples, self._stop = every, [], threading.Event()
        self.available = shutil.which("nvidia-smi") is not None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _read(self) -> int | None:
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                                 capture_output=True, text=True, timeout=10, check=False)
            return int(out.stdout.strip().splitlines()[0])
        except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
            return None

    def _run(self):
        start = time.perf_counter()
        while not self._stop.is_set():
            value = self._read()
            if value is not None:
                self.samples.append((round(time.perf_counter() - start, 1), value))
            self._stop.wait(self.every)

    def __enter__(self):
        if self.available:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self.available:
            self._thread.join()

    @property
    def peak_mib(self) -> int | None:
        return max((v for _, v in self.samples), default=None)


def probe(model_dir: Path, rows: int, tokens: int, train_rows: list[int], train_tokens: int) -> dict:
    """Times the pieces of a step in-process, on the model of the run, without the trainer.

    * generation: the thought sampler and plain ``generate`` on ``rows`` rows for ``tokens`` tokens each
      (the recipe's sampling settings and thought caps), in milliseconds per decoding step, on prompts of
      one length and on left-padded prompts of varied lengths;
    * update: the recipe's LoRA (r64 on every projection) with activation checkpointing, forward and
      backward of one micro-batch of each size in ``train_rows`` of ``train_tokens`` completion tokens after a
      200-token prompt, through TRL's ``selective_log_softmax`` at temperature 0.7: seconds and the
      peak of memory PyTorch allocated.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from trl.trainer.utils import selective_log_softmax

    from trl_resets.sampling import TransformersThoughtSampler
    from trl_resets.thoughts import ThoughtFormat

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def peak_gib():
        return round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16 if cuda else torch.float32)
    model = model.to(device).eval()
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    fmt = ThoughtFormat(max_thoughts=20, max_thought_tokens=256, max_completion_tokens=tokens)
    config = GenerationConfig(do_sample=True, temperature=0.7, top_p=0.95, top_k=0)
    sampler = TransformersThoughtSampler(model, tokenizer, fmt, generation_config=config, eos_ids=[])
    result = {"probe_rows": rows, "probe_tokens": tokens}
    # equal: every prompt 200 tokens (no padding); varied: 100..300 tokens, left-padded as in training
    for lengths in ("equal", "varied") if rows else ():
        sizes = [200] * rows if lengths == "equal" else [100 + (200 * i) // max(rows - 1, 1) for i in range(rows)]
        prompts = [torch.randint(0, len(tokenizer), (n,), generator=gen).tolist() for n in sizes]
        calls = (("plain", lambda prompts=prompts: sampler._generate(prompts, config={"max_new_tokens": tokens,
                                                                                      "min_new_tokens": tokens})),
                 ("thought", lambda prompts=prompts: sampler.sample(prompts)))
        if lengths == "equal":
            calls[0][1]()  # warm-up (kernels, allocator)
        for name, call in calls:
            sync()
            start = time.perf_counter()
            call()
            sync()
            result[f"generation_ms_per_step_{name}_{lengths}"] = round((time.perf_counter() - start) / tokens * 1000, 2)
    result["generation_peak_gib"] = peak_gib()

    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(model, LoraConfig(r=64, lora_alpha=64, target_modules=targets, task_type="CAUSAL_LM"))
    if rows:  # generation as the trainer runs it: under the LoRA adapter, in training mode, no checkpointing
        model.gradient_checkpointing_disable()
        sampler.model = model
        sync()
        start = time.perf_counter()
        sampler._generate(prompts, config={"max_new_tokens": tokens, "min_new_tokens": tokens})
        sync()
        result["generation_ms_per_step_plain_varied_lora_train"] = round((time.perf_counter() - start) / tokens * 1000, 2)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for count in train_rows:
        ids = torch.randint(0, vocab, (count, 200 + train_tokens), generator=gen).to(device)
        for _ in range(2):  # the second pass is the one reported
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            sync()
            start = time.perf_counter()
            logits = model(input_ids=ids).logits[:, 200 - 1:-1] / 0.7
            logps = selective_log_softmax(logits, ids[:, 200:])
            (-logps.mean()).backward()
            sync()
            result[f"update_{count}_rows_seconds"] = round(time.perf_counter() - start, 2)
            result[f"update_{count}_rows_peak_gib"] = peak_gib()
            del logits, logps
            model.zero_grad(set_to_none=True)
    result["update_tokens_per_row"] = 200 + train_tokens
    del model
    if cuda:
        torch.cuda.empty_cache()
    return result


def vllm_importable() -> bool:
    try:
        import vllm  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means: no vLLM here
        return False
    return True


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer", required=True, help="a local chat tokenizer folder")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-1.5b")
    parser.add_argument("--max_steps", type=int, default=2)
    parser.add_argument("--work_dir", default=None, help="where the stand-ins and the run go (default: a temp dir)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds before the training run is stopped")
    parser.add_argument("--probe", action="store_true", help="first time generation and one update micro-batch "
                        "in-process; see probe()")
    parser.add_argument("--probe_tokens", type=int, default=256, help="tokens per row in the generation probe")
    parser.add_argument("--probe_rows", type=int, default=128, help="rows in the generation probe (the recipe's "
                        "phase 1: 32 prompts x 4 base rollouts)")
    parser.add_argument("--probe_train_rows", default="16", help="micro-batch sizes in the update probe, "
                        "comma-separated (the recipe's per_device_train_batch_size is 16)")
    parser.add_argument("--probe_train_tokens", type=int, default=4096, help="completion tokens per row in the "
                        "update probe (the recipe's max_completion_length)")
    parser.add_argument("--skip_run", action="store_true", help="only the probe, no training run")
    parser.add_argument("--results_dir", default=None, help="where gpu_recipe_<shape>.{json,md} go (default: "
                        "benchmarks/results; the tiny smoke shape: a new temporary folder)")
    parser.add_argument("extra", nargs="*", help="more recipe overrides for the training run, after --")
    opts = parser.parse_args(argv)

    import tempfile

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    work = Path(opts.work_dir or tempfile.mkdtemp(prefix="gpu_recipe_"))
    model_dir, data_dir, out_dir = work / "model", work / "numina", work / "run"
    start = time.perf_counter()
    params = build_model(opts.shape, opts.tokenizer, model_dir, device)
    build_dataset(data_dir)
    setup_s = time.perf_counter() - start
    probed = {}
    if opts.probe:
        probed = probe(model_dir, rows=opts.probe_rows, tokens=opts.probe_tokens, train_tokens=opts.probe_train_tokens,
                       train_rows=[int(x) for x in opts.probe_train_rows.split(",") if x.strip()])
        print(json.dumps(probed), flush=True)
    if opts.skip_run:
        return {"returncode": 0, **probed}
    use_vllm = "true" if vllm_importable() else "false"
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
        "--mixed_precision", "bf16" if device == "cuda" else "no", "--dynamo_backend", "no",
        str(ROOT / "examples" / "train_srpo.py"), "--config", str(RECIPE),
        "--model_name_or_path", str(model_dir), "--dataset_name", str(data_dir), "--output_dir", str(out_dir),
        "--max_steps", str(opts.max_steps), "--use_vllm", use_vllm, *opts.extra,
    ]
    if device == "cpu":  # a smoke run of this script where there is no GPU
        command += ["--use_cpu", "true", "--bf16", "false", "--dtype", "float32"]
    print("$ " + " ".join(command), flush=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1")
    start = time.perf_counter()
    with MemoryPoller() as memory:
        child = subprocess.Popen(command, env=env, cwd=ROOT)
        try:
            rc = child.wait(timeout=opts.timeout)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
            rc = "timeout"
    wall = time.perf_counter() - start

    metrics_file = out_dir / "metrics.jsonl"
    lines = [json.loads(x) for x in metrics_file.read_text().splitlines()] if metrics_file.exists() else []
    steps = [x for x in lines if "loss" in x]
    summary_file = out_dir / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.exists() else {}
    resets_file = out_dir / "resets.jsonl"
    resets = [json.loads(x) for x in resets_file.read_text().splitlines()] if resets_file.exists() else []
    result = {
        "shape": opts.shape, "parameters": params, "device": torch.cuda.get_device_name(0) if device == "cuda" else
        platform.processor() or platform.machine(), "torch": torch.__version__, "use_vllm": use_vllm,
        "overrides": opts.extra, "returncode": rc, "setup_seconds": round(setup_s, 1), "wall_seconds": round(wall, 1),
        "train_seconds": summary.get("train_seconds"), "steps_done": len(steps), "max_steps": opts.max_steps,
        "peak_gpu_memory_mib": memory.peak_mib, "gpu_memory_samples": len(memory.samples),
        "step_time": [x.get("step_time") for x in steps], "loss": [x.get("loss") for x in steps],
        "completion_mean_length": [x.get("completions/mean_length") for x in steps],
        "tokens_base": [x.get("resets/tokens_base") for x in steps],
        "tokens_suffix": [x.get("resets/tokens_suffix") for x in steps],
        "tokens_localization": [x.get("resets/tokens_localization") for x in steps],
        "parse_failure_rate": [x.get("resets/parse_failure_rate") for x in steps],
        "resets": len(resets), "adapter_written": (out_dir / "adapter_model.safetensors").exists(),
        "card_written": (out_dir / "README.md").exists(), **probed,
    }
    results = Path(opts.results_dir or (tempfile.mkdtemp(prefix="trl-resets-gpu-recipe-") if opts.shape == "tiny"
                                        else RESULTS))
    results.mkdir(parents=True, exist_ok=True)
    name = f"gpu_recipe_{opts.shape}"
    (results / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    rows = [f"| {k} | {v} |" for k, v in result.items() if k not in ("overrides",)]
    (results / f"{name}.md").write_text(
        f"# The GPU recipe on {result['device']}, {opts.shape} shape, random weights\n\n"
        f"`python -m benchmarks.gpu_recipe --tokenizer DIR --shape {opts.shape} --max_steps {opts.max_steps}"
        + (" -- " + " ".join(opts.extra) if opts.extra else "") + "`\n\n| | |\n|---|---|\n" + "\n".join(rows) + "\n")
    for row in rows:
        print(row)
    print(f"results in {results}")
    peak = f"{memory.peak_mib / 1024:.1f} GiB" if memory.peak_mib is not None else "not measured"
    print(f"gpu recipe ({opts.shape}): rc={rc}, {len(steps)}/{opts.max_steps} steps, {wall:.0f} s, "
          f"GPU memory peak {peak}")
    return result


if __name__ == "__main__":
    outcome = main()
    sys.exit(0 if outcome["returncode"] == 0 else 1)
