"""`AsyncClient`: the asyncio (grpc.aio) mirror of `tandem.client.Client`.

    async with AsyncClient("127.0.0.1:50051") as client:
        result = await client.generate("Hello", max_tokens=16)
        stream = await client.generate("Hello", stream=True)
        async for chunk in stream:
            ...
        async with client.session(system="Be brief.") as chat:
            await chat.send("Hi")
"""
from __future__ import annotations

import asyncio
import time
from typing import Any, AsyncIterator, Mapping, Sequence

import grpc

from tandem._client_types import (
    Chunk, GenerationResult, ModelInfo, PipelineInfo, SessionInfo, StreamState, generate_request,
    model_info, new_request_id, pipeline_info, session_info, session_request, to_dict,
)
from tandem.client import channel_options
from tandem.client_errors import ClientError, FailedPreconditionError, ServerError, UnavailableError, from_rpc_error

__all__ = ["AsyncClient", "AsyncChatSession", "AsyncGenerationStream"]


class AsyncGenerationStream(StreamState):
    """`async for chunk in stream`; `result` holds the GenerationResult once the stream ended."""

    async def __anext__(self) -> Chunk:
        while not self._closed:
            try:
                msg = await self._call.read()
            except grpc.aio.AioRpcError as e:
                code = e.code()
                if code == grpc.StatusCode.UNAVAILABLE and not self._got_message and self._retries_left:
                    self._retries_left -= 1
                    await asyncio.sleep(0.2)
                    self._call = self._start()
                    continue
                self._end()
                if self._acc.done and code == grpc.StatusCode.CANCELLED:
                    break
                raise from_rpc_error(e, self.request_id) from None
            if msg is grpc.aio.EOF:
                self._end()
                if not self._acc.done:
                    raise ServerError("the stream ended without a final message", request_id=self.request_id)
                break
            chunk = self._take(msg)
            if chunk is not None:
                return chunk
        raise StopAsyncIteration

    async def __aiter__(self) -> AsyncIterator[Chunk]:
        try:
            while True:
                try:
                    yield await self.__anext__()
                except StopAsyncIteration:
                    return
        finally:
            self.cancel()


    async def wait(self) -> GenerationResult:
        try:
            while True:
                await self.__anext__()
        except StopAsyncIteration:
            pass
        finally:
            self.cancel()
        return self._finished()

    async def __aenter__(self) -> AsyncGenerationStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.cancel()

    def __del__(self) -> None:
        try:
            if not self._closed:
                self._call.cancel()
        except Exception:
            pass


class AsyncChatSession:
    """`async with client.session(...) as chat` (or `chat = await client.session(...)`): opened on entry."""

    def __init__(self, client: AsyncClient, create: Any):
        self._client = client
        self._create = create
        self.info_at_start: SessionInfo | None = None
        self.session_id = ""
        self.closed = True

    async def open(self) -> AsyncChatSession:
        if self.closed:
            self.info_at_start = session_info(await self._client._unary("CreateSession", self._create))
            self.session_id, self.closed = self.info_at_start.session_id, False
        return self

    def __await__(self):
        return self.open().__await__()

    async def send(self, text: str, **kw: Any) -> GenerationResult:
        return await self._client.generate(text, session_id=self._open_id(), **kw)

    async def stream(self, text: str, **kw: Any) -> AsyncGenerationStream:
        return await self._client.generate(text, session_id=self._open_id(), stream=True, **kw)

    async def info(self) -> SessionInfo:
        from tandem.v1 import orchestrator_pb2 as pb

        return session_info(await self._client._unary("GetSession", pb.GetSessionRequest(session_id=self._open_id())))

    def _open_id(self) -> str:
        if self.closed:
            raise FailedPreconditionError("the session is not open: use `async with client.session(...)` or "
                              "`await client.session(...)`, or `await chat.open()` after closing it")
        return self.session_id

    async def close(self) -> bool:
        from tandem.v1 import orchestrator_pb2 as pb

        if self.closed:
            return False
        self.closed = True
        req = pb.CloseSessionRequest(session_id=self.session_id)
        return (await self._client._unary("CloseSession", req, idempotent=True)).closed

    async def reset(self) -> None:
        await self.close()
        self._create.session_id = ""
        await self.open()

    async def __aenter__(self) -> AsyncChatSession:
        return await self.open()

    async def __aexit__(self, *exc: object) -> None:
        try:
            await self.close()
        except ClientError:
            if exc[0] is None:
                raise


