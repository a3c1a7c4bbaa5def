"""Errors that carry a gRPC status code out of pipelines and the worker pool."""
from __future__ import annotations

import grpc

from tandem.errors import TandemError


class StatusError(TandemError):
    def __init__(self, code: grpc.StatusCode, message: str):
        self.code = code
        self.message = message
        super().__init__(message)


def not_found(message: str) -> StatusError:
    return StatusError(grpc.StatusCode.NOT_FOUND, message)


def unavailable(message: str) -> StatusError:
    return StatusError(grpc.StatusCode.UNAVAILABLE, message)
