"""What the engine hands back: one StepOutput per request per step, and whole results."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


@dataclass(slots=True)
class StepOutput:
    request_id: str
    model: str
    new_token_ids: list[int] = field(default_factory=list)
    text_delta: str = ""
    sources: list[str] = field(default_factory=list)
    logprobs: list[dict] = field(default_factory=list)
    finished: bool = False
    finish_reason: str | None = None
    ready: bool = False
    usage: Usage | None = None
    timings: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    proposed: bool = False
    handoff: list[int] | None = None
    stats: dict[str, float] = field(default_factory=dict)


@dataclass
class KVSlice:
    """K and V of tokens `[start, start + n)` for layers `layers`, each `[len(layers), n, kv_heads, head_dim]`."""

    layers: range
    start: int
    k: object
    v: object

    @property
    def num_tokens(self) -> int:
        return self.k.shape[1]


@dataclass
class RequestOutput:
    request_id: str
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    logprobs: list[dict] = field(default_factory=list)
    finish_reason: str | None = None
    usage: Usage | None = None
    timings: dict[str, float] = field(default_factory=dict)
    stats: dict[str, float] = field(default_factory=dict)
    error: str | None = None

    def add(self, out: StepOutput) -> None:
        self.text += out.text_delta
        self.token_ids += out.new_token_ids
        self.sources += out.sources
        self.logprobs += out.logprobs
        if out.finished:
            self.finish_reason, self.usage, self.timings = out.finish_reason, out.usage, out.timings
            self.stats, self.error = out.stats, out.error
