"""CPU fast path: linear layers with weights packed once for a CPU kernel.

bf16 on CPUs with AVX-512 BF16 runs on our tiled kernel (`tandem_kernels.cpu_gemm`: within bf16 rounding of
`F.linear`, 1.2-1.9x oneDNN at 1-16 rows); elsewhere, and fp32, on oneDNN-prepacked weights as inductor's CPU
freezing does (bf16 bit-identical to `F.linear`, fp32 with another summation order, relative error ~1e-6).
Beside the packed weights, embedding tables move into file-backed mappings (`map_embeddings`), so each
weight is held in memory once."""
from __future__ import annotations

import gc
import tempfile
from collections import Counter
from typing import IO

import torch
from torch import nn

from tandem_kernels import cpu_gemm

SPILL_BYTES = 64 << 20
CHUNK_ROWS = 8192
BATCH_HINT = 16   # oneDNN picks the packed layout for this many rows: 2x faster fp32 at 1-16 rows than for 1


def default_kernel(dtype: torch.dtype) -> str:
    return "tiles" if dtype == torch.bfloat16 and cpu_gemm.available() else "onednn"


def _pack(weight: torch.Tensor, kernel: str, into: torch.Tensor | None = None, first_row: int = 0) -> torch.Tensor:
    """The packed weight, or, with `into`, these rows packed into their place in a whole weight's tiles."""
    if kernel == "onednn":
        return torch.ops.mkldnn._reorder_linear_weight(weight, BATCH_HINT)
    if into is None:
        return cpu_gemm.pack(weight)
    cpu_gemm.pack_into(weight, into, first_row)
    return into


class PackedLinear(nn.Module):
    """`kernel` "tiles": `packed` is one tensor of cpu_gemm tiles and the bias is kept in fp32; "onednn":
    `packed` holds the weight in row chunks (one chunk for all but the largest layers)."""

    def __init__(self, in_features: int, out_features: int, packed: list[torch.Tensor], bias: torch.Tensor | None,
                 kernel: str = "onednn"):
        super().__init__()
        assert kernel in ("tiles", "onednn") and (kernel == "onednn" or len(packed) == 1)
        self.in_features, self.out_features, self.kernel = in_features, out_features, kernel
        self.packed = packed
        self.bias = bias if bias is None or kernel == "onednn" else bias.float()
        rows = [p.shape[0] for p in packed]
        self.biases = [None] * len(packed) if bias is None or kernel == "tiles" else list(bias.split(rows))

    @classmethod
    def from_linear(cls, linear: nn.Linear, shared: bool, tied: nn.Embedding | None = None,
                    kernel: str | None = None) -> PackedLinear:
        """`tied`: the embedding that shares this weight; it is given a file-backed copy to look rows up in,
        so the table is held once, packed (an embedding lookup touches a few pages of the file per token)."""
        kernel = kernel or default_kernel(linear.weight.dtype)
        bias = None if linear.bias is None else linear.bias.detach()
        nbytes = linear.weight.numel() * linear.weight.element_size()
        shape = (linear.in_features, linear.out_features)
        if tied is not None:
            return cls(*shape, _spill_and_pack(linear, kernel, tied), bias, kernel)
        if shared or nbytes < SPILL_BYTES:
            return cls(*shape, [_pack(linear.weight.detach(), kernel)], bias, kernel)
        return cls(*shape, _spill_and_pack(linear, kernel), bias, kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel == "tiles":
            return cpu_gemm.linear(x, self.packed[0], self.out_features, self.bias)
        if len(self.packed) == 1:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed[0], self.bias, "none", [], "")
        return torch.cat([torch.ops.mkldnn._linear_pointwise(x, p, b, "none", [], "")
                          for p, b in zip(self.packed, self.biases)], dim=-1)


