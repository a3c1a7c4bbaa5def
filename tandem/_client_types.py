"""Result types of the client SDK and the conversions between them and tandem.v1 messages.

Shared by `tandem.client.Client` and `AsyncClient`; no I/O here."""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from tandem.client_errors import ClientError, RequestCancelledError, error_for

_FINISH = {0: "", 1: "stop", 2: "length", 3: "abort", 4: "error"}
_STATES = {0: "unspecified", 1: "starting", 2: "ready", 3: "unavailable", 4: "stopped"}
SAMPLING_KEYS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stop_token_ids", "ignore_eos",
                 "logprobs", "skip_special_tokens")


def _pb():
    from tandem.v1 import orchestrator_pb2

    return orchestrator_pb2


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class Chunk:
    """All new tokens of one engine step."""

    token_ids: list[int]
    text: str
    sources: list[str]
    logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens served from the prefix cache


@dataclass
class Timings:
    queue_s: float = 0.0
    ttft_s: float = 0.0
    per_token_s: float = 0.0
    total_s: float = 0.0
    server_s: float = 0.0
    client_s: float = 0.0  # measured by the client: call start to the final message


@dataclass
class GenerationResult:
    request_id: str = ""
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str = ""  # stop, length, abort, error
    usage: Usage = field(default_factory=Usage)
    timings: Timings = field(default_factory=Timings)
    stats: dict[str, float] = field(default_factory=dict)  # pipeline statistics
    session_id: str = ""
    num_chunks: int = 0


@dataclass
class ModelInfo:
    name: str
    path: str
    max_model_len: int
    vocab_size: int
    block_size: int
    num_blocks: int
    workers: list[str]
    ready: bool


@dataclass
class PipelineInfo:
    name: str
    description: str
    models: list[str]
    params_schema: dict[str, Any]
    ready: bool


@dataclass
class SessionInfo:
    session_id: str
    pipeline: str
    model: str
    num_turns: int
    num_tokens: int
    ttl_s: float
    expires_in_s: float


def new_request_id() -> str:
    return f"c-{uuid.uuid4().hex[:20]}"


def sampling_proto(kw: Mapping[str, Any]):
    pb = _pb()
    unknown = set(kw) - set(SAMPLING_KEYS)
    if unknown:
        raise TypeError(f"unknown sampling parameter(s) {sorted(unknown)}; known: {list(SAMPLING_KEYS)}")
    msg = pb.SamplingParams()
    for key, value in kw.items():
        if value is None:
            continue
        if key == "stop":
            msg.stop.extend([value] if isinstance(value, str) else list(value))
        elif key == "stop_token_ids":
            msg.stop_token_ids.extend(int(v) for v in value)
        else:
            setattr(msg, key, value)
    return msg


R2R_KEYS = ("decider", "threshold")


def _set_params(msg: Any, pipeline: str, model: str | None, params: Mapping[str, Any] | None) -> None:
    """`model` goes into the typed `single` params, r2r's decider/threshold into the typed `r2r` params;
    other parameters travel as a Struct."""
    if pipeline == "r2r" and params and model is None and set(params) <= set(R2R_KEYS):
        msg.r2r.SetInParent()
        if params.get("decider"):
            msg.r2r.decider = params["decider"]
        if params.get("threshold") is not None:
            msg.r2r.threshold = float(params["threshold"])
        return
    if params:
        data = dict(params)
        if model is not None:
            data.setdefault("model", model)
        msg.params.update(data)
    elif model is not None:
        if pipeline in ("", "single"):
            msg.single.model = model
        else:
            msg.params.update({"model": model})


def generate_request(prompt: str | None, messages: Sequence[Mapping[str, str]] | None,
                     token_ids: Sequence[int] | None, *, request_id: str, model: str | None, pipeline: str,
                     pipeline_params: Mapping[str, Any] | None, session_id: str = "",
                     background: bool = False, add_generation_prompt: bool | None = None,
                     sampling: Mapping[str, Any]):
    pb = _pb()
    given = [x is not None for x in (prompt, messages, token_ids)]
    if sum(given) != 1:
        raise TypeError("give exactly one of prompt, messages or token_ids")
    req = pb.GenerateRequest(request_id=request_id, pipeline=pipeline, session_id=session_id,
                             sampling=sampling_proto(sampling),
                             priority=pb.PRIORITY_BACKGROUND if background else pb.PRIORITY_NORMAL)
    if prompt is not None:
        req.text = prompt
    elif messages is not None:
        req.messages.messages.extend(pb.ChatMessage(role=m["role"], content=m["content"]) for m in messages)
    else:
        req.token_ids.ids.extend(int(t) for t in token_ids or ())
    if add_generation_prompt is not None:
        req.add_generation_prompt = add_generation_prompt
    _set_params(req, pipeline, model, pipeline_params)
    return req


def session_request(*, session_id: str, pipeline: str, model: str | None, pipeline_params: Mapping[str, Any] | None,
                    system: str | None, ttl_s: float):
    req = _pb().CreateSessionRequest(session_id=session_id, pipeline=pipeline, system_prompt=system or "",
                                     ttl_s=ttl_s)
    _set_params(req, pipeline, model, pipeline_params)
    return req


