"""A 1-process and a 2-process run over the same global batch build the same reset groups and advantages: the
reset choices are keyed by the prompt's global index, not by the process that holds it; with
``per_row_sampling_seed`` the sampled tokens are too."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.distributed.test_distributed import _free_port

WORKER = Path(__file__).with_name("world_size_worker.py")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRL_EXPERIMENTAL_SILENCE": "1", "OMP_NUM_THREADS": "1"}


def _reports(out: Path, processes: int, *extra: str) -> list[dict]:
    out.mkdir()
    if processes == 1:
        cmd = [sys.executable, str(WORKER), str(out), *extra]
    else:
        cmd = [str(Path(sys.executable).with_name("accelerate")), "launch", "--multi_gpu", "--num_processes",
               str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(_free_port()), str(WORKER), str(out), *extra]
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    reports = [json.loads((out / f"rank{r}.json").read_text()) for r in range(processes)]
    assert [r["num_processes"] for r in reports] == [processes] * processes
    return reports


def _joined(reports: list[dict], run: str | None = None) -> dict:
    """The processes' reports (of ``run``, when a worker reports several) in rank order: TRL hands each process a
    contiguous block of the global batch."""
    parts = [r if run is None else r[run] for r in reports]
    return {key: [item for part in parts for item in part[key]]
            for key in ("prompts", "resets", "replies", "completion_ids", "advantages", "eval") if key in parts[0]}


def test_one_process_and_two_build_the_same_reset_groups(tmp_path):
    one = _joined(_reports(tmp_path / "one", 1))
    two = _joined(_reports(tmp_path / "two", 2))
    assert len(set(one["prompts"])) == 4 and one["prompts"] == two["prompts"]
    assert len(one["resets"]) >= 4 and len({tuple(r) for r in one["resets"]}) > 2  # the draws vary
    assert one["resets"] == two["resets"]
    assert one["completion_ids"] == two["completion_ids"]
    assert one["advantages"] == two["advantages"] and any(one["advantages"])


@pytest.fixture(scope="module")
def sampled_runs(tmp_path_factory, tiny_model_dir):
    """The sampled worker's reports on 1 process and on 2 (one launch each, every backend and setting in it)."""
    out = tmp_path_factory.mktemp("sampled")
    return _reports(out / "one", 1, tiny_model_dir), _reports(out / "two", 2, tiny_model_dir)


@pytest.mark.parametrize("backend", ["transformers", "vllm"])
def test_with_per_row_sampling_seeds_sampled_runs_on_one_process_and_two_are_the_same(sampled_runs, backend):
    """SRPO sampling at temperature 1 from a random-weight model, a sampled localization reply included (the compact
    decoder, or vLLM colocated: the stand-in engine), then an evaluation batch: with a generator per row the two runs
    draw the same tokens; without, the rows depend on the process and its batch."""
    one, two = sampled_runs
    seeded, seeded_two = _joined(one, f"{backend}/seeded"), _joined(two, f"{backend}/seeded")
    assert len(set(seeded["prompts"])) == 4 and seeded["prompts"] == seeded_two["prompts"]
    assert len(seeded["resets"]) >= 2 and len(set(seeded["replies"])) == len(seeded["replies"])  # sampled replies
    assert len({tuple(ids) for ids in seeded["completion_ids"]}) > len(seeded["completion_ids"]) // 2  # sampled rows
    assert seeded == seeded_two and any(seeded["advantages"])  # the evaluation rollouts too
    assert len({tuple(ids) for ids in seeded["eval"]}) == len(seeded["eval"]) == 8  # a prompt's 2 rows differ
    unseeded, unseeded_two = _joined(one, f"{backend}/unseeded"), _joined(two, f"{backend}/unseeded")
    assert unseeded["prompts"] == unseeded_two["prompts"]
    assert unseeded["completion_ids"] != unseeded_two["completion_ids"]
    assert unseeded["replies"] != unseeded_two["replies"]
    assert unseeded["eval"] != unseeded_two["eval"]


def test_pipelined_resets_build_the_same_rows_on_one_process_and_two(sampled_runs):
    """reset_lag=1 with per-row sampling seeds: the second generation's reset slots take the first generation's
    states from a queue gathered from every process; 4 prompts of 2 seeds each over 2 processes."""
    one, two = sampled_runs
    lagged, lagged_two = _joined(one, "transformers/lagged"), _joined(two, "transformers/lagged")
    assert lagged == lagged_two and any(lagged["advantages"])
    origins = [tuple(r[3:]) for r in lagged["resets"]]
    assert len(origins) >= 4 and {g for g, _ in origins} == {0} and len({p for _, p in origins}) > 1
    queues = [r["transformers/lagged"]["queue"] for r in one + two]
    assert all(q == queues[0] for q in queues) and queues[0]  # the second generation's states, on every process


def test_per_row_sampling_seeds_are_refused_where_the_transformers_backend_cannot_honour_them(tmp_path,
                                                                                              char_tokenizer):
    from datasets import Dataset

    from tests.conftest import make_tiny_llama
    from tests.trainer.test_trainer import _args, contains_seven
    from trl_resets import SRPOConfig, SRPOTrainer

    for settings, refusal in [({"compact_decoding": False}, "compact_decoding=False"),
                              ({"credit": "repair", "repair_temperature": 0.7}, "credit=.repair. with repair_temperature=0.7")]:
        with pytest.raises(ValueError, match=f"per_row_sampling_seed=True cannot be honoured with {refusal}"):
            _args(tmp_path, SRPOConfig, per_row_sampling_seed=True, **settings)

    class Batched:  # a localizer that needs the policy for a whole batch at once
        name = "batched"

        def locate(self, requests, policy=None, rng=None):
            return []

    def build(localizer=None, **settings):
        return SRPOTrainer(model=make_tiny_llama(char_tokenizer), reward_funcs=contains_seven,
                           args=_args(tmp_path, SRPOConfig, per_row_sampling_seed=True, **settings),
                           train_dataset=Dataset.from_dict({"prompt": ["a"], "answer": ["7"]}),
                           processing_class=char_tokenizer, localizer=localizer)

    with pytest.raises(ValueError, match="cannot be honoured with localizer 'batched'"):
        build(Batched())
    with pytest.raises(ValueError, match="RepetitionPenaltyLogitsProcessor.*per_row_sampling_seed=False"):
        build(repetition_penalty=1.2)
    assert build().args.per_row_sampling_seed
