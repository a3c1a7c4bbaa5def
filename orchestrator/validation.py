"""Checks of client requests that need no worker; every error names its field (as in the .proto)."""
from __future__ import annotations

import math

from tandem.errors import InvalidRequestError as Bad
from tandem.v1 import orchestrator_pb2 as pb

ROLES = ("system", "user", "assistant", "tool")
MAX_ID_LEN = 256


def check_id(value: str, field: str) -> None:
    if len(value) > MAX_ID_LEN:
        raise Bad(field, f"is longer than {MAX_ID_LEN} characters")
    if any(not c.isprintable() for c in value):
        raise Bad(field, "must be printable characters")


def check_generate(r: pb.GenerateRequest, vocab_size: int | None = None) -> None:
    check_id(r.request_id, "request_id")
    check_id(r.session_id, "session_id")
    which = r.WhichOneof("input")
    if which is None:
        raise Bad("input", "one of text, messages or token_ids is required")
    if which == "text" and not r.text:
        raise Bad("text", "is empty")
    if which == "messages":
        check_messages(r.messages.messages, "messages.messages")
    if which == "token_ids":
        check_token_ids(list(r.token_ids.ids), "token_ids.ids", vocab_size)
    if r.priority not in pb.Priority.values():
        raise Bad("priority", f"{r.priority} is not a Priority value {list(pb.Priority.values())}")
    check_sampling(r.sampling, vocab_size)


def check_messages(messages, field: str) -> None:
    if not messages:
        raise Bad(field, "is empty")
    for i, m in enumerate(messages):
        if m.role not in ROLES:
            raise Bad(f"{field}[{i}].role", f"{m.role!r} is not one of {ROLES}")


def check_token_ids(ids: list[int], field: str, vocab_size: int | None) -> None:
    if not ids:
        raise Bad(field, "is empty")
    bad = [t for t in ids if t < 0 or (vocab_size is not None and t >= vocab_size)]
    if bad:
        raise Bad(field, f"ids {bad[:5]} are outside the vocabulary [0, {vocab_size})")


def check_sampling(p: pb.SamplingParams, vocab_size: int | None) -> None:
    f = "sampling."
    if p.HasField("max_tokens") and p.max_tokens <= 0:
        raise Bad(f + "max_tokens", f"must be a positive integer, got {p.max_tokens}")
    if p.HasField("temperature") and not (math.isfinite(p.temperature) and p.temperature >= 0):
        raise Bad(f + "temperature", f"must be a finite number >= 0, got {p.temperature}")
    if p.HasField("top_k") and p.top_k < 0:
        raise Bad(f + "top_k", f"must be >= 0 (0 disables it), got {p.top_k}")
    if p.HasField("top_p") and not 0 < p.top_p <= 1:
        raise Bad(f + "top_p", f"must be in (0, 1], got {p.top_p}")
    if p.HasField("seed") and p.seed < 0:
        raise Bad(f + "seed", f"must be a non-negative 64-bit integer, got {p.seed}")
    if p.HasField("logprobs") and not 0 <= p.logprobs <= 20:
        raise Bad(f + "logprobs", f"must be between 0 and 20, got {p.logprobs}")
    for i, s in enumerate(p.stop):
        if not s:
            raise Bad(f"{f}stop[{i}]", "stop strings must be non-empty")
    bad = [t for t in p.stop_token_ids if t < 0 or (vocab_size is not None and t >= vocab_size)]
    if bad:
        raise Bad(f + "stop_token_ids", f"ids {bad[:5]} are outside the vocabulary [0, {vocab_size})")
