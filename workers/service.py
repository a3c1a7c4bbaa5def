"""The worker process: one engine on its own thread behind the tandem.v1.Worker gRPC service."""
from __future__ import annotations

import asyncio
import logging
import os
from typing import TYPE_CHECKING, AsyncIterator, Awaitable, Callable, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from tandem.errors import InvalidRequestError, TandemError
from tandem.status import StatusError, not_found, status_of
from tandem.v1 import orchestrator_pb2 as pb
from tandem.v1 import worker_pb2 as wpb
from tandem.v1 import worker_pb2_grpc
from workers.chat import encode, turn_tokens
from workers.connection import Connection
from workers.convert import kv_from_proto, kv_to_proto, logprob_from_proto, sampling_from_proto, step_to_proto
from workers.engine import Engine, KVSlice, Priority
from workers.engine_loop import EngineLoop

if TYPE_CHECKING:
    from c2c.colocated import C2C
    from routing.r2r import R2R

log = logging.getLogger("tandem.worker")
T = TypeVar("T")
SERVICE_NAME = "tandem.v1.Worker"


async def _guard(context: grpc.aio.ServicerContext, coro: Awaitable[T]) -> T:
    """Map Tandem's typed errors onto status codes."""
    try:
        return await coro
    except TandemError as e:
        await context.abort(status_of(e), str(e))
    raise AssertionError("unreachable")


