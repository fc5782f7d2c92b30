"""The local sandbox: each program in its own confined process on this machine.

Every run gets:

* its own process group (``start_new_session``), killed as a whole when the
  program ends or reaches its wall-clock limit;
* resource limits: CPU seconds, address space, process count, file size,
  open files, no core dumps;
* no network: an empty network namespace where the system allows one
  (root, or unprivileged user namespaces), and in every case an audit hook
  that refuses to create sockets;
* a fresh temporary working directory, removed afterwards, and file changes
  outside it refused by the same hook;
* a minimal environment (``PATH``, ``HOME``/``TMPDIR`` = its directory,
  ``LANG``): nothing of the caller's, so no tokens and no secrets.

When the parent runs as root, programs also run as an unprivileged user of
their own (one user id per concurrent run), because the kernel does not apply
the process-count limit to root; after each run every process of that user is
killed, so a forked child that left the process group dies too. The first run
probes the system and logs, once, which isolation is in effect.

The audit hook is a second line, not a security boundary on its own: it
stops ordinary Python (``open``, ``os.remove``, ``socket``, ``ctypes``), while
the namespace, the limits and the separate user hold against anything else.
"""

from __future__ import annotations

import json
import logging
import math
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from .base import FINISHED, SANDBOX_ERROR, TIMEOUT, Execution

logger = logging.getLogger(__name__)

RUNNER = Path(__file__).with_name("_runner.py")
SETUP_FAILED = 125
GiB = 1024 ** 3
MiB = 1024 ** 2
# Modules imported before the program runs: those LiveCodeBench's runner gives
# every solution, and socket (so that a program meets the refusal, not a
# missing module). An unprivileged sandbox user may be unable to read the
# interpreter's files later (a Python installed under /root, say).
PRELOAD = ("array", "bisect", "collections", "copy", "datetime", "decimal", "fractions", "functools", "heapq",
           "io", "itertools", "json", "math", "operator", "random", "re", "socket", "statistics", "string", "typing")
# Also imported when the probe finds the interpreter's library unreadable by the
# sandbox user (they cost a tenth of a second per run, so only then).
PRELOAD_UNREADABLE = ("abc", "base64", "cmath", "contextlib", "csv", "dataclasses", "enum", "glob", "hashlib",
                      "numbers", "pathlib", "pickle", "pprint", "queue", "shutil", "struct", "tempfile",
                      "textwrap", "threading", "time", "traceback")


