r"""Format warm-up: a short supervised fine-tune that teaches a small model the thought format.

Out of the box SmolLM2-135M-Instruct writes numbered steps with no ``</thought>`` and no
``\boxed{}``, so every rollout is one long thought and no answer is ever read. Before reset-based
RL can do anything, the model must write delimited thoughts and box its answer, and (for SRPO's
self-localization) answer the localization prompt with ``\boxed{N}``.

The warm-up data comes from the arithmetic task (:mod:`trl_resets.tasks.arithmetic`):

* rollout examples: the prompt the trainer feeds the model (the question wrapped in the rollout
  template, as a chat user message) and the reference solution written thought by thought;
* localization examples: a reference chain with one injected calculation error whose wrong value
  is carried forward, shown in the localization prompt; the target reply is ``\boxed{j}`` with
  ``j`` the first wrong thought according to the exact step checker.

TRL's ``SFTTrainer`` trains a LoRA adapter on the completions only; the adapter is merged and the
merged model saved under the user cache, keyed by a hash of the base model and the settings, so a
later run with the same settings reuses it (:func:`warm_up`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import datasets

from ..localizers import DEFAULT_LOCALIZATION_TEMPLATE, LocalizationRequest, localization_prompt
from ..tasks.arithmetic import ArithmeticProblem, apply_operation, check_steps, make_arithmetic_dataset
from ..thoughts import DEFAULT_DELIMITER, DEFAULT_ROLLOUT_TEMPLATE, wrap_question
from .models import build_folder_atomically, model_cache_folder, release_host_memory

MARKER_FILE = "trl_resets_warmup.json"
THOUGHT_SEPARATOR = "\n"
# Bump when the data or the training recipe changes in a way the settings do not capture.
RECIPE_VERSION = 1


@dataclass(frozen=True)
class WarmupSettings:
    """What the warm-up trains on and how.

    Args:
        num_rollout_examples: reference solutions (rollout format) in the SFT data.
        num_localization_examples: chains with an injected error (localization format).
        num_steps: arithmetic steps per problem, drawn uniformly from this tuple.
        operations: operators of the generated problems.
        seed: seed of the generated problems and injected errors; keep it apart from the training
            task's seed so the warm-up does not see the RL problems.
        epochs, learning_rate, batch_size: SFT optimization.
        lora_r, lora_alpha: the LoRA adapter that is trained and then merged.
        lora_top_layers: share of the decoder layers, counted from the top, that get the adapter;
            backpropagation stops at the lowest adapted layer, so 0.5 saves about a third of the
            compute of adapting every layer.
        rollout_template, localization_template, delimiter: must match the trainer's settings, so
            the model learns the prompts it will be given.
        max_length: longest tokenized example; longer ones are truncated by SFTTrainer.
    """

    num_rollout_examples: int = 64
    num_localization_examples: int = 32
    num_steps: tuple[int, ...] = (2, 3)
    operations: str = "+-"
    seed: int = 1000
    epochs: float = 1.0
    learning_rate: float = 2e-3
    batch_size: int = 8
    lora_r: int = 16
    lora_alpha: int = 32
    lora_top_layers: float = 0.5
    rollout_template: str = DEFAULT_ROLLOUT_TEMPLATE
    localization_template: str = DEFAULT_LOCALIZATION_TEMPLATE
    delimiter: str = DEFAULT_DELIMITER
    max_length: int = 512

    def __post_init__(self):
        if self.num_rollout_examples < 0 or self.num_localization_examples < 0:
            raise ValueError(
                f"example counts must be >= 0, got num_rollout_examples={self.num_rollout_examples}, "
                f"num_localization_examples={self.num_localization_examples}."
            )
        if self.num_rollout_examples + self.num_localization_examples == 0:
            raise ValueError("the warm-up needs at least one example; raise num_rollout_examples.")
        if self.num_localization_examples and max(self.num_steps) < 2:
            raise ValueError(
                f"localization examples need chains of 2 or more steps, but num_steps={self.num_steps}; "
                "allow longer problems or set num_localization_examples=0."
            )
        if not 0 < self.lora_top_layers <= 1:
            raise ValueError(f"lora_top_layers must be in (0, 1], got {self.lora_top_layers}.")
        if self.epochs <= 0 or self.learning_rate <= 0 or self.batch_size < 1:
            raise ValueError(
                f"need epochs > 0, learning_rate > 0 and batch_size >= 1, got {self.epochs}, "
                f"{self.learning_rate}, {self.batch_size}."
            )

    def fingerprint(self) -> dict:
        data = asdict(self)
        data["num_steps"] = list(self.num_steps)
        data["recipe_version"] = RECIPE_VERSION
        return data


# --------------------------------------------------------------------------- data


def chat_prompt(text: str) -> list[dict]:
    """A one-turn conversational prompt, as the trainer builds it from a conversational dataset."""
    return [{"role": "user", "content": text}]


def thoughts_completion(thoughts: list[str], delimiter: str = DEFAULT_DELIMITER) -> str:
    """The thoughts as the model should write them: each closed by the delimiter."""
    return THOUGHT_SEPARATOR.join(f"{t}{delimiter}" for t in thoughts)


def rollout_example(row: dict, template: str = DEFAULT_ROLLOUT_TEMPLATE, delimiter: str = DEFAULT_DELIMITER) -> dict:
    """Prompt = the trainer's rollout prompt for the row's question; completion = its reference thoughts."""
    return {
        "prompt": chat_prompt(wrap_question(row["prompt"], template, delimiter)),
        "completion": [{"role": "assistant", "content": thoughts_completion(row["solution_steps"], delimiter)}],
        "kind": "rollout",
        "target": None,
    }


def inject_error(row: dict, rng: random.Random) -> tuple[list[str], int]:
    """A reference chain with one wrong result, carried forward; returns the thoughts and the checker's label.

    The result of a random step is off by a small amount and every later step operates, correctly,
    on the wrong running value, so the final boxed answer is wrong and only the checker's first
    wrong thought (the injected one) holds the mistake.
    """
    problem = ArithmeticProblem.from_row(row)
    if len(problem.ops) < 2:
        raise ValueError(f"inject_error needs a problem with 2 or more steps, got {len(problem.ops)}.")
    for _ in range(50):
        wrong_step = rng.randrange(len(problem.ops))
        thoughts = _chain_with_error(problem, wrong_step, rng.choice([-3, -2, -1, 1, 2, 3]))
        if thoughts is None:
            continue
        check = check_steps(row, thoughts)
        if check.first_wrong is not None and not check.final_correct:
            return thoughts, check.first_wrong
    raise ValueError(f"could not inject a checkable error into problem {row['prompt']!r}.")


def _chain_with_error(problem: ArithmeticProblem, wrong_step: int, delta: int) -> list[str] | None:
    value, thoughts = problem.start, []
    for i, (op, operand) in enumerate(problem.ops):
        try:
            result = apply_operation(value, op, operand)
        except ValueError:  # an inexact division on the wrong running value
            return None
        if i == wrong_step:
            result += delta
        if result < 0:
            return None
        thoughts.append(f"{value} {op} {operand} = {result}")
        value = result
    thoughts[-1] += f", so the answer is \\boxed{{{value}}}"
    return thoughts


def localization_example(row: dict, rng: random.Random, template: str = DEFAULT_LOCALIZATION_TEMPLATE) -> dict:
    """Prompt = the self-localization prompt on a chain with an injected error; completion = ``\\boxed{j}``."""
    thoughts, first_wrong = inject_error(row, rng)
    prompt = localization_prompt(LocalizationRequest(row["prompt"], thoughts), template)
    return {
        "prompt": chat_prompt(prompt),
        "completion": [{"role": "assistant", "content": f"\\boxed{{{first_wrong}}}"}],
        "kind": "localization",
        "target": first_wrong,
    }


def warmup_dataset(settings: WarmupSettings | None = None) -> datasets.Dataset:
    """The SFT data: rollout examples then localization examples, shuffled together (seeded)."""
    settings = settings or WarmupSettings()
    total = settings.num_rollout_examples + settings.num_localization_examples
    rows = make_arithmetic_dataset(
        total, num_steps=list(settings.num_steps), seed=settings.seed, operations=tuple(settings.operations)
    )
    rng = random.Random(settings.seed)
    examples = [rollout_example(rows[i], settings.rollout_template, settings.delimiter)
                for i in range(settings.num_rollout_examples)]
    multi_step = [rows[i] for i in range(settings.num_rollout_examples, total)]
    for row in multi_step:
        if row["num_steps"] < 2:  # a one-step chain has only one place to be wrong: lengthen it
            row = _longer_problem(row, rng, settings)
        examples.append(localization_example(row, rng, settings.localization_template))
    rng.shuffle(examples)
    return datasets.Dataset.from_list(examples)


def _longer_problem(row: dict, rng: random.Random, settings: WarmupSettings) -> dict:
    steps = max(settings.num_steps)
    seed = rng.randrange(1 << 30)
    return make_arithmetic_dataset(1, num_steps=steps, seed=seed, operations=tuple(settings.operations))[0]


# --------------------------------------------------------------------------- cache


def warmup_cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    return model_cache_folder(cache_dir).parent / "warmup"


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _model_identity(model_path: str) -> dict:
    """What names the base model: its path, and for a local folder a digest of every file it holds.

    The weights, config and tokenizer files are hashed by their contents, so a folder whose weights were
    replaced (a fine-tune saved over the same path, same sizes) gets a new key. Hidden files and Markdown
    (a model card) are left out: they do not change what the warm-up trains.
    """
    identity = {"model": str(model_path)}
    folder = Path(model_path)
    if folder.is_dir():
        identity["files"] = sorted(
            (p.name, _file_digest(p)) for p in folder.iterdir()
            if p.is_file() and not p.name.startswith(".") and p.suffix != ".md"
        )
    return identity


def warmup_key(model_path: str, settings: WarmupSettings) -> str:
    """A short hash of the base model and the settings: the cache folder's name."""
    blob = json.dumps({"base": _model_identity(model_path), "settings": settings.fingerprint()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def warmup_path(model_path: str, settings: WarmupSettings | None = None,
                cache_dir: str | os.PathLike | None = None) -> Path:
    """Where :func:`warm_up` stores (or finds) the warmed-up model."""
    settings = settings or WarmupSettings()
    name = Path(str(model_path).rstrip("/")).name or "model"
    return warmup_cache_root(cache_dir) / f"{name}-{warmup_key(model_path, settings)}"


def is_warmed_up(folder: Path) -> bool:
    return (Path(folder) / MARKER_FILE).is_file() and (Path(folder) / "config.json").is_file()


def warm_up(
    model_path: str,
    settings: WarmupSettings | None = None,
    cache_dir: str | os.PathLike | None = None,
    force: bool = False,
    use_cpu: bool | None = None,
    show_progress: bool = True,
) -> str:
    """Return a folder holding ``model_path`` after the format warm-up, training it only when not cached.

    The model is saved into a temporary sibling folder and renamed into place once complete, so an
    interrupted run never leaves a half-written model behind; ``force=True`` retrains.
    """
    settings = settings or WarmupSettings()
    target = warmup_path(model_path, settings, cache_dir)
    if is_warmed_up(target) and not force:
        return str(target)

    def build(staging: Path) -> None:
        report = _train(model_path, settings, staging, use_cpu, show_progress)
        (staging / MARKER_FILE).write_text(json.dumps(
            {"base": _model_identity(model_path), "settings": settings.fingerprint(), "training": report}, indent=2
        ) + "\n")

    build_folder_atomically(target, build, is_complete=is_warmed_up, replace=True)
    release_host_memory()  # the SFT trainer's memory, before the run that follows in this process
    return str(target)


def _train(model_path: str, settings: WarmupSettings, out_dir: Path, use_cpu: bool | None,
           show_progress: bool) -> dict:
    """SFT with a LoRA adapter on the completions, then merge and save model + tokenizer to ``out_dir``."""
    import time

    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    if use_cpu is None:
        use_cpu = not torch.cuda.is_available()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    data = warmup_dataset(settings).remove_columns(["kind", "target"])
    with tempfile.TemporaryDirectory(prefix="trl-resets-warmup-") as work:
        args = SFTConfig(
            output_dir=work,
            num_train_epochs=settings.epochs,
            learning_rate=settings.learning_rate,
            lr_scheduler_type="constant",
            per_device_train_batch_size=settings.batch_size,
            max_length=settings.max_length,
            completion_only_loss=True,
            logging_steps=max(1, len(data) // settings.batch_size // 4),
            save_strategy="no",
            report_to="none",
            use_cpu=use_cpu,
            bf16=False,
            seed=settings.seed,
            disable_tqdm=not show_progress,
            dataset_num_proc=None,
        )
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        layers = model.config.num_hidden_layers
        linear = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                         if isinstance(module, torch.nn.Linear) and ".layers." in name})
        peft_config = LoraConfig(
            r=settings.lora_r, lora_alpha=settings.lora_alpha, lora_dropout=0.0, target_modules=linear,
            layers_to_transform=list(range(layers - max(1, round(layers * settings.lora_top_layers)), layers)),
            task_type="CAUSAL_LM",
        )
        trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                             peft_config=peft_config)
        start = time.perf_counter()
        result = trainer.train()
        seconds = time.perf_counter() - start
        merged = trainer.model.merge_and_unload()
    merged.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    return {
        "examples": len(data),
        "steps": trainer.state.global_step,
        "train_loss": result.training_loss,
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "seconds": round(seconds, 1),
    }


