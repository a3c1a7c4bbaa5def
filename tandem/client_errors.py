"""Typed exceptions of the client SDK: one per gRPC status code a Tandem server returns.

Every one carries the server's message (`.message`), the status code (`.code`, a `grpc.StatusCode`)
and, for INVALID_ARGUMENT, the offending field (`.field`, the message's prefix before ": ").
"""
from __future__ import annotations

from typing import Any

from tandem.errors import TandemError


class ClientError(TandemError):
    """A call to a Tandem server that failed; `code` is the gRPC status code."""

    code_name = "UNKNOWN"

    def __init__(self, message: str, *, code: Any = None, field: str = "", request_id: str = ""):
        self.message = message
        self.code = code
        self.field = field
        self.request_id = request_id
        super().__init__(message)

    def __str__(self) -> str:
        return f"{self.code_name}: {self.message}"


class InvalidArgumentError(ClientError, ValueError):
    """INVALID_ARGUMENT: bad input; `field` names it (e.g. `sampling.top_p`)."""

    code_name = "INVALID_ARGUMENT"


class NotFoundError(ClientError, LookupError):
    """NOT_FOUND: an unknown model, pipeline or session."""

    code_name = "NOT_FOUND"


class AlreadyExistsError(ClientError):
    """ALREADY_EXISTS: a request_id or session_id already in use."""

    code_name = "ALREADY_EXISTS"


class ResourceExhaustedError(ClientError):
    """RESOURCE_EXHAUSTED: the server sheds load (admission queue full) or a message is too large."""

    code_name = "RESOURCE_EXHAUSTED"


class UnavailableError(ClientError, ConnectionError):
    """UNAVAILABLE: the server cannot be reached, is draining, or a worker is gone."""

    code_name = "UNAVAILABLE"


class RequestCancelledError(ClientError):
    """CANCELLED: the request was aborted (by `abort`, by the client, or by the server)."""

    code_name = "CANCELLED"


class DeadlineExceededError(ClientError, TimeoutError):
    """DEADLINE_EXCEEDED: the call's timeout passed."""

    code_name = "DEADLINE_EXCEEDED"


class FailedPreconditionError(ClientError):
    """FAILED_PRECONDITION: e.g. a session already busy with a turn."""

    code_name = "FAILED_PRECONDITION"


class ServerError(ClientError):
    """Any other status (INTERNAL, UNKNOWN, UNIMPLEMENTED, ...) or an in-band error with no better class."""


_BY_NAME: dict[str, type[ClientError]] = {
    cls.code_name: cls for cls in (InvalidArgumentError, NotFoundError, AlreadyExistsError, ResourceExhaustedError,
                                   UnavailableError, RequestCancelledError, DeadlineExceededError,
                                   FailedPreconditionError)
}


def error_for(code: Any, message: str, *, field: str = "", request_id: str = "") -> ClientError:
    """The typed exception of a status code (a `grpc.StatusCode` or its integer value)."""
    import grpc

    if isinstance(code, int):
        code = next((c for c in grpc.StatusCode if c.value[0] == code), grpc.StatusCode.UNKNOWN)
    name = code.name if code is not None else "UNKNOWN"
    cls = _BY_NAME.get(name, ServerError)
    if cls in (InvalidArgumentError, NotFoundError) and not field and ": " in message:
        field = message.split(": ", 1)[0]
    err = cls(message, code=code, field=field, request_id=request_id)
    if cls is ServerError:
        err.code_name = name
    return err


def from_rpc_error(e: Any, request_id: str = "") -> ClientError:
    """Turn a `grpc.RpcError` (sync or aio) into its typed exception."""
    code = e.code() if callable(getattr(e, "code", None)) else None
    details = e.details() if callable(getattr(e, "details", None)) else None
    return error_for(code, details or str(e), request_id=request_id)
