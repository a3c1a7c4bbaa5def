"""The tandem.v1.Orchestrator servicer: validation, sessions, admission, pipelines, abort, discovery."""
from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator

import grpc

from orchestrator.admission import Admission
from orchestrator.config import TandemConfig
from tandem.status import StatusError, not_found, status_of
from orchestrator.metrics import Metrics
from orchestrator.pipelines import REGISTRY, Pipeline, PipelineRequest
from orchestrator.sessions import Session, SessionStore
from orchestrator.validation import check_generate, check_id
from orchestrator.workers import WorkerPool
from tandem.errors import InvalidRequestError, ModelNotFoundError
from tandem.v1 import orchestrator_pb2 as pb
from tandem.v1 import orchestrator_pb2_grpc
from tandem.v1 import worker_pb2 as wpb

VERSION = "0.1.0"
OUTCOMES = {pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_LENGTH: "length", pb.FINISH_REASON_ABORT: "abort",
            pb.FINISH_REASON_ERROR: "error"}


@dataclass(eq=False)
class InFlight:
    pipeline: Pipeline
    abort: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def aborted(self) -> bool:
        return self.abort.is_set()


class OrchestratorService(orchestrator_pb2_grpc.OrchestratorServicer):
    def __init__(self, config: TandemConfig, pool: WorkerPool, metrics: Metrics):
        self.config = config
        self.pool = pool
        self.metrics = metrics
        self.pipelines = {name: REGISTRY[name](config.pipeline_config(name), pool) for name in config.pipelines}
        self.sessions = SessionStore(config.server.session_ttl_s, config.server.max_sessions)
        self.admission = Admission(config.server.max_in_flight, config.server.max_queue)
        self.inflight: dict[str, InFlight] = {}
        self.draining = False
        self.started = time.monotonic()

    def _pipeline(self, name: str) -> Pipeline:
        name = name or "single"
        if name not in self.pipelines:
            raise not_found(f"pipeline: {name!r} is not a pipeline of this server; pipelines: {sorted(self.pipelines)}")
        return self.pipelines[name]

    async def Generate(self, request: pb.GenerateRequest, context) -> AsyncIterator[pb.GenerateResponse]:
        arrival = time.monotonic()
        rid = request.request_id or f"r-{uuid.uuid4().hex}"
        name, outcome = "unknown", "error"  # a metrics label: only names of this server's pipelines
        state: InFlight | None = None
        try:
            if self.draining:
                raise StatusError(grpc.StatusCode.UNAVAILABLE, "server is draining; retry on another server")
            session = self.sessions.get(request.session_id) if request.session_id else None
            pipeline = self._pipeline(session.pipeline if session is not None else request.pipeline)
            name = pipeline.name
            params, model = self._checked(request, rid, session, pipeline)
            state = self.inflight[rid] = InFlight(pipeline)
            if session is not None:
                session.busy = True  # from here: a second turn queued beside this one is refused
            try:
                self.metrics.queue_depth.set(self.admission.waiting + 1)
                async with self.admission.slot(state.abort):
                    self.metrics.queue_depth.set(self.admission.waiting)
                    self.metrics.in_flight.set(self.admission.in_flight)
                    try:
                        async for msg in self._generate(rid, name, pipeline, params, model, request, session,
                                                        arrival, state, context):
                            if msg.HasField("final"):
                                outcome = OUTCOMES.get(msg.final.finish_reason, "error")
                            yield msg
                    finally:
                        self.metrics.in_flight.set(self.admission.in_flight - 1)
            finally:
                if session is not None:
                    session.busy = False
                    session.touch()
            if outcome == "abort" or state.aborted:
                outcome = "abort"
                raise StatusError(grpc.StatusCode.CANCELLED, f"request {rid!r} was aborted")
        except (InvalidRequestError, ModelNotFoundError) as e:
            outcome = "invalid"
            await context.abort(status_of(e), str(e))
        except StatusError as e:
            outcome = {grpc.StatusCode.CANCELLED: "abort", grpc.StatusCode.RESOURCE_EXHAUSTED: "rejected",
                       grpc.StatusCode.NOT_FOUND: "invalid", grpc.StatusCode.ALREADY_EXISTS: "invalid",
                       grpc.StatusCode.DEADLINE_EXCEEDED: "deadline"}.get(e.code, "error")
            await context.abort(e.code, e.message)
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        finally:
            if state is not None and self.inflight.get(rid) is state:
                del self.inflight[rid]
            self.metrics.requests.labels(name, outcome).inc()

    def _checked(self, request: pb.GenerateRequest, rid: str, session: Session | None,
                 pipeline: Pipeline) -> tuple[object, str]:
        """The request's typed pipeline parameters and model, once every field is checked."""
        if session is not None:
            if request.pipeline and request.pipeline != session.pipeline:
                raise InvalidRequestError("pipeline", f"session uses {session.pipeline!r}, not {request.pipeline!r}")
            if request.WhichOneof("pipeline_params"):
                raise InvalidRequestError(request.WhichOneof("pipeline_params"), "is fixed by the session")
        params = session.params if session is not None else pipeline.parse_params(request)
        model = pipeline.models(params)[0]
        if model not in self.pool.model_names:
            raise not_found(f"{pipeline.typed_field or 'params'}.model: {model!r} is not served here; "
                            f"models: {self.pool.model_names}")
        check_generate(request, self.pool.model_info(model).vocab_size or None)
        if rid in self.inflight:
            raise StatusError(grpc.StatusCode.ALREADY_EXISTS, f"request_id: {rid!r} is already in flight")
        if session is not None and session.busy:
            raise StatusError(grpc.StatusCode.FAILED_PRECONDITION, f"session_id: {session.session_id!r} is busy")
        return params, model

    async def _generate(self, rid: str, name: str, pipeline: Pipeline, params, model: str,
                        request: pb.GenerateRequest, session: Session | None, arrival: float, state: InFlight,
                        context) -> AsyncIterator[pb.GenerateResponse]:
        new_messages, prompt = await self._prompt(model, request, session)
        if state.aborted:
            raise StatusError(grpc.StatusCode.CANCELLED, f"request {rid!r} was aborted")
        remaining = context.time_remaining()
        run = PipelineRequest(rid, prompt, request.sampling, params, int(request.priority), remaining)
        if session is None and request.WhichOneof("input") == "text":
            run.text = request.text
        elif session is None and request.WhichOneof("input") == "messages":
            run.messages = [{"role": m.role, "content": m.content} for m in request.messages.messages]
        answer_ids: list[int] = []
        answer: list[str] = []
        last = None
        inter_token = self.metrics.inter_token.labels(name)
        async with contextlib.aclosing(pipeline.run(run)) as events:
            async for event in events:
                now = time.monotonic()
                if isinstance(event, pb.Chunk):
                    if last is None:
                        self.metrics.ttft.labels(name).observe(now - arrival)
                    elif event.token_ids:
                        inter_token.observe((now - last) / len(event.token_ids))
                    last = now
                    if session is not None:
                        answer_ids += event.token_ids
                        answer.append(event.text)
                    yield pb.GenerateResponse(request_id=rid, chunk=event)
                else:
                    event.timings.server_s = now - arrival
                    if session is not None:
                        event.session_id = session.session_id
                        if event.finish_reason in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH):
                            session.commit(new_messages, prompt, answer_ids, "".join(answer) + event.text)
                    yield pb.GenerateResponse(request_id=rid, final=event)

    async def _prompt(self, model: str, request: pb.GenerateRequest,
                      session: Session | None) -> tuple[list[dict[str, str]], list[int]]:
        which = request.WhichOneof("input")
        history = session.token_ids if session else []
        if which == "token_ids":
            return [], history + list(request.token_ids.ids)
        agp = request.add_generation_prompt if request.HasField("add_generation_prompt") else True
        if which == "text" and session is None:
            tok = wpb.TokenizeRequest(model=model, text=request.text)
            return [], list((await self._tokenize(model, tok)).token_ids)
        if which == "text":
            messages = [{"role": "user", "content": request.text}]
        else:
            messages = [{"role": m.role, "content": m.content} for m in request.messages.messages]
        rendered = session.messages if session and session.token_ids else []
        pending = session.messages if session and not session.token_ids else []  # a system prompt before turn 1
        tok = wpb.TokenizeRequest(model=model, add_generation_prompt=agp, history=[pb.ChatMessage(**m) for m in rendered],
                                  messages=pb.ChatMessages(messages=[pb.ChatMessage(**m) for m in pending + messages]),
                                  history_tail=history[-4:])
        ids = list((await self._tokenize(model, tok)).token_ids)
        if not history + ids:
            raise InvalidRequestError(which or "input", "renders to an empty prompt")
        return messages, history + ids

    async def _tokenize(self, model: str, request: wpb.TokenizeRequest) -> wpb.TokenizeResponse:
        handle = self.pool.pick(model)
        try:
            return await handle.stub.Tokenize(request, timeout=30)
        except grpc.aio.AioRpcError as e:
            raise StatusError(e.code(), e.details() or "tokenize failed") from None

    async def Abort(self, request: pb.AbortRequest, context) -> pb.AbortResponse:
        aborted = []
        for rid in request.request_ids:
            state = self.inflight.get(rid)
            if state is not None and not state.aborted:
                state.abort.set()
                aborted.append(rid)
                await state.pipeline.abort(rid)
        return pb.AbortResponse(aborted=aborted)

    async def CreateSession(self, request: pb.CreateSessionRequest, context) -> pb.Session:
        try:
            check_id(request.session_id, "session_id")
            if request.ttl_s < 0 or request.ttl_s != request.ttl_s:
                raise InvalidRequestError("ttl_s", f"must be >= 0, got {request.ttl_s}")
            pipeline = self._pipeline(request.pipeline)
            params = pipeline.parse_params(request)
            model = pipeline.models(params)[0]
            if model not in self.pool.model_names:
                raise not_found(f"{pipeline.typed_field or 'params'}.model: {model!r} is not served here")
            return self.sessions.create(request.session_id, pipeline.name, params, model, request.ttl_s,
                                        request.system_prompt).to_proto()
        except InvalidRequestError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except StatusError as e:
            await context.abort(e.code, e.message)

    async def GetSession(self, request: pb.GetSessionRequest, context) -> pb.Session:
        try:
            return self.sessions.get(request.session_id).to_proto()
        except StatusError as e:
            await context.abort(e.code, e.message)

    async def CloseSession(self, request: pb.CloseSessionRequest, context) -> pb.CloseSessionResponse:
        return pb.CloseSessionResponse(closed=self.sessions.close(request.session_id))

    async def ListModels(self, request, context) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[self.pool.model_info(m) for m in self.pool.model_names])

    async def ListPipelines(self, request, context) -> pb.ListPipelinesResponse:
        import json

        out = pb.ListPipelinesResponse()
        for name, p in self.pipelines.items():
            models = p.models()
            out.pipelines.add(name=name, description=p.description, models=models,
                              params_schema_json=json.dumps(p.Params.model_json_schema()),
                              ready=all(self.pool.model_ready(m) for m in models))
        return out

    async def GetServerInfo(self, request, context) -> pb.ServerInfo:
        s = self.config.server
        handles = self.pool.handles.values()
        return pb.ServerInfo(version=VERSION, uptime_s=time.monotonic() - self.started, draining=self.draining,
                             num_workers=len(handles), num_ready_workers=sum(h.ready for h in handles),
                             max_message_bytes=s.max_message_mb << 20, max_queue=s.max_queue,
                             max_in_flight=s.max_in_flight, session_ttl_s=s.session_ttl_s,
                             num_sessions=len(self.sessions.sessions), metrics_address=self.metrics.address,
                             pipelines=sorted(self.pipelines))

    async def GetLoads(self, request, context) -> pb.Loads:
        loads = await self.pool.loads()
        self.metrics.observe_loads(loads)
        return pb.Loads(workers=loads, queued=self.admission.waiting, in_flight=self.admission.in_flight,
                        sessions=len(self.sessions.sessions))

    async def RegisterWorker(self, request: pb.RegisterWorkerRequest, context) -> pb.RegisterWorkerResponse:
        if not request.address or not request.models:
            field = "address" if not request.address else "models"
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{field}: is required")
        try:
            return pb.RegisterWorkerResponse(worker_id=await self.pool.register(request))
        except StatusError as e:
            await context.abort(e.code, e.message)
