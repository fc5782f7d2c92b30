"""An executor that sends each program to a SandboxFusion service (``POST /run_code``).

SandboxFusion (github.com/bytedance/SandboxFusion) is the sandbox service verl
users run at scale. This adapter speaks its HTTP API with the standard library
only: the request carries ``code``, ``language="python"``, ``stdin``,
``run_timeout`` and ``memory_limit_MB``; the response's ``run_result`` (status
``Finished``, ``TimeLimitExceeded`` or ``Error``, with ``return_code``,
``stdout`` and ``stderr``) becomes an :class:`~trl_resets.sandbox.Execution`.
The isolation is the service's. A service that cannot be reached, answers
with an HTTP error or says ``SandboxError`` gives a ``"sandbox_error"``
execution (the test fails, training goes on) and a warning.
"""

from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.request

from .base import FINISHED, SANDBOX_ERROR, TIMEOUT, Execution

logger = logging.getLogger(__name__)


class SandboxFusionExecutor:
    """Runs programs on a SandboxFusion service.

    Args:
        url: the service's base address, e.g. ``"http://sandbox:8080"``.
        memory_mb: the memory limit sent with each run (``-1``: the service's default).
        request_overhead_s: how much longer than the run's own limit to wait for the answer.
        retries: how many times to retry a run whose request failed (connection refused, HTTP 5xx).
    """

    def __init__(self, url: str, memory_mb: int = 2048, request_overhead_s: float = 30.0, retries: int = 2):
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"url={url!r}: give the service's http:// or https:// address, e.g. http://sandbox:8080.")
        if retries < 0 or request_overhead_s <= 0:
            raise ValueError(f"retries={retries}, request_overhead_s={request_overhead_s}: need retries >= 0 and "
                             "a positive overhead.")
        self.url = url.rstrip("/") + "/run_code"
        self.memory_mb = memory_mb
        self.request_overhead_s = request_overhead_s
        self.retries = retries

    def describe(self) -> str:
        """The isolation line: the service's own."""
        return f"remote SandboxFusion service at {self.url} (its isolation)"

    def run(self, source: str, stdin: str = "", timeout_s: float = 6.0) -> Execution:
        """Send one program to the service and read its answer."""
        if timeout_s <= 0:
            raise ValueError(f"timeout_s={timeout_s}: a run needs a positive wall-clock limit.")
        body = json.dumps({"code": source, "language": "python", "stdin": stdin, "run_timeout": timeout_s,
                           "compile_timeout": timeout_s, "memory_limit_MB": self.memory_mb}).encode("utf-8")
        start = time.perf_counter()
        problem = ""
        for _ in range(self.retries + 1):
            try:
                answer = self._post(body, timeout_s + self.request_overhead_s)
            except urllib.error.HTTPError as error:
                problem = f"HTTP {error.code} from {self.url}"
                if error.code < 500:
                    break
                continue
            except (urllib.error.URLError, OSError, ValueError) as error:
                problem = f"no answer from {self.url}: {error}"
                continue
            return _execution(answer, time.perf_counter() - start)
        logger.warning("SandboxFusion run failed: %s", problem)
        return Execution(SANDBOX_ERROR, None, "", problem, time.perf_counter() - start)

    def _post(self, body: bytes, timeout_s: float) -> dict:
        request = urllib.request.Request(self.url, data=body, headers={"Content-Type": "application/json"},
                                         method="POST")
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return json.loads(response.read().decode("utf-8"))


def _execution(answer: dict, seconds: float) -> Execution:
    """Map one ``/run_code`` response to an execution."""
    run = answer.get("run_result") if isinstance(answer, dict) else None
    if not isinstance(run, dict):
        message = answer.get("message", "") if isinstance(answer, dict) else repr(answer)[:200]
        return Execution(SANDBOX_ERROR, None, "", f"SandboxFusion gave no run result: {message}", seconds)
    stdout, stderr = run.get("stdout") or "", run.get("stderr") or ""
    if run.get("status") == "TimeLimitExceeded":
        return Execution(TIMEOUT, None, stdout, stderr, seconds)
    if run.get("status") == "Finished" and isinstance(run.get("return_code"), int):
        return Execution(FINISHED, run["return_code"], stdout, stderr, seconds)
    return Execution(SANDBOX_ERROR, None, stdout, stderr or answer.get("message", ""), seconds)
