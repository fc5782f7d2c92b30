"""benchmarks/step_cost.py: the timing wrappers, the wall-clock split and the ratios (no model runs here)."""

import importlib.util
import math
import random
from pathlib import Path

import pytest

from trl_resets.localizers import LocalizationRequest, RandomLocalizer
from trl_resets.thoughts import Rollout

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "step_cost.py"
_spec = importlib.util.spec_from_file_location("step_cost", _PATH)
step_cost = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(step_cost)


class FakeClock:
    """A clock that only moves when told to."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_timed_adds_each_call_duration_and_keeps_results():
    clock = FakeClock()
    probe = step_cost.Probe(clock)

    def work(x, advance):
        clock.now += advance
        return x * 2

    timed = probe.timed("rollout", work)
    assert timed(3, advance=1.5) == 6
    assert timed(4, advance=0.25) == 8
    assert probe.seconds["rollout"] == pytest.approx(1.75)
    assert probe.calls["rollout"] == 2


def test_timed_counts_time_of_a_call_that_raises():
    clock = FakeClock()
    probe = step_cost.Probe(clock)

    def broken():
        clock.now += 2.0
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        probe.timed("step", broken)()
    assert probe.seconds["step"] == pytest.approx(2.0)


def test_timed_localizer_times_inner_locate_and_passes_answers_through():
    clock = FakeClock()
    probe = step_cost.Probe(clock)

    class SlowRandom(RandomLocalizer):
        def locate(self, requests, policy=None, rng=None):
            clock.now += 0.5
            return super().locate(requests, policy, rng)

    wrapped = step_cost.TimedLocalizer(SlowRandom(), probe)
    requests = [LocalizationRequest("q", ["a", "b", "c"]), LocalizationRequest("q", ["a"])]
    answers = wrapped.locate(requests, None, random.Random(0))
    assert wrapped.name == "random"
    assert [1 <= a.index <= r.num_steps for a, r in zip(answers, requests)] == [True, True]
    assert probe.seconds["localization"] == pytest.approx(0.5)


class FakeStream:
    """Finishes each step's requests: rollouts of fixed length, replies of fixed length; advances the clock."""

    def __init__(self, clock, length=5, reply=3):
        self.clock, self.length, self.reply = clock, length, reply
        self.extra = "kept"
        self.queue = []

    def submit(self, requests):
        self.queue += requests
        return list(range(len(self.queue) - len(requests), len(self.queue)))

    def step(self):
        self.clock.now += 1.0
        done = [(h, [7] * self.reply if r.is_reply else Rollout(list(range(self.length)), [(0, self.length)], "eos"))
                for h, r in enumerate(self.queue)]
        self.queue = []
        return done


def test_counting_stream_counts_rollout_and_reply_tokens_and_time():
    from trl_resets.sampling.base import DecodeRequest

    clock = FakeClock()
    probe = step_cost.Probe(clock)
    stream = step_cost.CountingStream(FakeStream(clock), probe)
    stream.submit([DecodeRequest([1]), DecodeRequest([2]), DecodeRequest([1], reply_tokens=8)])
    stream.step()
    stream.submit([DecodeRequest([1, 2], 1, 10)])
    stream.step()
    assert probe.tokens["rollout"] == 15 and probe.tokens["rollouts"] == 3 and probe.tokens["localization"] == 3
    assert probe.seconds["sample"] == pytest.approx(2.0)
    assert stream.extra == "kept"  # other attributes reach the inner stream



class LateStream:
    """Brings each request back ``after`` steps after its submission, with ``tokens`` tokens."""

    def __init__(self, after, tokens):
        self.after, self.tokens, self.steps, self.pending = after, tokens, 0, {}

    def submit(self, requests):
        start = len(self.pending) + 100 * self.steps
        handles = list(range(start, start + len(requests)))
        self.pending.update((h, self.steps + self.after) for h in handles)
        return handles

    def step(self):
        self.steps += 1
        done = [h for h, due in self.pending.items() if due <= self.steps]
        for h in done:
            del self.pending[h]
        return [(h, Rollout(list(range(self.tokens)), [(0, self.tokens)], "eos")) for h in done]


