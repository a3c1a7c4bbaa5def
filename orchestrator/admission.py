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
    async def slot(self, abort: asyncio.Event | None = None) -> AsyncIterator[None]:
        """A running slot; a request whose `abort` is set while it waits leaves the queue with CANCELLED."""
        if self._slots.locked() and self.waiting >= self.max_queue:
            raise StatusError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                              f"server overloaded: {self.in_flight} in flight, {self.waiting} queued")
        self.waiting += 1
        try:
            await self._acquire(abort)
        finally:
            self.waiting -= 1
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1
            self._slots.release()

    async def _acquire(self, abort: asyncio.Event | None) -> None:
        if abort is None or not self._slots.locked():
            await self._slots.acquire()
            return
        acquire = asyncio.ensure_future(self._slots.acquire())
        aborted = asyncio.ensure_future(abort.wait())
        try:
            await asyncio.wait((acquire, aborted), return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            self._give_back(acquire)
            raise
        finally:
            aborted.cancel()
        if not acquire.done():
            self._give_back(acquire)
            raise StatusError(grpc.StatusCode.CANCELLED, "aborted while queued for admission")

    def _give_back(self, acquire: asyncio.Future) -> None:
        if acquire.done() and not acquire.cancelled():
            self._slots.release()
        else:
            acquire.cancel()
