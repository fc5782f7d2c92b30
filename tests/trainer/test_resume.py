"""Kill a run with SIGKILL after a checkpoint, resume it: its next logged losses, rewards and resets/* metrics equal
an uninterrupted run's with the same seed (CPU, deterministic settings). Killed while a checkpoint is written, the
previous checkpoint stays loadable and resume_from_checkpoint=True picks it."""

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from trl_resets import checkpoints

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


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """The uninterrupted run's logs, per worker arguments (run once for the module)."""
    runs = {}

    def logs(*extra):
        if extra not in runs:
            out = tmp_path_factory.mktemp("full")
            assert _run(out, "full", *extra).returncode == 0
            runs[extra] = _logs(out, "full")
        return runs[extra]

    return logs


def _assert_same_run(expected, logged):
    for step, entry in logged.items():
        want, got = _compared(expected[step]), _compared(entry)
        assert want.keys() == got.keys() and "loss" in want
        for key, value in want.items():
            if value is None or got[key] is None or math.isnan(value):
                assert got[key] is value or (got[key] is not None and math.isnan(got[key])), (step, key, got[key])
            else:
                assert got[key] == pytest.approx(value, abs=1e-6), (step, key, value, got[key])


@pytest.mark.parametrize("extra", [(), ("lag=2",), ("lag=1", "iters=3")])
def test_a_run_killed_after_a_checkpoint_resumes_as_the_same_run(tmp_path, full_run, extra):
    """lag=N: pipelined resets, whose queue of reset states the checkpoint holds; with iters=3 (num_iterations)
    the checkpoint falls inside the first generation (the buffered rows of a generation are saved with it, as with
    steps_per_generation > 1: TRL buffers one generation for steps_per_generation x num_iterations steps), and
    the next generation uses the states it carried."""
    broken = tmp_path / "broken"
    killed = _run(broken, "kill", *extra)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert (broken / "checkpoint-2" / "generation_buffer_0.pt").exists()
    assert not (broken / "checkpoint-4").exists()
    resumed = _run(broken, "resume", *extra)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    expected, before, after = full_run(*extra), _logs(broken, "kill"), _logs(broken, "resume")
    assert sorted(before) == [1, 2] and sorted(after) == [3, 4]
    named = dict(a.split("=") for a in extra if isinstance(a, str))
    resumed_generation = 4 if "iters" in named else 3  # the first optimizer step of a generation after the resume
    assert any(k.startswith("resets/") for k in expected[resumed_generation])
    if "lag" in named:  # the resumed generation uses states the checkpoint carried
        assert expected[resumed_generation]["resets/reset_age"] == int(named["lag"])
        assert expected[resumed_generation]["resets/fallback_rate"] < 1.0
        assert expected[resumed_generation - 1 if "iters" not in named else 1]["resets/queue_fill"] > 0
    _assert_same_run(expected, {**before, **after})


@pytest.mark.parametrize("mode", ["kill-in-files", "kill-before-marker"])
def test_a_kill_while_a_checkpoint_is_written_leaves_the_previous_one_to_resume_from(tmp_path, full_run, mode):
    out = tmp_path / "run"
    killed = _run(out, mode)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    previous, interrupted = out / "checkpoint-2", out / "checkpoint-4"
    assert checkpoints.is_complete(previous) and (previous / "trainer_state.json").exists()  # not rotated away
    assert interrupted.is_dir() and not checkpoints.is_complete(interrupted)
    if mode == "kill-in-files":  # the buffer was never renamed into place; TRL's RNG states, written before it, are
        assert not (interrupted / "generation_buffer_0.pt").exists()
        assert (interrupted / "rng_state.pth").exists()
    resumed = _run(out, "resume-latest")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from checkpoint-2" in resumed.stderr
    after = _logs(out, "resume-latest")
    assert sorted(after) == [3, 4]
    _assert_same_run(full_run(), after)
    # the save of checkpoint-4 done again completes it, leaves no temporary file, and only then drops checkpoint-2
    assert checkpoints.is_complete(interrupted) and not previous.exists()
    assert not [p.name for p in interrupted.iterdir() if ".tmp-" in p.name]


def test_resuming_from_the_latest_with_no_complete_checkpoint_names_the_folders(tmp_path):
    (tmp_path / "checkpoint-3").mkdir()
    with pytest.raises(ValueError, match=r"\['checkpoint-3'\] are incomplete.*checkpoint_complete.json"):
        checkpoints.last_complete_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="there is no checkpoint"):
        checkpoints.last_complete_checkpoint(tmp_path / "absent")
    checkpoints.mark_complete(tmp_path / "checkpoint-3", 3)
    (tmp_path / "checkpoint-10").mkdir()
    (tmp_path / "checkpoint-10" / checkpoints.COMPLETE_FILE).write_text("{trunc")  # a torn marker is no marker
    with pytest.warns(UserWarning, match=r"\['checkpoint-10'\].*resuming from checkpoint-3"):
        assert checkpoints.last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-3")
