"""Continuous batching for one model: decode first, then chunked prefill under a token budget."""
from __future__ import annotations

from dataclasses import dataclass

from workers.engine.block_manager import BlockManager
from workers.engine.sequence import Priority, Sequence, Status


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new: int

    @property
    def start(self) -> int:
        return self.seq.num_computed


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_batched_tokens: int, max_num_seqs: int):
        self.bm = block_manager
        self.max_tokens = max_num_batched_tokens
        self.max_seqs = max_num_seqs
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self.paused: list[Sequence] = []

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running) + len(self.paused)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting) or any(s.num_uncomputed for s in self.running)

    def add(self, seq: Sequence, paused: bool = False) -> None:
        """Queue `seq`; with `paused` it waits for `resume` first."""
        seq.status = Status.PAUSED if paused else Status.WAITING
        (self.paused if paused else self.waiting).append(seq)

    def schedule(self) -> list[ScheduledSeq]:
        budget = self.max_tokens
        decode: list[ScheduledSeq] = []
        extend: list[ScheduledSeq] = []
        self.running.sort(key=Sequence.sort_key)
        block_size = self.bm.block_size
        for seq in list(self.running):
            if not budget:
                break
            uncomputed = len(seq.token_ids) - seq.num_computed
            if not uncomputed or seq.status is not Status.RUNNING:
                continue
            n = min(uncomputed, budget)
            if seq.num_computed + n > len(seq.block_table) * block_size:
                while not self.bm.ensure(seq, seq.num_computed + n):
                    victim = self._victim(exclude=seq, scheduled=decode + extend)
                    if victim is None:
                        self.preempt(seq)
                        break
                    self.preempt(victim)
            if seq.status is Status.RUNNING:
                (decode if n == 1 else extend).append(ScheduledSeq(seq, n))
                budget -= n
        self.waiting.sort(key=Sequence.sort_key)
        while self.waiting and budget and len(self.running) < self.max_seqs:
            seq = self.waiting[0]
            if not seq.block_table:
                self.bm.match_prefix(seq)
            n = min(seq.num_uncomputed, budget)
            if not self.bm.ensure(seq, seq.num_computed + n):
                self.bm.release(seq)
                break
            self.waiting.pop(0)
            seq.status = Status.RUNNING
            self.running.append(seq)
            (decode if n == 1 else extend).append(ScheduledSeq(seq, n))
            budget -= n
        return decode + extend

    def _victim(self, exclude: Sequence, scheduled: list[ScheduledSeq]) -> Sequence | None:
        taken = {s.seq for s in scheduled}
        candidates = [s for s in self.running + self.paused if s is not exclude and s not in taken and s.block_table]
        lower = [s for s in candidates if s.sort_key() > exclude.sort_key()]
        return max(lower, key=Sequence.sort_key) if lower else None

    def preempt(self, seq: Sequence) -> None:
        """Give back the sequence's blocks; it is recomputed from its tokens when it runs again.
        A paused sequence stays paused."""
        self.bm.release(seq)
        seq.num_preemptions += 1
        if seq in self.running:
            self.running.remove(seq)
            seq.status = Status.WAITING
            self.waiting.append(seq)

    def pause(self, seq: Sequence) -> None:
        for queue in (self.running, self.waiting):
            if seq in queue:
                queue.remove(seq)
                self.paused.append(seq)
        seq.status = Status.PAUSED

    def resume(self, seq: Sequence) -> None:
        if seq not in self.paused:
            return
        self.paused.remove(seq)
        if seq.block_table:
            self.running.append(seq)
            seq.status = Status.RUNNING
        else:
            self.add(seq)

    def remove(self, seq: Sequence) -> None:
        for queue in (self.waiting, self.running, self.paused):
            if seq in queue:
                queue.remove(seq)
        self.bm.release(seq)


__all__ = ["Priority", "ScheduledSeq", "Scheduler"]
