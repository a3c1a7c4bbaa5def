"""Overlapped decode steps on CUDA: while the GPU runs step n, the host already launches step n+1,
whose input tokens are step n's sampled tokens still on the device; only then does it wait for step
n's tokens and append them. The GPU never idles for the host's scheduling and bookkeeping.

A step is chained only when the next one is certain to be the same batch of plain decode rows: greedy
sampling without logprobs, no token policies or step hooks, nothing waiting to be admitted, and room
in every sequence's blocks, length and token budget for one more token. A sequence that stops on the
token of step n had one extra token computed in step n+1, which is dropped."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

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

    def keep(self, tokens: torch.Tensor, graphs) -> None:
        """Hold the step's sampled tokens; on CUDA queue their copy to the host now, ahead of the next step's
        work on the stream, so that reading them later waits for this step alone."""
        self.tokens = tokens
        if tokens.is_cuda:
            self.host_tokens, self.ready = graphs.send_home(tokens)

    def token_list(self) -> list[int]:
        self.ready.synchronize()
        return self.host_tokens.tolist()

    @property
    def seqs(self) -> list[Sequence]:
        return [self.batch[i].seq for i in self.sample_rows]


def _plain(seq: Sequence) -> bool:
    p = seq.params
    return (p.greedy and p.logprobs is None and not seq.propose_only and not seq.vocab_limit
            and seq.status is Status.RUNNING and not seq.is_finished)


def may_defer(engine: Engine, rm: ResidentModel, fl: InFlight) -> bool:
    """Whether a just-launched step may stay in flight, so the next engine step can chain onto it."""
    graphs = rm.runner.graphs
    return (engine.config.overlap and graphs is not None and not rm.policies and not engine.step_hooks
            and len(fl.sample_rows) == len(fl.batch) and all(s.num_new == 1 for s in fl.batch)
            and graphs.fits(fl.batch) and all(_plain(s) for s in fl.seqs))


def chain(engine: Engine, rm: ResidentModel, fl: InFlight) -> InFlight | None:
    """Launch the step after `fl` on its device tokens, or None when it cannot be chained."""
    sched = rm.scheduler
    if engine._inbox or sched.waiting or len(sched.running) != len(fl.batch) or not may_defer(engine, rm, fl):
        return None
    for seq in fl.seqs:
        nxt = seq.num_tokens + 1                          # the in-flight token, then the one this step samples
        if nxt >= seq.max_len or seq.num_output + 2 > seq.params.max_tokens or not rm.blocks.ensure(seq, nxt):
            return None
    from workers.engine.scheduler import ScheduledSeq

    with torch.inference_mode():
        hidden = rm.runner.graphs.run_rows([(s.seq, s.seq.num_tokens) for s in fl.batch], device_ids=fl.tokens)
        logits = rm.runner.model.logits(hidden)
        nxt = InFlight([ScheduledSeq(s.seq, 1) for s in fl.batch], fl.sample_rows, hidden, logits)
        nxt.keep(logits.argmax(dim=-1), rm.runner.graphs)
    return nxt


def commit_chained(rm: ResidentModel, fl: InFlight) -> None:
    """After the previous step's tokens are appended: the chained step computed each live sequence's last token."""
    for seq in fl.seqs:
        if not seq.is_finished and seq.status is Status.RUNNING:
            assert seq.num_computed == seq.num_tokens - 1
            seq.num_computed += 1
            rm.blocks.commit(seq)
