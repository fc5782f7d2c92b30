"""Executors for model-written code: the local sandbox and a SandboxFusion adapter."""

from .base import FINISHED, SANDBOX_ERROR, TIMEOUT, Execution, Executor
from .local import LocalSandbox

__all__ = ["FINISHED", "SANDBOX_ERROR", "TIMEOUT", "Execution", "Executor", "LocalSandbox"]
