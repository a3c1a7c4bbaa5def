"""AttentionMetadata: where one engine step's tokens live in the paged KV cache."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class ExtendSeq:
    """A sequence whose step has several new tokens (a prefill chunk or a catch-up)."""

    q_start: int
    q_len: int
    ctx_len: int
    slots: torch.Tensor


@dataclass
class AttentionMetadata:
    """Shared by every layer of one step.

    Tokens are flattened: the decode rows (one new token each) come first, then the extend
    sequences. `slot_mapping[i]` is the cache slot that token i's K/V are written to.
    """

    slot_mapping: torch.Tensor
    positions: torch.Tensor
    num_decode: int
    decode_slots: torch.Tensor
    decode_ctx_lens: torch.Tensor
    extends: list[ExtendSeq]
    _masks: dict = field(default_factory=dict, repr=False)

    def decode_mask(self, window: int | None) -> torch.Tensor:
        key = ("decode", window)
        if key not in self._masks:
            n_keys = self.decode_slots.shape[1]
            j = torch.arange(n_keys, device=self.decode_slots.device)
            q = (self.decode_ctx_lens - 1)[:, None]
            mask = j[None, :] <= q
            if window is not None:
                mask &= j[None, :] > q - window
            self._masks[key] = mask[:, None, None, :]
        return self._masks[key]

    def extend_mask(self, i: int, window: int | None) -> torch.Tensor | None:
        key = (i, window)
        if key not in self._masks:
            e = self.extends[i]
            q = torch.arange(e.ctx_len - e.q_len, e.ctx_len, device=e.slots.device)[:, None]
            j = torch.arange(e.ctx_len, device=e.slots.device)[None, :]
            mask = j <= q
            if window is not None:
                mask &= j > q - window
            self._masks[key] = mask[None]
        return self._masks[key]


def build_metadata(
    block_tables: list[list[int]],
    starts: list[int],
    lens: list[int],
    block_size: int,
    device: torch.device,
) -> AttentionMetadata:
    """`starts[i]` tokens of sequence i are already cached; `lens[i]` new ones follow.

    Sequences with one new token must come before the others.
    """
    n = len(lens)
    num_decode = 0
    while num_decode < n and lens[num_decode] == 1:
        num_decode += 1
    assert all(length > 1 for length in lens[num_decode:]), "decode rows must come first"
    positions = torch.cat([torch.arange(s, s + m) for s, m in zip(starts, lens)]) if n else torch.empty(0, dtype=torch.long)
    max_blocks = max((len(t) for t in block_tables), default=0)
    table = torch.zeros((n, max(max_blocks, 1)), dtype=torch.long)
    for i, t in enumerate(block_tables):
        table[i, : len(t)] = torch.tensor(t, dtype=torch.long)
    seq_index = torch.repeat_interleave(torch.arange(n), torch.tensor(lens, dtype=torch.long))
    slot_mapping = table[seq_index, positions // block_size] * block_size + positions % block_size

    offsets = torch.arange(block_size)
    ctx = [s + m for s, m in zip(starts, lens)]
    if num_decode:
        n_keys = max(ctx[:num_decode])
        d_table = table[:num_decode, : -(-n_keys // block_size)]
        decode_slots = (d_table[:, :, None] * block_size + offsets).reshape(num_decode, -1)[:, :n_keys]
    else:
        decode_slots = torch.zeros((0, 1), dtype=torch.long)
    extends = []
    q_start = num_decode
    for i in range(num_decode, n):
        nb = -(-ctx[i] // block_size)
        slots = (table[i, :nb, None] * block_size + offsets).reshape(-1)[: ctx[i]]
        extends.append(ExtendSeq(q_start, lens[i], ctx[i], slots.to(device)))
        q_start += lens[i]
    return AttentionMetadata(
        slot_mapping=slot_mapping.to(device),
        positions=positions.to(device),
        num_decode=num_decode,
        decode_slots=decode_slots.to(device),
        decode_ctx_lens=torch.tensor(ctx[:num_decode], dtype=torch.long, device=device),
        extends=extends,
    )
