"""`single`: one model generates every token, in one worker."""
from __future__ import annotations

import asyncio
import contextlib
from typing import AsyncIterator

import grpc
from pydantic import BaseModel, ConfigDict

from orchestrator.errors import StatusError, unavailable
from orchestrator.pipelines.base import (
    FINISH_REASONS,
    Params,
    Pipeline,
    PipelineRequest,
)
from orchestrator.workers import WorkerHandle
from tandem.v1 import orchestrator_pb2 as pb
from tandem.v1 import worker_pb2 as wpb


class SingleConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None  # None: the first model of the config


class SingleParams(Params):
    model: str = ""


class Single(Pipeline):
    name = "single"
    description = "one model generates every token"
    Config = SingleConfig
    Params = SingleParams
    typed_field = "single"

    def __init__(self, config: SingleConfig, pool):
        super().__init__(config, pool)
        self.active: dict[str, WorkerHandle] = {}

    def models(self, params: SingleParams | None = None) -> list[str]:
        return [(params.model if params else "") or self.config.model or self.pool.model_names[0]]

    async def run(self, request: PipelineRequest) -> AsyncIterator[pb.Chunk | pb.Final]:
        model = self.models(request.params)[0]
        handle = self.pool.pick(model)
        call = handle.stub.Generate(wpb.WorkerGenerateRequest(
            request_id=request.request_id, model=model, prompt_token_ids=request.token_ids,
            sampling=request.sampling, priority=request.priority), timeout=request.timeout)
        self.active[request.request_id] = handle
        try:
            async with contextlib.aclosing(relay_events(handle, call, repr(model))) as events:
                async for event in events:
                    yield event
        finally:
            self.active.pop(request.request_id, None)

    async def abort(self, request_id: str) -> bool:
        handle = self.active.get(request_id)
        return handle is not None and await abort_on([(handle, request_id)])


class MultiWorkerPipeline(Pipeline):
    """A pipeline whose request runs on several workers: `active` holds each running request's (worker,
    its id there) pairs, `aborted` the requests told to stop (drivers check it between worker calls)."""

    def __init__(self, config: BaseModel, pool):
        super().__init__(config, pool)
        self.active: dict[str, list[tuple[WorkerHandle, str]]] = {}
        self.aborted: set[str] = set()

    def forget(self, request_id: str) -> None:
        self.active.pop(request_id, None)
        self.aborted.discard(request_id)

    async def abort(self, request_id: str) -> bool:
        placed = self.active.get(request_id)
        if placed is None:
            return False
        self.aborted.add(request_id)
        return await abort_on(placed)


async def abort_on(placed: list[tuple[WorkerHandle, str]]) -> bool:
    """Abort each (worker, request id there); True when a ready worker took an abort."""
    done = False
    for handle, request_id in placed:
        if not handle.ready:
            continue
        try:
            await handle.stub.Abort(pb.AbortRequest(request_ids=[request_id]), timeout=5)
            done = True
        except grpc.aio.AioRpcError:
            pass
    return done


async def relay_events(handle: WorkerHandle, call, what: str) -> AsyncIterator[pb.Chunk | pb.Final]:
    """One worker Generate call as the pipeline's events: a Chunk per step with tokens, the Final."""
    async with contextlib.aclosing(relay(handle, call, what)) as steps:
        async for step in steps:
            if step.token_ids or step.text:
                yield chunk_of(step)
            if step.finished:
                yield final_of(step)


async def relay(handle: WorkerHandle, call, what: str) -> AsyncIterator[wpb.WorkerStep]:
    """The steps of one worker Generate call, its errors mapped to statuses; the call is cancelled
    (which aborts the request on the worker) when the relay is closed before the final step."""
    handle.calls.add(call)
    finished = False
    try:
        async for step in call:
            finished = finished or step.finished
            yield step
    except grpc.aio.AioRpcError as e:
        raise worker_error(handle, e) from None
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if not handle.ready and not (task and task.cancelling()):
            raise unavailable(f"worker {handle.worker_id} serving {what} is gone") from None
        raise
    finally:
        handle.calls.discard(call)
        if not finished:
            call.cancel()


def chunk_of(step: wpb.WorkerStep) -> pb.Chunk:
    return pb.Chunk(token_ids=step.token_ids, text=step.text, sources=step.sources, logprobs=step.logprobs)


def final_of(step: wpb.WorkerStep) -> pb.Final:
    final = pb.Final(finish_reason=FINISH_REASONS.get(step.finish_reason, pb.FINISH_REASON_UNSPECIFIED),
                     usage=step.usage, timings=step.timings, pipeline_stats=step.stats)
    if step.error:
        final.error.CopyFrom(pb.Error(code=grpc.StatusCode.INTERNAL.value[0], message=step.error))
    return final


def worker_error(handle: WorkerHandle, e: grpc.aio.AioRpcError) -> StatusError:
    if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED) and not handle.ready:
        return unavailable(f"worker {handle.worker_id} is gone: {e.details()}")
    if e.code() == grpc.StatusCode.UNAVAILABLE:
        return unavailable(f"worker {handle.worker_id}: {e.details()}")
    return StatusError(e.code(), e.details() or str(e.code()))
