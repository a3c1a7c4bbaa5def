"""Triton: the k largest values of each row (sorted, largest first), for the R2R router's top-100 logits
over a whole vocabulary. Each program sorts a chunk of a row in registers and keeps its k largest; the
kept values are cut into chunks again until one chunk is left. Exact: a row's k largest are among its
chunks' k largest. On an H100, for one 151,936-wide row: `torch.topk` 58 µs, this 30 µs (chunks of 1024,
8 warps: the best of bench/router_gpu.py's sweep); even at 16 rows."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

DEFAULT_CHUNK = 1024


@triton.jit
def _chunk_top_kernel(x_ptr, out_ptr, n, stride_x, stride_out, K: tl.constexpr, CHUNK: tl.constexpr):
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    offs = chunk * CHUNK + tl.arange(0, CHUNK)
    x = tl.load(x_ptr + row * stride_x + offs, mask=offs < n, other=float("-inf")).to(tl.float32)
    ranked = tl.sort(x, descending=True)
    rank = tl.arange(0, CHUNK)
    tl.store(out_ptr + row * stride_out + chunk * K + rank, ranked, mask=rank < K)


def top_values(x: torch.Tensor, k: int, chunk: int = DEFAULT_CHUNK, num_warps: int = 8) -> torch.Tensor:
    """`x.float().topk(k, dim=-1).values` for a 2-D `x`; `chunk` (a power of two ≥ 2k, so that every round at
    least halves what is left) is each program's share."""
    rows, n = x.shape
    assert 0 < k <= n and 2 * k <= chunk and chunk & (chunk - 1) == 0 and x.stride(1) == 1
    while True:
        chunks = triton.cdiv(n, chunk)
        out = torch.empty((rows, chunks * k), dtype=torch.float32, device=x.device)
        if rows:
            _chunk_top_kernel[(rows, chunks)](x, out, n, x.stride(0), out.stride(0), K=k, CHUNK=chunk,
                                              num_warps=num_warps)
        if chunks == 1:
            return out
        x, n = out, chunks * k
