"""Executors for model-written code: the local sandbox and a SandboxFusion adapter."""

from .base import FINISHED, SANDBOX_ERROR, TIMEOUT, Execution, Executor
from .local import LocalSandbox
from .remote import SandboxFusionExecutor

__all__ = ["FINISHED", "SANDBOX_ERROR", "TIMEOUT", "Execution", "Executor", "LocalSandbox", "SandboxFusionExecutor"]
