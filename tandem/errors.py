"""Typed errors shared by the engine, the servers and the SDK."""
from __future__ import annotations


class TandemError(Exception):
    """Base class of every error Tandem raises on purpose."""


class InvalidRequestError(TandemError, ValueError):
    """Bad input from outside; `field` names the offending field."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"{field}: {message}")


class ModelNotFoundError(TandemError):
    """A model name or path that Tandem does not know."""


class ModelNotInstalledError(ModelNotFoundError):
    """A known model whose files are not installed yet."""


class CheckpointError(TandemError):
    """A checkpoint that is missing, corrupt or of an unsupported architecture."""


class CapacityError(TandemError):
    """A request that can never fit (more KV blocks than the pool holds)."""