def test_counting_stream_counts_steps_a_request_waited_beyond_its_tokens():
    from trl_resets.sampling.base import DecodeRequest

    probe = step_cost.Probe(FakeClock())
    stream = step_cost.CountingStream(LateStream(after=5, tokens=2), probe)
    stream.submit([DecodeRequest([1]), DecodeRequest([2])])
    stream.step()
    stream.submit([DecodeRequest([3])])  # submitted after one step, back after step 6
    for _ in range(5):
        stream.step()
    assert probe.tokens["stream_requests"] == 3
    assert probe.tokens["stream_wait_steps"] == 3 + 3 + 3  # 5 steps in the stream, 2 of them its tokens
    assert probe.tokens["stream_max_wait"] == 3
    on_time = step_cost.Probe(FakeClock())
    stream = step_cost.CountingStream(LateStream(after=2, tokens=2), on_time)
    stream.submit([DecodeRequest([1])])
    stream.step(), stream.step()
    assert on_time.tokens["stream_wait_steps"] == 0 and on_time.tokens["stream_requests"] == 1
    for timed in (probe, on_time):
        timed.add_time("step", 2.0), timed.add_time("rollout", 1.0)
    record = step_cost.step_record(probe, prompts=1)
    assert (record["stream_requests"], record["stream_wait_steps"], record["stream_max_wait"]) == (3, 9, 3)
    note = step_cost.wait_note({"SRPO": [record], "GRPO": [step_cost.step_record(on_time, prompts=1)]})
    assert "SRPO 9 step(s) over 3 requests (longest wait 3)" in note and "GRPO 0 step(s) over 1 requests" in note
    assert step_cost.wait_note({"SRPO": [{"stream_requests": 0}]}) == ""

def test_forward_counter_counts_passes_decoding_rows_and_prefilled_tokens(char_tokenizer):
    import torch
    from transformers import GenerationConfig

    from tests.conftest import make_tiny_llama
    from trl_resets.sampling import TransformersThoughtSampler
    from trl_resets.thoughts import ThoughtFormat

    model = make_tiny_llama(char_tokenizer).eval()
    probe = step_cost.Probe(FakeClock())
    hook = model.register_forward_hook(step_cost.ForwardCounter(probe), with_kwargs=True)
    sampler = TransformersThoughtSampler(model, char_tokenizer, ThoughtFormat(max_completion_tokens=6),
                                         GenerationConfig(do_sample=False), [char_tokenizer.eos_token_id])
    rollouts = sampler.sample([[10, 11, 12], [10, 11, 12], [13, 14]])
    hook.remove()
    steps = max(len(r.token_ids) for r in rollouts) - 1  # the first token comes from the prefill
    assert probe.tokens["forward_passes"] == 1 + steps and probe.tokens["decode_steps"] == steps
    assert probe.tokens["row_steps"] == sum(len(r.token_ids) - 1 for r in rollouts)
    assert probe.tokens["prefill"] == 3 + 2  # the repeated context once
    assert torch.is_grad_enabled()


def test_step_parts_and_record():
    clock = FakeClock()
    probe = step_cost.Probe(clock)
    probe.add_time("step", 10.0)
    probe.add_time("rollout", 6.0)
    probe.add_time("localization", 1.5)
    probe.add_tokens("rollout", 400)
    probe.add_tokens("localization", 40)
    probe.add_tokens("forward_passes", 90)
    probe.add_tokens("decode_steps", 80)
    record = step_cost.step_record(probe, prompts=2, generations=3)
    assert record["generation"] == pytest.approx(6.0)  # the whole rollout_func, localization included
    assert record["localization"] == pytest.approx(1.5)
    assert record["update"] == pytest.approx(4.0)
    assert record["generation"] + record["update"] == pytest.approx(record["step"])
    assert record["tokens_per_group"] == 200 and record["localization_tokens_per_group"] == 20
    assert record["total_tokens_per_group"] == 220
    assert record["gen_tokens_per_s"] == pytest.approx(440 / 6)  # every token generated, per generation second
    assert record["forward_passes"] == 30 and record["decode_steps"] == pytest.approx(80 / 3)  # per generation