class LocalSandbox:
    """Runs Python programs in confined child processes (see the module docstring).

    Args:
        python: the interpreter that runs the programs (default: this one).
        memory_bytes: address-space limit per program (default 2 GiB).
        max_processes: process-count limit (``RLIMIT_NPROC``) per program. For a
            non-root caller the kernel counts all of the caller's processes
            against it, so a program usually cannot start any (which is what
            the tests of a coding task need).
        file_size_bytes: the largest file a program may write (its output included).
        max_output_bytes: output kept from each stream (the rest is dropped).
        network_namespace: ``"auto"`` (use one when the system allows), ``True``
            (refuse to run without one) or ``False`` (sockets refused by the hook only).
        first_uid: when running as root, programs run as users ``first_uid``,
            ``first_uid + 1``, ... (one per concurrent run); pick a range no real
            user has.
        tmp_root: where the per-run directories are made (default: the system's temp dir).
    """

    def __init__(
        self,
        python: str | None = None,
        memory_bytes: int = 2 * GiB,
        max_processes: int = 16,
        file_size_bytes: int = 64 * MiB,
        max_output_bytes: int = 16 * MiB,
        network_namespace: bool | str = "auto",
        first_uid: int = 1_500_000,
        tmp_root: str | None = None,
    ):
        if network_namespace not in ("auto", True, False):
            raise ValueError(f"network_namespace={network_namespace!r}: use 'auto', True or False.")
        for name, value in (("memory_bytes", memory_bytes), ("max_processes", max_processes),
                            ("file_size_bytes", file_size_bytes), ("max_output_bytes", max_output_bytes)):
            if value < 1:
                raise ValueError(f"{name}={value}: the limit must be positive.")
        self.python = python or sys.executable
        self.memory_bytes = memory_bytes
        self.max_processes = max_processes
        self.file_size_bytes = file_size_bytes
        self.max_output_bytes = max_output_bytes
        self.network_namespace = network_namespace
        self.tmp_root = tmp_root
        self.as_root = os.geteuid() == 0
        self._uids: queue.SimpleQueue[int] = queue.SimpleQueue()
        self._next_uid = first_uid
        self._uid_lock = threading.Lock()
        self._probe_lock = threading.Lock()
        self._netns: bool | None = None
        self._preload = PRELOAD
        self._description: str | None = None

    # ------------------------------------------------------------------ isolation in effect

    def describe(self) -> str:
        """Probe the system once and return the line that says which isolation is in effect."""
        with self._probe_lock:
            if self._description is None:
                self._description = self._probe()
                logger.info("code sandbox: %s", self._description)
        return self._description

    def _probe(self) -> str:
        """Find out whether a network namespace works here; fix the mode for later runs."""
        netns_failure = ""
        result = self._execute("pass", "", 30.0, netns=self.network_namespace is not False, report=True)
        if result.status == SANDBOX_ERROR and self.network_namespace is not False:
            netns_failure = result.stderr.strip()[-300:]
            result = self._execute("pass", "", 30.0, netns=False, report=True)
        if not result.ok:
            raise RuntimeError(f"the code sandbox cannot run {self.python}: {result.stderr.strip()[-500:]}")
        found = json.loads(result.stdout.strip().splitlines()[-1])
        self._netns = found["network_namespace"]
        if not found["library_readable"]:
            self._preload = PRELOAD + PRELOAD_UNREADABLE
        if not self._netns and self.network_namespace is True:
            raise RuntimeError(
                "LocalSandbox(network_namespace=True) cannot enter a network namespace on this system "
                f"({netns_failure}); run as root, allow unprivileged user "
                "namespaces, or pass network_namespace='auto' to rely on refused sockets."
            )
        network = "network namespace + sockets refused" if self._netns else "sockets refused (no network namespace)"
        user = "a separate unprivileged user per run" if self.as_root else f"the caller's user (uid {os.getuid()})"
        if self._preload != PRELOAD:
            user += (f" (it cannot read {self.python}'s library: programs import only the {len(self._preload)} "
                     "preloaded modules; pass a world-readable python= to allow more)")
        return (f"local, {network}; {user}; own process group; limits: {self.memory_bytes // MiB} MiB address "
                f"space, {self.max_processes} processes, {self.file_size_bytes // MiB} MiB files, CPU = wall "
                "limit; fresh temp dir; minimal environment")

    # ------------------------------------------------------------------ running

    def run(self, source: str, stdin: str = "", timeout_s: float = 6.0) -> Execution:
        """Run ``source`` as ``__main__`` with ``stdin``; killed (with all it started) after ``timeout_s``."""
        if timeout_s <= 0:
            raise ValueError(f"timeout_s={timeout_s}: a run needs a positive wall-clock limit.")
        self.describe()
        return self._execute(source, stdin, timeout_s, netns=self._netns, report=False)

    def _execute(self, source: str, stdin: str, timeout_s: float, netns: bool, report: bool) -> Execution:
        """One confined run in a fresh directory that is removed afterwards."""
        uid = self._take_uid() if self.as_root else None
        base = Path(tempfile.mkdtemp(prefix="trl-resets-sandbox-", dir=self.tmp_root))
        try:
            return self._run_in(base, uid, source, stdin, timeout_s, netns, report)
        finally:
            if uid is not None:
                self._kill_user(uid)
                self._uids.put(uid)
            shutil.rmtree(base, ignore_errors=True)

    def _run_in(self, base: Path, uid, source, stdin, timeout_s, netns, report) -> Execution:
        work = base / "work"
        work.mkdir()
        if uid is not None:
            os.chmod(base, 0o711)  # the program's user may pass through, not list
            os.chown(work, uid, uid)
        cpu = math.ceil(timeout_s) + 1
        job = {
            "source": source, "uid": uid, "network_namespace": netns, "report": report, "preload": self._preload,
            "rlimits": {"RLIMIT_CPU": cpu, "RLIMIT_AS": self.memory_bytes, "RLIMIT_NPROC": self.max_processes,
                        "RLIMIT_FSIZE": self.file_size_bytes, "RLIMIT_CORE": 0, "RLIMIT_NOFILE": 64},
        }
        job_path = base / "job.json"
        job_path.write_text(json.dumps(job), encoding="utf-8")
        env = {"PATH": "/usr/bin:/bin", "HOME": str(work), "TMPDIR": str(work), "LANG": "C.UTF-8",
               "PYTHONIOENCODING": "utf-8"}
        start = time.perf_counter()
        with open(base / "stdout", "w+b") as out, open(base / "stderr", "w+b") as err:
            try:
                process = subprocess.Popen(
                    [self.python, "-I", "-B", str(RUNNER), str(job_path)], cwd=work, env=env,
                    stdin=subprocess.PIPE, stdout=out, stderr=err, start_new_session=True, close_fds=True,
                )
            except OSError as error:
                return Execution(SANDBOX_ERROR, None, "", f"could not start {self.python}: {error}", 0.0)
            status = self._wait(process, stdin, timeout_s)
            seconds = time.perf_counter() - start
            stdout, stderr = self._read(out), self._read(err)
        if status == FINISHED and process.returncode == SETUP_FAILED:
            return Execution(SANDBOX_ERROR, None, stdout, stderr, seconds)
        exit_code = process.returncode if status == FINISHED else None
        return Execution(status, exit_code, stdout, stderr, seconds)

    @staticmethod
    def _wait(process: subprocess.Popen, stdin: str, timeout_s: float) -> str:
        """Feed ``stdin``, wait up to ``timeout_s``, then kill the whole process group."""
        deadline = time.monotonic() + timeout_s
        status = FINISHED
        writer = threading.Thread(target=_feed, args=(process, stdin.encode("utf-8")), daemon=True)
        writer.start()
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            status = TIMEOUT
        finally:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            process.wait()
            writer.join(timeout=max(0.0, deadline - time.monotonic()) + 1.0)
        return status

    def _read(self, handle) -> str:
        """Return at most ``max_output_bytes`` of what the program wrote to one stream."""
        handle.flush()
        handle.seek(0)
        return handle.read(self.max_output_bytes).decode("utf-8", errors="replace")

    # ------------------------------------------------------------------ the per-run users (root only)

    def _take_uid(self) -> int:
        """A user id no concurrent run holds."""
        try:
            return self._uids.get_nowait()
        except queue.Empty:
            with self._uid_lock:
                uid, self._next_uid = self._next_uid, self._next_uid + 1
            return uid

    @staticmethod
    def _kill_user(uid: int, wait_s: float = 5.0) -> None:
        """Kill every process of ``uid`` (``kill -9 -1`` run as that user signals only its own), and wait
        until the kernel has removed them, so the next run on this user id starts from none."""
        deadline = time.monotonic() + wait_s
        while True:
            subprocess.run(["kill", "-9", "-1"], user=uid, group=uid, extra_groups=[], env={"PATH": "/usr/bin:/bin"},
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
            if not _processes_of(uid):
                return
            if time.monotonic() > deadline:
                logger.warning("code sandbox: processes of user %d outlived their run by %.0f s", uid, wait_s)
                return
            time.sleep(0.01)


def _processes_of(uid: int) -> bool:
    """Say whether any process (a zombie included) belongs to ``uid``."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}").st_uid == uid:
                    return True
            except FileNotFoundError:
                continue
    return False


def _feed(process: subprocess.Popen, data: bytes) -> None:
    """Write a program's standard input and close it; a program that exits early is fine."""
    try:
        process.stdin.write(data)
        process.stdin.close()
    except (BrokenPipeError, OSError, ValueError):
        pass
