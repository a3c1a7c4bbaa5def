"""Triton: `y = x @ W.T (+ b)` for a single row, the decode step at batch 1. There cuBLAS reads a small
model's 2-9 MB weights at 0.4-1.3 TB/s; this reads W in [BLOCK_N, BLOCK_K] tiles over many programs."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, b_ptr, y_ptr, N, K, stride_w, HAS_BIAS: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = w_ptr + n[:, None].to(tl.int64) * stride_w
    acc = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + k, mask=k < K, other=0.0).to(tl.float32)
        w = tl.load(rows + k[None, :], mask=(n[:, None] < N) & (k[None, :] < K), other=0.0)
        acc += w.to(tl.float32) * x[None, :]
    y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        y += tl.load(b_ptr + n, mask=n < N, other=0.0).to(tl.float32)
    tl.store(y_ptr + n, y.to(y_ptr.dtype.element_ty), mask=n < N)


def config_for(n: int, k: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps), from a sweep on an H100 (bench/gemv_gpu.py): two rows per program
    for most shapes; wide-and-short weights (a small model's gate_up) prefer wider, shallower tiles."""
    if k <= 1024 and n >= 4096:
        return 16, 128, 8
    return 2, 512, 2


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
         config: tuple[int, int, int] | None = None) -> torch.Tensor:
    """x `[1, K]`, weight `[N, K]` (rows contiguous) -> `[1, N]`."""
    assert x.shape[0] == 1 and x.stride(-1) == 1 and weight.stride(1) == 1
    n, k = weight.shape
    y = torch.empty((1, n), dtype=x.dtype, device=x.device)
    block_n, block_k, warps = config or config_for(n, k)
    _gemv_kernel[(triton.cdiv(n, block_n),)](x, weight, bias if bias is not None else weight, y, n, k,
                                              weight.stride(0), HAS_BIAS=bias is not None, BLOCK_N=block_n,
                                              BLOCK_K=block_k, num_warps=warps)
    return y