class WorkerService(worker_pb2_grpc.WorkerServicer):
    def __init__(self, engine: Engine, loop: EngineLoop, device: str = "cpu", r2r: R2R | None = None,
                 c2c: C2C | None = None):
        self.engine = engine
        self.loop = loop
        self.device = device
        self.r2r = r2r
        self.c2c = c2c

    async def Generate(self, request: wpb.WorkerGenerateRequest, context) -> AsyncIterator[wpb.WorkerStep]:
        rid = request.request_id
        queue: asyncio.Queue = asyncio.Queue()
        try:
            first = self._submit(request, queue)
        except StatusError as e:
            await context.abort(e.code, e.message)
        if first is not None:
            yield first
        if first is None or not first.finished:
            finished = False
            try:
                while not finished:
                    out = await queue.get()
                    finished = out.finished
                    yield step_to_proto(out)
            finally:
                self.loop.close(rid)
                if not finished:
                    await asyncio.shield(self.loop.abort(rid))

    async def Connect(self, commands: AsyncIterator[wpb.WorkerCommand], context) -> AsyncIterator[wpb.WorkerSteps]:
        conn = Connection(self.loop)
        reader = asyncio.create_task(self._read_commands(commands, conn))
        try:
            async for batch in conn.batches():
                yield batch
        finally:
            reader.cancel()
            await asyncio.shield(conn.abort_open())

    async def _read_commands(self, commands: AsyncIterator[wpb.WorkerCommand], conn: Connection) -> None:
        try:
            async for command in commands:
                if command.HasField("generate"):
                    request = command.generate
                    try:
                        first = self._submit(request, conn)
                    except StatusError as e:
                        conn.refuse(request.request_id, e.code, e.message)
                        continue
                    except Exception as e:
                        log.exception("submitting %r failed", request.request_id)
                        conn.refuse(request.request_id, grpc.StatusCode.INTERNAL, f"submission failed: {e}")
                        continue
                    if first is not None:
                        conn.post(first)
                    if first is None or not first.finished:
                        conn.open.add(request.request_id)
                elif command.HasField("abort"):
                    self._abort(list(command.abort.request_ids))
        except grpc.aio.AioRpcError:
            pass  # the orchestrator went away; Connect aborts what is open
        finally:
            conn.end_commands()

    def _submit(self, request: wpb.WorkerGenerateRequest, sink) -> wpb.WorkerStep | None:
        """Adds the request with `sink` receiving its outputs; returns a step to send first (c2c's needs, or
        the end of a request aborted before it came), else None. Raises StatusError."""
        rid = request.request_id
        if not rid:
            raise StatusError(grpc.StatusCode.INVALID_ARGUMENT, "request_id: must be a non-empty string")
        if self.loop.was_aborted(rid):
            return wpb.WorkerStep(request_id=rid, model=request.model, finished=True, finish_reason="abort")
        if self.loop.open(rid, sink) is None:
            raise StatusError(grpc.StatusCode.ALREADY_EXISTS, f"request_id: {rid!r} is already in use")
        try:
            needs = self._add(request)
        except TandemError as e:
            self.loop.close(rid)
            raise StatusError(status_of(e), str(e)) from None
        except BaseException:
            self.loop.close(rid)
            raise
        self.loop.wake()
        if not needs:
            return None
        return wpb.WorkerStep(request_id=rid, model=self.c2c.receiver.name, c2c_need=[
            wpb.C2CNeed(sharer=n.sharer, token_ids=n.token_ids, layers=n.layers) for n in needs])

    def _add(self, request: wpb.WorkerGenerateRequest) -> list:
        """Adds the request; returns what remote sharers must send (c2c), else nothing."""
        params = sampling_from_proto(request.sampling)
        prompt, priority = list(request.prompt_token_ids), _priority(request.priority)
        if request.c2c.enabled:
            return self._add_c2c(request, prompt, params, priority)
        if request.route.enabled:
            self._add_routed(request, prompt, params, priority)
            return []
        self.engine.add_request(request.request_id, prompt, params, request.model or None, priority,
                                not request.prefill_only, request.cache_salt, propose_only=request.propose_only,
                                vocab_limit=request.vocab_limit or None)
        return []

    def _add_c2c(self, request: wpb.WorkerGenerateRequest, prompt: list[int], params, priority: Priority) -> list:
        c2c = self.c2c
        if c2c is None:
            raise InvalidRequestError("c2c", "this worker hosts no receiver of a c2c pipeline")
        if request.model and request.model != c2c.receiver.name:
            self.engine.model(request.model)       # NOT_FOUND when it is not loaded here at all
            raise InvalidRequestError("model", f"c2c requests run on the receiver {c2c.receiver.name!r}, "
                                      f"not {request.model!r}")
        if request.route.enabled or request.prefill_only or request.propose_only:
            raise InvalidRequestError("c2c", "does not combine with route, prefill_only or propose_only")
        messages = [{"role": m.role, "content": m.content} for m in request.c2c.messages]
        chat = messages and c2c.receiver_ids(messages) == prompt
        c2c.add_request(request.request_id, messages if chat else prompt, params, priority=priority,
                        sharers=list(request.c2c.sharers))
        return c2c.need(request.request_id)

    def _add_routed(self, request: wpb.WorkerGenerateRequest, prompt: list[int], params, priority: Priority) -> None:
        r2r, route = self.r2r, request.route
        if r2r is None:
            raise InvalidRequestError("route", "this worker hosts no SLM of an r2r pipeline")
        if request.model and request.model != r2r.slm.name:
            raise InvalidRequestError("model", f"routed requests run on the SLM {r2r.slm.name!r}, "
                                      f"not {request.model!r}")
        if request.prefill_only or request.propose_only:
            raise InvalidRequestError("route", "does not combine with prefill_only or propose_only")
        threshold = route.threshold if route.HasField("threshold") else None
        try:
            r2r.add_request(request.request_id, prompt, params, decider=route.decider, threshold=threshold,
                            priority=priority, cache_salt=request.cache_salt)
        except InvalidRequestError as e:
            if e.field in ("decider", "threshold"):
                raise InvalidRequestError(f"route.{e.field}", str(e).split(": ", 1)[-1]) from None
            raise

    async def Tokenize(self, request: wpb.TokenizeRequest, context) -> wpb.TokenizeResponse:
        async def tokenize() -> list[int]:
            rm = self.engine.model(request.model or None)
            tok = rm.tokenizer
            if request.WhichOneof("input") == "messages":
                msgs = [{"role": m.role, "content": m.content} for m in request.messages.messages]
                hist = [{"role": m.role, "content": m.content} for m in request.history]
                tail = list(request.history_tail)
                rm.check_token_ids(tail, "history_tail")
                return await asyncio.to_thread(turn_tokens, tok, hist, msgs, request.add_generation_prompt, tail)
            return await asyncio.to_thread(encode, tok, request.text)

        return wpb.TokenizeResponse(token_ids=await _guard(context, tokenize()))

    async def _on_engine(self, context, fn: Callable[[], T]) -> T:
        return await _guard(context, self.loop.run(fn))

    async def _on_request(self, context, request_id: str, fn: Callable[[str], T]) -> T:
        """`fn(request_id)` on the engine's thread, once the request is known live there; else NOT_FOUND."""
        return await self._on_engine(context, lambda: fn(self._live(request_id)))

    def _live(self, request_id: str) -> str:
        if request_id not in self.engine.requests:
            raise not_found(f"request_id: no live request {request_id!r} (finished, released or never added)")
        return request_id

    async def Extend(self, request: wpb.ExtendRequest, context) -> wpb.Ack:
        await self._on_request(context, request.request_id,
                               lambda rid: self.engine.extend(rid, list(request.token_ids), request.sample))
        return wpb.Ack()

    async def Pause(self, request: wpb.RequestRef, context) -> wpb.Ack:
        await self._on_request(context, request.request_id, self.engine.pause)
        return wpb.Ack()

    async def Resume(self, request: wpb.RequestRef, context) -> wpb.Ack:
        await self._on_request(context, request.request_id, self.engine.resume)
        return wpb.Ack()

    async def Release(self, request: wpb.RequestRef, context) -> wpb.Ack:
        await self._on_request(context, request.request_id, self.engine.release)
        return wpb.Ack()

    async def Inject(self, request: wpb.InjectRequest, context) -> wpb.Ack:
        logprob = logprob_from_proto(request.logprob) if request.HasField("logprob") else None
        await self._on_request(context, request.request_id,
                               lambda rid: self.engine.inject(rid, request.token_id, request.source, logprob))
        return wpb.Ack()

    async def Abort(self, request: pb.AbortRequest, context) -> pb.AbortResponse:
        live = self._abort(list(request.request_ids))
        await self.loop.abort("")
        return pb.AbortResponse(aborted=live)

    def _abort(self, request_ids: list[str]) -> list[str]:
        """Abort the live ones; mark the others, which an abort may have overtaken. Returns the live ones."""
        live = [rid for rid in request_ids if rid in self.loop.sinks]
        self.loop.mark_aborted([rid for rid in request_ids if rid not in self.loop.sinks])
        for rid in request_ids:
            self.engine.abort(rid)
        self.loop.wake()
        return live

    async def ExportKV(self, request: wpb.ExportKVRequest, context) -> wpb.KVData:
        def export(rid: str) -> KVSlice:
            layers = self._layer_range(rid, request.layer_start, request.layer_end)
            end = request.end if request.HasField("end") else None
            return self.engine.export_kv(rid, layers, request.start, end)

        return kv_to_proto(await self._on_request(context, request.request_id, export))

    def _layer_range(self, request_id: str, start: int, end: int) -> range | None:
        """The layers `[start, end)` of the request's model (`end` 0: through the last); None: all of them."""
        if not (start or end):
            return None
        n = self.engine.models[self.engine.requests[request_id].model].runner.spec.num_layers
        if not 0 <= start < n:
            raise InvalidRequestError("layer_start", f"{start} is not a layer of this {n}-layer model")
        if not start < (end or n) <= n:
            raise InvalidRequestError("layer_end", f"{end} does not end a layer range after layer_start {start} "
                                      f"within this {n}-layer model")
        return range(start, end or n)

    async def ImportKV(self, request: wpb.ImportKVRequest, context) -> wpb.Ack:
        kv = await _guard(context, asyncio.to_thread(kv_from_proto, request.kv))
        await self._on_request(context, request.request_id,
                               lambda rid: self.engine.import_kv(rid, kv, request.mark_computed))
        return wpb.Ack()

    async def FuseKV(self, request: wpb.FuseKVRequest, context) -> wpb.Ack:
        if self.c2c is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "this worker hosts no receiver of a c2c pipeline")
        slices = await _guard(context, asyncio.to_thread(lambda: [kv_from_proto(kv) for kv in request.kv]))
        await self._on_engine(context, lambda: self.c2c.supply(request.request_id, request.sharer, slices))
        return wpb.Ack()   # fusion runs in the same engine step, once every part is in

    async def GetLoad(self, request: wpb.GetLoadRequest, context) -> pb.WorkerLoad:
        stats = await self.loop.run(self.engine.stats)
        load = pb.WorkerLoad(pid=os.getpid(), in_flight=len(self.loop.sinks), device=self.device,
                             state=pb.WORKER_STATE_READY)
        for name, s in stats.items():
            load.models.add(model=name, num_blocks=s["num_blocks"], free_blocks=s["free_blocks"],
                            block_size=s["block_size"], waiting=s["waiting"], running=s["running"],
                            paused=s["paused"], prefix_hit_tokens=s["prefix_hit_tokens"],
                            prefix_hit_rate=s["prefix_hit_rate"])
        return load

    async def Describe(self, request: wpb.DescribeRequest, context) -> wpb.WorkerDescription:
        desc = wpb.WorkerDescription(pid=os.getpid(), device=self.device)
        for name, rm in self.engine.models.items():
            desc.models.add(name=name, path=str(rm.runner.loaded.path), max_model_len=rm.runner.max_model_len,
                            vocab_size=rm.runner.spec.vocab_size, block_size=rm.blocks.block_size,
                            num_blocks=rm.blocks.num_blocks, ready=True)
        return desc


def _priority(value: int) -> Priority:
    if value not in {int(p) for p in Priority}:
        raise InvalidRequestError("priority", f"{value} is not a priority; known: {[int(p) for p in Priority]}")
    return Priority(value)


def grpc_options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.so_reuseport", 0),  # a second server on a port in use fails to bind instead of sharing it
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000)]


async def start_worker_server(engine: Engine, host: str = "127.0.0.1", port: int = 0, device: str = "cpu",
                              max_message_bytes: int = 256 << 20, r2r: R2R | None = None,
                              c2c: C2C | None = None) -> tuple[grpc.aio.Server, EngineLoop, int]:
    """Start the engine thread and the gRPC server; returns (server, loop, bound port). `r2r`, `c2c`: the
    coordinators routed and c2c Generate calls go through (built on `engine`)."""
    loop = EngineLoop(engine, asyncio.get_running_loop())
    loop.start()
    server = grpc.aio.server(options=grpc_options(max_message_bytes))
    worker_pb2_grpc.add_WorkerServicer_to_server(WorkerService(engine, loop, device, r2r, c2c), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, loop, bound
