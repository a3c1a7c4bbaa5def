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


@triton.jit
def _rope_store_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, pos_ptr, slot_ptr, kc_ptr, vc_ptr,
                       stride_q, stride_k, stride_v, stride_c, QH: tl.constexpr, KH: tl.constexpr,
                       D: tl.constexpr, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    c = tl.arange(0, BLOCK_HALF)
    mask = c < HALF
    cos = tl.load(cos_ptr + pos * stride_c + c, mask=mask, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + pos * stride_c + c, mask=mask, other=0.0).to(tl.float32)
    if h < QH:
        base = q_ptr + t * stride_q + h * D
    else:
        base = k_ptr + t * stride_k + (h - QH) * D
    x1 = tl.load(base + c, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(base + HALF + c, mask=mask, other=0.0).to(tl.float32)
    r1 = (x1 * cos - x2 * sin).to(base.dtype.element_ty)
    r2 = (x2 * cos + x1 * sin).to(base.dtype.element_ty)
    tl.store(base + c, r1, mask=mask)
    tl.store(base + HALF + c, r2, mask=mask)
    if h >= QH:
        slot = tl.load(slot_ptr + t).to(tl.int64)
        if slot >= 0:
            j = h - QH
            dst = slot * (KH * D) + j * D
            tl.store(kc_ptr + dst + c, r1, mask=mask)
            tl.store(kc_ptr + dst + HALF + c, r2, mask=mask)
            e = tl.arange(0, BLOCK_D)
            v = tl.load(v_ptr + t * stride_v + j * D + e, mask=e < D)
            tl.store(vc_ptr + dst + e, v, mask=e < D)


def rope_store_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  positions: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor) -> None:
    """One launch for a layer's rotary embedding and KV store: q and k `[T, heads, d]` are rotated in place
    (cos/sin tables `[max_pos, d]` indexed by `positions`), then k and v are written to their slots."""
    t, qh, d = q.shape
    kh = k.shape[1]
    for x in (q, k, v):
        assert x.stride(2) == 1 and x.stride(1) == d
    assert k_cache.is_contiguous() and v_cache.is_contiguous() and cos.stride(1) == 1
    if t == 0:
        return
    _rope_store_kernel[(t, qh + kh)](q, k, v, cos, sin, positions, slots, k_cache, v_cache, q.stride(0),
                                     k.stride(0), v.stride(0), cos.stride(0), QH=qh, KH=kh, D=d, HALF=d // 2,
                                     BLOCK_HALF=triton.next_power_of_2(d // 2), BLOCK_D=triton.next_power_of_2(d))
