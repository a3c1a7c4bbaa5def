"""Decode steps captured in CUDA graphs at bucketed batch sizes."""
from __future__ import annotations

import gc
from typing import TYPE_CHECKING

import torch

from tandem_kernels.metadata import AttentionMetadata

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
        self.inputs = torch.zeros((4, n), dtype=torch.long, device=dev)      # ids, positions, slots, lengths:
        self.input_ids, self.positions, self.slots, self.lengths = self.inputs   # one transfer per step
        self.slots.fill_(-1)
        self.block_tables = torch.zeros((n, self.max_blocks), dtype=torch.int32, device=dev)
        self.seq_lens = torch.zeros(n, dtype=torch.int32, device=dev)
        self.cu_q = torch.zeros(1, dtype=torch.int32, device=dev)
        self.hidden = torch.zeros((n, runner.spec.hidden_size), dtype=runner.dtype, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.pool = None
        # A capture stream of our own: torch gives cuBLAS one workspace per (handle, stream) and a graph
        # bakes in the one of the stream it was captured on, so graphs captured on the shared default
        # capture stream must never replay at once (two models on two streams would share split-K space).
        self.capture_stream = torch.cuda.Stream(dev)
        # Two pinned staging buffers, used in turn: an overlapped step (see `overlap`) fills one while the
        # copies out of the other may still be queued behind the step before it.
        self._tables = [torch.zeros((n, self.max_blocks), dtype=torch.int32, pin_memory=True) for _ in range(2)]
        self._hosts = [torch.zeros((4, n), dtype=torch.long, pin_memory=True) for _ in range(2)]
        self._written: list[list[tuple[list | None, int]]] = [[(None, 0)] * n for _ in range(2)]  # table per row
        self._turn = 0
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

    def _forward(self, b: int, fb) -> None:
        self.seq_lens[:b].copy_(self.lengths[:b])
        self.hidden[:b] = self.runner.model(self.input_ids[:b], fb)

    @torch.inference_mode()
    def _capture(self, b: int) -> None:
        fb = self.runner.forward_batch(self._meta(b))
        for _ in range(2):
            self._forward(b, fb)
        torch.cuda.synchronize()
        gc.collect()   # no garbage may be freed inside the capture (a pinned buffer's release records an event)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, stream=self.capture_stream):
            self._forward(b, fb)
        self.pool = graph.pool()
        self.graphs[b] = graph

    def run(self, batch: list[ScheduledSeq]) -> torch.Tensor:
        """One row per new token. A sequence with several new tokens (a short catch-up extend) becomes
        one decode row per token, each attending up to its own position: every row's K/V is stored
        before any row attends, so the rows see exactly the causal prefix."""
        return self.run_rows([(s.seq, p) for s in batch for p in range(s.start, s.start + s.num_new)])

    @torch.inference_mode()
    def run_rows(self, rows: list, device_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Rows `(sequence, position)`; with `device_ids` the rows' input tokens are read from that device
        tensor (tokens sampled by a step the host has not read yet, see `overlap`)."""
        n = len(rows)
        b = next(x for x in self.buckets if x >= n)
        bs = self.runner.block_size
        ids, pos, slots, lens = [], [], [], []
        self._turn ^= 1
        host, table_host, written_rows = self._hosts[self._turn], self._tables[self._turn], self._written[self._turn]
        table_np = table_host.numpy()
        for i, (seq, p) in enumerate(rows):
            ids.append(seq.token_ids[p] if device_ids is None else 0)
            pos.append(p)
            table = seq.block_table
            slots.append(table[p // bs] * bs + p % bs)
            lens.append(p + 1)
            owner, written = written_rows[i]
            if owner is not table:
                written = 0
            if written < len(table):
                table_np[i, written : len(table)] = table[written:]
                written_rows[i] = (table, len(table))
        h = host.numpy()
        h[0, :n], h[1, :n], h[2, :n], h[3, :n] = ids, pos, slots, lens
        h[:, n:b] = 0
        h[2, n:b] = -1                                 # padding rows write no KV
        self.inputs.copy_(host, non_blocking=True)
        self.block_tables[:b].copy_(table_host[:b], non_blocking=True)
        if device_ids is not None:
            self.input_ids[:n].copy_(device_ids)
        self.graphs[b].replay()
        return self.hidden[:n]
