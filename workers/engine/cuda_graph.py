"""Decode steps captured in CUDA graphs at bucketed batch sizes."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from kernels.metadata import AttentionMetadata

if TYPE_CHECKING:
    from workers.engine.model_runner import ModelRunner
    from workers.engine.scheduler import ScheduledSeq

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256)


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

    def fits(self, batch: int) -> bool:
        return batch <= self.buckets[-1]

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
        n = len(batch)
        b = next(x for x in self.buckets if x >= n)
        bs = self.runner.block_size
        ids, pos, slots, lens = [], [], [], []
        table_np = self._table.numpy()
        for i, s in enumerate(batch):
            p = s.start
            ids.append(s.seq.token_ids[p])
            pos.append(p)
            table = s.seq.block_table
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
