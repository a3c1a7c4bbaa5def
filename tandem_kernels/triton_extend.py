"""Triton: causal attention of a ragged batch of new tokens over each sequence's paged KV
(the cached prefix and the new tokens, which `store_kv` has already written)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from tandem_kernels.triton_tile import LOG2E, attend_tile


@triton.jit
def _extend_kernel(
    q_ptr, o_ptr, kc_ptr, vc_ptr, bt_ptr, cu_ptr, len_ptr, pos_ptr,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_bt, scale, window,
    KV_HEADS: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_POS: tl.constexpr,
    PRECISION: tl.constexpr,
):
    s = tl.program_id(0)
    h = tl.program_id(1)
    mb = tl.program_id(2)
    q_start = tl.load(cu_ptr + s)
    q_len = tl.load(cu_ptr + s + 1) - q_start
    if mb * BLOCK_M >= q_len:
        return
    ctx = tl.load(len_ptr + s)
    kvh = h // GROUP
    rows = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    r_mask = rows < q_len
    q_pos = ctx - q_len + rows
    d = tl.arange(0, D)
    q = tl.load(q_ptr + (q_start + rows)[:, None].to(tl.int64) * stride_qt + h * stride_qh + d[None, :],
                mask=r_mask[:, None], other=0.0)

    hi = tl.minimum(ctx, ctx - q_len + (mb + 1) * BLOCK_M)
    lo = 0
    if HAS_WINDOW and not HAS_POS:
        lo = tl.maximum(ctx - q_len + mb * BLOCK_M - window + 1, 0) // BLOCK_N * BLOCK_N
    if HAS_POS:
        hi = ctx

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    bt_row = bt_ptr + s * stride_bt
    if not HAS_WINDOW and not HAS_POS:
        # tiles wholly before the block's first query are visible to every row: no mask
        whole = tl.minimum(ctx - q_len + mb * BLOCK_M + 1, hi) // BLOCK_N * BLOCK_N
        for n0 in range(0, whole, BLOCK_N):
            m_i, l_i, acc = attend_tile(q, q_pos, m_i, l_i, acc, n0, hi, kc_ptr, vc_ptr, bt_row, pos_ptr, kvh, scale,
                                        window, KV_HEADS, D, PAGE, BLOCK_N, False, False, PRECISION, False)
        lo = whole
    for n0 in range(lo, hi, BLOCK_N):
        m_i, l_i, acc = attend_tile(q, q_pos, m_i, l_i, acc, n0, hi, kc_ptr, vc_ptr, bt_row, pos_ptr, kvh, scale,
                                    window, KV_HEADS, D, PAGE, BLOCK_N, HAS_WINDOW, HAS_POS, PRECISION, True)
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(o_ptr + (q_start + rows)[:, None].to(tl.int64) * stride_ot + h * stride_oh + d[None, :],
             out.to(o_ptr.dtype.element_ty), mask=r_mask[:, None])


def extend_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    cu_q: torch.Tensor, seq_lens: torch.Tensor, max_q_len: int, scale: float, window: int | None = None,
    kv_pos: torch.Tensor | None = None, out: torch.Tensor | None = None, config: tuple | None = None,
) -> torch.Tensor:
    """q `[T, heads, d]` holds sequence i's new tokens at rows `cu_q[i]:cu_q[i+1]`, the last
    `cu_q[i+1] - cu_q[i]` of its `seq_lens[i]` tokens."""
    t, heads, d = q.shape
    kv_heads, page = k_cache.shape[2], k_cache.shape[1]
    out = torch.empty_like(q) if out is None else out
    n_seqs = seq_lens.shape[0]
    if t == 0 or n_seqs == 0:
        return out
    block_m = 16 if max_q_len <= 16 else (64 if d <= 128 else 32)
    block_n = 64 if d <= 128 else 32
    warps, stages = (8 if block_m >= 128 else 4), (3 if q.is_cuda else 1)
    if q.is_cuda and q.element_size() == 2 and d <= 128 and max_q_len > 64:   # the H100 sweep's best for long
        # 16-bit prefills (bench/kernels_gpu.py); fp32 tiles that size overflow shared memory
        block_m, block_n, warps = 128, (128 if d > 64 else 64), 8
    if config is not None:
        block_m, block_n, warps, stages = config
    grid = (n_seqs, heads, triton.cdiv(max_q_len, block_m))
    _extend_kernel[grid](
        q, out, k_cache, v_cache, block_tables, cu_q, seq_lens, kv_pos if kv_pos is not None else seq_lens,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0), scale * LOG2E, window or 0,
        KV_HEADS=kv_heads, GROUP=heads // kv_heads, D=d, PAGE=page, BLOCK_M=block_m, BLOCK_N=block_n,
        HAS_WINDOW=window is not None, HAS_POS=kv_pos is not None, PRECISION=_precision(q),
        num_warps=warps, num_stages=stages,
    )
    return out


def _precision(q: torch.Tensor) -> str:
    """fp32 inputs get full-precision dots (the default would be TF32 on the GPU)."""
    return "ieee" if q.dtype == torch.float32 else "tf32"
