"""The paged KV block pool of one model: allocation, exact free accounting, prefix caching."""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from workers.engine.sequence import Sequence


@dataclass(eq=False)
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None
    token_ids: tuple[int, ...] = field(default_factory=tuple)


class BlockManager:
    """Blocks with `ref_count == 0` sit in `free`, oldest first; a freed full block keeps its hash
    until it is reused, so a later request with the same prefix finds it (a prefix-cache hit)."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        assert num_blocks > 0 and block_size > 0
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[int, int] = {}
        self.hit_tokens = 0
        self.queried_tokens = 0

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _chunk(self, seq: Sequence, i: int) -> tuple[int, ...]:
        return tuple(seq.token_ids[i * self.block_size : (i + 1) * self.block_size])

    def _chain(self, seq: Sequence, num_blocks: int) -> int:
        h = hash(("tandem", seq.cache_salt))
        for i in range(num_blocks):
            h = hash((h, self._chunk(seq, i)))
        return h

    def match_prefix(self, seq: Sequence) -> None:
        """For a sequence with no blocks yet: reuse cached blocks of its longest cached prefix.
        At least one token is left to compute, so the step has logits to sample from."""
        assert not seq.block_table and seq.num_computed == 0
        self.queried_tokens += seq.num_tokens
        if not self.enable_prefix_caching:
            return
        num_full = (seq.num_tokens - 1) // self.block_size
        h = self._chain(seq, 0)
        for i in range(num_full):
            chunk = self._chunk(seq, i)
            h_next = hash((h, chunk))
            block_id = self.cached.get(h_next)
            if block_id is None or self.blocks[block_id].token_ids != chunk:
                break
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free[block_id]
            block.ref_count += 1
            seq.block_table.append(block_id)
            h = h_next
        seq.num_committed_blocks, seq.block_hash = len(seq.block_table), h
        seq.num_computed = len(seq.block_table) * self.block_size
        seq.num_cached_tokens = seq.num_computed
        self.hit_tokens += seq.num_computed

    def ensure(self, seq: Sequence, num_tokens: int) -> bool:
        """Give `seq` blocks for its first `num_tokens` tokens; False (and no change) if the pool is short."""
        need = self.blocks_needed(num_tokens) - len(seq.block_table)
        if need <= 0:
            return True
        if need > self.num_free:
            return False
        for _ in range(need):
            seq.block_table.append(self._take())
        return True

    def _take(self) -> int:
        block_id, _ = self.free.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None and self.cached.get(block.hash) == block_id:
            del self.cached[block.hash]
        block.hash, block.token_ids, block.ref_count = None, (), 1
        return block_id

    def commit(self, seq: Sequence) -> None:
        """Register the sequence's newly computed full blocks in the prefix cache (incremental:
        each block is hashed once, chained on the hash of the blocks before it). A sequence with imported
        K/V registers none: its entries are not what its tokens alone compute."""
        if not self.enable_prefix_caching or seq.has_imported_kv:
            return
        num_full = min(seq.num_computed, seq.num_tokens) // self.block_size
        if num_full <= seq.num_committed_blocks:
            return
        h = seq.block_hash if seq.block_hash is not None else self._chain(seq, seq.num_committed_blocks)
        for i in range(seq.num_committed_blocks, num_full):
            chunk = self._chunk(seq, i)
            h = hash((h, chunk))
            block = self.blocks[seq.block_table[i]]
            if block.hash is None:
                block.hash, block.token_ids = h, chunk
                self.cached.setdefault(h, block.block_id)
        seq.num_committed_blocks, seq.block_hash = num_full, h

    def invalidate_from(self, seq: Sequence, token_index: int) -> None:
        """KV from `token_index` on was overwritten: its blocks may no longer serve as cached prefixes."""
        first = token_index // self.block_size
        for block_id in seq.block_table[first:]:
            block = self.blocks[block_id]
            if block.hash is not None and self.cached.get(block.hash) == block_id:
                del self.cached[block.hash]
            block.hash, block.token_ids = None, ()
        if seq.num_committed_blocks > first:
            seq.num_committed_blocks, seq.block_hash = first, None

    def release(self, seq: Sequence) -> None:
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            assert block.ref_count > 0
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free[block_id] = None
        seq.block_table = []
        seq.num_computed = 0
        seq.num_committed_blocks, seq.block_hash = 0, None

    def slots(self, seq: Sequence, start: int, end: int) -> torch.Tensor:
        """The KV slots of positions [start, end), as a long tensor on the CPU."""
        positions = torch.arange(start, end)
        table = torch.tensor(seq.block_table, dtype=torch.long)
        return table[positions // self.block_size] * self.block_size + positions % self.block_size
