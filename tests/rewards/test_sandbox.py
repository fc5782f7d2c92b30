"""The local sandbox against hostile programs (each fails, ends, and leaves the machine as it was), and the
SandboxFusion adapter against a local stand-in service."""

import logging
import os
import socket
import sys
import threading

import pytest

from trl_resets.rewards import CodeReward
from trl_resets.sandbox import FINISHED, SANDBOX_ERROR, TIMEOUT, LocalSandbox, SandboxFusionExecutor

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the local sandbox needs Linux")

MiB = 1024 ** 2


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("sandbox-runs")


@pytest.fixture(scope="module")
def sandbox(runs_dir):
    return LocalSandbox(memory_bytes=512 * MiB, max_processes=16, tmp_root=str(runs_dir))


def _gone(pid: int, uid: int) -> bool:
    """No such process of ``uid`` runs: none with that pid, a zombie, or the pid reused by another user."""
    try:
        with open(f"/proc/{pid}/status") as status:
            fields = dict(line.split(":\t", 1) for line in status.read().splitlines())
    except FileNotFoundError:
        return True
    return fields["State"].startswith("Z") or int(fields["Uid"].split()[0]) != uid


def test_runs_a_program_with_its_input(sandbox):
    result = sandbox.run("a, b = map(int, input().split())\nprint(a + b)", "2 40\n")
    assert (result.status, result.exit_code, result.stdout) == (FINISHED, 0, "42\n")
    failing = sandbox.run("raise ValueError('boom')")
    assert failing.status == FINISHED and failing.exit_code == 1 and "ValueError: boom" in failing.stderr


def test_logs_the_isolation_in_effect_once(runs_dir, caplog):
    fresh = LocalSandbox(memory_bytes=512 * MiB, tmp_root=str(runs_dir))
    with caplog.at_level(logging.INFO, logger="trl_resets.sandbox.local"):
        fresh.run("pass")
        fresh.run("pass")
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("code sandbox:")]
    assert len(lines) == 1 and "sockets refused" in lines[0] and "process group" in lines[0]


def test_infinite_loop_is_killed_at_its_limit(sandbox):
    result = sandbox.run("import os\nprint(os.getuid(), os.getpid(), flush=True)\nwhile True:\n    pass", timeout_s=1.0)
    assert result.status == TIMEOUT and result.exit_code is None
    uid, pid = map(int, result.stdout.split())
    assert _gone(pid, uid)


def test_fork_bomb_is_bounded_and_every_child_dies(sandbox):
    program = (
        "import os, time\n"
        "pids = []\n"
        "while len(pids) < 10000:\n"
        "    try:\n"
        "        pid = os.fork()\n"
        "    except OSError:\n"
        "        break\n"
        "    if pid == 0:\n"
        "        os.setsid()  # leave the process group\n"
        "        time.sleep(30)\n"
        "        os._exit(0)\n"
        "    pids.append(pid)\n"
        "print(os.getuid(), *pids, flush=True)\n"
        "time.sleep(30)\n"
    )
    result = sandbox.run(program, timeout_s=2.0)
    assert result.status == TIMEOUT
    uid, *pids = map(int, result.stdout.split())
    assert len(pids) < 16  # the process-count limit stopped it
    if os.geteuid() == 0:  # as root the sandbox kills every process of the run's user, escaped or not
        assert all(_gone(pid, uid) for pid in pids)


def test_unbounded_allocation_fails_inside_its_limit(sandbox):
    result = sandbox.run("blocks = []\nwhile True:\n    blocks.append(bytearray(16 * 2**20))", timeout_s=10.0)
    assert result.status == FINISHED and result.exit_code != 0 and "MemoryError" in result.stderr


def test_no_network(sandbox):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.2)
    port = server.getsockname()[1]
    program = f"import socket\ns = socket.socket()\ns.connect(('127.0.0.1', {port}))\nprint('connected')"
    result = sandbox.run(program, timeout_s=5.0)
    assert not result.ok and "connected" not in result.stdout and "PermissionError" in result.stderr
    with pytest.raises(socket.timeout):
        server.accept()
    server.close()
    if "network namespace +" in sandbox.describe():
        interfaces = sandbox.run("print(open('/proc/self/net/dev').read())").stdout
        assert "lo:" in interfaces and len(interfaces.strip().splitlines()) == 3  # two header lines and lo


def test_no_secret_from_the_environment(sandbox, monkeypatch):
    monkeypatch.setenv("TRL_RESETS_TEST_SECRET", "hunter2")
    result = sandbox.run("import os\nprint(sorted(os.environ))\nprint(os.environ.get('TRL_RESETS_TEST_SECRET'))")
    assert result.ok and "hunter2" not in result.stdout
    assert result.stdout.splitlines()[0] == "['HOME', 'LANG', 'PATH', 'PYTHONIOENCODING', 'TMPDIR']"


