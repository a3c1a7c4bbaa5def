"""`single`: one model generates every token, in one worker."""
from __future__ import annotations

import contextlib
from typing import AsyncIterator

import grpc
from pydantic import BaseModel, ConfigDict

from tandem.status import unavailable
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
        submission = wpb.WorkerGenerateRequest(request_id=request.request_id, model=model,
                                               prompt_token_ids=request.token_ids, sampling=request.sampling,
                                               priority=request.priority)
        self.active[request.request_id] = handle
        try:
            async with contextlib.aclosing(relay_events(handle, submission, request.timeout, repr(model))) as events:
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
    """Abort each (worker, request id there) over the worker's link, ordered after the request's submission;
    True when a ready worker was told."""
    done = False
    for handle, request_id in placed:
        if handle.ready and handle.link is not None:
            handle.link.abort([request_id])
            done = True
    return done


async def relay_events(handle: WorkerHandle, request: wpb.WorkerGenerateRequest, timeout: float | None,
                       what: str) -> AsyncIterator[pb.Chunk | pb.Final]:
    """One request on a worker as the pipeline's events: a Chunk per step with tokens, the Final."""
    async with contextlib.aclosing(relay(handle, request, timeout, what)) as steps:
        async for step in steps:
            if step.token_ids or step.text:
                yield chunk_of(step)
            if step.finished:
                yield final_of(step)


def relay(handle: WorkerHandle, request: wpb.WorkerGenerateRequest, timeout: float | None,
          what: str) -> AsyncIterator[wpb.WorkerStep]:
    """The steps of one request run on a worker (over its link), errors as statuses; closing them before the
    final step aborts the request there."""
    if handle.link is None or not handle.ready:
        raise unavailable(f"worker {handle.worker_id} serving {what} is not ready")
    return handle.link.steps(request, timeout)


async def read_to_end(steps: AsyncIterator[wpb.WorkerStep]) -> None:
    """After a Release: the request's steps up to its finished one, so that closing them aborts nothing (an
    abort of an id the worker no longer knows would refuse that id's next use for a while)."""
    async for step in steps:
        if step.finished:
            return


def chunk_of(step: wpb.WorkerStep) -> pb.Chunk:
    if step.logprobs:
        return pb.Chunk(token_ids=step.token_ids, text=step.text, sources=step.sources, logprobs=step.logprobs)
    return pb.Chunk(token_ids=step.token_ids, text=step.text, sources=step.sources)


def final_of(step: wpb.WorkerStep) -> pb.Final:
    final = pb.Final(finish_reason=FINISH_REASONS.get(step.finish_reason, pb.FINISH_REASON_UNSPECIFIED),
                     usage=step.usage, timings=step.timings, pipeline_stats=step.stats)
    if step.error:
        final.error.CopyFrom(pb.Error(code=grpc.StatusCode.INTERNAL.value[0], message=step.error))
    return final
