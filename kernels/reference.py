"""Plain-torch references: the CPU path and the oracle of the Triton kernels."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.metadata import AttentionMetadata


def store_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
    """Write new K/V rows `[T, kv_heads, d]` into caches `[blocks, block_size, kv_heads, d]` at `slots`."""
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slots, k)
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slots, v)


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    window: int | None = None,
) -> torch.Tensor:
    """Causal attention of the step's queries `[T, heads, d]` over each sequence's cached K/V."""
    out = torch.empty_like(q)
    k_flat = k_cache.view(-1, *k_cache.shape[2:])
    v_flat = v_cache.view(-1, *v_cache.shape[2:])
    gqa = q.shape[1] != k_cache.shape[2]
    nd = meta.num_decode
    if nd:
        k = k_flat[meta.decode_slots].transpose(1, 2)
        v = v_flat[meta.decode_slots].transpose(1, 2)
        o = F.scaled_dot_product_attention(
            q[:nd, :, None, :], k, v, attn_mask=meta.decode_mask(window), scale=scale, enable_gqa=gqa
        )
        out[:nd] = o[:, :, 0, :]
    for i, e in enumerate(meta.extends):
        k = k_flat[e.slots].transpose(0, 1)[None]
        v = v_flat[e.slots].transpose(0, 1)[None]
        qs = q[e.q_start : e.q_start + e.q_len].transpose(0, 1)[None]
        o = F.scaled_dot_product_attention(qs, k, v, attn_mask=meta.extend_mask(i, window), scale=scale, enable_gqa=gqa)
        out[e.q_start : e.q_start + e.q_len] = o[0].transpose(0, 1)
    return out
