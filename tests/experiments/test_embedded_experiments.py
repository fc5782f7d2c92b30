"""The localization-quality and learning-speed arithmetic added for the main job's model (intervals, pooling, the
records read from a main-job run), and the testbed path through the shared collection code."""

import json
import math
from types import SimpleNamespace

import pytest

from experiments.learning_speed import _seed_major, embedded_argv, embedded_record, paired_with_baseline
from experiments.localization_quality import (
    merged_adapter,
    paired_difference,
    rates,
    summarize,
    table,
    wilson_interval,
)


def test_wilson_interval_matches_the_textbook_values():
    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(0.4902, abs=1e-4) and high == pytest.approx(0.9433, abs=1e-4)
    assert wilson_interval(0, 5)[0] == 0.0 and wilson_interval(5, 5)[1] == 1.0
    assert wilson_interval(0, 0) is None
    narrow, wide = wilson_interval(50, 100), wilson_interval(5, 10)
    assert narrow[1] - narrow[0] < wide[1] - wide[0]  # more seeds, a narrower interval


def test_paired_difference_uses_the_spread_of_the_differences():
    result = paired_difference([1.0, 1.0, 0.0, 1.0], [0.0, 1.0, 0.0, 0.0])
    assert result["n"] == 4 and result["mean"] == pytest.approx(0.5)
    assert result["se"] == pytest.approx(math.sqrt(1 / 3) / 2)
    assert result["ci"] == pytest.approx((0.5 - 1.96 * result["se"], 0.5 + 1.96 * result["se"]))
    with pytest.raises(ValueError, match="at least 2 pairs"):
        paired_difference([1.0], [0.0])


def _seed(first_wrong, choices):
    record = {"first_wrong": first_wrong, "num_thoughts": 3}
    for name, (index, success, failed) in choices.items():
        record[name] = {"index": index, "clean": index <= first_wrong, "success": success, "parse_failed": failed}
    return record


def test_pooled_rates_count_each_localizers_reset_and_the_summary_pairs_self_with_random():
    records = [
        _seed(2, {"self": (2, 0.5, False), "random": (3, 0.0, False), "oracle": (2, 0.5, False)}),
        _seed(1, {"self": (1, 0.0, True), "random": (1, 0.25, False), "oracle": (1, 0.25, False)}),
        _seed(3, {"self": (1, 0.75, False), "random": (2, 0.0, False), "oracle": (3, 0.0, False)}),
    ]
    pooled = rates(records, ("self", "random"))
    assert pooled["all"]["n"] == 6 and pooled["clean"]["n"] == 5 and pooled["erroneous"]["n"] == 1
    assert pooled["clean"]["pass_at_g2"] == pytest.approx(3 / 5)  # successes 0.5, 0, 0.75, 0.25, 0: 3 of 5 > 0
    assert pooled["erroneous"]["pass_at_g2"] == 0.0
    summary = summarize(records)
    assert summary["self"]["exact"] == pytest.approx(2 / 3) and summary["random"]["exact"] == pytest.approx(1 / 3)
    assert summary["self"]["parse_failure_rate"] == pytest.approx(1 / 3)
    assert summary["self"]["clean_share_ci"] == pytest.approx(wilson_interval(3, 3))
    assert summary["self_vs_random"]["clean"]["mean"] == pytest.approx(1 / 3)  # seed 1 clean only under self
    assert summary["self_vs_random"]["success"]["mean"] == pytest.approx((0.5 - 0.25 + 0.75) / 3)
    text = table(summary)
    assert "| self | 0.667 [" in text and "from an erroneous one 0.000" in text and "(n=3)." in text


def test_an_adapter_folder_without_an_adapter_is_refused_before_loading(tmp_path):
    with pytest.raises(ValueError, match="no adapter_config.json"):
        merged_adapter("unused-model-path", str(tmp_path), str(tmp_path))


def test_the_testbed_runs_through_the_shared_collection():
    from experiments.localization_quality import collect
    from experiments.testbed import POLICY_DIR

    opts = SimpleNamespace(policy=str(POLICY_DIR), problems=4, samples=2, g2=2, seed=0, temperature=None, batch_size=3)
    records, stats = collect(opts)
    assert stats["rollouts"] == 8 and stats["seeds"] == len(records) + stats["no_checker_error"]
    for r in records:
        assert 1 <= r["self"]["index"] <= r["num_thoughts"] and 1 <= r["random"]["index"] <= r["num_thoughts"]
        assert r["oracle"]["clean"]  # the checker's own first wrong step is a clean reset by definition
        assert all(r[name]["success"] in (0.0, 0.5, 1.0) for name in ("self", "random", "oracle"))


