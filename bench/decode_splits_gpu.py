"""Split counts for paged decode attention where it misses its bandwidth target (H100, bf16, random data).

For each case: the engine's default split count, then every power of two and every count that fills whole
waves of `batch x kv_heads x splits` programs (1-8 per SM), at the default launch configuration; then the
three best counts at two more configurations. Beside them, in the same run, two device-to-device copies:
one of the same bytes (it moves twice the kernel's traffic, the figure docs/benchmarks.md compares with)
and one that moves the same traffic as the kernel (half the bytes, read and written). Every figure is a
replay of one CUDA graph over inputs larger than L2 (bench/kernels_gpu.py's clock). JSON goes to
`--out` after every case, so a run cut short keeps what it measured.

    python bench/decode_splits_gpu.py [--out DIR] [--budget-s 420]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402

from gpu_timing import environment  # noqa: E402
from kernels_gpu import MAX_MODEL_LEN, copy_bw, decode_tbps  # noqa: E402
from tandem_kernels.triton_decode import num_splits_for  # noqa: E402

CASES = [  # (heads, kv, d, batch, ctx): below 90% of the copy at b9d8322
    (32, 8, 128, 1, 4096), (32, 8, 128, 1, 32768), (32, 8, 128, 8, 4096),
    (14, 2, 64, 1, 4096), (14, 2, 64, 1, 32768), (14, 2, 64, 8, 4096), (14, 2, 64, 8, 32768),
    (14, 2, 64, 64, 4096),
]
DEFAULT_CFG = (64, 4, 2)
MORE_CFGS = [(32, 4, 2), (128, 8, 2)]


def candidates(programs_per_split: int, ctx: int, sms: int) -> list[int]:
    waves = {max(1, (w * sms) // programs_per_split) for w in range(1, 9)}
    return sorted(s for s in waves | {1 << i for i in range(10)}
                  if s <= min(512, ctx // 32) and s * programs_per_split >= sms // 2)


def sweep_case(heads, kv, d, batch, ctx, sms):
    nbytes = 2 * batch * ctx * kv * d * 2

    def tbps(splits, cfg):
        return round(decode_tbps(batch, ctx, heads, kv, d, splits, config=cfg), 3)

    default = num_splits_for(batch, kv, MAX_MODEL_LEN, sms)
    rows = {(default, DEFAULT_CFG): tbps(default, DEFAULT_CFG)}
    for s in candidates(batch * kv, ctx, sms):
        rows.setdefault((s, DEFAULT_CFG), tbps(s, DEFAULT_CFG))
    top = sorted(rows, key=rows.get, reverse=True)[:3]
    for s, _ in top:
        for cfg in MORE_CFGS:
            rows[(s, cfg)] = tbps(s, cfg)
    best = max(rows, key=rows.get)
    copy_same_bytes, copy_same_traffic = copy_bw(nbytes), copy_bw(nbytes // 2)
    return {
        "heads": f"{heads}/{kv}x{d}", "batch": batch, "ctx": ctx, "MB": round(nbytes / 2**20, 1),
        "default_splits": default, "default_TBps": rows[(default, DEFAULT_CFG)],
        "best_splits": best[0], "best_config": list(best[1]), "best_TBps": rows[best],
        "copy_same_bytes_TBps": round(copy_same_bytes, 3), "copy_same_traffic_TBps": round(copy_same_traffic, 3),
        "default_vs_copy": round(rows[(default, DEFAULT_CFG)] / copy_same_bytes, 3),
        "best_vs_copy": round(rows[best] / copy_same_bytes, 3),
        "default_vs_copy_same_traffic": round(rows[(default, DEFAULT_CFG)] / copy_same_traffic, 3),
        "best_vs_copy_same_traffic": round(rows[best] / copy_same_traffic, 3),
        "sweep": [[s, list(cfg), v] for (s, cfg), v in sorted(rows.items())],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--budget-s", type=float, default=420.0, help="stop starting new cases after this long")
    args = ap.parse_args()
    t0 = time.time()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    report = {**environment(), "sms": sms, "cases": []}
    for case in CASES:
        if time.time() - t0 > args.budget_s:
            report["stopped_early"] = True
            break
        report["cases"].append(sweep_case(*case, sms))
        print(json.dumps({k: v for k, v in report["cases"][-1].items() if k != "sweep"}), file=sys.stderr, flush=True)
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / "decode_splits_gpu.json").write_text(json.dumps(report, indent=1))
        torch.cuda.empty_cache()
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
