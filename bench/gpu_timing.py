"""The clock the GPU benchmarks share: replays of a captured CUDA graph between two CUDA events; and the
environment each report names."""
from __future__ import annotations

import torch


def environment() -> dict:
    """The device and versions a GPU benchmark's report starts with."""
    import triton

    return {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}


def replay_ms(graph: torch.cuda.CUDAGraph, replays: int = 20) -> float:
    """Milliseconds per replay of `graph`, after one untimed replay."""
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / replays


def capture(fn, warmups: int = 2) -> torch.cuda.CUDAGraph:
    """A CUDA graph of one call of `fn`, captured after `warmups` eager calls (kernels compile, allocations
    settle)."""
    for _ in range(warmups):
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph
