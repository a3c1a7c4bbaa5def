"""A Sequence: one request's tokens, its place in the KV pool and its output so far."""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from enum import Enum, IntEnum

import torch

from workers.engine.sampling_params import SamplingParams


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PAUSED = "paused"
    FINISHED = "finished"


class Priority(IntEnum):
    NORMAL = 0
    BACKGROUND = 1


_arrivals = itertools.count()


@dataclass(eq=False)
class Sequence:
    """`held`: a policy dropped its sampled token; it waits, paused, for `Engine.inject` (or `extend`) to give
    it tokens. `has_imported_kv`: K/V written from elsewhere, so none of its blocks enters the prefix cache."""

    request_id: str
    model: str
    token_ids: list[int]
    params: SamplingParams
    priority: Priority = Priority.NORMAL
    sample_on_complete: bool = True
    cache_salt: str = ""
    status: Status = Status.WAITING
    num_computed: int = 0
    num_cached_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    num_committed_blocks: int = 0
    block_hash: int | None = None
    output_token_ids: list[int] = field(default_factory=list)
    output_sources: list[str] = field(default_factory=list)
    output_logprobs: list[dict] = field(default_factory=list)
    generator: torch.Generator | None = None
    finish_reason: str | None = None
    max_len: int = 0
    text: str = ""
    num_preemptions: int = 0
    detokenizer: object = None
    emitted_chars: int = 0
    arrival: int = field(default_factory=lambda: next(_arrivals))
    arrival_time: float = field(default_factory=time.monotonic)
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finish_time: float | None = None
    propose_only: bool = False
    vocab_limit: int = 0
    held: bool = False
    has_imported_kv: bool = False
    stats: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.num_prompt_tokens = len(self.token_ids)
        self.stop_hold = max((len(s) for s in self.params.stop), default=1) - 1
        self.stop_ids: frozenset[int] = frozenset(self.params.stop_token_ids)

    def set_eos(self, eos_ids: list[int]) -> None:
        if not self.params.ignore_eos:
            self.stop_ids = self.stop_ids | frozenset(eos_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed

    @property
    def num_output(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED

    def sort_key(self) -> tuple[int, int]:
        return (int(self.priority), self.arrival)
