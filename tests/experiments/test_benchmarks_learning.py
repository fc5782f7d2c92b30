"""The arithmetic of the learning-speed, localization-quality and credit-signal benchmarks."""

import math

import pytest

from experiments.credit_signal import split_by_part
from experiments.learning_speed import (
    mean_and_spread,
    paired_differences,
    paired_differences_table,
    paired_table,
    paired_with_baseline,
    reusable_runs,
    speed_ratio,
    steps_to_reach,
    summarize,
    t_interval,
    t_quantile,
)
from experiments.localization_quality import correction_by_deviation, deviation_histogram, is_clean, rates


def test_steps_to_reach_is_the_first_evaluation_at_or_above_the_target():
    steps = [0, 5, 10, 15, 20]
    assert steps_to_reach(steps, [0.3, 0.4, 0.5, 0.45, 0.6], 0.5) == 10
    assert steps_to_reach(steps, [0.3, 0.4, 0.5, 0.45, 0.6], 0.61) is None
    assert steps_to_reach(steps, [0.7, 0.4, 0.5, 0.45, 0.6], 0.5) == 0


def test_speed_ratio_measures_against_the_baselines_final_value():
    steps = [0, 10, 20, 30, 40]
    grpo = [0.4, 0.45, 0.5, 0.55, 0.6]
    assert speed_ratio(steps, grpo, [0.4, 0.5, 0.61, 0.7, 0.7]) == 0.5
    assert speed_ratio(steps, grpo, grpo) == 1.0
    assert speed_ratio(steps, grpo, [0.4, 0.4, 0.4, 0.4, 0.59]) is None
    assert speed_ratio(steps, [0.5, 0.6, 0.4, 0.4, 0.45], [0.5] * 5) is None  # GRPO got worse: nothing to reach


def test_summary_averages_seeds_then_compares_with_grpo():
    def run(acc, tokens=(0, 100, 200)):
        return {"steps": [0, 10, 20], "accuracy": acc, "tokens": list(tokens), "train_seconds": 40.0}

    runs = {"GRPO": [run([0.4, 0.5, 0.6]), run([0.4, 0.4, 0.5])],  # mean final 0.55
            "SRPO": [run([0.4, 0.6, 0.7], (0, 140, 280)), run([0.4, 0.5, 0.6], (0, 160, 320))]}  # mean 0.4, 0.55, 0.65
    summary = summarize(runs)
    assert summary["SRPO"]["accuracy_mean"] == pytest.approx([0.4, 0.55, 0.65])
    assert summary["SRPO"]["steps_to_grpo_final"] == 10 and summary["SRPO"]["ratio_to_grpo"] == 0.5
    assert summary["GRPO"]["ratio_to_grpo"] == 1.0
    assert summary["GRPO"]["seconds_per_step"] == 2.0
    # against tokens: SRPO reaches GRPO's 0.55 at step 10, after 150 tokens (mean); GRPO itself at step 20, after 200
    assert summary["SRPO"]["tokens_to_grpo_final"] == 150 and summary["GRPO"]["tokens_to_grpo_final"] == 200
    assert summary["SRPO"]["token_ratio_to_grpo"] == 0.75 and summary["GRPO"]["token_ratio_to_grpo"] == 1.0
    mean, low, high = mean_and_spread([[1.0, 2.0], [3.0, 0.0]])
    assert mean == [2.0, 1.0] and low == [1.0, 0.0] and high == [3.0, 2.0]


def test_median_curves_discount_one_stalled_seed():
    def run(acc):
        return {"steps": [0, 10, 20], "accuracy": acc, "tokens": [0, 100, 200], "train_seconds": 40.0}

    runs = {"GRPO": [run([0.1, 0.5, 0.8]), run([0.1, 0.5, 0.8]), run([0.1, 0.1, 0.1])],  # one seed stalls
            "SRPO": [run([0.1, 0.6, 0.7])] * 3}
    summary = summarize(runs)
    assert summary["GRPO"]["accuracy_mean"][-1] == pytest.approx(0.5667, abs=1e-3)
    assert summary["GRPO"]["accuracy_median"] == [0.1, 0.5, 0.8]
    assert summary["SRPO"]["ratio_to_grpo"] == 0.5  # the stalled seed drags GRPO's mean below SRPO's at step 10
    assert summary["SRPO"]["ratio_to_grpo_median"] is None  # by the median SRPO never reaches GRPO's 0.8
    assert summary["SRPO"]["seeds"] == 3


def test_methods_are_compared_with_grpo_seed_by_seed():
    def run(seed, acc):
        return {"seed": seed, "steps": [0, 10, 20], "accuracy": acc}

    runs = {"GRPO": [run(0, [0.2, 0.4, 0.6]), run(1, [0.2, 0.6, 0.8]), run(2, [0.2, 0.5, 0.5])],
            "SRPO": [run(1, [0.2, 0.7, 0.8]), run(0, [0.2, 0.4, 0.8]), run(5, [0.2, 0.9, 0.9])]}  # seed 5: no pair
    paired = paired_with_baseline(runs)
    assert set(paired) == {"SRPO"}  # GRPO is not compared with itself
    srpo = paired["SRPO"]
    assert srpo["seeds"] == 2 and srpo["seeds_above"] == 2
    assert srpo["final_diff"] == pytest.approx(0.1) and srpo["final_diff_se"] == pytest.approx(0.1)  # diffs 0, 0.2
    assert srpo["curve_diff"] == pytest.approx(0.075)  # curve means: +0.05 for seed 1, +0.1 for seed 0
    assert srpo["curve_diff_se"] == pytest.approx(0.025)
    assert "| SRPO | 2 | +0.100 ± 0.100 | +0.075 ± 0.025 | 2 of 2 |" in paired_table(paired)
    assert paired_with_baseline({"GRPO": runs["GRPO"], "RRPO": [run(0, [0.2, 0.3, 0.4])]}) == {}  # one pair: no s.e.


def test_t_quantiles_and_intervals_match_the_tables():
    for df, quantile in ((1, 12.706), (2, 4.303), (5, 2.571), (11, 2.201), (30, 2.042)):  # two-sided 95%
        assert t_quantile(0.975, df) == pytest.approx(quantile, abs=1e-3)
    mean, low, high = t_interval([1.0, 2.0, 3.0])  # s.e. 1/sqrt(3), 2 degrees of freedom
    assert mean == 2.0 and high - mean == pytest.approx(4.3027 / 3 ** 0.5, abs=1e-3) and mean - low == pytest.approx(high - mean)


def test_lags_are_paired_with_srpo_without_seed_search_and_iid_with_srpo():
    def run(seed, acc, tokens, steps):
        return {"seed": seed, "steps": [0, 10, 20], "accuracy": acc, "tokens": [0, tokens / 2, tokens],
                "decode_steps": [0, steps / 2, steps], "train_seconds": 20.0}

    runs = {"GRPO": [run(0, [0.2, 0.3, 0.4], 100, 50), run(1, [0.2, 0.3, 0.4], 100, 50)],
            "SRPO": [run(0, [0.2, 0.4, 0.5], 120, 120), run(1, [0.2, 0.4, 0.6], 120, 120)],
            "SRPO-b0": [run(0, [0.2, 0.4, 0.5], 110, 100), run(1, [0.2, 0.5, 0.6], 110, 100), run(2, [0.2] * 3, 1, 1)],
            "SRPO-lag1": [run(0, [0.2, 0.3, 0.6], 110, 50), run(1, [0.2, 0.4, 0.5], 110, 60)],
            "SRPO-iid": [run(1, [0.2, 0.4, 0.8], 90, 120)]}  # one seed: no interval
    differences = paired_differences(runs)
    assert set(differences) == {"SRPO-lag1 - SRPO-b0"}
    lag = differences["SRPO-lag1 - SRPO-b0"]
    assert lag["seeds"] == 2 and lag["final_diff"] == pytest.approx(0.0)  # +0.1 and -0.1; seed 2 has no pair
    assert lag["final_ci95"] == pytest.approx([-12.706 * 0.1, 12.706 * 0.1], abs=1e-3)  # s.e. 0.1, 1 d.o.f.
    assert lag["curve_diff"] == pytest.approx(-0.05)  # curve means: 0 for seed 0, -0.1 for seed 1
    assert lag["decode_steps_ratio"] == pytest.approx(0.55)  # 50 / 100 and 60 / 100
    assert lag["tokens_ratio"] == pytest.approx(1.0)
    assert "| SRPO-lag1 - SRPO-b0 | 2 | +0.000 [-1.271, +1.271] |" in paired_differences_table(differences)
    uncounted = {m: [{**r, "decode_steps": [0, math.nan, math.nan]} for r in records] for m, records in runs.items()}
    assert paired_differences(uncounted)["SRPO-lag1 - SRPO-b0"]["decode_steps_ratio"] is None  # never a silent 0
    summary = summarize(runs)
    assert summary["SRPO-lag1"]["decode_steps_mean"] == [0, 27.5, 55.0]


