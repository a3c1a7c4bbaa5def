"""Triton: one tile of paged attention with the online-softmax update, shared by decode and extend.

Scores are kept in base 2: callers pass `scale · log2(e)`, so the running max `m` and the log-sum-exp a
split writes are base-2 quantities and every exponential is an `exp2`."""
from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def attend_tile(
    q, q_pos, m_i, l_i, acc, n0, hi, kc_ptr, vc_ptr, bt_row_ptr, pos_ptr, kvh, scale, window,
    KV_HEADS: tl.constexpr, D: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_POS: tl.constexpr, PRECISION: tl.constexpr, MASKED: tl.constexpr = True,
):
    """Keys `n0 .. n0 + BLOCK_N` (those below `hi`) of one sequence, read through its block table.
    A key counts when its position (its index, or its tag with HAS_POS) is at most the query's and,
    with a window, within it. Rows with nothing to attend keep m = -inf and contribute zeros.
    MASKED=False is for tiles the caller knows are whole and visible to every row: no mask at all."""
    d = tl.arange(0, D)
    n = n0 + tl.arange(0, BLOCK_N)
    row = KV_HEADS * D
    if MASKED:
        n_mask = n < hi
        page = tl.load(bt_row_ptr + n // PAGE, mask=n_mask, other=0).to(tl.int64)
        slot = page * PAGE + n % PAGE
        k = tl.load(kc_ptr + slot[:, None] * row + kvh * D + d[None, :], mask=n_mask[:, None], other=0.0)
    else:
        page = tl.load(bt_row_ptr + n // PAGE).to(tl.int64)
        slot = page * PAGE + n % PAGE
        k = tl.load(kc_ptr + slot[:, None] * row + kvh * D + d[None, :])
    qk = tl.dot(q, tl.trans(k), input_precision=PRECISION).to(tl.float32) * scale
    if MASKED:
        k_pos = n
        if HAS_POS:
            k_pos = tl.load(pos_ptr + slot, mask=n_mask, other=0)
        valid = n_mask[None, :] & (k_pos[None, :] <= q_pos[:, None])
        if HAS_WINDOW:
            valid = valid & (k_pos[None, :] > q_pos[:, None] - window)
        qk = tl.where(valid, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(qk - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    if MASKED:
        v = tl.load(vc_ptr + slot[:, None] * row + kvh * D + d[None, :], mask=n_mask[:, None], other=0.0)
    else:
        v = tl.load(vc_ptr + slot[:, None] * row + kvh * D + d[None, :])
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION).to(tl.float32)
    l_i = l_i * alpha + tl.sum(p, 1)
    return m_new, l_i, acc
