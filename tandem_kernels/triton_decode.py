"""Triton: paged decode attention, grouped over GQA heads, split over the KV length, then combined (in a second
launch, one program per query head: measured faster on an H100, in a 24-layer chain, than combining in the
last-finishing split program). With one split the first launch writes the output itself."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from tandem_kernels.pdl import pdl_enter, pdl_launch, use_pdl
from tandem_kernels.triton_tile import LOG2E, attend_tile


@triton.jit
def _split_span(seq_len, window, SPLITS: tl.constexpr, BLOCK_N: tl.constexpr, WINDOWED: tl.constexpr):
    """The first key a query sees (its window's start) and the keys per split, whole tiles: the split kernel
    and the combine cut a sequence alike."""
    lo = 0
    if WINDOWED:
        lo = tl.maximum(seq_len - window, 0)
    return lo, tl.cdiv(tl.cdiv(seq_len - lo, SPLITS), BLOCK_N) * BLOCK_N


@triton.jit
def _decode_split_kernel(
    q_ptr, kc_ptr, vc_ptr, bt_ptr, len_ptr, pos_ptr, part_ptr, lse_ptr, o_ptr,
    stride_qb, stride_qh, stride_ob, stride_oh, stride_bt, scale, window,
    KV_HEADS: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, PAGE: tl.constexpr,
    SPLITS: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, HAS_WINDOW: tl.constexpr,
    HAS_POS: tl.constexpr, PRECISION: tl.constexpr, PDL: tl.constexpr,
):
    pdl_enter(PDL)
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(len_ptr + b)
    heads = kvh * GROUP + tl.arange(0, BLOCK_H)
    h_mask = tl.arange(0, BLOCK_H) < GROUP
    d = tl.arange(0, D)
    lo, split_len = _split_span(seq_len, window, SPLITS, BLOCK_N, HAS_WINDOW and not HAS_POS)
    start = lo + split * split_len
    end = tl.minimum(start + split_len, seq_len)
    if SPLITS == 1 or start < end:   # a split past the sequence's end stays idle: the combine skips it
        q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=h_mask[:, None], other=0.0)
        m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_H], tl.float32)
        acc = tl.zeros([BLOCK_H, D], tl.float32)
        q_pos = tl.full([BLOCK_H], 0, tl.int32) + seq_len - 1
        for n0 in range(start, end, BLOCK_N):
            m_i, l_i, acc = attend_tile(q, q_pos, m_i, l_i, acc, n0, end, kc_ptr, vc_ptr, bt_ptr + b * stride_bt,
                                        pos_ptr, kvh, scale, window, KV_HEADS, D, PAGE, BLOCK_N, HAS_WINDOW, HAS_POS,
                                        PRECISION, True)
        l_safe = tl.where(l_i == 0.0, 1.0, l_i)
        if SPLITS == 1:
            out_rows = o_ptr + b * stride_ob + heads[:, None] * stride_oh + d[None, :]
            tl.store(out_rows, (acc / l_safe[:, None]).to(o_ptr.dtype.element_ty), mask=h_mask[:, None])
        else:
            out_base = (b * KV_HEADS * GROUP + heads) * SPLITS + split
            tl.store(part_ptr + out_base[:, None] * D + d[None, :], acc / l_safe[:, None], mask=h_mask[:, None])
            tl.store(lse_ptr + out_base, tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(l_safe)), mask=h_mask)


@triton.jit
def _decode_combine_kernel(part_ptr, lse_ptr, len_ptr, o_ptr, stride_ob, stride_oh, window, HEADS: tl.constexpr,
                           D: tl.constexpr, SPLITS: tl.constexpr, BLOCK_N: tl.constexpr, WINDOWED: tl.constexpr,
                           CHUNK: tl.constexpr, PDL: tl.constexpr):
    """Merges the splits that held keys, CHUNK per load."""
    pdl_enter(PDL)
    b = tl.program_id(0)
    h = tl.program_id(1)
    seq_len = tl.load(len_ptr + b)
    lo, split_len = _split_span(seq_len, window, SPLITS, BLOCK_N, WINDOWED)
    used = tl.cdiv(seq_len - lo, tl.maximum(split_len, 1))
    d = tl.arange(0, D)
    base = (b * HEADS + h) * SPLITS
    m = tl.full([1], float("-inf"), tl.float32)
    total = tl.zeros([1], tl.float32)
    out = tl.zeros([D], tl.float32)
    for s0 in range(0, used, CHUNK):
        s = s0 + tl.arange(0, CHUNK)
        lse = tl.load(lse_ptr + base + s, mask=s < used, other=float("-inf"))
        part = tl.load(part_ptr + (base + s)[:, None] * D + d[None, :], mask=(s < used)[:, None], other=0.0)
        m_new = tl.maximum(m, tl.max(lse, 0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m - m_safe)
        w = tl.math.exp2(lse - m_safe)   # base-2 log-sum-exps (tandem_kernels/triton_tile.py)
        out = out * alpha + tl.sum(part * w[:, None], 0)
        total = total * alpha + tl.sum(w, 0)
        m = m_new
    out = out / tl.where(total == 0.0, 1.0, total)
    tl.store(o_ptr + b * stride_ob + h * stride_oh + d, out.to(o_ptr.dtype.element_ty))


def num_splits_for(batch: int, kv_heads: int, max_len: int, sms: int = 132) -> int:
    """A power of two near four programs per SM, at most 128, splits of at least 128 tokens (measured on an
    H100 with bench/decode_chain.py and bench/kernels_gpu.py, 14/2x64 and 32/8x128 heads, batch 1-64, context
    512-32k). Each sequence cuts its own length into splits of whole tiles, and the splits past its end stay
    idle, so a count chosen for `max_len` also serves shorter ones."""
    want = min((4 * sms) // max(1, batch * kv_heads), 128, max(1, max_len // 128))
    return 1 << max(0, int(want).bit_length() - 1)


def decode_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    seq_lens: torch.Tensor, scale: float, window: int | None = None, num_splits: int = 1,
    kv_pos: torch.Tensor | None = None, out: torch.Tensor | None = None, config: tuple | None = None,
    pdl: bool | None = None,
) -> torch.Tensor:
    """q `[B, heads, d]`; one query per sequence at position `seq_lens - 1`. `pdl`: launch with programmatic
    dependent launch (`tandem_kernels/pdl.py`; default: where it is on)."""
    b, heads, d = q.shape
    kv_heads, page = k_cache.shape[2], k_cache.shape[1]
    group = heads // kv_heads
    assert heads % kv_heads == 0 and q.stride(2) == 1 and block_tables.stride(1) == 1
    out = torch.empty_like(q) if out is None else out
    if b == 0:
        return out
    block_n, warps, stages = config or ((32 if d > 128 else 64), 4, 2)
    pdl = use_pdl(q, pdl)
    if num_splits > 1:
        part = torch.empty((b, heads, num_splits, d), dtype=torch.float32, device=q.device)
        lse = torch.empty((b, heads, num_splits), dtype=torch.float32, device=q.device)
    else:
        part = lse = out
    _decode_split_kernel[(b, kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, seq_lens, kv_pos if kv_pos is not None else seq_lens, part, lse, out,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0), scale * LOG2E, window or 0,
        KV_HEADS=kv_heads, GROUP=group, D=d, PAGE=page, SPLITS=num_splits,
        BLOCK_H=max(16, triton.next_power_of_2(group)), BLOCK_N=block_n,
        HAS_WINDOW=window is not None, HAS_POS=kv_pos is not None, PRECISION=_precision(q), PDL=pdl,
        num_warps=warps, num_stages=stages, **pdl_launch(pdl),
    )
    if num_splits > 1:
        _decode_combine_kernel[(b, heads)](
            part, lse, seq_lens, out, out.stride(0), out.stride(1), window or 0, HEADS=heads, D=d, SPLITS=num_splits,
            BLOCK_N=block_n, WINDOWED=window is not None and kv_pos is None,
            CHUNK=min(triton.next_power_of_2(num_splits), max(1, 4096 // d)), PDL=pdl, **pdl_launch(pdl),
        )
    return out


def _precision(q: torch.Tensor) -> str:
    """fp32 inputs get full-precision dots (the default would be TF32 on the GPU)."""
    return "ieee" if q.dtype == torch.float32 else "tf32"
