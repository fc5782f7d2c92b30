"""benchmarks/memory.py: the leak ratio, the non-finite count and the RSS sampler."""

import math
import mmap
import time

from benchmarks.memory import RssSampler, leak_ratio, non_finite


def test_leak_ratio_compares_step_50_with_step_5_or_the_last_step():
    rss = [100 + step for step in range(60)]  # RSS at the end of steps 1..60
    assert leak_ratio(rss) == (5, 50, rss[49] / rss[4])
    assert leak_ratio(rss[:8]) == (5, 8, rss[7] / rss[4])
    assert leak_ratio(rss[:3]) == (3, 3, 1.0)


def test_non_finite_counts_nan_and_infinite_values_per_metric():
    logs = [{"loss": 0.5, "resets/sp_pass_rate": math.nan}, {"loss": math.inf, "resets/sp_pass_rate": math.nan,
                                                             "step": 2}]
    assert non_finite(logs) == {"resets/sp_pass_rate": 2, "loss": 1}


def test_rss_sampler_sees_a_step_that_allocates_and_frees():
    with RssSampler(interval=0.001) as rss:
        rss.reset()
        before = rss.now()
        block = mmap.mmap(-1, 64 * 2**20)  # fresh pages, whatever the allocator kept from earlier tests
        for page in range(0, len(block), mmap.PAGESIZE):  # touch every page so it is resident
            block[page] = 1
        deadline = time.monotonic() + 10  # on a loaded machine the sampling thread may wait for a core
        while rss._peak - before < 60 * 2**20 and time.monotonic() < deadline:
            time.sleep(0.01)
        block.close()
        assert rss.peak() - before >= 60 * 2**20  # the thread saw the block while it was resident


def test_results_written_while_the_run_goes_on_are_marked_partial_with_the_curve_so_far(tmp_path):
    import json

    from benchmarks.memory import write_results

    settings = {"steps": 1000, "prompts": 2, "command": "python -m benchmarks.memory --soak"}
    record = {"steps": [1, 2, 3], "peak_rss_mib": [500.0, 510.0, 505.0], "end_rss_mib": [490.0, 495.0, 494.0],
              "seconds": [2.0, 2.1, 2.2], "start_rss_mib": 450.0, "train_seconds": 6.6,
              "non_finite": {"resets/sp_pass_rate": 1}, "completion_length_mean": 30.0}
    stem = tmp_path / "memory_soak"
    write_results(stem, record, settings, "a test machine")
    saved = json.loads(stem.with_suffix(".json").read_text())
    assert saved["complete"] is False and saved["steps_done"] == 3
    assert saved["end_rss_mib"] == [490.0, 495.0, 494.0] and saved["non_finite"] == {"resets/sp_pass_rate": 1}
    text = stem.with_suffix(".md").read_text()
    assert "Partial: 3 of 1000 steps done" in text and "7 s so far" in text
    assert "RSS at the end of step 3 | 494" in text
    assert stem.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    record.update(steps=[1, 2, 3, 4], peak_rss_mib=[*record["peak_rss_mib"], 506.0],
                  end_rss_mib=[*record["end_rss_mib"], 494.0], seconds=[*record["seconds"], 2.0])
    write_results(stem, record, {**settings, "steps": 4}, "a test machine")
    assert json.loads(stem.with_suffix(".json").read_text())["complete"] is True
    assert "Partial" not in stem.with_suffix(".md").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["memory_soak.json", "memory_soak.md", "memory_soak.png"]
