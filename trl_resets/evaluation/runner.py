"""An evaluation run: a model on a suite, every completion and score in JSON lines, resumable and re-scorable.

A run folder holds::

    run.json           the run's settings (a resumed or re-scored run reads them back)
    completions.jsonl  one line per sample: benchmark, item id, sample index, completion, score
    results.json       each benchmark's accuracy, mean score, pass@k and item counts
    table.md           the Table 3 row of this run
    results.png        the same, as bars

An interrupted run started again with the same settings generates only the items missing from
``completions.jsonl`` (items are written a batch at a time).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .generation import GenerationSettings
from .report import write_report
from .scoring import score_completions, summarize
from .suite import BENCHMARKS, PAPER_SUITE, load_benchmark, resolve_suite, select_items

logger = logging.getLogger(__name__)
COMPLETIONS = "completions.jsonl"
SETTINGS = "run.json"
RESULTS = "results.json"


@dataclass
class RunSettings:
    """What a run evaluates; a resumed run must match these (the backend and batch size may change)."""

    model: str
    adapter: str | None = None
    benchmarks: list[str] = field(default_factory=lambda: list(PAPER_SUITE))
    data_dir: str | None = None
    num_items: int = 500
    seed: int = 0
    pass_k: list[int] = field(default_factory=lambda: [1])
    label: str | None = None
    generation: GenerationSettings = field(default_factory=GenerationSettings)

    def __post_init__(self):
        if isinstance(self.generation, dict):
            self.generation = GenerationSettings(**self.generation)
        self.benchmarks = [b.name for b in resolve_suite(self.benchmarks)]
        if self.num_items < 1:
            raise ValueError(f"num_items={self.num_items}: evaluate at least one item per benchmark.")
        if not self.pass_k or min(self.pass_k) < 1 or max(self.pass_k) > self.generation.num_samples:
            raise ValueError(f"pass_k={self.pass_k}: each k must lie in 1..num_samples "
                             f"({self.generation.num_samples}); draw more samples (--num-samples) for a larger k.")
        self.label = self.label or Path(self.adapter or self.model).name

    def comparable(self) -> dict:
        """The settings that decide the completions (a resumed run must keep them)."""
        settings = asdict(self)
        settings["generation"].pop("batch_size")
        settings.pop("label")
        return settings


def read_records(path: Path) -> list[dict]:
    """The records of a completions file; a last line cut short by an interruption is dropped with a warning."""
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number < len(lines):
                raise ValueError(f"{path}:{number} is not a JSON record ({line[:80]!r}); the file is damaged "
                                 "beyond an interrupted last line: remove that line or start a new run.") from None
            logger.warning("%s: dropped an incomplete last line (the run was interrupted while writing).", path)
    return records


def complete_items(records: list[dict], num_samples: int) -> list[dict]:
    """The records of items that have all their samples (an interruption can leave an item short)."""
    counts: dict[tuple, int] = {}
    for record in records:
        key = (record["benchmark"], record["id"])
        counts[key] = counts.get(key, 0) + 1
    return [r for r in records if counts[(r["benchmark"], r["id"])] == num_samples]


def write_records(path: Path, records: list[dict], mode: str = "a") -> None:
    with path.open(mode, encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        handle.flush()


def _check_resume(out: Path, settings: RunSettings) -> None:
    stored_path = out / SETTINGS
    if stored_path.exists():
        stored = RunSettings(**json.loads(stored_path.read_text())).comparable()
        if stored != settings.comparable():
            changed = sorted(k for k in stored if stored[k] != settings.comparable()[k])
            raise ValueError(f"{out} holds a run with other settings ({', '.join(changed)} differ); resume it with "
                             "the same settings, or choose another --output-dir.")
    elif (out / COMPLETIONS).exists():
        raise ValueError(f"{out / COMPLETIONS} exists without {SETTINGS}; choose another --output-dir.")


def suite_items(settings: RunSettings) -> dict[str, list[dict]]:
    """Each benchmark's selected rows (seeded, at most ``num_items``), keyed by benchmark name."""
    items = {}
    for name in settings.benchmarks:
        benchmark = BENCHMARKS[name]
        data = load_benchmark(benchmark, settings.data_dir)
        rows = [data[i] for i in select_items(len(data), settings.num_items, settings.seed)]
        ids = [str(row[benchmark.id_column]) for row in rows]
        if len(set(ids)) != len(ids):
            raise ValueError(f"{name}: item ids in column {benchmark.id_column!r} repeat; a run needs them unique.")
        for row, identity in zip(rows, ids):
            row["_id"] = identity
        items[name] = rows
    return items