def test_grpo_record_has_no_localization():
    probe = step_cost.Probe(FakeClock())
    probe.add_time("step", 4.0)
    record = step_cost.step_record(probe, prompts=1)
    assert record["localization"] == 0.0 and record["localization_tokens_per_group"] == 0
    assert math.isnan(record["gen_tokens_per_s"])  # no generation seen: no throughput, not a division error


def _record(step, gen, loc, tokens, loc_tokens=0.0, rate=100.0, passes=100.0):
    return {"step": step, "generation": gen + loc, "localization": loc, "update": step - gen - loc,
            "tokens_per_group": tokens, "localization_tokens_per_group": loc_tokens,
            "total_tokens_per_group": tokens + loc_tokens, "rollouts_per_group": 8.0, "prefill_tokens_per_group": 100.0,
            "row_steps_per_group": tokens, "forward_passes": passes, "decode_steps": passes - 2,
            "gen_tokens_per_s": rate}


def test_summary_takes_medians_and_ratios_divide_by_grpo():
    runs = {
        "GRPO": [_record(10, 6, 0, 800), _record(30, 6, 0, 800), _record(12, 6, 0, 800)],  # one noisy outlier
        "SRPO": [_record(13, 7, 1, 700, 60, 80.0, 105), _record(14, 7, 1, 700, 60, 80.0, 105),
                 _record(40, 7, 1, 700, 60, 80.0, 300)],
    }
    summary = step_cost.summarize(runs)
    assert summary["GRPO"]["step"] == 12 and summary["SRPO"]["step"] == 14
    ratios = step_cost.ratios_to(summary)
    assert ratios["GRPO"]["wall_clock"] == 1.0
    assert ratios["SRPO"]["wall_clock"] == pytest.approx(14 / 12)
    assert ratios["SRPO"]["tokens"] == pytest.approx(700 / 800)
    assert ratios["SRPO"]["tokens_with_localization"] == pytest.approx(760 / 800)
    assert ratios["SRPO"]["gen_throughput"] == pytest.approx(0.8)
    assert ratios["SRPO"]["generation"] == pytest.approx(8 / 6) and ratios["SRPO"]["forward_passes"] == 1.05
    # 1.17x is over the 1.05x wall-clock target, 1.33x generation over 1.10x, 0.8x throughput under 0.9x;
    # 1.05x forward passes are within 1.10x and 0.95x tokens within 1.08x
    assert step_cost.verdicts(ratios["SRPO"]) == {"wall_clock": False, "generation": False, "gen_throughput": False,
                                                  "forward_passes": True, "tokens": True}
    assert step_cost.headline(ratios) == ("SRPO/GRPO generation time 1.33x (target <= 1.10x), sequential decoding "
                                          "steps 1.05x (target <= 1.10x)")


def test_tokens_target_counts_localization_replies():
    ratios = {"wall_clock": 1.0, "generation": 1.0, "gen_throughput": 1.0, "forward_passes": 1.0, "tokens": 1.05,
              "tokens_with_localization": 1.10}
    assert not step_cost.verdicts(ratios)["tokens"] and step_cost.verdicts(ratios)["gen_throughput"]


