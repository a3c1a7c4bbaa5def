"""Triton: RMSNorm fused with the residual add, and rotary embedding applied in place."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _add_rmsnorm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, stride_x, stride_r, stride_o, n, eps,
                        HAS_RES: tl.constexpr, OFFSET: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BLOCK)
    mask = c < n
    x = tl.load(x_ptr + i * stride_x + c, mask=mask, other=0.0)
    if HAS_RES:
        x = x + tl.load(res_ptr + i * stride_r + c, mask=mask, other=0.0)
        tl.store(res_ptr + i * stride_r + c, x, mask=mask)
    xf = x.to(tl.float32)
    normed = xf * tl.rsqrt(tl.sum(xf * xf, 0) / n + eps)
    w = tl.load(w_ptr + c, mask=mask, other=0.0)
    if OFFSET:
        y = normed * (1.0 + w.to(tl.float32))
    else:
        y = w * normed.to(x.dtype)
    tl.store(out_ptr + i * stride_o + c, y.to(out_ptr.dtype.element_ty), mask=mask)


def add_rmsnorm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
                offset: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns `(norm(x + residual), x + residual)`; the residual buffer is updated in place.
    Without a residual: `(norm(x), x)`."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    out = torch.empty_like(x2)
    res2 = residual.view(-1, shape[-1]) if residual is not None else x2
    if x2.shape[0]:
        _add_rmsnorm_kernel[(x2.shape[0],)](
            x2, res2, weight, out, x2.stride(0), res2.stride(0), out.stride(0), shape[-1], eps,
            HAS_RES=residual is not None, OFFSET=offset, BLOCK=triton.next_power_of_2(shape[-1]),
        )
    return out.view(shape), (residual if residual is not None else x)


@triton.jit
def _rope_kernel(x_ptr, cos_ptr, sin_ptr, pos_ptr, stride_t, stride_h, stride_c,
                 HALF: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0)
    h = tl.program_id(1)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    c = tl.arange(0, BLOCK)
    mask = c < HALF
    base = x_ptr + t.to(tl.int64) * stride_t + h * stride_h
    x1 = tl.load(base + c, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(base + HALF + c, mask=mask, other=0.0).to(tl.float32)
    cos = tl.load(cos_ptr + pos * stride_c + c, mask=mask, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + pos * stride_c + c, mask=mask, other=0.0).to(tl.float32)
    tl.store(base + c, (x1 * cos - x2 * sin).to(x_ptr.dtype.element_ty), mask=mask)
    tl.store(base + HALF + c, (x2 * cos + x1 * sin).to(x_ptr.dtype.element_ty), mask=mask)


def rotary_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """In place on x `[T, heads, d]` (d contiguous); cos/sin `[max_pos, d]` tables indexed by `positions`."""
    t, heads, d = x.shape
    assert x.stride(2) == 1 and cos.stride(1) == 1
    if t:
        _rope_kernel[(t, heads)](x, cos, sin, positions, x.stride(0), x.stride(1), cos.stride(0),
                                 HALF=d // 2, BLOCK=triton.next_power_of_2(d // 2))
    return x
