"""Programmatic dependent launch (PDL, compute capability 9.0 and later). A kernel launched with it may
start while the kernel before it still runs: it waits on the device (`gdc_wait`) before it reads anything
that kernel could have written, then lets the kernel after it launch (`gdc_launch_dependents`). Each
launch's latency then overlaps the tail of the kernel before it, also inside a CUDA graph. Decode
attention's two kernels can use it (docs/benchmarks.md). Off until the engine on CUDA has been checked with it;
`TANDEM_PDL=1` turns it on."""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
    AVAILABLE = True
except ImportError:   # an older Triton
    gdc_launch_dependents = gdc_wait = None
    AVAILABLE = False

ENABLED = AVAILABLE and os.environ.get("TANDEM_PDL", "0") == "1"


@triton.jit
def pdl_enter(PDL: tl.constexpr):
    """Call before the kernel's first read of another kernel's output (reads of constants may come first)."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


@functools.lru_cache(maxsize=None)
def _capable(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def use_pdl(t: torch.Tensor, enabled: bool | None = None) -> bool:
    """Whether kernels on `t`'s device launch with PDL (`enabled` overrides `TANDEM_PDL`)."""
    on = ENABLED if enabled is None else enabled and AVAILABLE
    return bool(on) and t.is_cuda and _capable(t.device.index if t.device.index is not None else torch.cuda.current_device())


def pdl_launch(on: bool) -> dict:
    """The launch keyword arguments of a kernel that calls `pdl_enter(PDL=on)`."""
    return {"launch_pdl": True} if on else {}
