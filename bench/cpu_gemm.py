"""bf16 linear layers on the CPU at the Qwen2.5-0.5B shapes: our tiled AVX-512 BF16 kernel
(`tandem_kernels/cpu_gemm.cpp`) beside oneDNN's packed kernel (the engine's path before it) and plain
`F.linear` (what transformers runs), in one run. Weights cycle through enough copies to exceed the L3
cache, as in a decode step, where every weight comes from memory once. Prints JSON: microseconds per call
and the achieved GFLOP/s and GB/s of weights.

    python bench/cpu_gemm.py [--rows 1,4,16,64] [--reps 20]
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import torch
import torch.nn.functional as F

from tandem_kernels import cpu_gemm

SHAPES = {"qkv": (1152, 896), "o": (896, 896), "gate_up": (9728, 896), "down": (896, 4864), "lm_head": (151936, 896)}
COLD_BYTES = 160 << 20


def time_us(fn, copies: int, reps: int) -> float:
    for i in range(copies):
        fn(i)
    t0 = time.perf_counter()
    for r in range(reps):
        fn(r % copies)
    return (time.perf_counter() - t0) / reps * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="1,4,16,64")
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    if not cpu_gemm.available():
        raise SystemExit("this CPU has no AVX-512 BF16, or no C++ compiler is found")
    torch.manual_seed(0)
    results = []
    for name, (n, k) in SHAPES.items():
        copies = max(2, COLD_BYTES // (n * k * 2))
        weights = [torch.randn(n, k, dtype=torch.bfloat16) * 0.05 for _ in range(copies)]
        tiles = [cpu_gemm.pack(w) for w in weights]
        onednn = [torch.ops.mkldnn._reorder_linear_weight(w, 16) for w in weights]
        for rows in (int(r) for r in args.rows.split(",")):
            x = torch.randn(rows, k, dtype=torch.bfloat16)
            row = {"layer": name, "rows": rows, "n": n, "k": k}
            for system, fn in [
                ("f_linear", lambda i: F.linear(x, weights[i])),
                ("onednn", lambda i: torch.ops.mkldnn._linear_pointwise(x, onednn[i], None, "none", [], "")),
                ("tiles", lambda i: cpu_gemm.linear(x, tiles[i], n)),
            ]:
                us = time_us(fn, copies, args.reps)
                row[f"{system}_us"] = round(us, 1)
                row[f"{system}_gflops"] = round(2 * rows * n * k / us / 1e3, 1)
                row[f"{system}_weight_gbs"] = round(2 * n * k / us / 1e3, 1)
            row["tiles_over_onednn"] = round(row["onednn_us"] / row["tiles_us"], 2)
            row["tiles_over_f_linear"] = round(row["f_linear_us"] / row["tiles_us"], 2)
            results.append(row)
            print(json.dumps(row), flush=True)
    print(json.dumps({"machine": platform.machine(), "threads": torch.get_num_threads(), "torch": torch.__version__,
                      "rows": results}))


if __name__ == "__main__":
    main()
