"""The Python client of a Tandem server (`tandem.v1.Orchestrator` over gRPC).

    from tandem import Client
    with Client("127.0.0.1:50051") as client:
        print(client.generate("Hello", max_tokens=32).text)
        for chunk in client.generate("Hello", stream=True):
            print(chunk.text, end="")
        with client.session(system="Be brief.") as chat:
            print(chat.send("Hi").text, chat.send("And again?").usage.cached_tokens)

Errors arrive as the typed exceptions of `tandem.client_errors`. Retries only where safe: idempotent
reads on UNAVAILABLE, with backoff; a Generate that fails with UNAVAILABLE before any message once, with
the same request_id; never after a chunk arrived. Leaving a stream (break, close, garbage collection)
cancels its RPC, which aborts the request on the server. `AsyncClient` (grpc.aio) mirrors this API.
"""
from __future__ import annotations

import time
from typing import Any, Iterator, Mapping, Sequence

import grpc

from tandem._client_types import (
    Chunk, GenerationResult, ModelInfo, PipelineInfo, SessionInfo, StreamState, generate_request,
    model_info, new_request_id, pipeline_info, session_info, session_request, to_dict,
)
from tandem.client_errors import ClientError, ServerError, UnavailableError, from_rpc_error

__all__ = ["Client", "ChatSession", "GenerationStream", "GenerationResult", "Chunk"]


def channel_options(max_message_mb: int) -> list[tuple[str, Any]]:
    n = max_message_mb << 20
    return [("grpc.max_send_message_length", n), ("grpc.max_receive_message_length", n),
            ("grpc.enable_retries", 0), ("grpc.keepalive_time_ms", 30_000)]


class GenerationStream(StreamState):
    """The chunks of one streamed Generate; `result` holds the GenerationResult once the stream ended."""

    def __next__(self) -> Chunk:
        while not self._closed:
            try:
                msg = next(self._call)
            except StopIteration:
                self._end()
                if not self._acc.done:
                    raise ServerError("the stream ended without a final message", request_id=self.request_id)
                break
            except grpc.RpcError as e:
                code = e.code()
                if code == grpc.StatusCode.UNAVAILABLE and not self._got_message and self._retries_left:
                    self._retries_left -= 1
                    time.sleep(0.2)
                    self._call = self._start()
                    continue
                self._end()
                if self._acc.done and code == grpc.StatusCode.CANCELLED:
                    break  # aborted: the Final (finish_reason "abort") already arrived
                raise from_rpc_error(e, self.request_id) from None
            chunk = self._take(msg)
            if chunk is not None:
                return chunk
        raise StopIteration

    def __iter__(self) -> Iterator[Chunk]:
        try:
            while True:
                try:
                    yield next(self)
                except StopIteration:
                    return
        finally:
            if not self._closed:
                self.cancel()


    def wait(self) -> GenerationResult:
        """Consume what is left and return the result."""
        for _ in self:
            pass
        return self._finished()

    def __enter__(self) -> GenerationStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cancel()

    def __del__(self) -> None:
        try:
            if not self._closed:
                self._call.cancel()
        except Exception:
            pass


class ChatSession:
    """A multi-turn chat on the server: earlier turns' KV is reused. Closed on `close()` or leaving `with`."""

    def __init__(self, client: Client, create: Any, info: SessionInfo):
        self._client = client
        self._create = create
        self.info_at_start = info
        self.session_id = info.session_id
        self.closed = False

    def send(self, text: str, **kw: Any) -> GenerationResult:
        """One turn; keyword arguments are generate()'s sampling options (max_tokens, temperature, ...)."""
        return self._client.generate(text, session_id=self.session_id, **kw)

    def stream(self, text: str, **kw: Any) -> GenerationStream:
        return self._client.generate(text, session_id=self.session_id, stream=True, **kw)

    def info(self) -> SessionInfo:
        from tandem.v1 import orchestrator_pb2 as pb

        return session_info(self._client._unary("GetSession", pb.GetSessionRequest(session_id=self.session_id)))

    def close(self) -> bool:
        from tandem.v1 import orchestrator_pb2 as pb

        if self.closed:
            return False
        self.closed = True
        reply = self._client._unary("CloseSession", pb.CloseSessionRequest(session_id=self.session_id),
                                    idempotent=True)
        return reply.closed

    def reset(self) -> None:
        """Forget the conversation: close this session and open a fresh one with the same settings."""
        self.close()
        self._create.session_id = ""
        info = session_info(self._client._unary("CreateSession", self._create))
        self.session_id, self.closed = info.session_id, False

    def __enter__(self) -> ChatSession:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.close()
        except ClientError:
            if exc[0] is None:
                raise


