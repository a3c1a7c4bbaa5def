"""Batch-1 linear layers at the Qwen2.5 shapes: the Triton GEMV (`tandem_kernels/triton_gemv.py`) over a sweep of
tile configurations, beside cuBLAS (`F.linear`) in the same run. Bandwidth = weight bytes / time.
Then the fused variants beside the launches they replace, each over the same sweep: `norm_gemv` for qkv
against `add_rmsnorm` + `gemv`; for gate_up, with the gated epilogue, against `add_rmsnorm` + `gemv` +
`act_mul`, and the gated `gemv` alone against `gemv` + `act_mul`.

With `--cold`, a shape's four batch-1 projections as the decode step runs them (fused where it fuses them),
each weight read once per call from HBM (enough copies to overflow the L2), over a smaller sweep.

    python bench/gemv_gpu.py [--out DIR] [--fused-only] [--cold [--cold-shapes qwen2.5-0.5b,...]]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

SHAPES = {  # (N, K) per layer: qkv, o, gate_up, down
    "qwen2.5-0.5b": [(1152, 896), (896, 896), (9728, 896), (896, 4864)],
    "qwen2.5-1.5b": [(2048, 1536), (1536, 1536), (17920, 1536), (1536, 8960)],
    "qwen2.5-7b": [(4608, 3584), (3584, 3584), (37888, 3584), (3584, 18944)],
}
CONFIGS = [(bn, bk, w) for bn in (2, 4, 8, 16) for bk in (128, 256, 512) for w in (2, 4, 8)]


def us(fn, reps: int = 200) -> float:
    """Median of graph-captured replays, as the decode step runs them."""
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(20):
            fn()
    times = []
    for _ in range(reps // 20):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / 20)
    return sorted(times)[len(times) // 2]


def main() -> None:
    from tandem_kernels.triton_gemv import config_for, gemv

    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--fused-only", action="store_true")
    ap.add_argument("--cold", action="store_true")
    ap.add_argument("--cold-shapes", default="qwen2.5-0.5b")
    args = ap.parse_args()
    if args.cold:
        rows = cold_rows(args.cold_shapes.split(","))
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / "gemv_cold.json").write_text(json.dumps({"device": torch.cuda.get_device_name(),
                                                                       "rows": rows}, indent=1))
        return
    rows = []
    for shape, layers in SHAPES.items() if not args.fused_only else ():
        for n, k in layers:
            w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
            b = torch.randn(n, device="cuda", dtype=torch.bfloat16)
            x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
            err = (gemv(x, w, b).float() - F.linear(x, w, b).float()).abs().max().item()
            cublas = us(lambda: F.linear(x, w))
            sweep = {}
            for cfg in CONFIGS:
                try:
                    sweep[cfg] = us(lambda: gemv(x, w, config=cfg))
                except Exception:
                    continue
            best = min(sweep, key=sweep.get)
            default = us(lambda: gemv(x, w))
            gb = n * k * 2 / 1e9
            row = {"shape": shape, "N": n, "K": k, "cublas_us": round(cublas, 2), "gemv_default_us": round(default, 2),
                   "default_config": config_for(n, k), "best_us": round(sweep[best], 2), "best_config": best,
                   "cublas_TBs": round(gb / cublas * 1e3, 2), "default_TBs": round(gb / default * 1e3, 2),
                   "best_TBs": round(gb / sweep[best] * 1e3, 2), "max_abs_err_vs_cublas": err,
                   "top5": sorted(((round(v, 2), c) for c, v in sweep.items()))[:5]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    fused = fused_rows()
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "gemv.json").write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows,
                                                              "fused": fused}, indent=1))


def cold_rows(shapes: list[str]) -> list[dict]:
    from tandem_kernels.triton_gemv import config_for, epilogue_pays, gemv, norm_gemv, prologue_pays

    rows = []
    for shape, layer, (n, k), norm, act in (
            (shape, layer, nk, norm and prologue_pays(*nk), act if epilogue_pays(nk[1]) else None)
            for shape in shapes
            for layer, nk, norm, act in zip(("qkv", "o", "gate_up", "down"), SHAPES[shape],
                                            (True, False, False, False), (None, None, "silu", None))):
        copies = max(2, (256 << 20) // (n * k * 2))
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        x, res, nw = (torch.randn(1, k, device="cuda", dtype=torch.bfloat16) for _ in range(3))

        def chain(cfg=None):
            for w in ws:
                if norm:
                    norm_gemv(x, res, nw, 1e-6, False, w, config=cfg)
                else:
                    gemv(x, w, config=cfg, gated=act)

        def per_call(cfg=None) -> float:
            return us(lambda: chain(cfg), reps=40) / copies

        sweep = {}
        for cfg in [(bn, bk, w) for bn in (2, 4, 8, 16) for bk in (256, 512, 1024) for w in (2, 4)]:
            try:
                sweep[cfg] = per_call(cfg)
            except Exception:
                continue
        best = min(sweep, key=sweep.get)
        default = per_call()
        gb = n * k * 2 / 1e9
        row = {"shape": shape, "layer": layer, "prologue": "norm" if norm else None, "epilogue": act, "N": n, "K": k,
               "copies": copies, "default_config": config_for(n, k, norm),
               "default_us": round(default, 2), "default_TBs": round(gb / default * 1e3, 2), "best_config": best,
               "best_us": round(sweep[best], 2), "best_TBs": round(gb / sweep[best] * 1e3, 2),
               "top5": sorted(((round(v, 2), c) for c, v in sweep.items()))[:5]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def fused_rows() -> list[dict]:
    from tandem_kernels.triton_act import act_mul
    from tandem_kernels.triton_gemv import config_for, gemv, norm_gemv
    from tandem_kernels.triton_norm_rope import add_rmsnorm

    rows = []
    for shape, (qkv, _, gate_up, _) in SHAPES.items():
        for layer, (n, k), norm, act in (("qkv", qkv, True, None), ("gate_up", gate_up, True, "silu"),
                                         ("gate_up", gate_up, False, "silu")):
            w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
            x, res, nw = (torch.randn(1, k, device="cuda", dtype=torch.bfloat16) for _ in range(3))

            def pair():
                h = add_rmsnorm(x, res, nw, 1e-6)[0] if norm else x
                y = gemv(h, w)
                return act_mul(y, act) if act else y

            def one(cfg=None):
                if norm:
                    return norm_gemv(x, res, nw, 1e-6, False, w, config=cfg, gated=act)[0]
                return gemv(x, w, config=cfg, gated=act)

            err = (one().float() - pair().float()).abs().max().item()
            sweep = {}
            for cfg in CONFIGS:
                try:
                    sweep[cfg] = us(lambda: one(cfg))
                except Exception:
                    continue
            best = min(sweep, key=sweep.get)
            row = {"shape": shape, "layer": layer, "prologue": "norm" if norm else None, "epilogue": act,
                   "N": n, "K": k, "unfused_us": round(us(pair), 2), "gemv_alone_us": round(us(lambda: gemv(x, w)), 2),
                   "fused_default_us": round(us(one), 2), "default_config": config_for(n, k, norm),
                   "fused_best_us": round(sweep[best], 2), "best_config": best, "max_abs_err_vs_unfused": err,
                   "top5": sorted(((round(v, 2), c) for c, v in sweep.items()))[:5]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


if __name__ == "__main__":
    main()
