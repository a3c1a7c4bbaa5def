"""Where a decode step's time goes on the GPU: the whole `Engine.step()`, the captured graph alone,
the kernels one step launches (torch profiler) and the host's Python (cProfile).

    python bench/decode_profile.py [--shape qwen2.5-0.5b] [--batches 1,256] [--ctx 512] [--out DIR]
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402

from decode_step_gpu import our_engine, start_decoding  # noqa: E402
from gpu_timing import replay_ms  # noqa: E402


def timed_steps(engine, n: int) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        engine.step()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n * 1e3


def kernel_table(engine, steps: int = 3) -> dict:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
    kernels: dict[str, list[float]] = {}
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            kernels.setdefault(ev.name[:90], []).append(ev.device_time_total)
    rows = sorted(((name, len(t) / steps, sum(t) / steps) for name, t in kernels.items()), key=lambda r: -r[2])
    return {"kernels_per_step": sum(r[1] for r in rows), "kernel_us_per_step": round(sum(r[2] for r in rows), 1),
            "top": [{"kernel": n, "per_step": c, "us_per_step": round(us, 1)} for n, c, us in rows[:25]]}


def host_profile(engine, steps: int = 20) -> str:
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        engine.step()
    torch.cuda.synchronize()
    prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(30)
    return buf.getvalue()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="qwen2.5-0.5b")
    ap.add_argument("--batches", default="1,256")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--out")
    args = ap.parse_args()
    engine = our_engine(args.shape, kv_mb=8192)
    runner = engine.model().runner
    report = {"device": torch.cuda.get_device_name(), "shape": args.shape, "ctx": args.ctx, "rows": []}
    texts = []
    for batch in (int(b) for b in args.batches.split(",")):
        seqs = start_decoding(engine, batch, args.ctx, 200)
        for _ in range(5):
            engine.step()
        step = statistics.median(timed_steps(engine, 10) for _ in range(5))
        bucket = next(b for b in runner.graphs.buckets if b >= batch)
        graph = replay_ms(runner.graphs.graphs[bucket], 50)
        hidden = runner.graphs.hidden[:batch]
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(50):
            runner.model.logits(hidden).argmax(-1)
        torch.cuda.synchronize()
        head = (time.perf_counter() - t0) / 50 * 1e3
        row = {"batch": batch, "step_ms": round(step, 3), "graph_ms": round(graph, 3), "lm_head_argmax_ms": round(head, 3),
               **kernel_table(engine)}
        texts.append(f"=== batch {batch}: host cProfile over 20 steps ===\n{host_profile(engine)}")
        report["rows"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "top"}), flush=True)
        for s in seqs:
            engine.abort(s.request_id)
        engine.step()
    text = json.dumps(report, indent=1)
    print(text)
    print("\n".join(texts))
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "decode_profile.json").write_text(text)
        (Path(args.out) / "decode_profile_host.txt").write_text("\n".join(texts))


if __name__ == "__main__":
    main()