# --------------------------------------------------------------------------- measurement


@dataclass
class FormatReport:
    """What :func:`measure_format` saw. Rates are shares in [0, 1]; counts say out of how many."""

    answer_accuracy: float
    delimited_rate: float
    multi_thought_rate: float
    boxed_rate: float
    mean_thoughts: float
    rollouts: int
    localization_parse_rate: float
    localization_accuracy: float
    localization_chance: float
    localization_prompts: int
    self_localization_parse_rate: float
    self_localization_accuracy: float
    self_localization_prompts: int
    seconds: float

    def as_dict(self) -> dict:
        return asdict(self)


def _chat_ids(tokenizer, text: str) -> list[int]:
    ids = tokenizer.apply_chat_template(chat_prompt(text), add_generation_prompt=True, tokenize=True, return_dict=True)
    return list(ids["input_ids"])


def _rate(hits, total) -> float:
    return hits / total if total else math.nan


def measure_format(
    model_path: str,
    num_problems: int = 32,
    rollouts_per_problem: int = 4,
    num_localization: int = 48,
    num_steps: Sequence[int] = (2, 3),
    operations: str = "+-",
    seed: int = 2024,
    temperature: float = 0.7,
    top_p: float = 0.95,
    max_thoughts: int = 6,
    max_thought_tokens: int = 48,
    max_completion_tokens: int = 128,
    localization_max_tokens: int = 32,
    rollout_template: str = DEFAULT_ROLLOUT_TEMPLATE,
    localization_template: str = DEFAULT_LOCALIZATION_TEMPLATE,
    delimiter: str = DEFAULT_DELIMITER,
    batch_size: int = 64,
) -> FormatReport:
    """Measure, on held-out arithmetic problems, what the warm-up is for, as the trainer would see it.

    Rollouts come from the package's thought sampler on the trainer's rollout prompt (sampling at
    ``temperature``); localization replies are greedy, as in training, on the package's
    localization prompt. Localization is measured twice: on reference chains with one injected
    error (label: the step checker's first wrong thought), and on the model's own failed rollouts
    from the first measurement, which is what SRPO asks it in training (same label; a chain whose
    thoughts are all right but stop short resets at its last thought, as ``OracleLocalizer`` does).
    """
    import time

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from ..localizers import parse_step_index
    from ..rewards.math import answers_match, extract_boxed
    from ..sampling import TransformersThoughtSampler
    from ..thoughts import ThoughtFormat, strip_delimiter

    if num_problems < 1 or rollouts_per_problem < 1:
        raise ValueError(f"need num_problems >= 1 and rollouts_per_problem >= 1, got {num_problems}, "
                         f"{rollouts_per_problem}.")
    start = time.perf_counter()
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    fmt = ThoughtFormat(delimiter=delimiter, max_thoughts=max_thoughts, max_thought_tokens=max_thought_tokens,
                        max_completion_tokens=max_completion_tokens)
    eos = model.generation_config.eos_token_id
    eos_ids = list(eos) if isinstance(eos, (list, tuple)) else [eos if eos is not None else tokenizer.eos_token_id]
    sampler = TransformersThoughtSampler(
        model, tokenizer, fmt,
        generation_config=GenerationConfig(do_sample=True, temperature=temperature, top_p=top_p, top_k=0),
        eos_ids=eos_ids, batch_size=batch_size,
    )
    rows = make_arithmetic_dataset(num_problems, num_steps=list(num_steps), seed=seed, operations=tuple(operations))
    contexts, owners = [], []
    for i, row in enumerate(rows):
        ids = _chat_ids(tokenizer, wrap_question(row["prompt"], rollout_template, delimiter))
        contexts += [ids] * rollouts_per_problem
        owners += [i] * rollouts_per_problem
    rollouts = sampler.sample(contexts)

    correct = delimited = multi = boxed = thoughts_total = 0
    failed = []  # (row, thoughts) of the model's own wrong rollouts
    for owner, rollout in zip(owners, rollouts):
        row = rows[owner]
        raw = [tokenizer.decode(rollout.thought_ids(h), skip_special_tokens=True) for h in range(rollout.num_thoughts)]
        thoughts = [strip_delimiter(t, fmt) for t in raw]
        answer = extract_boxed("\n".join(raw))
        ok = answer is not None and answers_match(answer, row["answer"])
        correct += ok
        boxed += answer is not None
        delimited += bool(raw) and all(t.strip().endswith(delimiter) for t in raw)
        multi += len(raw) >= 2
        thoughts_total += len(raw)
        if not ok and thoughts and any(thoughts):
            failed.append((row, thoughts))

    def localize(requests, labels):
        prompts = [_chat_ids(tokenizer, localization_prompt(r, localization_template)) for r in requests]
        replies = sampler.complete(prompts, localization_max_tokens, 0.0)
        texts = tokenizer.batch_decode(replies, skip_special_tokens=True)
        answers = [parse_step_index(t, r.num_steps) for t, r in zip(texts, requests)]
        parsed = sum(a is not None for a in answers)
        hits = sum(a is not None and a == label for a, label in zip(answers, labels))
        return _rate(parsed, len(requests)), _rate(hits, len(requests))

    rng = random.Random(seed)
    loc_rows = make_arithmetic_dataset(num_localization, num_steps=[max(2, k) for k in num_steps], seed=seed + 1,
                                       operations=tuple(operations))
    requests, labels = [], []
    for row in loc_rows:
        thoughts, label = inject_error(row, rng)
        requests.append(LocalizationRequest(row["prompt"], thoughts))
        labels.append(label)
    parse_rate, accuracy = localize(requests, labels) if requests else (math.nan, math.nan)
    chance = _rate(sum(1 / r.num_steps for r in requests), len(requests))

    own_requests, own_labels = [], []
    for row, thoughts in failed:
        label = check_steps(row, thoughts).first_wrong
        if label is None:
            continue
        own_requests.append(LocalizationRequest(row["prompt"], thoughts))
        own_labels.append(min(label, len(thoughts)))
    own_parse, own_accuracy = localize(own_requests, own_labels) if own_requests else (math.nan, math.nan)

    n = len(rollouts)
    return FormatReport(
        answer_accuracy=_rate(correct, n), delimited_rate=_rate(delimited, n), multi_thought_rate=_rate(multi, n),
        boxed_rate=_rate(boxed, n), mean_thoughts=_rate(thoughts_total, n), rollouts=n,
        localization_parse_rate=parse_rate, localization_accuracy=accuracy, localization_chance=chance,
        localization_prompts=len(requests), self_localization_parse_rate=own_parse,
        self_localization_accuracy=own_accuracy, self_localization_prompts=len(own_requests),
        seconds=round(time.perf_counter() - start, 1),
    )
