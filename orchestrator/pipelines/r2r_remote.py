"""R2R disaggregated: the SLM and the LLM in different workers, the hand-off through the Worker RPCs.

The SLM's worker routes each token in its step; a flagged row is held and its stream carries a `handoff`
step with the tokens the LLM has not seen (the prompt too, the first time). The LLM side of the request is a
propose-only sequence `<rid>/llm` on the LLM's worker: opened by Generate with those tokens, later caught up
by `Extend(sample=True)`; each time it streams one `proposed` token, which `Inject` gives to the SLM's row.
Nothing is rolled back: the SLM never wrote KV for the token it dropped."""
from __future__ import annotations

import contextlib
import time
from typing import TYPE_CHECKING, AsyncIterator

import grpc

from tandem.status import StatusError, unavailable
from orchestrator.pipelines.base import PipelineRequest
from orchestrator.pipelines.single import chunk_of, final_of, read_to_end, relay
from orchestrator.workers import worker_error
from orchestrator.workers import WorkerHandle
from routing.r2r import llm_seed
from tandem.errors import InvalidRequestError
from tandem.v1 import orchestrator_pb2 as pb
from tandem.v1 import worker_pb2 as wpb
from workers.engine import SamplingParams

if TYPE_CHECKING:
    from orchestrator.pipelines.r2r import R2R


class LLMSideEnded(Exception):
    """The LLM's propose-only sequence ended before proposing (aborted, or its worker failed)."""


class LLMSide:
    """The LLM's copy of one request on its own worker: catches up on hand-off tokens, proposes one token."""

    def __init__(self, handle: WorkerHandle, model: str, request: PipelineRequest, vocab_limit: int = 0):
        self.handle = handle
        self.vocab_limit = vocab_limit
        self.model = model
        self.request_id = f"{request.request_id}/llm"
        self.request = request
        self.steps: AsyncIterator[wpb.WorkerStep] | None = None
        self.link = None
        self.tokens = 0
        self.seconds = 0.0

    async def propose(self, token_ids: list[int]) -> wpb.WorkerStep:
        started = time.perf_counter()
        if self.steps is None:
            submission = wpb.WorkerGenerateRequest(
                request_id=self.request_id, model=self.model, prompt_token_ids=token_ids,
                sampling=llm_sampling(self.request.sampling), priority=self.request.priority, propose_only=True,
                vocab_limit=self.vocab_limit)
            self.steps = relay(self.handle, submission, self.request.timeout, repr(self.model))
            self.link = self.handle.link
        else:
            if self.handle.link is not self.link or not self.handle.ready:
                raise unavailable(f"the LLM's worker {self.handle.worker_id} serving {self.model!r} restarted "
                                  f"while {self.request.request_id!r} ran")
            try:
                await self.handle.stub.Extend(wpb.ExtendRequest(request_id=self.request_id, token_ids=token_ids,
                                                                sample=True), timeout=self.request.timeout)
            except grpc.aio.AioRpcError as e:
                raise worker_error(self.handle, e) from None
        while True:
            step = await anext(self.steps, None)
            if step is None or step.finished:
                reason = step.error or step.finish_reason if step is not None else "its stream ended"
                raise LLMSideEnded(f"the LLM side of {self.request.request_id!r} ended: {reason}")
            if step.proposed and step.token_ids:
                self.tokens += 1
                self.seconds += time.perf_counter() - started
                return step

    async def release(self) -> None:
        if self.steps is None:
            return
        with contextlib.suppress(grpc.aio.AioRpcError, StatusError):
            await self.handle.stub.Release(wpb.RequestRef(request_id=self.request_id), timeout=5)
            await read_to_end(self.steps)

    async def close(self) -> None:
        """Cancels the LLM's stream, which aborts the sequence there if it was not released."""
        if self.steps is not None:
            await self.steps.aclose()