def test_no_writes_or_deletes_outside_its_directory(sandbox, tmp_path, runs_dir):
    outside = tmp_path / "outside"
    outside.mkdir()
    outside.chmod(0o777)  # writable by anyone: only the sandbox stands in the way
    keep = outside / "keep.txt"
    keep.write_text("original")
    keep.chmod(0o666)
    program = (
        "import os, shutil\n"
        f"attempts = [lambda: open({str(keep)!r}, 'w').write('changed'), lambda: os.remove({str(keep)!r}),\n"
        f"            lambda: open({str(outside / 'new.txt')!r}, 'w'), lambda: shutil.rmtree({str(outside)!r}),\n"
        f"            lambda: os.rename({str(keep)!r}, 'stolen.txt')]\n"
        "refused = 0\n"
        "for attempt in attempts:\n"
        "    try:\n"
        "        attempt()\n"
        "    except OSError:\n"
        "        refused += 1\n"
        "open('mine.txt', 'w').write('fine inside')\n"
        "print(refused, open('mine.txt').read())\n"
    )
    result = sandbox.run(program)
    assert result.ok and result.stdout == "5 fine inside\n"
    assert keep.read_text() == "original" and sorted(p.name for p in outside.iterdir()) == ["keep.txt"]
    assert list(runs_dir.iterdir()) == []  # every run's directory is removed afterwards


def test_parallel_runs_stay_separate(sandbox):
    outputs = [None] * 4

    def work(i):
        outputs[i] = sandbox.run(f"import os\nopen('f', 'w').write('{i}')\nprint(sorted(os.listdir('.')), {i})")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [r.stdout for r in outputs] == [f"['f'] {i}\n" for i in range(4)]


def test_bad_settings_are_refused(runs_dir):
    with pytest.raises(ValueError, match="network_namespace='maybe'"):
        LocalSandbox(network_namespace="maybe")
    with pytest.raises(ValueError, match="memory_bytes=0"):
        LocalSandbox(memory_bytes=0)
    with pytest.raises(ValueError, match="positive wall-clock limit"):
        LocalSandbox(tmp_root=str(runs_dir)).run("pass", timeout_s=0)
    missing = LocalSandbox(python="/nonexistent/python", tmp_root=str(runs_dir))
    with pytest.raises(RuntimeError, match="cannot run /nonexistent/python"):
        missing.run("pass")


# ---------------------------------------------------------------------------- the SandboxFusion adapter


@pytest.fixture()
def service(sandbox):
    from tests.helpers.sandbox_fusion_standin import StandIn

    with StandIn(sandbox) as standin:
        yield standin


def test_sandbox_fusion_adapter_runs_programs_through_the_service(service):
    remote = SandboxFusionExecutor(service.url, memory_mb=256)
    result = remote.run("print(int(input()) * 2)", "21\n", timeout_s=5.0)
    assert (result.status, result.exit_code, result.stdout) == (FINISHED, 0, "42\n")
    assert service.requests[-1] == {"code": "print(int(input()) * 2)", "language": "python", "stdin": "21\n",
                                    "run_timeout": 5.0, "compile_timeout": 5.0, "memory_limit_MB": 256}
    assert remote.run("while True:\n    pass", timeout_s=1.0).status == TIMEOUT
    failed = remote.run("raise SystemExit(3)")
    assert failed.status == FINISHED and failed.exit_code == 3
    assert "SandboxFusion" in remote.describe() and service.url in remote.describe()


def test_sandbox_fusion_adapter_scores_code_end_to_end(service):
    reward = CodeReward(SandboxFusionExecutor(service.url), max_workers=2)
    tests = {"inputs": ["1 2\n", "5 5\n"], "outputs": ["3\n", "10\n"]}
    completions = ["a, b = map(int, input().split())\nprint(a + b)", "print(3)", "while True:\n    pass"]
    assert CodeReward(SandboxFusionExecutor(service.url), test_timeout_s=1.0)(completions[2:], [tests]) == [0.0]
    assert reward(completions[:2], [tests] * 2) == [1.0, 0.5]


def test_sandbox_fusion_adapter_retries_then_reports_failures(service, caplog):
    remote = SandboxFusionExecutor(service.url, retries=1)
    service.failures = [503]
    assert remote.run("print(1)").stdout == "1\n"  # one 503, then the retry answers
    service.failures = [500, 500]
    result = remote.run("print(1)")
    assert result.status == SANDBOX_ERROR and "HTTP 500" in result.stderr and "SandboxFusion run failed" in caplog.text
    service.failures = [422]
    assert remote.run("print(1)").status == SANDBOX_ERROR and len(service.requests) == 5  # no retry on 4xx
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    unreachable = SandboxFusionExecutor(f"http://127.0.0.1:{closed.getsockname()[1]}", retries=0)
    closed.close()
    assert unreachable.run("print(1)").status == SANDBOX_ERROR
    with pytest.raises(ValueError, match="http:// or https://"):
        SandboxFusionExecutor("sandbox:8080")