def test_quick_settings_leave_the_options_given_on_the_command_line():
    import argparse

    from experiments.learning_speed import given_options

    parser = argparse.ArgumentParser()
    parser.add_argument("--eval_every", type=int, default=2)
    parser.add_argument("--methods", nargs="+", default=["GRPO"])
    parser.add_argument("--quick", action="store_true")
    assert given_options(parser, ["--quick", "--eval_every", "2"]) == {"quick", "eval_every"}  # the default's value
    assert given_options(parser, ["--eval_every=3", "--methods", "SRPO-lag1"]) == {"eval_every", "methods"}
    assert given_options(parser, []) == set()


def test_reused_runs_must_come_from_the_same_settings(tmp_path):
    from types import SimpleNamespace

    from experiments.learning_speed import RUN_OPTIONS

    options = {k: 1 for k in RUN_OPTIONS} | {"policy": "some/where", "num_steps": None, "task": {"num_steps": [4, 5]}}
    old = {"options": options, "runs": {"GRPO": [{"accuracy": [0.1, 0.2]}, {"accuracy": [0.1, 0.3]}],
                                        "SRPO": [{"seed": 7, "accuracy": [0.1, 0.4]}]}}
    path = tmp_path / "old.json"
    path.write_text(__import__("json").dumps(old))
    found = reusable_runs([path], SimpleNamespace(**options))
    assert found[("GRPO", 1)]["accuracy"] == [0.1, 0.3] and found[("GRPO", 1)]["seed"] == 1  # numbered in order
    assert found[("SRPO", 7)]["accuracy"] == [0.1, 0.4] and ("SRPO", 0) not in found
    with pytest.raises(SystemExit, match="lr"):
        reusable_runs([path], SimpleNamespace(**(options | {"lr": 2})))
    with pytest.raises(SystemExit, match="task"):
        reusable_runs([path], SimpleNamespace(**(options | {"task": {"num_steps": [8]}})))
    other = tmp_path / "other.json"
    other.write_text('{"summary": {}}')  # e.g. a localization_quality file
    with pytest.raises(SystemExit, match="no runs"):
        reusable_runs([other], SimpleNamespace(**options))


def test_failed_rollout_signal_splits_at_the_checkers_first_wrong_thought():
    spans = [(0, 3), (3, 5), (5, 9)]
    values = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]  # the last token is past every thought
    parts = split_by_part(spans, 2, values)
    assert parts == {"prefix": [0.1, 0.2, 0.3], "first_wrong": [0.4, 0.5], "after": [0.6, 0.7, 0.8, 0.9, 1.0]}
    first = split_by_part(spans, 1, values)
    assert first["prefix"] == [] and first["first_wrong"] == [0.1, 0.2, 0.3]
    assert sum(map(len, first.values())) == len(values)


def _record(first_wrong, self_index, self_success, random_index, random_success):
    return {"first_wrong": first_wrong,
            "self": {"index": self_index, "clean": is_clean(self_index, first_wrong), "success": self_success},
            "random": {"index": random_index, "clean": is_clean(random_index, first_wrong), "success": random_success}}


def test_clean_prefixes_and_correction_rates_split_by_the_checkers_first_error():
    assert is_clean(2, 2) and is_clean(1, 3) and not is_clean(3, 2)
    records = [_record(2, 2, 0.75, 3, 0.0), _record(3, 1, 0.5, 1, 0.25), _record(1, 2, 0.0, 1, 1.0)]
    self_rates = rates(records, "self")
    assert self_rates["clean"]["n"] == 2 and self_rates["clean"]["success"] == pytest.approx(0.625)
    assert self_rates["erroneous"] == {"n": 1, "success": 0.0, "pass_at_g2": 0.0,
                                       "pass_at_g2_ci": pytest.approx((0.0, 0.7935), abs=1e-4)}
    assert self_rates["all"]["pass_at_g2"] == pytest.approx(2 / 3)
    assert deviation_histogram(records, "self") == {-2: 1, 0: 1, 1: 1}
    assert correction_by_deviation(records, "random") == {-2: 0.25, 0: 1.0, 1: 0.0}
    empty = rates([r for r in records if r["random"]["clean"]], "random")["erroneous"]
    assert empty["n"] == 0 and empty["success"] is None and not math.isnan(empty["n"])


