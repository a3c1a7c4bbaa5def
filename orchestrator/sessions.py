"""Chat sessions: the conversation's exact token history, so each turn's prompt shares the earlier turns'
prefix (and their KV blocks, through the worker's prefix cache); idle sessions expire."""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

import grpc

from tandem.status import StatusError, not_found
from orchestrator.pipelines import Params
from tandem.v1 import orchestrator_pb2 as pb


@dataclass(eq=False)
class Session:
    session_id: str
    pipeline: str
    params: Params
    model: str
    ttl_s: float
    messages: list[dict[str, str]] = field(default_factory=list)  # rendered conversation so far
    token_ids: list[int] = field(default_factory=list)            # prompt + answer tokens of all turns
    turns: int = 0
    busy: bool = False
    last_used: float = field(default_factory=time.monotonic)

    def touch(self) -> None:
        self.last_used = time.monotonic()

    def expired(self, now: float) -> bool:
        return not self.busy and now - self.last_used > self.ttl_s

    def commit(self, new_messages: list[dict[str, str]], prompt: list[int], answer_ids: list[int], answer: str) -> None:
        self.messages += new_messages + [{"role": "assistant", "content": answer}]
        self.token_ids = prompt + answer_ids
        self.turns += 1

    def to_proto(self) -> pb.Session:
        return pb.Session(session_id=self.session_id, pipeline=self.pipeline, model=self.model, num_turns=self.turns,
                          num_tokens=len(self.token_ids), ttl_s=self.ttl_s,
                          expires_in_s=max(0.0, self.ttl_s - (time.monotonic() - self.last_used)))


class SessionStore:
    def __init__(self, default_ttl_s: float, max_sessions: int):
        self.default_ttl_s = default_ttl_s
        self.max_sessions = max_sessions
        self.sessions: dict[str, Session] = {}

    def create(self, session_id: str, pipeline: str, params: Params, model: str, ttl_s: float,
               system_prompt: str) -> Session:
        self.sweep()
        session_id = session_id or f"s-{uuid.uuid4().hex[:16]}"
        if session_id in self.sessions:
            raise StatusError(grpc.StatusCode.ALREADY_EXISTS, f"session_id: {session_id!r} already exists")
        if len(self.sessions) >= self.max_sessions:
            raise StatusError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"too many sessions ({self.max_sessions})")
        session = Session(session_id, pipeline, params, model, ttl_s or self.default_ttl_s)
        if system_prompt:
            session.messages.append({"role": "system", "content": system_prompt})
        self.sessions[session_id] = session
        return session

    def get(self, session_id: str) -> Session:
        session = self.sessions.get(session_id)
        if session is None or session.expired(time.monotonic()):
            self.sessions.pop(session_id, None)
            raise not_found(f"session_id: no session {session_id!r} (closed, expired or never created)")
        session.touch()
        return session

    def close(self, session_id: str) -> bool:
        return self.sessions.pop(session_id, None) is not None

    def sweep(self) -> int:
        now = time.monotonic()
        gone = [sid for sid, s in self.sessions.items() if s.expired(now)]
        for sid in gone:
            del self.sessions[sid]
        return len(gone)