def test_markdown_and_plot(tmp_path):
    runs = {"GRPO": [_record(10, 6, 0, 800)], "RRPO": [_record(11, 7, 0, 750)],
            "SRPO": [_record(12, 7, 1, 700, 50)]}
    summary = step_cost.summarize(runs)
    ratios = step_cost.ratios_to(summary)
    table = step_cost.render_table(summary, ratios)
    assert table.count("\n") == 5 and "| SRPO | 12.0 |" in table and "1.20x" in table
    targets = step_cost.render_targets(ratios)
    assert "missed" in targets and "1.51x" in targets
    pytest.importorskip("matplotlib")
    path = tmp_path / "cost.png"
    step_cost.plot(summary, ratios, path, "test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_gpu_memory_peaks_are_reported_with_their_ratio_only_where_measured():
    runs = {"GRPO": [_record(10, 6, 0, 800) | {"peak_memory_gib": 4.0}, _record(10, 6, 0, 800) | {"peak_memory_gib": 6.0}],
            "SRPO": [_record(12, 7, 1, 700, 50) | {"peak_memory_gib": 7.5}]}
    summary = step_cost.summarize(runs)
    line = step_cost.render_memory_line(summary, step_cost.ratios_to(summary))
    assert line == "Peak allocated GPU memory per run: GRPO 5.00 GiB (1.00x GRPO); SRPO 7.50 GiB (1.50x GRPO).\n"
    on_cpu = step_cost.summarize({m: [_record(10, 6, 0, 800)] for m in ("GRPO", "SRPO")})
    assert step_cost.render_memory_line(on_cpu, step_cost.ratios_to(on_cpu)) == ""


def test_localization_note_reports_parse_failures_only_when_logged():
    runs = {"SRPO": [{"trainer_logged": {"resets/parse_failure_rate": 1.0}},
                     {"trainer_logged": {"resets/parse_failure_rate": 0.5}}]}
    assert "75% (mean over 2 step(s))" in step_cost.localization_note(runs)
    assert step_cost.localization_note({"SRPO": [{"trainer_logged": {}}]}) == ""
    assert step_cost.localization_note({"GRPO": []}) == ""


def test_mean_line_uses_means_not_medians():
    runs = {"GRPO": [_record(10, 6, 0, 800), _record(10, 6, 0, 800), _record(10, 6, 0, 800)],
            "SRPO": [_record(11, 7, 1, 800), _record(11, 7, 1, 800), _record(41, 7, 1, 1700)]}
    assert step_cost.ratios_to(step_cost.summarize(runs))["SRPO"]["wall_clock"] == pytest.approx(1.1)
    line = step_cost.render_mean_line(runs)
    assert "wall-clock 2.10x" in line and "tokens 1.38x" in line  # (11+11+41)/3/10 and (800+800+1700)/3/800


def test_logged_metrics_per_group_and_rates_skip_nan_and_none():
    logs = [
        {"loss": 0.1},  # a log line without the reset metrics
        {"resets/tokens_base": 100.0, "resets/tokens_suffix": 40.0, "resets/tokens_unused": 0.0,
         "resets/tokens_localization": 10.0, "resets/parse_failure_rate": 1.0, "resets/fallback_rate": None},
        {"resets/tokens_base": 60.0, "resets/tokens_suffix": 20.0, "resets/tokens_unused": 8.0,
         "resets/tokens_localization": 6.0, "resets/parse_failure_rate": float("nan"), "resets/fallback_rate": 0.0},
    ]
    out = step_cost.logged_metrics(logs, groups=2)
    assert out["resets/tokens_base"] == 80.0 and out["resets/tokens_suffix"] == 30.0
    assert out["resets/tokens_unused"] == 4.0 and out["resets/tokens_localization"] == 8.0
    assert out["resets/parse_failure_rate"] == 1.0 and out["resets/fallback_rate"] == 0.0
    assert "resets/reset_depth_mean" not in out
    assert step_cost.logged_metrics([{"loss": 1.0}], groups=1) == {}


def test_pooled_update_ratio_takes_one_update_for_every_method():
    # GRPO's updates ran slow (load), SRPO's fast: pooled, both get the median update of all rounds (5)
    runs = {"GRPO": [_record(16, 6, 0, 800), _record(16, 6, 0, 800), _record(16, 6, 0, 800)],
            "RRPO": [_record(14, 9, 0, 800)] * 3,
            "SRPO": [_record(13, 7, 1, 800), _record(13, 7, 1, 800), _record(13, 7, 1, 800)]}
    assert step_cost.ratios_to(step_cost.summarize(runs))["SRPO"]["wall_clock"] == pytest.approx(13 / 16)
    pooled = step_cost.pooled_update_ratios(runs)
    assert pooled["SRPO"] == pytest.approx((8 + 5) / (6 + 5)) and pooled["RRPO"] == pytest.approx((9 + 5) / 11)
    assert "1.18x" in step_cost.render_pooled_line(runs)


def test_a_smoke_run_writes_to_a_fresh_folder_and_a_real_run_to_the_results(tmp_path):
    smoke = step_cost.results_folder(None, smoke=True)
    assert smoke.is_dir() and not any(smoke.iterdir()) and smoke != step_cost.RESULTS
    assert step_cost.RESULTS.resolve() not in smoke.resolve().parents
    smoke.rmdir()
    assert step_cost.results_folder(None, smoke=False) == step_cost.RESULTS
    assert step_cost.results_folder(str(tmp_path), smoke=True) == tmp_path


def _ratios(tokens, with_localization):
    keys = ("wall_clock", "generation", "tokens", "tokens_with_localization", "gen_throughput", "forward_passes",
            "decode_steps", "row_steps", "peak_memory")
    return {k: tokens if k == "tokens" else with_localization if k == "tokens_with_localization" else 2.0
            for k in keys}


def test_the_iid_line_judges_tokens_with_localization_against_its_target():
    assert step_cost.render_iid_line({"GRPO": _ratios(1, 1), "SRPO": _ratios(1, 1.1)}) == ""
    met = step_cost.render_iid_line({"SRPO": _ratios(1, 1.1), step_cost.IID: _ratios(0.8, 0.9)})
    missed = step_cost.render_iid_line({"SRPO": _ratios(1, 1.1), step_cost.IID: _ratios(0.8, 0.93)})
    assert "tokens 0.80x (0.90x with localization; target <= 0.90x, met)" in met
    assert "(0.93x with localization; target <= 0.90x, missed)" in missed


def test_the_pooled_line_names_whichever_methods_ran():
    runs = {m: [{"generation": g, "update": 1.0}] for m, g in (("GRPO", 1.0), ("SRPO", 2.0), (step_cost.IID, 1.5))}
    line = step_cost.render_pooled_line(runs)
    assert "SRPO / GRPO wall-clock: 1.50x (SRPO-iid 1.25x)." in line and "RRPO" not in line


def test_the_lag_line_judges_decoding_steps_against_its_target():
    assert step_cost.render_lag_line({"GRPO": _ratios(1, 1), "SRPO": _ratios(1, 1)}) == ""
    met, missed = _ratios(1.0, 1.1), _ratios(1.0, 1.1)
    met["decode_steps"], missed["decode_steps"] = 1.05, 1.2
    line = step_cost.render_lag_line({"SRPO": _ratios(1, 1), "SRPO-lag1": met, "SRPO-lag2": missed})
    assert "SRPO-lag1 / GRPO: sequential decoding steps 1.05x (target <= 1.10x, met)" in line
    assert "SRPO-lag2 / GRPO: sequential decoding steps 1.20x (target <= 1.10x, missed)" in line


def test_a_steady_state_run_leaves_its_first_steps_out():
    clock = FakeClock()
    probe = step_cost.Probe(clock)
    probe.active = False  # the untimed first step
    probe.add_tokens("rollout", 5)
    probe.add_time("rollout", 1.0)
    probe.active = True
    probe.add_tokens("rollout", 3)
    assert probe.tokens == {"rollout": 3} and probe.seconds == {}
