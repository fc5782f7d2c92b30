r"""CommonsenseQA, SciKnowEval and StrategyQA as tasks for the multiple-choice and yes/no rewards.

Each loader maps its hub dataset (by id, in its own schema) to ``prompt`` (the
question, with lettered options for CommonsenseQA and SciKnowEval, and how to box the answer),
``answer`` (the option letter, or a bool) and ``id``; ``REWARDS`` names the
reward that scores each. ``data_files`` reads local JSON-lines files in the
same schema instead of the hub (no dataset cache is written).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from ..rewards import multiple_choice_reward, yes_no_reward

COMMONSENSE_QA = "tau/commonsense_qa"
STRATEGY_QA = "ChilleD/StrategyQA"
SCIKNOWEVAL = "hicai-zju/SciKnowEval"
SCIKNOWEVAL_DOMAINS = ("chemistry", "biology", "materials", "physics")
REWARDS = {"commonsense_qa": multiple_choice_reward, "sciknoweval": multiple_choice_reward,
           "strategyqa": yes_no_reward}
CHOICE_INSTRUCTION = "Give the letter of the correct option in \\boxed{}, for example \\boxed{A}."
YES_NO_INSTRUCTION = "Answer yes or no in \\boxed{}, for example \\boxed{Yes}."


def choice_row(row: Mapping, identity) -> dict:
    """A question with ``choices.label/text`` and an ``answerKey`` (CommonsenseQA's and SciKnowEval's form)."""
    options = "\n".join(f"{label}. {text}" for label, text in zip(row["choices"]["label"], row["choices"]["text"]))
    return {"prompt": f"{row['question'].strip()}\n\n{options}\n\n{CHOICE_INSTRUCTION}",
            "answer": row["answerKey"], "id": str(identity)}


def strategyqa_row(row: Mapping) -> dict:
    """One StrategyQA question (``question``, bool ``answer``) as a task row."""
    return {"prompt": f"{row['question'].strip()}\n\n{YES_NO_INSTRUCTION}", "answer": bool(row["answer"]),
            "id": row["qid"]}


def load_commonsense_qa(split: str = "validation", data_files=None):
    """CommonsenseQA (``tau/commonsense_qa``); its test split has no answers, so evaluation uses validation."""
    rows = _rows(COMMONSENSE_QA, split, data_files)
    unanswered = sum(1 for row in rows if not row["answerKey"])
    if unanswered:
        raise ValueError(f"{unanswered} of {len(rows)} CommonsenseQA rows in split {split!r} have no answerKey; "
                         "use split='validation' or 'train' (the test split is unlabelled).")
    return _dataset([choice_row(row, row["id"]) for row in rows])


def load_sciknoweval(domain: str, split: str = "test", data_files=None):
    """SciKnowEval's multiple-choice questions (``type`` ``mcq-...``) of one domain.

    Args:
        domain: ``"chemistry"``, ``"biology"``, ``"materials"`` or ``"physics"`` (the paper's four columns).
    """
    if domain not in SCIKNOWEVAL_DOMAINS:
        raise ValueError(f"domain={domain!r}: use one of {SCIKNOWEVAL_DOMAINS}.")
    rows = [(position, row) for position, row in enumerate(_rows(SCIKNOWEVAL, split, data_files))
            if row["domain"].lower()[:5] == domain[:5] and row["type"].startswith("mcq")]
    return _dataset([choice_row(row, f"{domain}-{position}") for position, row in rows])


def load_strategyqa(split: str = "test", data_files=None):
    """StrategyQA (``ChilleD/StrategyQA``, train and test splits with bool answers)."""
    return _dataset([strategyqa_row(row) for row in _rows(STRATEGY_QA, split, data_files)])


def _rows(hub_id: str, split: str, data_files) -> list[dict]:
    """The rows of a hub split, or of local JSON-lines files."""
    if data_files is None:
        import datasets

        return list(datasets.load_dataset(hub_id, split=split))
    rows = []
    for path in [data_files] if isinstance(data_files, (str, Path)) else data_files:
        with open(path, encoding="utf-8") as handle:
            rows += [json.loads(line) for line in handle if line.strip()]
    return rows


def _dataset(rows: list[dict]):
    import datasets

    return datasets.Dataset.from_list(rows)