def llm_sampling(sampling: pb.SamplingParams) -> pb.SamplingParams:
    """The request's sampling minus stop strings (the SLM's side checks them); a seed one apart from the
    SLM's, as in the co-located engine."""
    out = pb.SamplingParams()
    out.CopyFrom(sampling)
    del out.stop[:]
    if sampling.HasField("seed"):
        out.seed = llm_seed(sampling.seed)
    return out


def fit_llm_context(pipeline: R2R, request: PipelineRequest) -> pb.SamplingParams:
    """max_tokens cut so that every token the LLM may be asked to read fits its context and KV pool."""
    info = pipeline.pool.model_info(pipeline.config.llm)
    limits = [n for n in (info.max_model_len, info.num_blocks * info.block_size) if n > 0]
    sampling = request.sampling
    if not limits:
        return sampling
    room = min(limits) - len(request.token_ids)
    if room <= 0:
        raise InvalidRequestError("input", f"{len(request.token_ids)} prompt tokens leave no room in the LLM "
                                  f"{pipeline.config.llm!r} (context {min(limits)} tokens)")
    want = sampling.max_tokens if sampling.HasField("max_tokens") else SamplingParams().max_tokens
    if want > room:
        sampling = pb.SamplingParams()
        sampling.CopyFrom(request.sampling)
        sampling.max_tokens = room
    return sampling


async def run_disaggregated(pipeline: R2R, request: PipelineRequest) -> AsyncIterator[pb.Chunk | pb.Final]:
    config, rid = pipeline.config, request.request_id
    slm, llm_handle = pipeline.pool.pick(config.slm), pipeline.pool.pick(config.llm)
    sampling = fit_llm_context(pipeline, request)
    submission = wpb.WorkerGenerateRequest(
        request_id=rid, model=config.slm, prompt_token_ids=request.token_ids, sampling=sampling,
        priority=request.priority, route=pipeline.route(request.params))
    llm = LLMSide(llm_handle, config.llm, request, pipeline.pool.model_info(config.slm).vocab_size)
    pipeline.active[rid] = [(slm, rid)]  # the LLM side joins once it is submitted: an abort of an id a worker
    #                                        has not seen would refuse that id there for a while
    try:
        async with contextlib.aclosing(relay(slm, submission, request.timeout, repr(config.slm))) as steps:
            async for step in steps:
                if step.handoff:
                    await _hand_off(pipeline, slm, llm, step)
                    continue
                if step.token_ids or step.text:
                    yield chunk_of(step)
                if step.finished:
                    pipeline.active[rid] = [(slm, rid)]
                    await llm.release()
                    yield _final(step, llm)
    finally:
        await llm.close()


async def _hand_off(pipeline: R2R, slm: WorkerHandle, llm: LLMSide, step: wpb.WorkerStep) -> None:
    rid = llm.request.request_id
    if llm.steps is None:
        pipeline.active[rid].append((llm.handle, llm.request_id))
    try:
        proposal = await llm.propose(list(step.handoff_token_ids))
        inject = wpb.InjectRequest(request_id=rid, token_id=proposal.token_ids[0], source=llm.model)
        if proposal.logprobs:
            inject.logprob.CopyFrom(proposal.logprobs[0])
        try:
            await slm.stub.Inject(inject, timeout=llm.request.timeout)
        except grpc.aio.AioRpcError as e:
            raise worker_error(slm, e) from None
    except (LLMSideEnded, StatusError) as e:
        if rid in pipeline.aborted:
            return  # the SLM's stream ends with the abort
        if isinstance(e, LLMSideEnded):
            raise StatusError(grpc.StatusCode.INTERNAL, str(e)) from None
        raise


def _final(step: wpb.WorkerStep, llm: LLMSide) -> pb.Final:
    """The SLM's worker counts its own tokens and router time; the LLM's tokens and time are counted here."""
    final = final_of(step)
    stats = final.pipeline_stats
    slm_tokens = int(stats.get("slm_tokens", 0))
    stats["llm_tokens"] = llm.tokens
    stats["llm_s"] = llm.seconds
    stats["llm_token_share"] = llm.tokens / (llm.tokens + slm_tokens) if llm.tokens + slm_tokens else 0.0
    return final
