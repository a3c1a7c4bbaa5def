"""gRPC statuses of Tandem's errors, shared by the worker and the orchestrator servers."""
from __future__ import annotations

import grpc

from tandem.errors import InvalidRequestError, ModelNotFoundError, TandemError


class StatusError(TandemError):
    """An error that ends an RPC with this status code."""

    def __init__(self, code: grpc.StatusCode, message: str):
        self.code = code
        self.message = message
        super().__init__(message)


def status_of(e: TandemError) -> grpc.StatusCode:
    """The status code of Tandem's typed errors."""
    if isinstance(e, StatusError):
        return e.code
    if isinstance(e, InvalidRequestError):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(e, ModelNotFoundError):
        return grpc.StatusCode.NOT_FOUND
    return grpc.StatusCode.FAILED_PRECONDITION


def not_found(message: str) -> StatusError:
    return StatusError(grpc.StatusCode.NOT_FOUND, message)


def unavailable(message: str) -> StatusError:
    return StatusError(grpc.StatusCode.UNAVAILABLE, message)