def evaluate_model(settings: RunSettings, output_dir: str | Path, completer=None, backend: str = "auto",
                   dtype: str = "auto", progress: bool = True) -> dict:
    """Generate, score and report a run in ``output_dir`` (resuming it when it exists); returns the results.

    ``completer`` (an object with ``complete(questions, answer_format) -> samples per question``) replaces the model loading,
    e.g. to reuse a loaded model.
    """
    from tqdm.auto import tqdm

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    _check_resume(out, settings)
    (out / SETTINGS).write_text(json.dumps(asdict(settings), indent=2) + "\n")
    path = out / COMPLETIONS
    records = complete_items(read_records(path), settings.generation.num_samples)
    write_records(path, records, mode="w")  # rewrite without what an interruption left half-written
    done = {(r["benchmark"], r["id"]) for r in records}
    items = suite_items(settings)
    pending = {name: [row for row in rows if (name, row["_id"]) not in done] for name, rows in items.items()}
    if any(pending.values()) and completer is None:
        from .generation import make_completer

        completer = make_completer(settings.model, settings.adapter, settings.generation, backend, dtype)
    step = settings.generation.batch_size
    for name, rows in pending.items():
        benchmark = BENCHMARKS[name]
        bar = tqdm(total=len(items[name]), initial=len(items[name]) - len(rows), desc=name, disable=not progress,
                   unit="item")
        for start in range(0, len(rows), step):
            batch = rows[start:start + step]
            samples = completer.complete([row["prompt"] for row in batch], benchmark.answer_format)
            flat_rows = [row for row, texts in zip(batch, samples) for _ in texts]
            flat_texts = [text for texts in samples for text in texts]
            scores = score_completions(benchmark, flat_texts, flat_rows)
            new = []
            position = 0
            for row, texts in zip(batch, samples):
                for index, text in enumerate(texts):
                    new.append({"benchmark": name, "id": row["_id"], "sample": index, "completion": text,
                                "score": scores[position]})
                    position += 1
            write_records(path, new)
            records += new
            bar.update(len(batch))
        bar.close()
    return finish(out, settings, records)


def rescore(output_dir: str | Path) -> dict:
    """Score every completion of a run again with the current rewards and rewrite its file, results and report."""
    out = Path(output_dir)
    if not (out / SETTINGS).exists():
        raise FileNotFoundError(f"{out} has no {SETTINGS}: it is not an evaluation run folder.")
    settings = RunSettings(**json.loads((out / SETTINGS).read_text()))
    records = read_records(out / COMPLETIONS)
    items = suite_items(settings)
    rows_by_id = {name: {row["_id"]: row for row in rows} for name, rows in items.items()}
    for name in settings.benchmarks:
        mine = [r for r in records if r["benchmark"] == name]
        missing = sorted({r["id"] for r in mine} - set(rows_by_id[name]))
        if missing:
            raise ValueError(f"{name}: items {missing[:5]} of {out / COMPLETIONS} are not in the benchmark any more; "
                             "re-score with the data the run used (its data_dir in run.json).")
        scores = score_completions(BENCHMARKS[name], [r["completion"] for r in mine],
                                   [rows_by_id[name][r["id"]] for r in mine])
        for record, score in zip(mine, scores):
            record["score"] = score
    write_records(out / COMPLETIONS, records, mode="w")
    return finish(out, settings, records)


def finish(out: Path, settings: RunSettings, records: list[dict]) -> dict:
    """results.json, table.md and results.png of one run."""
    results = {name: summarize([r for r in records if r["benchmark"] == name], settings.pass_k)
               for name in settings.benchmarks}
    (out / RESULTS).write_text(json.dumps({"label": settings.label, "results": results}, indent=2) + "\n")
    write_report({settings.label: [results]}, out / "table.md", out / "results.png")
    return results
