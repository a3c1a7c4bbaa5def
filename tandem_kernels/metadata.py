"""AttentionMetadata: where one engine step's tokens live in the paged KV cache."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class AttentionMetadata:
    """Shared by every layer of one step; all tensors, so a CUDA graph can capture it.

    Tokens are flattened: the `num_decode` decode rows (one new token each) come first, then the
    extend sequences (prefill chunks, catch-ups) at rows `num_decode + cu_q[i] : num_decode + cu_q[i+1]`.
    `seq_lens[i]` counts sequence i's tokens including the new ones; `slot_mapping[t]` is where
    token t's K/V are written (-1: padding, skipped).
    """

    slot_mapping: torch.Tensor
    positions: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    num_decode: int
    cu_q: torch.Tensor
    max_q_len: int
    page_size: int
    num_splits: int = 1
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def num_extend(self) -> int:
        return self.seq_lens.shape[0] - self.num_decode

    def host(self, name: str) -> list[int]:
        """Host copies for the CPU reference path (never used under a CUDA graph)."""
        if name not in self._cache:
            self._cache[name] = getattr(self, name).tolist()
        return self._cache[name]

    def memo(self, key, make):
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]


def build_metadata(
    block_tables: list[list[int]],
    starts: list[int],
    lens: list[int],
    block_size: int,
    device: torch.device,
    num_splits: int = 1,
) -> AttentionMetadata:
    """`starts[i]` tokens of sequence i are already cached; `lens[i]` new ones follow.
    Sequences with one new token must come before the others."""
    n = len(lens)
    num_decode = 0
    while num_decode < n and lens[num_decode] == 1:
        num_decode += 1
    assert all(length > 1 for length in lens[num_decode:]), "decode rows must come first"
    positions = [p for s, m in zip(starts, lens) for p in range(s, s + m)]
    max_blocks = max((len(t) for t in block_tables), default=1) or 1
    table = [t + [0] * (max_blocks - len(t)) for t in block_tables]
    slots = [table[i][p // block_size] * block_size + p % block_size
             for i, (s, m) in enumerate(zip(starts, lens)) for p in range(s, s + m)]
    cu = [0]
    for m in lens[num_decode:]:
        cu.append(cu[-1] + m)
    as_tensor = lambda x: torch.tensor(x, dtype=torch.int32).to(device, non_blocking=True)  # noqa: E731
    return AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.long).to(device, non_blocking=True),
        positions=torch.tensor(positions, dtype=torch.long).to(device, non_blocking=True),
        block_tables=as_tensor(table if table else [[0]]),
        seq_lens=as_tensor([s + m for s, m in zip(starts, lens)]),
        num_decode=num_decode,
        cu_q=as_tensor(cu),
        max_q_len=max(lens[num_decode:], default=0),
        page_size=block_size,
        num_splits=num_splits,
    )
