"""Overlapped decode steps on CUDA: while the GPU runs step n, the host already launches step n+1,
whose input tokens are step n's sampled tokens still on the device; only then does it wait for step
n's tokens and append them. The GPU never idles for the host's scheduling and bookkeeping.

A step is chained when the next one is likely to be the same batch of plain decode rows: greedy sampling
without logprobs, no token policies but deferred ones (`DeferredPolicy`, whose device work is queued at
launch), nothing waiting to be admitted, and room in every sequence's blocks, length and
token budget for one more token. The chained step is a speculation on step n's tokens: a sequence that
stops on the token of step n, or whose token a policy holds back, had one extra token computed in step
n+1; that row is marked stale and dropped (its KV slot is rewritten when the sequence goes on)."""
from __future__ import annotations

import functools
from collections.abc import Hashable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from workers.engine.policy import DeferredPolicy, StepView
from workers.engine.sequence import Sequence, Status

if TYPE_CHECKING:
    from workers.engine.engine import Engine, ResidentModel
    from workers.engine.scheduler import ScheduledSeq


@dataclass
class InFlight:
    """A launched step whose tokens the host has not read yet."""

    batch: list[ScheduledSeq]
    sample_rows: list[int]
    hidden: torch.Tensor
    logits: torch.Tensor
    tokens: torch.Tensor | None = None
    host_tokens: torch.Tensor | None = None    # `tokens` copied to pinned memory, valid once `ready` has passed
    ready: torch.cuda.Event | None = None
    prepared: list[tuple[torch.Tensor, torch.cuda.Event | None] | None] | None = None   # per policy, see `prepare`
    stale: set[int] | None = None              # rows of a chained step whose input token did not stand
    plain: bool | None = None                  # decode rows only, each greedy without logprobs (see `may_defer`)

    def keep(self, tokens: torch.Tensor, copies: HostCopies) -> None:
        """Hold the step's sampled tokens; on CUDA queue their copy to the host now, ahead of the next step's
        work on the stream, so that reading them later waits for this step alone."""
        self.tokens = tokens
        if tokens.is_cuda:
            self.host_tokens, self.ready = copies.send("tokens", tokens)

    def token_list(self) -> list[int]:
        if self.ready is None:
            return self.tokens.tolist()
        self.ready.synchronize()
        return self.host_tokens.tolist()

    def prepare(self, rm: ResidentModel) -> None:
        """Run the deferred policies' device halves on this step's device tokens and send their rows home.
        With the model's `policy_stream` they run on it, beside the next step, which is launched right after
        and needs only the tokens; the hidden state is copied first, as that step's graph rewrites it."""
        side = rm.policy_stream
        if side is None:
            self._prepare(rm, self.hidden)
            return
        hidden = self.hidden.clone()
        side.wait_stream(torch.cuda.current_stream(side.device))
        for t in (hidden, self.logits, self.tokens):
            if t.is_cuda:
                t.record_stream(side)
        with torch.cuda.stream(side):
            self._prepare(rm, hidden)

    def _prepare(self, rm: ResidentModel, hidden: torch.Tensor) -> None:
        view = StepView(rm.name, self.seqs, hidden, self.logits, self.tokens)
        self.prepared = []
        for k, policy in enumerate(rm.policies):
            rows = policy.prepare(view) if isinstance(policy, DeferredPolicy) else None
            self.prepared.append(None if rows is None else rm.host_copies.send(k, rows))

    def prepared_rows(self, k: int) -> torch.Tensor | None:
        if not self.prepared or self.prepared[k] is None:
            return None
        rows, ready = self.prepared[k]
        if ready is not None:
            ready.synchronize()
        return rows

    @functools.cached_property
    def seqs(self) -> list[Sequence]:
        return [self.batch[i].seq for i in self.sample_rows]


def _plain(seq: Sequence) -> bool:
    p = seq.params
    return p.greedy and p.logprobs is None and not seq.propose_only and not seq.vocab_limit


class HostCopies:
    """Pinned host buffers for small per-step tensors (sampled tokens, a policy's scores), two per key used
    in turn: at most two steps are in flight, so a copy never overwrites one the host has not read."""

    def __init__(self):
        self._buffers: dict[Hashable, tuple[list[torch.Tensor], list[torch.cuda.Event]]] = {}
        self._turn: dict[Hashable, int] = {}

    def send(self, key: Hashable, rows: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
        if not rows.is_cuda:
            return rows, None
        bufs = self._buffers.get(key)
        if bufs is None or bufs[0][0].dtype != rows.dtype or bufs[0][0].numel() < rows.numel():
            bufs = ([torch.empty(max(rows.numel(), 256), dtype=rows.dtype, pin_memory=True) for _ in range(2)],
                    [torch.cuda.Event() for _ in range(2)])
            self._buffers[key] = bufs
        turn = self._turn[key] = self._turn.get(key, 0) ^ 1
        home = bufs[0][turn][: rows.numel()].view(rows.shape)
        home.copy_(rows, non_blocking=True)
        bufs[1][turn].record()
        return home, bufs[1][turn]


def may_defer(engine: Engine, rm: ResidentModel, fl: InFlight) -> bool:
    """Whether a just-launched step may stay in flight, so the next engine step can chain onto it."""
    graphs = rm.runner.graphs
    if not (engine.config.overlap and graphs is not None and all(isinstance(p, DeferredPolicy) for p in rm.policies)):
        return False
    if fl.plain is None:                                  # what cannot change while the same batch is chained
        fl.plain = (len(fl.sample_rows) == len(fl.batch) and graphs.fits(fl.batch)
                    and all(s.num_new == 1 and _plain(s.seq) for s in fl.batch))
    return fl.plain and all(s.status is Status.RUNNING for s in fl.seqs)


def chain(engine: Engine, rm: ResidentModel, fl: InFlight) -> InFlight | None:
    """Launch the step after `fl` on its device tokens, or None when it cannot be chained."""
    sched = rm.scheduler
    if (engine._inbox or sched.waiting or len(sched.running) != len(fl.batch) or fl.stale
            or not may_defer(engine, rm, fl)):
        return None
    room = rm.blocks.block_size
    for seq in fl.seqs:
        nxt = len(seq.token_ids) + 1                      # the in-flight token, then the one this step samples
        if nxt >= seq.max_len or len(seq.output_token_ids) + 2 > seq.params.max_tokens:
            return None
        if nxt > len(seq.block_table) * room and not rm.blocks.ensure(seq, nxt):
            return None
    with torch.inference_mode():
        hidden = rm.runner.graphs.run_rows([(s.seq, s.seq.num_tokens) for s in fl.batch], device_ids=fl.tokens)
        logits = rm.runner.model.logits(hidden)
        nxt = InFlight(fl.batch, fl.sample_rows, hidden, logits, plain=True)   # one new token per row again
        nxt.keep(logits.argmax(dim=-1), rm.host_copies)
        if rm.policies:
            nxt.prepare(rm)
    return nxt


def commit_chained(rm: ResidentModel, fl: InFlight) -> None:
    """After the previous step's tokens are appended: the chained step computed each live sequence's last
    token; a sequence that finished or was held is stale in it."""
    fl.stale = set()
    blocks = rm.blocks
    per_block = blocks.block_size if blocks.enable_prefix_caching else 0
    for i, seq in enumerate(fl.seqs):
        if seq.status is Status.RUNNING:
            assert seq.num_computed == len(seq.token_ids) - 1
            seq.num_computed += 1
            if per_block and seq.num_computed // per_block > seq.num_committed_blocks:
                blocks.commit(seq)
        else:
            fl.stale.add(i)
