"""Kill a run with SIGKILL after a checkpoint, resume it: its next logged losses, rewards and resets/* metrics equal
an uninterrupted run's with the same seed (CPU, deterministic settings)."""

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("resume_worker.py")


def _run(out, mode, *extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRL_EXPERIMENTAL_SILENCE="1")
    return subprocess.run([sys.executable, str(WORKER), str(out), mode, *map(str, extra)], env=env, check=False,
                          capture_output=True, text=True, timeout=600)


def _logs(out, mode):
    lines = (Path(out) / f"logs-{mode}.jsonl").read_text().splitlines()
    return {entry["step"]: entry for entry in map(json.loads, lines) if "loss" in entry}


def _compared(entry):
    return {k: v for k, v in entry.items() if k in ("loss", "reward", "reward_std", "grad_norm") or k.startswith(("resets/", "rewards/"))}


@pytest.mark.parametrize("steps_per_generation", [None, 4])  # 4: the checkpoint falls inside one generation
def test_a_run_killed_after_a_checkpoint_resumes_as_the_same_run(tmp_path, steps_per_generation):
    extra = () if steps_per_generation is None else (steps_per_generation,)
    full, broken = tmp_path / "full", tmp_path / "broken"
    assert _run(full, "full", *extra).returncode == 0
    killed = _run(broken, "kill", *extra)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert (broken / "checkpoint-2" / "generation_buffer_0.pt").exists()
    assert not (broken / "checkpoint-4").exists()
    resumed = _run(broken, "resume", *extra)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    expected, before, after = _logs(full, "full"), _logs(broken, "kill"), _logs(broken, "resume")
    assert sorted(before) == [1, 2] and sorted(after) == [3, 4]
    assert any(k.startswith("resets/") for k in expected[3 if steps_per_generation is None else 1])
    for step, entry in {**before, **after}.items():
        want, got = _compared(expected[step]), _compared(entry)
        assert want.keys() == got.keys() and "loss" in want
        for key, value in want.items():
            if value is None or got[key] is None or math.isnan(value):
                assert got[key] is value or (got[key] is not None and math.isnan(got[key])), (step, key, got[key])
            else:
                assert got[key] == pytest.approx(value, abs=1e-6), (step, key, value, got[key])
