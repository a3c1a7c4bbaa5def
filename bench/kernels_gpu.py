"""Attention kernels on the GPU beside their baselines, in one run (random data, bf16).

decode: achieved bandwidth (K+V bytes read / time) beside a device-to-device copy and torch SDPA
on contiguous KV, each replayed from a CUDA graph over inputs larger than L2 together; prefill:
TFLOP/s (causal, 4·s²·h·d/2) beside torch SDPA. A small sweep of launch configurations reports the
best and the default.

    python bench/kernels_gpu.py [--out DIR] [--quick]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from gpu_timing import environment, replay_ms  # noqa: E402
from tandem_kernels.triton_decode import decode_attention, num_splits_for  # noqa: E402
from tandem_kernels.triton_extend import extend_attention  # noqa: E402

PAGE = 16
DT = torch.bfloat16
SWEEP = "--no-sweep" not in sys.argv
MAX_MODEL_LEN = 32768   # the split count depends on it, not on the context


def paged(batch, ctx, kv, d):
    pages = -(-ctx // PAGE)
    total = batch * pages
    k = torch.randn(total, PAGE, kv, d, device="cuda", dtype=DT)
    v = torch.randn_like(k)
    tables = torch.randperm(total, device="cuda").view(batch, pages).to(torch.int32)
    return k, v, tables


def graph_ms(make, nbytes: int, min_bytes: int = 256 << 20, replays: int = 20) -> float:
    """Milliseconds per call of `make()`'s closure, replayed from one CUDA graph (as the engine runs the
    decode step), over enough independent copies of its inputs (`make` builds fresh ones) that together
    they exceed the L2 cache: each call reads from memory, none pays a Python launch."""
    calls = [make() for _ in range(max(1, min(64, -(-min_bytes // nbytes))))]
    for fn in calls:
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in calls:
            fn()
    return replay_ms(graph, replays) / len(calls)


def copy_bw(nbytes):
    def make():
        src = torch.empty(nbytes // 2, dtype=DT, device="cuda")
        dst = torch.empty_like(src)
        return lambda: dst.copy_(src)
    return 2 * nbytes / graph_ms(make, nbytes) / 1e9


def decode_tbps(batch, ctx, heads, kv, d, splits, **kw) -> float:
    """Paged decode attention's bandwidth (K+V bytes read / time, TB/s), every sequence at `ctx`, timed by
    `graph_ms`; `kw` goes to `decode_attention` (config, pdl)."""
    nbytes = 2 * batch * ctx * kv * d * 2
    lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")

    def make():
        k, v, tables = paged(batch, ctx, kv, d)
        q = torch.randn(batch, heads, d, device="cuda", dtype=DT)
        out = torch.empty_like(q)
        return lambda: decode_attention(q, k, v, tables, lens, d**-0.5, num_splits=splits, out=out, **kw)
    return nbytes / graph_ms(make, nbytes) / 1e9


def bench_decode(batch, ctx, heads, kv, d, sms):
    nbytes = 2 * batch * ctx * kv * d * 2
    splits = num_splits_for(batch, kv, MAX_MODEL_LEN, sms)   # as the engine sizes it
    default = decode_tbps(batch, ctx, heads, kv, d, splits)
    best, sweep = (default, "default", splits), []
    for s in sorted({1, 2, 4, 8, 16, 32, 64, splits}) if SWEEP else ():
        for cfg in [(32, 4, 2), (64, 4, 2), (64, 4, 3), (128, 8, 2), (128, 4, 3), (128, 8, 3), (256, 8, 2), (256, 8, 3)]:
            if d > 128 and cfg[0] > 64:
                continue
            tbps = decode_tbps(batch, ctx, heads, kv, d, s, config=cfg)
            sweep.append([s, list(cfg), round(tbps, 3)])
            if tbps > best[0]:
                best = (tbps, cfg, s)

    def sdpa():
        k, v, tables = paged(batch, ctx, kv, d)
        q = torch.randn(batch, heads, d, device="cuda", dtype=DT)
        kc = k[tables.long()].reshape(batch, -1, kv, d)[:, :ctx].transpose(1, 2).contiguous()
        vc = v[tables.long()].reshape(batch, -1, kv, d)[:, :ctx].transpose(1, 2).contiguous()
        del k, v
        return lambda: F.scaled_dot_product_attention(q[:, :, None], kc, vc, enable_gqa=True)

    sdpa_ms = graph_ms(sdpa, nbytes)
    out = {"batch": batch, "ctx": ctx, "heads": f"{heads}/{kv}x{d}", "splits_default": splits,
           "tandem_default_TBps": default, "tandem_best_TBps": best[0],
           "best_config": str(best[1]), "best_splits": best[2], "sdpa_contiguous_TBps": nbytes / sdpa_ms / 1e9,
           "copy_TBps": copy_bw(nbytes)}
    out["default_vs_copy"] = out["tandem_default_TBps"] / out["copy_TBps"]
    out["best_vs_copy"] = out["tandem_best_TBps"] / out["copy_TBps"]
    return {**{k2: round(v2, 3) if isinstance(v2, float) else v2 for k2, v2 in out.items()}, "sweep": sweep}


def bench_prefill(seq, heads, kv, d):
    k, v, tables = paged(1, seq, kv, d)
    q = torch.randn(seq, heads, d, device="cuda", dtype=DT)
    cu = torch.tensor([0, seq], dtype=torch.int32, device="cuda")
    lens = torch.tensor([seq], dtype=torch.int32, device="cuda")
    flops = 4 * seq * seq * heads * d / 2
    default_ms = do_bench(lambda: extend_attention(q, k, v, tables, cu, lens, seq, d**-0.5))
    best, sweep = (default_ms, "default"), []
    for cfg in [] if not SWEEP else [(128, 64, 8, 3), (128, 64, 4, 3), (128, 128, 8, 3), (128, 128, 8, 2),
                                     (64, 64, 4, 3), (128, 32, 4, 4), (64, 128, 4, 3), (128, 64, 8, 4),
                                     (64, 64, 4, 4), (128, 128, 8, 4), (64, 128, 8, 3), (64, 64, 8, 3)]:
        try:
            ms = do_bench(lambda: extend_attention(q, k, v, tables, cu, lens, seq, d**-0.5, config=cfg))
        except Exception:
            continue
        sweep.append([list(cfg), round(flops / ms / 1e9, 1)])
        if ms < best[0]:
            best = (ms, cfg)
    qc = q.transpose(0, 1)[None]
    kc = k[tables.long()].reshape(1, -1, kv, d)[:, :seq].transpose(1, 2).contiguous()
    vc = v[tables.long()].reshape(1, -1, kv, d)[:, :seq].transpose(1, 2).contiguous()
    res = {"seq": seq, "heads": f"{heads}/{kv}x{d}", "tandem_default_TFLOPs": flops / default_ms / 1e9,
           "tandem_best_TFLOPs": flops / best[0] / 1e9, "best_config": str(best[1])}
    for name, backend in [("sdpa_flash", SDPBackend.FLASH_ATTENTION), ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION)]:
        try:
            with sdpa_kernel(backend):
                ms = do_bench(lambda: F.scaled_dot_product_attention(qc, kc, vc, is_causal=True, enable_gqa=True))
            res[f"{name}_TFLOPs"] = flops / ms / 1e9
        except Exception as e:
            res[f"{name}_TFLOPs"] = f"n/a: {type(e).__name__}"
    res["default_vs_flash"] = (res["tandem_default_TFLOPs"] / res["sdpa_flash_TFLOPs"]
                               if isinstance(res["sdpa_flash_TFLOPs"], float) else None)
    return {**{k2: round(v2, 2) if isinstance(v2, float) else v2 for k2, v2 in res.items()}, "sweep": sweep}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-sweep", action="store_true", help="time the default launch configuration only")
    args = ap.parse_args()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    report = {**environment(), "decode": [], "prefill": []}
    for heads, kv, d in [(32, 8, 128), (14, 2, 64)]:
        for batch in (1, 8, 64):
            for ctx in (512, 4096, 32768):
                if args.quick and (batch, ctx) not in {(1, 32768), (64, 4096)}:
                    continue
                report["decode"].append(bench_decode(batch, ctx, heads, kv, d, sms))
                print(json.dumps({k: v for k, v in report["decode"][-1].items() if k != "sweep"}), file=sys.stderr, flush=True)
                torch.cuda.empty_cache()
    for seq in (4096, 16384):
        for heads, kv, d in [(32, 8, 128), (14, 2, 64)]:
            report["prefill"].append(bench_prefill(seq, heads, kv, d))
            print(json.dumps({k: v for k, v in report["prefill"][-1].items() if k != "sweep"}), file=sys.stderr, flush=True)
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "kernels_gpu.json").write_text(text)


if __name__ == "__main__":
    main()