def test_one_oracle_srpo_step_on_the_testbed_counts_tokens_and_evaluates():
    from types import SimpleNamespace

    from experiments.learning_speed import train_one
    from experiments.testbed import EVAL_SEED, POLICY_DIR, task_dataset

    opts = SimpleNamespace(policy=str(POLICY_DIR), prompts_per_step=1, steps=1, lr=3e-4, eval_every=1,
                           eval_samples=1, train_prompts=4, num_steps=None, task=None)
    record = train_one("SRPO-oracle", 0, opts, task_dataset(4, seed=EVAL_SEED), {"accuracy": 0.25})
    assert record["steps"] == [0, 1] and record["accuracy"][0] == 0.25 and 0.0 <= record["accuracy"][1] <= 1.0
    # 5 phase-1 rollouts (G1 + k) at least, then 4 suffixes when a seed was found: far more than 20 tokens
    assert record["tokens"][1] > 20
    assert record["localization_parse_failure"] in (None, 0.0)  # the checker always names a step
    # the generation's sequential decoding steps: at least its longest rollout, at most every token one at a time
    assert record["decode_steps"][0] == 0 and 0 < record["decode_steps"][1] < record["tokens"][1]


def test_a_lagged_srpo_run_on_the_testbed_counts_its_decoding_steps():
    from types import SimpleNamespace

    from experiments.learning_speed import train_one
    from experiments.testbed import EVAL_SEED, POLICY_DIR, task_dataset

    opts = SimpleNamespace(policy=str(POLICY_DIR), prompts_per_step=1, steps=2, lr=3e-4, eval_every=1,
                           eval_samples=1, train_prompts=4, num_steps=None, task=None)
    record = train_one("SRPO-lag1", 0, opts, task_dataset(4, seed=EVAL_SEED), {"accuracy": 0.25})
    assert record["steps"] == [0, 1, 2]
    steps = record["decode_steps"]
    assert steps[0] == 0 and 0 < steps[1] < steps[2] and all(math.isfinite(n) for n in steps)


def test_credit_signal_on_the_shipped_policy_accounts_for_every_failed_token():
    from experiments.credit_signal import PARTS, measure
    from experiments.testbed import POLICY_DIR

    result = measure(str(POLICY_DIR), problems=6, samples=4, seed=0)
    parts = result["parts"]
    assert result["failed"] > 0 and 0.0 <= result["accuracy"] <= 1.0
    assert sum(parts[n]["signal_share"] for n in PARTS) == pytest.approx(1.0)
    assert sum(parts[n]["token_share"] for n in PARTS) == pytest.approx(1.0)
    for name in PARTS:
        if parts[name]["tokens"]:
            assert 0.0 <= parts[name]["mean_signal_per_token"] <= 1.0
    # the slipped step is where the policy was least sure: its tokens carry more signal than the clean prefix's
    assert parts["first_wrong"]["mean_signal_per_token"] > parts["prefix"]["mean_signal_per_token"]


def test_the_exact_corrector_keeps_right_thoughts_and_replaces_wrong_ones():
    from experiments.credit_signal import exact_correction
    from trl_resets.tasks import make_arithmetic_dataset

    row = make_arithmetic_dataset(1, num_steps=3, seed=0)[0]
    right = row["solution_steps"]
    value = int(right[0].split(" = ")[1])
    wrong = [right[0], right[1].replace(str(value), str(value + 1), 1), "so 1 + 1 = 2"]
    assert exact_correction(row, wrong) == [right[0], right[1], right[2]]
    assert exact_correction(row, right[:2]) == right  # a chain that stopped early gets its missing step


def test_credit_precision_shares_of_each_method_add_up():
    from experiments.credit_signal import PARTS, measure_methods
    from experiments.testbed import POLICY_DIR

    results = measure_methods(str(POLICY_DIR), problems=4, seed=0, methods=("GRPO", "diff", "state"))
    assert set(results) == {"GRPO", "diff", "state"}
    for result in results.values():
        assert result["failed_rows"] > 0
        assert sum(result["negative_share"][p] for p in PARTS) == pytest.approx(1.0)
    assert results["GRPO"]["positive_per_failed_row"] == 0.0  # uniform credit on a failed row is all negative
    # diff moves each failed row's credit along it without inflating it: the same rows, the same total advantage
    assert results["diff"]["failed_rows"] == results["GRPO"]["failed_rows"]
