"""benchmarks/memory.py: the leak ratio, the non-finite count and the RSS sampler."""

import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

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
        block = bytearray(64 * 2**20)
        block[:: 4096] = b"x" * len(block[:: 4096])  # touch every page so it is resident
        time.sleep(0.05)
        del block
        assert rss.peak() - before >= 60 * 2**20
