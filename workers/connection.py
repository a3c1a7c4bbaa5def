"""One orchestrator's multiplexed stream (Worker.Connect): the StepOutputs of every request submitted on it
are gathered as the engine posts them and leave as one WorkerSteps per engine step."""
from __future__ import annotations

import asyncio

import grpc

from tandem.v1 import worker_pb2 as wpb
from workers.convert import step_to_proto
from workers.engine import StepOutput
from workers.engine_loop import EngineLoop


class Connection:
    """A sink of the EngineLoop for the requests submitted on one Connect stream; `open` holds those still
    running. The engine thread posts a step's outputs in one callback, so a batch is at least one step."""

    def __init__(self, loop: EngineLoop):
        self.loop = loop
        self.open: set[str] = set()
        self.pending: list[wpb.WorkerStep] = []
        self.commands_ended = False
        self._ready = asyncio.Event()

    def put_nowait(self, out: StepOutput) -> None:
        if out.finished:
            self.open.discard(out.request_id)
            self.loop.close(out.request_id)
        self.post(step_to_proto(out))

    def post(self, step: wpb.WorkerStep) -> None:
        self.pending.append(step)
        self._ready.set()

    def refuse(self, request_id: str, code: grpc.StatusCode, message: str) -> None:
        self.post(wpb.WorkerStep(request_id=request_id, finished=True, finish_reason="error", error=message,
                                 status_code=code.value[0]))

    def end_commands(self) -> None:
        self.commands_ended = True
        self._ready.set()

    @property
    def done(self) -> bool:
        return self.commands_ended and not self.open and not self.pending

    async def batches(self):
        """Each batch of steps as it is ready; ends once the commands have ended and every request has."""
        while not self.done:
            await self._ready.wait()
            self._ready.clear()
            if self.pending:
                batch, self.pending = self.pending, []
                yield wpb.WorkerSteps(steps=batch)

    async def abort_open(self) -> None:
        """Abort every request still running (the stream is gone); their blocks are free when this returns."""
        ids, self.open = list(self.open), set()
        for rid in ids:
            self.loop.close(rid)
            self.loop.engine.abort(rid)
        if ids:
            await self.loop.abort(ids[0])
