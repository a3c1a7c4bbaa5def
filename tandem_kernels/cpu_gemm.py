"""bf16 linear layers on CPUs with AVX-512 BF16 (`cpu_gemm.cpp`): weights packed once into vdpbf16ps tiles
and streamed with software prefetch, so reading them overlaps the arithmetic. At 1-16 rows (decode) this is
1.2-1.9x oneDNN's packed kernel; the result is within bf16 rounding of `F.linear` (`linear_ref`), not
bit-identical (another summation order).

The library is compiled with g++ on first use into `$TANDEM_HOME/build` (about a second) and shares
torch's OpenMP runtime. Where it cannot be had (another CPU, no compiler, `TANDEM_CPU_GEMM=0`),
`available()` is False and the callers keep oneDNN."""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

SOURCE = Path(__file__).with_name("cpu_gemm.cpp")
FLAGS = ["-O3", "-std=c++17", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-fopenmp", "-shared", "-fPIC"]
TILE = 16
log = logging.getLogger(__name__)


def _cpu_has_avx512_bf16() -> bool:
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return False
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return False
    return "avx512_bf16" in flags


def _build(compiler: str) -> Path:
    source = SOURCE.read_bytes()
    tag = hashlib.sha256(source + " ".join([compiler, *FLAGS]).encode()).hexdigest()[:16]
    home = Path(os.environ.get("TANDEM_HOME") or Path.home() / ".cache" / "tandem").expanduser()
    out = home / "build" / f"cpu_gemm-{tag}.so"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
            built = Path(tmp) / out.name
            subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(built)], check=True, capture_output=True, text=True)
            os.replace(built, out)   # atomic: processes building at once each see a whole library
    return out


@functools.cache
def library() -> ctypes.CDLL | None:
    if os.environ.get("TANDEM_CPU_GEMM", "1") == "0" or not _cpu_has_avx512_bf16():
        return None
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if compiler is None:
        log.warning("no C++ compiler: bf16 linears stay on oneDNN")
        return None
    try:
        lib = ctypes.CDLL(str(_build(compiler)))
    except (OSError, subprocess.CalledProcessError) as e:
        log.warning("the bf16 CPU GEMM did not build (%s); bf16 linears stay on oneDNN", getattr(e, "stderr", e))
        return None
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.tandem_gemm_packed_numel.argtypes, lib.tandem_gemm_packed_numel.restype = [i64, i64], i64
    lib.tandem_gemm_pack.argtypes, lib.tandem_gemm_pack.restype = [p, i64, i64, p], None
    lib.tandem_gemm.argtypes, lib.tandem_gemm.restype = [p, i64, i64, i64, p, i64, p, p, ctypes.c_int], None
    return lib


def available() -> bool:
    return library() is not None


def packed_numel(out_features: int, in_features: int) -> int:
    return library().tandem_gemm_packed_numel(out_features, in_features)


def pack_into(weight: torch.Tensor, packed: torch.Tensor, first_row: int = 0) -> None:
    """Pack rows `first_row ...` of a weight (all of it, or a chunk of a larger one whose first row is a
    multiple of 16) into their tiles of `packed`."""
    assert weight.dtype == torch.bfloat16 and weight.dim() == 2 and first_row % TILE == 0
    weight = weight.contiguous()
    rows, cols = weight.shape
    offset = first_row // TILE * packed_numel(1, cols)   # packed_numel(1, k): one tile of 16 rows
    assert offset + packed_numel(rows, cols) <= packed.numel() and packed.dtype == torch.bfloat16
    library().tandem_gemm_pack(weight.data_ptr(), rows, cols, packed.data_ptr() + offset * 2)


def pack(weight: torch.Tensor) -> torch.Tensor:
    packed = torch.empty(packed_numel(*weight.shape), dtype=torch.bfloat16)
    pack_into(weight, packed)
    return packed


def linear(x: torch.Tensor, packed: torch.Tensor, out_features: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`x @ W.T + bias` for a weight packed by `pack`; `bias` in fp32."""
    assert x.dtype == torch.bfloat16 and x.device.type == "cpu"
    assert bias is None or (bias.dtype == torch.float32 and bias.is_contiguous() and bias.numel() == out_features)
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    if x2.shape[0] and x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = torch.empty((x2.shape[0], out_features), dtype=torch.bfloat16)
    if x2.shape[0]:
        library().tandem_gemm(x2.data_ptr(), x2.stride(0), x2.shape[0], k, packed.data_ptr(), out_features,
                              None if bias is None else bias.data_ptr(), y.data_ptr(), torch.get_num_threads())
    return y.view(*x.shape[:-1], out_features)


def linear_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return F.linear(x, weight, bias)
