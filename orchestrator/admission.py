"""Admission: at most `max_in_flight` requests run; up to `max_queue` wait; beyond that, RESOURCE_EXHAUSTED."""
from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from typing import AsyncIterator

import grpc

from tandem.status import StatusError


class Admission:
    def __init__(self, max_in_flight: int, max_queue: int):
        self.max_in_flight = max_in_flight
        self.max_queue = max_queue
        self._slots = asyncio.Semaphore(max_in_flight)
        self.waiting = 0
        self.in_flight = 0

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        if self._slots.locked() and self.waiting >= self.max_queue:
            raise StatusError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                              f"server overloaded: {self.in_flight} in flight, {self.waiting} queued")
        self.waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self.waiting -= 1
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1
            self._slots.release()
