"""`t2t`: the text-to-text baseline of C2C. The sharer writes a sentence of background for the question
(greedy, at most `context_tokens`), then the receiver answers the question in a chat that holds that context
(the prompts of `c2c.t2t`). Runs over any placement: two Generate calls, on workers hosting each model."""
from __future__ import annotations

import contextlib
import time
from typing import AsyncIterator

import grpc
from pydantic import BaseModel, ConfigDict, Field, model_validator

from c2c.t2t import answer_messages, context_messages
from tandem.status import StatusError
from orchestrator.pipelines.base import Params, PipelineRequest, check_hosted
from orchestrator.pipelines.single import MultiWorkerPipeline, chunk_of, final_of, relay
from orchestrator.workers import WorkerHandle, worker_error
from tandem.errors import InvalidRequestError
from tandem.v1 import orchestrator_pb2 as pb
from tandem.v1 import worker_pb2 as wpb

DESCRIPTION = (
    "T2T, the text-to-text baseline of c2c: the sharer writes one sentence of background for the question "
    "(greedy), the receiver answers with it in its chat. Input: text or messages (the last one the question). "
    "Params: context_tokens (at most the pipeline's max_context_tokens). Final pipeline_stats: context_tokens, "
    "context_bytes, sharer_s, receiver_s (seconds of each model's Generate, seen from the orchestrator).")


class T2TConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    receiver: str = Field(min_length=1, description="the model that answers")
    sharer: str = Field(min_length=1, description="the model that writes the context")
    context_tokens: int = Field(64, ge=1, description="default most tokens of context")
    max_context_tokens: int = Field(256, ge=1, description="highest per-request context_tokens accepted")

    @model_validator(mode="after")
    def _check(self) -> T2TConfig:
        if self.context_tokens > self.max_context_tokens:
            raise ValueError(f"context_tokens: {self.context_tokens} is above max_context_tokens {self.max_context_tokens}")
        return self


class T2TParams(Params):
    context_tokens: int | None = Field(None, ge=1, description="most tokens of context; unset: the pipeline's default")


class T2T(MultiWorkerPipeline):
    name = "t2t"
    description = DESCRIPTION
    Config = T2TConfig
    Params = T2TParams
    typed_field = "t2t"

    def __init__(self, config: T2TConfig, pool):
        super().__init__(config, pool)
        self.description = f"{DESCRIPTION} Receiver {config.receiver!r}, sharer {config.sharer!r}."

    @classmethod
    def check_config(cls, config: T2TConfig, server) -> None:
        key = f"pipelines.{cls.name}"
        check_hosted(server, key, [("receiver", config.receiver), ("sharer", config.sharer)])
        if config.receiver == config.sharer:
            raise ValueError(f"{key}.sharer: must differ from receiver ({config.receiver!r})")

    def models(self, params: T2TParams | None = None) -> list[str]:
        return [self.config.receiver, self.config.sharer]

    def parse_params(self, request: pb.GenerateRequest | pb.CreateSessionRequest) -> T2TParams:
        if isinstance(request, pb.CreateSessionRequest):
            raise InvalidRequestError("pipeline", "t2t answers one question at a time and does not run in sessions")
        params = super().parse_params(request)
        prefix = request.WhichOneof("pipeline_params") or "params"
        n = params.context_tokens or self.config.context_tokens
        if n > self.config.max_context_tokens:
            raise InvalidRequestError(f"{prefix}.context_tokens", f"{n} is above this server's max_context_tokens "
                                      f"{self.config.max_context_tokens}")
        return T2TParams(context_tokens=n)

    async def run(self, request: PipelineRequest) -> AsyncIterator[pb.Chunk | pb.Final]:
        rid, cfg = request.request_id, self.config
        if request.messages:
            if request.messages[-1]["role"] != "user":
                raise InvalidRequestError("messages.messages", "t2t needs the last message to be the user's question")
            question, before = request.messages[-1]["content"], request.messages[:-1]
        elif request.text:
            question, before = request.text, []
        else:
            raise InvalidRequestError("input", "t2t needs the question as text or messages, not token ids")
        self.active[rid] = []
        try:
            started = time.perf_counter()
            context, tokens = await self._context(request, question)
            if context is None:
                yield pb.Final(finish_reason=pb.FINISH_REASON_ABORT)
                return
            stats = {"sharer_s": time.perf_counter() - started, "context_tokens": float(tokens),
                     "context_bytes": float(len(context.encode()))}
            started = time.perf_counter()
            handle = self.pool.pick(cfg.receiver)
            ids = await _tokenize(handle, cfg.receiver, answer_messages(question, context, before=before))
            if rid in self.aborted:
                yield pb.Final(finish_reason=pb.FINISH_REASON_ABORT)
                return
            submission = wpb.WorkerGenerateRequest(request_id=rid, model=cfg.receiver, prompt_token_ids=ids,
                                                   sampling=request.sampling, priority=request.priority)
            self.active[rid] = [(handle, rid)]
            async with contextlib.aclosing(relay(handle, submission, request.timeout, repr(cfg.receiver))) as steps:
                async for step in steps:
                    if step.token_ids or step.text:
                        yield chunk_of(step)
                    if step.finished:
                        final = final_of(step)
                        final.pipeline_stats.update(stats, receiver_s=time.perf_counter() - started)
                        yield final
        finally:
            self.forget(rid)

    async def _context(self, request: PipelineRequest, question: str) -> tuple[str | None, int]:
        """The sharer's context text and its token count; (None, 0) when the request was aborted meanwhile."""
        rid, sharer = request.request_id, self.config.sharer
        handle = self.pool.pick(sharer)
        ids = await _tokenize(handle, sharer, context_messages(question))
        srid = f"{rid}/sharer"
        submission = wpb.WorkerGenerateRequest(
            request_id=srid, model=sharer, prompt_token_ids=ids, priority=request.priority,
            sampling=pb.SamplingParams(max_tokens=request.params.context_tokens, temperature=0))
        self.active[rid] = [(handle, srid)]
        texts, tokens = [], 0
        async with contextlib.aclosing(relay(handle, submission, request.timeout, repr(sharer))) as steps:
            async for step in steps:
                texts.append(step.text)
                tokens += len(step.token_ids)
                if step.finished and step.finish_reason not in ("stop", "length"):
                    if rid in self.aborted:
                        return None, 0
                    raise StatusError(grpc.StatusCode.INTERNAL, f"t2t: the sharer {sharer!r} ended: "
                                      f"{step.error or step.finish_reason}")
        if rid in self.aborted:
            return None, 0
        return "".join(texts).strip(), tokens


async def _tokenize(handle: WorkerHandle, model: str, messages: list[dict[str, str]]) -> list[int]:
    request = wpb.TokenizeRequest(model=model, add_generation_prompt=True, messages=pb.ChatMessages(
        messages=[pb.ChatMessage(**m) for m in messages]))
    try:
        return list((await handle.stub.Tokenize(request, timeout=30)).token_ids)
    except grpc.aio.AioRpcError as e:
        raise worker_error(handle, e) from None
