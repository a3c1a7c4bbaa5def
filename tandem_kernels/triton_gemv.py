"""Triton: `y = x @ W.T (+ b)` for a single row, the decode step at batch 1. There cuBLAS reads a small
model's 2-9 MB weights at 0.4-1.3 TB/s; this reads W in [BLOCK_N, BLOCK_K] tiles over many programs.

The same kernel can take the small kernels around a projection into it, so a layer of the batch-1 step
launches two fewer kernels (where they pay, see `prologue_pays` and `epilogue_pays`):
- a prologue, residual add + RMSNorm (`norm_gemv`, before qkv): every program recomputes it over the
  whole input row, which stays in L1/L2; only program 0 writes the new residual;
- an epilogue, `act(gate) * up` (`gated`, after gate_up): a program reads the gate rows n and the up rows
  I + n of the fused weight and writes `act(g_n) * u_n`, rounded as the unfused ops round."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from tandem_kernels.triton_act import ACTS, act_times


@triton.jit
def _gemv_kernel(x_ptr, res_ptr, res_out_ptr, nw_ptr, w_ptr, b_ptr, y_ptr, N, K, stride_w, eps,
                 NORM: tl.constexpr, HAS_RES: tl.constexpr, OFFSET: tl.constexpr, HAS_BIAS: tl.constexpr,
                 ACT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = w_ptr + n[:, None].to(tl.int64) * stride_w
    k = tl.arange(0, BLOCK_K)
    # Software-pipelined over K: the next weight tiles are requested before this tile's product.
    w = tl.load(rows + k[None, :], mask=(n[:, None] < N) & (k[None, :] < K), other=0.0)
    if ACT >= 0:
        w_up = tl.load(rows + N * stride_w + k[None, :], mask=(n[:, None] < N) & (k[None, :] < K), other=0.0)
    if NORM:
        written = tl.where(pid == 0, K, 0)
        squares = tl.zeros((BLOCK_K,), tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + k
            s = tl.load(x_ptr + kk, mask=kk < K, other=0.0)
            if HAS_RES:
                s = s + tl.load(res_ptr + kk, mask=kk < K, other=0.0)
                tl.store(res_out_ptr + kk, s, mask=kk < written)
            sf = s.to(tl.float32)
            squares += sf * sf
        rstd = tl.rsqrt(tl.sum(squares, 0) / K + eps)
    acc = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
    if ACT >= 0:
        acc_up = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + k
        x = tl.load(x_ptr + kk, mask=kk < K, other=0.0)
        if NORM:
            if HAS_RES:
                x = x + tl.load(res_ptr + kk, mask=kk < K, other=0.0)
            normed = x.to(tl.float32) * rstd
            nw = tl.load(nw_ptr + kk, mask=kk < K, other=0.0)
            if OFFSET:
                x = (normed * (1.0 + nw.to(tl.float32))).to(x.dtype)
            else:
                x = nw * normed.to(x.dtype)
        x = x.to(tl.float32)[None, :]
        acc += w.to(tl.float32) * x
        if ACT >= 0:
            acc_up += w_up.to(tl.float32) * x
        nxt = kk + BLOCK_K
        mask = (n[:, None] < N) & (nxt[None, :] < K)
        w = tl.load(rows + nxt[None, :], mask=mask, other=0.0)
        if ACT >= 0:
            w_up = tl.load(rows + N * stride_w + nxt[None, :], mask=mask, other=0.0)
    y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        y += tl.load(b_ptr + n, mask=n < N, other=0.0).to(tl.float32)
    if ACT >= 0:
        dtype = y_ptr.dtype.element_ty
        y = act_times(y.to(dtype), tl.sum(acc_up, axis=1).to(dtype), ACT)
    tl.store(y_ptr + n, y.to(y_ptr.dtype.element_ty), mask=n < N)


def config_for(rows: int, k: int, norm: bool = False) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps) for `rows` weight rows (2I when gated), from sweeps on an H100 with the
    weights cold in HBM, as the decode step reads them (`bench/gemv_gpu.py --cold`): deep tiles, so that
    each program has its whole row slice in flight at once; four rows share the norm prologue's cost."""
    if norm:
        return 4, 1024, 4
    return 2, 1024, 2 if k <= 1024 else 4


def prologue_pays(n: int, k: int) -> bool:
    """The norm prologue beat its own launch on small projections (the 0.5B and 1.5B qkv), not on the
    gate_up projections nor at the 7B shape (bench/gemv_gpu.py)."""
    return n * k <= 4 << 20


def epilogue_pays(k: int) -> bool:
    """The gated epilogue beat `act_mul`'s launch at the 0.5B and 1.5B shapes, not at the 7B's."""
    return k <= 2048


def _launch(x, weight, bias, config, gated, *, res=None, res_out=None, norm_weight=None, eps=0.0,
            norm=False, offset=False) -> torch.Tensor:
    n, k = weight.shape
    if gated is not None:
        assert bias is None and n % 2 == 0, "a gated weight is a fused [2I, K] gate_up without bias"
        n //= 2
    assert x.shape == (1, k) and x.stride(-1) == 1 and weight.stride(1) == 1, (x.shape, weight.shape)
    y = torch.empty((1, n), dtype=x.dtype, device=x.device)
    block_n, block_k, warps = config or config_for(weight.shape[0], k, norm)
    _gemv_kernel[(triton.cdiv(n, block_n),)](
        x, res if res is not None else x, res_out if res_out is not None else x,
        norm_weight if norm_weight is not None else x, weight, bias if bias is not None else weight, y, n, k,
        weight.stride(0), eps, NORM=norm, HAS_RES=res is not None, OFFSET=offset, HAS_BIAS=bias is not None,
        ACT=ACTS[gated] if gated is not None else -1, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps)
    return y


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
         config: tuple[int, int, int] | None = None, gated: str | None = None) -> torch.Tensor:
    """x `[1, K]`, weight `[N, K]` (rows contiguous) -> `[1, N]`. With `gated` (an activation), weight is a
    fused `[2I, K]` gate_up and the result `act(gate) * up`, `[1, I]`."""
    return _launch(x, weight, bias, config, gated)


def norm_gemv(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float, offset: bool,
              weight: torch.Tensor, bias: torch.Tensor | None = None, config: tuple[int, int, int] | None = None,
              gated: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`(gemv(norm(x + residual)), x + residual)`, as `add_rmsnorm` then `gemv`; the sum goes to a new
    tensor (other programs still read the old residual). Without a residual: `(gemv(norm(x)), x)`."""
    res_out = torch.empty_like(x) if residual is not None else x
    y = _launch(x, weight, bias, config, gated, res=residual, res_out=res_out, norm_weight=norm_weight, eps=eps,
                norm=True, offset=offset)
    return y, res_out