def chunk_from_proto(c: Any) -> Chunk:
    return Chunk(list(c.token_ids), c.text, list(c.sources),
                 [TokenLogprob(lp.token_id, lp.logprob, [(t.token_id, t.logprob) for t in lp.top])
                  for lp in c.logprobs])


class Accumulator:
    """Folds a Generate stream's messages into a GenerationResult."""

    def __init__(self, request_id: str):
        self.result = GenerationResult(request_id=request_id)
        self.texts: list[str] = []
        self.done = False

    def add_chunk(self, chunk: Chunk) -> None:
        r = self.result
        r.token_ids += chunk.token_ids
        r.sources += chunk.sources
        r.logprobs += chunk.logprobs
        self.texts.append(chunk.text)
        r.num_chunks += 1

    def add_final(self, f: Any) -> ClientError | None:
        """Record the Final; returns the typed error when it carries one (finish reason ERROR)."""
        r = self.result
        if f.text:
            self.texts.append(f.text)
        r.text = "".join(self.texts)
        r.finish_reason = _FINISH.get(f.finish_reason, str(f.finish_reason))
        u, t = f.usage, f.timings
        r.usage = Usage(u.prompt_tokens, u.completion_tokens, u.cached_tokens)
        r.timings = Timings(t.queue_s, t.ttft_s, t.per_token_s, t.total_s, t.server_s)
        r.stats = dict(f.pipeline_stats)
        r.session_id = f.session_id
        self.done = True
        if f.HasField("error") and (f.error.code or f.error.message):
            return error_for(f.error.code or 2, f.error.message, field=f.error.field, request_id=r.request_id)
        return None


class StreamState:
    """What a sync or async Generate stream keeps: the call, its accumulated result, and the one retry
    allowed when the server is unavailable before any message arrived."""

    def __init__(self, start: Callable[[], Any], request_id: str, *, retry_unavailable: bool = True):
        self._start = start
        self.request_id = request_id
        self._acc = Accumulator(request_id)
        self._retries_left = 1 if retry_unavailable else 0
        self._got_message = False
        self._closed = False
        self._t0 = time.perf_counter()
        self._call = start()

    @property
    def result(self) -> GenerationResult | None:
        return self._acc.result if self._acc.done else None

    def _finished(self) -> GenerationResult:
        """The result of a stream read to its end; RequestCancelledError for one left before its final message."""
        if not self._acc.done:
            raise RequestCancelledError(f"the stream of {self.request_id!r} was cancelled before its final message",
                                        request_id=self.request_id)
        return self._acc.result

    def _end(self) -> None:
        self._closed = True
        self._acc.result.timings.client_s = time.perf_counter() - self._t0

    def _take(self, msg: Any) -> Chunk | None:
        """Fold one GenerateResponse in; returns its chunk, or None for the final (raising its in-band error)."""
        self._got_message = True
        if msg.WhichOneof("kind") == "chunk":
            chunk = chunk_from_proto(msg.chunk)
            self._acc.add_chunk(chunk)
            return chunk
        if msg.WhichOneof("kind") == "final":
            err = self._acc.add_final(msg.final)
            if err is not None:
                self.cancel()
                raise err
        return None

    def cancel(self) -> None:
        """Cancel the RPC (the server aborts the request). Idempotent."""
        if not self._closed:
            self._closed = True
            self._call.cancel()

    close = cancel


def model_info(m: Any) -> ModelInfo:
    return ModelInfo(m.name, m.path, m.max_model_len, m.vocab_size, m.block_size, m.num_blocks, list(m.workers),
                     m.ready)


def pipeline_info(p: Any) -> PipelineInfo:
    import json

    try:
        schema = json.loads(p.params_schema_json) if p.params_schema_json else {}
    except ValueError:
        schema = {"raw": p.params_schema_json}
    return PipelineInfo(p.name, p.description, list(p.models), schema, p.ready)


def session_info(s: Any) -> SessionInfo:
    return SessionInfo(s.session_id, s.pipeline, s.model, s.num_turns, s.num_tokens, s.ttl_s, s.expires_in_s)


def to_dict(msg: Any) -> dict[str, Any]:
    """A message as plain Python: every field present, int64 as int, enums as lower-case names."""
    from google.protobuf.descriptor import FieldDescriptor as F

    def value(fd: Any, v: Any) -> Any:
        if fd.type == F.TYPE_MESSAGE:
            return to_dict(v)
        if fd.type == F.TYPE_ENUM:
            name = fd.enum_type.values_by_number[v].name if v in fd.enum_type.values_by_number else str(v)
            prefix = "".join("_" + c if c.isupper() else c for c in fd.enum_type.name).lstrip("_").upper() + "_"
            return name.removeprefix(prefix).lower()
        return v

    out: dict[str, Any] = {}
    for fd in msg.DESCRIPTOR.fields:
        v = getattr(msg, fd.name)
        if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
            vf = fd.message_type.fields_by_name["value"]
            out[fd.name] = {k: value(vf, x) for k, x in v.items()}
        elif fd.is_repeated:
            out[fd.name] = [value(fd, x) for x in v]
        else:
            out[fd.name] = value(fd, v)
    return out