class Client:
    """A blocking client. `address` is HOST:PORT; `credentials` (grpc.ChannelCredentials) switches on TLS;
    `timeout` (s) is the default deadline of every call; `max_retries` bounds retries of idempotent reads."""

    def __init__(self, address: str, *, credentials: grpc.ChannelCredentials | None = None,
                 timeout: float | None = None, max_retries: int = 3, retry_backoff_s: float = 0.1,
                 max_message_mb: int = 64, options: Sequence[tuple[str, Any]] = ()):
        from tandem.v1 import orchestrator_pb2_grpc

        self.address = address
        self.timeout = timeout
        self.max_retries = max_retries
        self.retry_backoff_s = retry_backoff_s
        opts = channel_options(max_message_mb) + list(options)
        self._channel = (grpc.secure_channel(address, credentials, options=opts) if credentials is not None
                         else grpc.insecure_channel(address, options=opts))
        self._stub = orchestrator_pb2_grpc.OrchestratorStub(self._channel)

    # ---- plumbing ----
    def _unary(self, method: str, request: Any, *, idempotent: bool = False, timeout: float | None = None,
               stub: Any = None) -> Any:
        fn = getattr(stub or self._stub, method)
        attempts = 1 + (self.max_retries if idempotent else 0)
        for i in range(attempts):
            try:
                return fn(request, timeout=timeout if timeout is not None else self.timeout)
            except grpc.RpcError as e:
                if idempotent and e.code() == grpc.StatusCode.UNAVAILABLE and i + 1 < attempts:
                    time.sleep(self.retry_backoff_s * 2 ** i)
                    continue
                raise from_rpc_error(e) from None
        raise AssertionError("unreachable")

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- generation ----
    def generate(self, prompt: str | None = None, *, messages: Sequence[Mapping[str, str]] | None = None,
                 token_ids: Sequence[int] | None = None, model: str | None = None, pipeline: str = "single",
                 pipeline_params: Mapping[str, Any] | None = None, max_tokens: int | None = None,
                 temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
                 seed: int | None = None, stop: str | Sequence[str] | None = None, logprobs: int | None = None,
                 stop_token_ids: Sequence[int] | None = None, ignore_eos: bool | None = None,
                 skip_special_tokens: bool | None = None, request_id: str | None = None, stream: bool = False,
                 session_id: str = "", background: bool = False, add_generation_prompt: bool | None = None,
                 timeout: float | None = None) -> Any:
        """Generate from one of `prompt`, `messages` (chat, rendered with the model's template) or
        `token_ids`. Returns a GenerationResult, or with `stream=True` a GenerationStream of Chunks.
        `pipeline_params` are the pipeline's own, e.g. `pipeline="r2r", pipeline_params={"decider": "entropy",
        "threshold": 0.1}`; the result's `sources` name each token's model and `stats` holds the pipeline's
        statistics (r2r: llm_token_share, llm_tokens, slm_tokens, router_s, llm_s)."""
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
        s = GenerationStream(lambda: self._stub.Generate(req, timeout=deadline), rid)
        return s if stream else s.wait()

    def abort(self, request_ids: str | Sequence[str]) -> list[str]:
        """Abort requests by id (idempotent); returns the ids that were in flight."""
        from tandem.v1 import orchestrator_pb2 as pb

        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        return list(self._unary("Abort", pb.AbortRequest(request_ids=ids), idempotent=True).aborted)

    def session(self, *, model: str | None = None, system: str | None = None, pipeline: str = "single",
                pipeline_params: Mapping[str, Any] | None = None, ttl_s: float = 0.0,
                session_id: str = "") -> ChatSession:
        """Open a chat session now; use it as a context manager so it is closed on exit."""
        req = session_request(session_id=session_id, pipeline=pipeline, model=model,
                              pipeline_params=pipeline_params, system=system, ttl_s=ttl_s)
        return ChatSession(self, req, session_info(self._unary("CreateSession", req)))

    # ---- discovery and state (idempotent, retried) ----
    def list_models(self) -> list[ModelInfo]:
        from tandem.v1 import orchestrator_pb2 as pb

        return [model_info(m) for m in self._unary("ListModels", pb.ListModelsRequest(), idempotent=True).models]

    def list_pipelines(self) -> list[PipelineInfo]:
        from tandem.v1 import orchestrator_pb2 as pb

        reply = self._unary("ListPipelines", pb.ListPipelinesRequest(), idempotent=True)
        return [pipeline_info(p) for p in reply.pipelines]

    def server_info(self) -> dict[str, Any]:
        from tandem.v1 import orchestrator_pb2 as pb

        return to_dict(self._unary("GetServerInfo", pb.GetServerInfoRequest(), idempotent=True))

    def loads(self) -> dict[str, Any]:
        from tandem.v1 import orchestrator_pb2 as pb

        return to_dict(self._unary("GetLoads", pb.GetLoadsRequest(), idempotent=True))

    def health(self, service: str = "") -> str:
        """The grpc.health.v1 status of `service` ("" is the server): SERVING, NOT_SERVING, ..."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        reply = self._unary("Check", health_pb2.HealthCheckRequest(service=service), idempotent=True,
                            stub=health_pb2_grpc.HealthStub(self._channel))
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    def wait_ready(self, timeout: float = 60.0, service: str = "") -> None:
        """Block until health(service) is SERVING; raises UnavailableError after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        last = "unreachable"
        while time.monotonic() < deadline:
            try:
                last = self.health(service)
                if last == "SERVING":
                    return
            except UnavailableError as e:
                last = e.message
            time.sleep(0.1)
        raise UnavailableError(f"{self.address} not ready after {timeout:.0f} s ({last})")


def __getattr__(name: str) -> Any:
    if name == "AsyncClient":
        from tandem.aio_client import AsyncClient

        return AsyncClient
    raise AttributeError(name)
