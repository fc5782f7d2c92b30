"""What every code executor returns, and the protocol the code reward runs programs through."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

FINISHED = "finished"
TIMEOUT = "timeout"
SANDBOX_ERROR = "sandbox_error"


@dataclass(frozen=True)
class Execution:
    """The outcome of running one program once.

    Attributes:
        status: ``"finished"`` (it exited by itself), ``"timeout"`` (killed at its
            wall-clock limit) or ``"sandbox_error"`` (the executor could not run it).
        exit_code: the program's exit status (``None`` unless finished).
        stdout, stderr: what it wrote (decoded as UTF-8, undecodable bytes replaced).
        seconds: wall-clock time from start to end.
    """

    status: str
    exit_code: int | None
    stdout: str
    stderr: str
    seconds: float

    @property
    def ok(self) -> bool:
        """Say whether the program finished with exit status 0."""
        return self.status == FINISHED and self.exit_code == 0


@runtime_checkable
class Executor(Protocol):
    """Runs one Python program with a given standard input; safe to call from several threads."""

    def run(self, source: str, stdin: str = "", timeout_s: float = 6.0) -> Execution:
        """Run ``source`` as ``__main__`` with ``stdin``, killed after ``timeout_s`` seconds."""
        ...

    def describe(self) -> str:
        """One line saying what isolation this executor gives."""
        ...