class AsyncClient:
    """Same arguments and methods as `Client`; every method is a coroutine."""

    def __init__(self, address: str, *, credentials: grpc.ChannelCredentials | None = None,
                 timeout: float | None = None, max_retries: int = 3, retry_backoff_s: float = 0.1,
                 max_message_mb: int = 64, options: Sequence[tuple[str, Any]] = ()):
        from tandem.v1 import orchestrator_pb2_grpc

        self.address = address
        self.timeout = timeout
        self.max_retries = max_retries
        self.retry_backoff_s = retry_backoff_s
        opts = channel_options(max_message_mb) + list(options)
        self._channel = (grpc.aio.secure_channel(address, credentials, options=opts) if credentials is not None
                         else grpc.aio.insecure_channel(address, options=opts))
        self._stub = orchestrator_pb2_grpc.OrchestratorStub(self._channel)

    async def _unary(self, method: str, request: Any, *, idempotent: bool = False, timeout: float | None = None,
                     stub: Any = None) -> Any:
        fn = getattr(stub or self._stub, method)
        attempts = 1 + (self.max_retries if idempotent else 0)
        for i in range(attempts):
            try:
                return await fn(request, timeout=timeout if timeout is not None else self.timeout)
            except grpc.aio.AioRpcError as e:
                if idempotent and e.code() == grpc.StatusCode.UNAVAILABLE and i + 1 < attempts:
                    await asyncio.sleep(self.retry_backoff_s * 2 ** i)
                    continue
                raise from_rpc_error(e) from None
        raise AssertionError("unreachable")

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def generate(self, prompt: str | None = None, *, messages: Sequence[Mapping[str, str]] | None = None,
                       token_ids: Sequence[int] | None = None, model: str | None = None, pipeline: str = "single",
                       pipeline_params: Mapping[str, Any] | None = None, max_tokens: int | None = None,
                       temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
                       seed: int | None = None, stop: str | Sequence[str] | None = None,
                       logprobs: int | None = None, stop_token_ids: Sequence[int] | None = None,
                       ignore_eos: bool | None = None, skip_special_tokens: bool | None = None,
                       request_id: str | None = None, stream: bool = False, session_id: str = "",
                       background: bool = False, add_generation_prompt: bool | None = None,
                       timeout: float | None = None) -> Any:
        rid = request_id or new_request_id()
        req = generate_request(prompt, messages, token_ids, request_id=rid, model=model,
                               pipeline="" if session_id and pipeline == "single" else pipeline,
                               pipeline_params=pipeline_params, session_id=session_id, background=background,
                               add_generation_prompt=add_generation_prompt,
                               sampling=dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                             top_k=top_k, seed=seed, stop=stop, logprobs=logprobs,
                                             stop_token_ids=stop_token_ids, ignore_eos=ignore_eos,
                                             skip_special_tokens=skip_special_tokens))
        deadline = timeout if timeout is not None else self.timeout
        s = AsyncGenerationStream(lambda: self._stub.Generate(req, timeout=deadline), rid)
        return s if stream else await s.wait()

    async def abort(self, request_ids: str | Sequence[str]) -> list[str]:
        from tandem.v1 import orchestrator_pb2 as pb

        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        return list((await self._unary("Abort", pb.AbortRequest(request_ids=ids), idempotent=True)).aborted)

    def session(self, *, model: str | None = None, system: str | None = None, pipeline: str = "single",
                pipeline_params: Mapping[str, Any] | None = None, ttl_s: float = 0.0,
                session_id: str = "") -> AsyncChatSession:
        """A chat session, created on `await` or on entering `async with`; closed on leaving it."""
        req = session_request(session_id=session_id, pipeline=pipeline, model=model,
                              pipeline_params=pipeline_params, system=system, ttl_s=ttl_s)
        return AsyncChatSession(self, req)

    async def list_models(self) -> list[ModelInfo]:
        from tandem.v1 import orchestrator_pb2 as pb

        return [model_info(m) for m in (await self._unary("ListModels", pb.ListModelsRequest(), idempotent=True)).models]

    async def list_pipelines(self) -> list[PipelineInfo]:
        from tandem.v1 import orchestrator_pb2 as pb

        reply = await self._unary("ListPipelines", pb.ListPipelinesRequest(), idempotent=True)
        return [pipeline_info(p) for p in reply.pipelines]

    async def server_info(self) -> dict[str, Any]:
        from tandem.v1 import orchestrator_pb2 as pb

        return to_dict(await self._unary("GetServerInfo", pb.GetServerInfoRequest(), idempotent=True))

    async def loads(self) -> dict[str, Any]:
        from tandem.v1 import orchestrator_pb2 as pb

        return to_dict(await self._unary("GetLoads", pb.GetLoadsRequest(), idempotent=True))

    async def health(self, service: str = "") -> str:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        reply = await self._unary("Check", health_pb2.HealthCheckRequest(service=service), idempotent=True,
                                  stub=health_pb2_grpc.HealthStub(self._channel))
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    async def wait_ready(self, timeout: float = 60.0, service: str = "") -> None:
        deadline = time.monotonic() + timeout
        last = "unreachable"
        while time.monotonic() < deadline:
            try:
                last = await self.health(service)
                if last == "SERVING":
                    return
            except UnavailableError as e:
                last = e.message
            await asyncio.sleep(0.1)
        raise UnavailableError(f"{self.address} not ready after {timeout:.0f} s ({last})")
