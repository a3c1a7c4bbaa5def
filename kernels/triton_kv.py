"""Triton: write new K/V rows into their paged-cache slots (slot -1 is padding and skipped)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _store_kv_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr, stride_k, stride_v,
                     ROW: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0)
    slot = tl.load(slot_ptr + i).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < tl.where(slot >= 0, ROW, 0)
    k = tl.load(k_ptr + i.to(tl.int64) * stride_k + offs, mask=mask)
    v = tl.load(v_ptr + i.to(tl.int64) * stride_v + offs, mask=mask)
    tl.store(kc_ptr + slot * ROW + offs, k, mask=mask)
    tl.store(vc_ptr + slot * ROW + offs, v, mask=mask)


def store_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
    """k, v `[T, kv_heads, d]` (rows may be strided, heads and d contiguous); caches `[blocks, block, kv_heads, d]`."""
    t, heads, d = k.shape
    assert k.stride(2) == 1 and k.stride(1) == d and v.stride(2) == 1 and v.stride(1) == d
    assert k_cache.is_contiguous() and v_cache.is_contiguous()
    if t == 0:
        return
    row = heads * d
    _store_kv_kernel[(t,)](k, v, k_cache, v_cache, slots, k.stride(0), v.stride(0), ROW=row,
                           BLOCK=triton.next_power_of_2(row))
