"""A 2-process `accelerate launch` run on CPU: data is sharded, no deadlock, replicas stay in sync."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from trl_resets import checkpoints


def _free_port() -> int:
    """A port the OS has just handed out, so two suites on one machine do not meet on a fixed one."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize("vllm_mode", [None, "server", "server-lag", "zero2", "zero3", "zero3-peft"])
def test_two_process_srpo_run(tmp_path, vllm_mode):
    launcher = Path(sys.executable).with_name("accelerate")
    worker = Path(__file__).with_name("distributed_worker.py")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRL_EXPERIMENTAL_SILENCE": "1", "OMP_NUM_THREADS": "1"}
    # `--cpu` makes accelerate's launcher start one process only; `--multi_gpu` starts 2 through torch's
    # elastic launcher, and `use_cpu=True` in the config keeps them on the CPU (gloo).
    deepspeed = vllm_mode in ("zero2", "zero3", "zero3-peft")
    if deepspeed:
        pytest.importorskip("deepspeed")
    port = str(_free_port())
    cmd = [str(launcher), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--main_process_port", port, str(worker), str(tmp_path)]
    cmd += [vllm_mode] if vllm_mode else []
    if deepspeed:
        # accelerate's launcher runs DeepSpeed through its own launcher (GPU-only); torchrun starts the 2 CPU ranks
        cmd = [str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node", "2", "--master_port", port,
               str(worker), str(tmp_path), vllm_mode]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["num_processes"] for r in reports] == [2, 2]
    steps = 3 if vllm_mode == "server-lag" else 2
    assert [r["global_step"] for r in reports] == [steps, steps]
    assert reports[0]["param_hash"] == reports[1]["param_hash"]  # gradients were all-reduced
    first, second = (set(r["prompts"]) for r in reports)
    assert first and second and not (first & second)  # each process built the groups of its own prompts
    for r in reports:
        assert all(len(r["prompts"]) % 8 == 0 for r in reports)
        assert all("resets/fallback_rate" in e for e in r["logs"])
    if vllm_mode is None:
        # the compact decoder's steps, the larger of the two processes' (the same logged on both)
        steps = [[e["resets/decode_steps"] for e in r["logs"]] for r in reports]
        assert steps[0] == steps[1] and all(s >= 1 for s in steps[0])
        checkpoint = tmp_path / "checkpoint-2"
        assert checkpoints.is_complete(checkpoint)
        for name in ("generation_buffer_{}.pt", "rng_state_{}.pth"):
            assert all((checkpoint / name.format(rank)).is_file() for rank in (0, 1)), name
    if vllm_mode == "server":
        # one server (the main process's client) sampled for both processes, whose unfinished rows differ per round
        assert reports[0]["engine_requests"] > 0
        for r in reports:
            assert all(e["sampling/sampling_logp_difference/mean"] < 1e-3 for e in r["logs"])
    if vllm_mode == "server-lag":
        # pipelined resets with one server for both processes (no per-row seeds there): the queue is the same on
        # both, and each process's reset slot takes the state found by the prompt at its place a generation before
        assert reports[0]["queue"] == reports[1]["queue"]
        for rank, r in enumerate(reports):
            assert r["resets"][0] == []  # generation 0: fillers
            assert [reset[3:] for reset in r["resets"][1]] == [[0, rank]]  # from generation 0, global prompt `rank`
            assert [e["resets/reset_age"] for e in r["logs"][1:]] == [1.0, 1.0]
        fills = [[e["resets/queue_fill"] for e in r["logs"]] for r in reports]
        assert fills[0] == fills[1] and fills[0][0] == 2.0  # generation 0: both processes' seeds, localized
    if deepspeed:
        stage = 2 if vllm_mode == "zero2" else 3
        assert [r["zero_stage"] for r in reports] == [stage, stage]
    if vllm_mode == "zero3-peft":
        assert 0 < reports[0]["num_params"] < 2000  # the hash covers the LoRA adapter's parameters, the trained ones
        assert reports[0]["num_params"] > 1000  # the hash covers the gathered parameters, not empty shards
