"""Decode steps captured in CUDA graphs at bucketed batch sizes."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from kernels.metadata import AttentionMetadata

if TYPE_CHECKING:
    from workers.engine.model_runner import ModelRunner
    from workers.engine.scheduler import ScheduledSeq

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256)
MAX_EXTEND_ROWS = 32
MAX_EXTEND_KV_READS = 1 << 16


class DecodeGraphs:
    """Static input buffers shared by every bucket; a batch is padded up to the next bucket
    (padding rows write no KV and attend to nothing)."""

    def __init__(self, runner: ModelRunner, max_batch: int | None = None):
        self.runner = runner
        self.buckets = [b for b in BUCKETS if b <= (max_batch or runner.config.max_graph_batch)]
        n = self.buckets[-1]
        dev = runner.device
        self.max_blocks = -(-runner.max_model_len // runner.block_size)
        self.input_ids = torch.zeros(n, dtype=torch.long, device=dev)
        self.positions = torch.zeros(n, dtype=torch.long, device=dev)
        self.slots = torch.full((n,), -1, dtype=torch.long, device=dev)
        self.block_tables = torch.zeros((n, self.max_blocks), dtype=torch.int32, device=dev)
        self.seq_lens = torch.zeros(n, dtype=torch.int32, device=dev)
        self.cu_q = torch.zeros(1, dtype=torch.int32, device=dev)
        self.hidden = torch.zeros((n, runner.spec.hidden_size), dtype=runner.dtype, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.pool = None
        self._table = torch.zeros((n, self.max_blocks), dtype=torch.int32, pin_memory=True)
        self._host = torch.zeros((4, n), dtype=torch.long, pin_memory=True)
        self._rows: list[tuple[list | None, int]] = [(None, 0)] * n  # block-table list last written per row
        for b in reversed(self.buckets):
            self._capture(b)

    def fits(self, batch: list[ScheduledSeq]) -> bool:
        """Decode rows, and short extends counted one row per token."""
        extends = [s for s in batch if s.num_new > 1]
        return (all(s.num_new <= MAX_EXTEND_ROWS for s in extends)
                and sum(s.num_new * (s.start + s.num_new) for s in extends) <= MAX_EXTEND_KV_READS
                and sum(s.num_new for s in batch) <= self.buckets[-1])

    def _meta(self, b: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slots[:b], positions=self.positions[:b], block_tables=self.block_tables[:b],
            seq_lens=self.seq_lens[:b], num_decode=b, cu_q=self.cu_q, max_q_len=0,
            page_size=self.runner.block_size, num_splits=self.runner.num_splits(b),
        )

    @torch.inference_mode()
    def _capture(self, b: int) -> None:
        fb = self.runner.forward_batch(self._meta(b))
        model = self.runner.model
        for _ in range(2):
            self.hidden[:b] = model(self.input_ids[:b], fb)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            self.hidden[:b] = model(self.input_ids[:b], fb)
        self.pool = graph.pool()
        self.graphs[b] = graph

    @torch.inference_mode()
    def run(self, batch: list[ScheduledSeq]) -> torch.Tensor:
        """One row per new token. A sequence with several new tokens (a short catch-up extend) becomes
        one decode row per token, each attending up to its own position: every row's K/V is stored
        before any row attends, so the rows see exactly the causal prefix."""
        rows = [(s.seq, p) for s in batch for p in range(s.start, s.start + s.num_new)]
        n = len(rows)
        b = next(x for x in self.buckets if x >= n)
        bs = self.runner.block_size
        ids, pos, slots, lens = [], [], [], []
        table_np = self._table.numpy()
        for i, (seq, p) in enumerate(rows):
            ids.append(seq.token_ids[p])
            pos.append(p)
            table = seq.block_table
            slots.append(table[p // bs] * bs + p % bs)
            lens.append(p + 1)
            owner, written = self._rows[i]
            if owner is not table:
                written = 0
            if written < len(table):
                table_np[i, written : len(table)] = table[written:]
                self._rows[i] = (table, len(table))
        pad = b - n
        self._host[:, :b] = torch.tensor([ids + [0] * pad, pos + [0] * pad, slots + [-1] * pad, lens + [0] * pad])
        self.input_ids[:b].copy_(self._host[0, :b], non_blocking=True)
        self.positions[:b].copy_(self._host[1, :b], non_blocking=True)
        self.slots[:b].copy_(self._host[2, :b], non_blocking=True)
        self.seq_lens[:b].copy_(self._host[3, :b], non_blocking=True)
        self.block_tables[:b].copy_(self._table[:b], non_blocking=True)
        self.graphs[b].replay()
        return self.hidden[:n]
