"""WorkerLink: the orchestrator's one Worker.Connect stream to a worker. Every request it runs there is
submitted and aborted over it, and each engine step's WorkerSteps comes back once for all of them."""
from __future__ import annotations

import asyncio
from typing import AsyncIterator, Callable

import grpc

from tandem.status import StatusError
from tandem.v1 import orchestrator_pb2 as pb
from tandem.v1 import worker_pb2 as wpb
from tandem.v1 import worker_pb2_grpc

CODES = {code.value[0]: code for code in grpc.StatusCode}


class WorkerLink:
    """`requests` maps each request id in flight on the worker to the queue its steps (or the error that
    ends it) arrive on. The stream opens with the first request and reopens after it breaks."""

    def __init__(self, stub: worker_pb2_grpc.WorkerStub, on_error: Callable[[grpc.aio.AioRpcError], StatusError]):
        self.stub = stub
        self.on_error = on_error
        self.requests: dict[str, asyncio.Queue] = {}
        self._outbox: asyncio.Queue[wpb.WorkerCommand | None] | None = None
        self._reader: asyncio.Task | None = None

    def __len__(self) -> int:
        return len(self.requests)

    async def steps(self, request: wpb.WorkerGenerateRequest, timeout: float | None) -> AsyncIterator[wpb.WorkerStep]:
        """The request's steps, up to its finished one. Closing this early aborts the request on the worker;
        past `timeout` it ends in DEADLINE_EXCEEDED; a refused submission or a broken stream raises a
        StatusError."""
        rid = request.request_id
        if rid in self.requests:
            raise StatusError(grpc.StatusCode.ALREADY_EXISTS, f"request_id: {rid!r} is already in use")
        queue: asyncio.Queue = asyncio.Queue()
        self.requests[rid] = queue
        timer = None
        if timeout is not None:
            timer = asyncio.get_running_loop().call_later(
                max(timeout, 0.0), queue.put_nowait,
                StatusError(grpc.StatusCode.DEADLINE_EXCEEDED, f"request {rid!r}: deadline exceeded"))
        finished = False
        try:
            self._send(wpb.WorkerCommand(generate=request))
            while not finished:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise self.on_error(item) if isinstance(item, grpc.aio.AioRpcError) else item
                if item.status_code:
                    finished = True
                    raise StatusError(CODES.get(item.status_code, grpc.StatusCode.UNKNOWN), item.error)
                finished = item.finished
                yield item
        finally:
            if timer is not None:
                timer.cancel()
            if self.requests.get(rid) is queue:
                del self.requests[rid]
            if not finished:
                self.abort([rid])

    def abort(self, request_ids: list[str]) -> None:
        """Ordered after their submissions; an id the worker has not seen yet is refused there when it comes."""
        if self._reader is not None and not self._reader.done():
            self._send(wpb.WorkerCommand(abort=pb.AbortRequest(request_ids=request_ids)))

    def fail(self, error: BaseException) -> None:
        """End every request in flight with `error` and drop the stream (the worker is gone)."""
        for queue in self.requests.values():
            queue.put_nowait(error)
        self.requests.clear()
        if self._reader is not None:
            self._reader.cancel()

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)

    def _send(self, command: wpb.WorkerCommand) -> None:
        if self._reader is None or self._reader.done():
            self._outbox = asyncio.Queue()
            self._reader = asyncio.create_task(self._read(self.stub.Connect(self._commands(self._outbox))))
        self._outbox.put_nowait(command)

    @staticmethod
    async def _commands(outbox: asyncio.Queue[wpb.WorkerCommand | None]) -> AsyncIterator[wpb.WorkerCommand]:
        while (command := await outbox.get()) is not None:
            yield command

    async def _read(self, call) -> None:
        requests = self.requests
        error: BaseException = StatusError(grpc.StatusCode.UNAVAILABLE, "the worker ended its Connect stream")
        try:
            async for batch in call:
                for step in batch.steps:
                    queue = requests.get(step.request_id)
                    if queue is not None:
                        queue.put_nowait(step)
        except grpc.aio.AioRpcError as e:
            error = e
        finally:
            call.cancel()
            for queue in requests.values():
                queue.put_nowait(error)
            requests.clear()