def test_a_main_job_run_becomes_a_learning_speed_record():
    logs = [
        {"step": 0, "validation/pass_rate": 0.25},
        {"step": 1, "loss": 0.1, "resets/generated_tokens": 100.0, "resets/decode_steps": 30.0},
        {"step": 2, "loss": 0.1, "resets/generated_tokens": 120.0, "credit/tokens_repair": 5.0,
         "validation/pass_rate": 0.5, "resets/decode_steps": 40.0},
        {"step": 3, "loss": 0.1, "resets/generated_tokens": 90.0, "resets/decode_steps": 20.0},
        {"step": 3, "train_runtime": 9.0},
    ]
    validation = [{"step": 0, "validation/pass_rate": 0.25}, {"step": 2, "validation/pass_rate": 0.5},
                  {"step": 3, "validation/pass_rate": 0.375}]
    record = embedded_record(4, logs, validation, 30.0)
    assert record == {"seed": 4, "steps": [0, 2, 3], "accuracy": [0.25, 0.5, 0.375], "tokens": [0, 225, 315],
                      "decode_steps": [0, 70.0, 90.0], "train_seconds": 30.0}
    uncounted = embedded_record(4, [{k: v for k, v in e.items() if k != "resets/decode_steps" or e["step"] != 2}
                                    for e in logs], validation, 30.0)
    assert uncounted["decode_steps"][0] == 0 and all(math.isnan(n) for n in uncounted["decode_steps"][1:])
    with pytest.raises(ValueError, match="step-0"):
        embedded_record(4, logs, validation[1:], 30.0)


def test_main_job_flags_come_first_so_job_args_override_them():
    opts = SimpleNamespace(steps=6, eval_problems=32, eval_every=3, job_args="--learning_rate 2e-4 --max_steps 8")
    argv = embedded_argv(1, opts, "/tmp/out")
    assert argv[:4] == ["--output_dir", "/tmp/out", "--seed", "1"]
    assert argv[-4:] == ["--learning_rate", "2e-4", "--max_steps", "8"]
    assert argv[argv.index("--validation_problems") + 1] == "32"


def test_a_partial_seed_major_run_keeps_the_seeds_every_method_finished():
    def run(seed):
        return {"seed": seed, "steps": [0, 3], "accuracy": [0.2, 0.3 + seed / 10], "tokens": [0, 10],
                "train_seconds": 1.0}

    runs = {"GRPO": [run(0), run(1)], "RRPO": [run(0), run(1)], "SRPO": [run(0)]}
    kept = _seed_major(runs)
    assert [r["seed"] for r in kept["GRPO"]] == [0] and [r["seed"] for r in kept["SRPO"]] == [0]
    assert paired_with_baseline(kept) == {}  # one common seed: no standard error yet


def test_without_suffixes_the_localizers_are_measured_and_no_success_is_made_up():
    from experiments.localization_quality import collect
    from experiments.testbed import POLICY_DIR

    opts = SimpleNamespace(policy=str(POLICY_DIR), problems=4, samples=2, g2=0, seed=0, temperature=None)
    records, _ = collect(opts)
    assert records and all(r[name]["success"] is None for r in records for name in ("self", "random", "oracle"))
    summary = summarize(records)
    assert summary["oracle"]["exact"] == 1.0 and summary["self"]["correction"]["all"]["success"] is None
    assert summary["pooled_self_random"]["clean"]["pass_at_g2"] is None
    if len(records) >= 2:
        assert "success" not in summary["self_vs_random"] and "suffix success" not in table(summary)


def _embedded_results(path, seed, start=0.3, job_args=""):
    """A learning_speed --embedded results file of one seed, as one process of a side-by-side run writes it."""
    options = {"embedded": True, "steps": 8, "eval_every": 4, "eval_problems": 68, "job_args": job_args}
    runs = {method: [{"seed": seed, "steps": [0, 4, 8], "accuracy": [start, start + 0.1 * i, start + 0.05 * seed],
                      "tokens": [0, 100 * i, 200 * i], "decode_steps": [0, 10, 20], "train_seconds": 8.0}]
            for i, method in enumerate(("GRPO", "SRPO"), start=1)}
    path.write_text(json.dumps({"options": options, "runs": runs}))
    return str(path)


def test_embedded_runs_of_side_by_side_processes_are_read_back_into_one_comparison(tmp_path, monkeypatch):
    import sys

    import torch

    from experiments import learning_speed

    files = [_embedded_results(tmp_path / f"seed{seed}.json", seed) for seed in (0, 1)]
    monkeypatch.setattr(learning_speed, "train_embedded", lambda *a: pytest.fail("a read-back run was run again"))
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    argv = ["learning_speed", "--embedded", "--methods", "GRPO", "SRPO", "--seeds", "2", "--steps", "8",
            "--eval_every", "4", "--eval_problems", "68", "--out", str(tmp_path / "out"), "--tag", "t"]
    monkeypatch.setattr(sys, "argv", [*argv, "--reuse", *files])
    learning_speed.main()
    result = json.loads((tmp_path / "out" / "learning_speed_t.json").read_text())
    assert result["runs_read_back"] == 4
    assert [r["seed"] for r in result["runs"]["SRPO"]] == [0, 1]
    assert result["runs"]["SRPO"][1]["accuracy"] == [0.3, 0.5, 0.35]
    assert result["summary"]["SRPO"]["accuracy_mean"] == pytest.approx([0.3, 0.5, 0.325])

    monkeypatch.setattr(sys, "argv", [*argv, "--job_args=--learning_rate 3e-4", "--reuse", *files])
    with pytest.raises(SystemExit, match="job_args"):  # other main-job flags: other runs, not read back
        learning_speed.main()
    other_start = _embedded_results(tmp_path / "seed1b.json", 1, start=0.2)
    monkeypatch.setattr(sys, "argv", [*argv, "--reuse", files[0], other_start])
    with pytest.raises(SystemExit, match="not the same code, model or held-out set"):
        learning_speed.main()