def _spill_and_pack(linear: nn.Linear, kernel: str, tied: nn.Embedding | None = None) -> list[torch.Tensor]:
    """Pack a large weight chunk by chunk after moving it to a temporary file, so the original and
    its packed copy are never in memory together (the lm_head of a 150k vocabulary is 270 MB).
    The chunks are read with plain reads, so the pages of `tied`'s mapping stay untouched."""
    weight = linear.weight.detach()
    rows, cols, dtype = weight.shape[0], weight.shape[1], weight.dtype
    row_bytes = cols * weight.element_size()
    with _spill(weight) as f:
        if tied is not None:
            tied.weight = _mapping(f, weight)
        del linear.weight, weight
        gc.collect()   # the weight can sit in a reference cycle: free it before its packed copy is made
        chunks = []
        whole = torch.empty(cpu_gemm.packed_numel(rows, cols), dtype=dtype) if kernel == "tiles" else None
        buf = torch.empty((min(CHUNK_ROWS, rows), cols), dtype=dtype)
        for start in range(0, rows, CHUNK_ROWS):
            n = min(CHUNK_ROWS, rows - start)
            f.seek(start * row_bytes)
            f.readinto(memoryview(buf[:n].view(-1).view(torch.uint8).numpy()))
            chunks.append(_pack(buf[:n], kernel, whole, start))
    return chunks[:1] if kernel == "tiles" else chunks


def _spill(weight: torch.Tensor) -> IO[bytes]:
    """`weight` written to a temporary file, which closing removes (a mapping of it stays valid). Not a
    context manager of its own: one would hold `weight` alive until the block's end."""
    f = tempfile.NamedTemporaryFile()
    f.write(memoryview(weight.contiguous().view(-1).view(torch.uint8).numpy()))
    f.flush()
    return f


def _mapping(f: IO[bytes], like: torch.Tensor) -> nn.Parameter:
    mapped = torch.from_file(f.name, shared=False, size=like.numel(), dtype=like.dtype).view(like.shape)
    param = nn.Parameter(mapped, requires_grad=False)
    param.file_backed = True
    return param


def is_file_backed(weight: torch.Tensor) -> bool:
    return getattr(weight, "file_backed", False)


def map_embeddings(model: nn.Module) -> int:
    """Move embedding tables into file-backed mappings: a lookup touches a few pages per token, so a
    table (270 MB for a 150k vocabulary) is not held in memory. Returns how many were moved."""
    count = 0
    for m in model.modules():
        if isinstance(m, nn.Embedding) and not is_file_backed(m.weight):
            old = m.weight
            with _spill(old.detach()) as f:
                m.weight = _mapping(f, old)
            del old
            gc.collect()
            count += 1
    return count


def can_pack(dtype: torch.dtype, device: torch.device) -> bool:
    """oneDNN's packing, the fallback of every dtype, must be bit-identical to F.linear in bf16 and within
    fp32 rounding in fp32."""
    if device.type != "cpu" or dtype not in (torch.bfloat16, torch.float32) or not torch.backends.mkldnn.is_available():
        return False
    try:
        probe = nn.Linear(64, 64, bias=True, dtype=dtype)
        x = torch.randn(3, 64, dtype=dtype)
        got, want = PackedLinear.from_linear(probe, shared=True, kernel="onednn")(x), probe(x)
        if dtype == torch.bfloat16:
            return torch.equal(got, want)
        return torch.allclose(got, want, rtol=1e-5, atol=1e-6)
    except (RuntimeError, AttributeError):
        return False


def pack_linears(model: nn.Module) -> int:
    """Replace every nn.Linear in `model` in place, one at a time, so that each original weight is
    freed as soon as its packed copy exists; returns how many were packed."""
    uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    embeddings = {id(m.weight): m for m in model.modules() if isinstance(m, nn.Embedding)}
    count = 0
    parents = [m for m in model.modules() if not isinstance(m, nn.Linear)]
    for parent in parents:
        names = [n for n, c in parent.named_children() if isinstance(c, nn.Linear)]
        for name in names:
            linear = getattr(parent, name)
            shared = uses[id(linear.weight)] > 1
            tied = embeddings.get(id(linear.weight)) if shared else None
            setattr(parent, name, PackedLinear.from_linear(linear, shared, tied))
            count += 1
    return count
