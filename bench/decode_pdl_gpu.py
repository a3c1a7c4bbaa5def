"""Programmatic dependent launch (PDL, `tandem_kernels/pdl.py`) for paged decode attention, beside ordinary
launches, in one run: with it, the split kernel and the combine each launch while the kernel before them
still runs and wait for it on the device.

Timed two ways, both replays of one CUDA graph: independent calls over inputs that together exceed L2 (as
`bench/kernels_gpu.py`), and 24 calls in a row at the 0.5B shape (as `bench/decode_chain.py`). First, each
mode's output against the torch reference in bf16.

    python bench/decode_pdl_gpu.py [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from gpu_timing import environment, replay_ms  # noqa: E402
from kernels_gpu import DT, MAX_MODEL_LEN, PAGE, copy_bw, decode_tbps, paged  # noqa: E402
from tandem_kernels.reference import decode_attention_ref  # noqa: E402
from tandem_kernels.pdl import AVAILABLE as HAS_PDL  # noqa: E402
from tandem_kernels.triton_decode import decode_attention, num_splits_for  # noqa: E402

MODES = {"off": False, "on": True}
SHAPES = [(32, 8, 128), (14, 2, 64)]


def check(sms: int) -> list[dict]:
    rows = []
    for heads, kv, d in SHAPES:
        for batch, ctx in [(1, 4096), (3, 1000), (8, 333)]:
            k, v, tables = paged(batch, ctx, kv, d)
            lens = torch.randint(1, ctx + 1, (batch,), device="cuda", dtype=torch.int32)
            q = torch.randn(batch, heads, d, device="cuda", dtype=DT)
            ref = decode_attention_ref(q.float(), k.float(), v.float(), tables, lens, d**-0.5)
            splits = num_splits_for(batch, kv, MAX_MODEL_LEN, sms)
            for name, mode in MODES.items():
                got = decode_attention(q, k, v, tables, lens, d**-0.5, num_splits=splits, pdl=mode).float()
                rows.append({"heads": f"{heads}/{kv}x{d}", "batch": batch, "ctx": ctx, "mode": name,
                             "max_abs_err": round((got - ref).abs().max().item(), 4)})
    return rows


def independent(batch, ctx, heads, kv, d, sms) -> dict:
    nbytes = 2 * batch * ctx * kv * d * 2
    splits = num_splits_for(batch, kv, MAX_MODEL_LEN, sms)
    row = {"heads": f"{heads}/{kv}x{d}", "batch": batch, "ctx": ctx, "splits": splits,
           "copy_TBps": round(copy_bw(nbytes), 3)}
    for name, mode in MODES.items():
        row[f"{name}_TBps"] = round(decode_tbps(batch, ctx, heads, kv, d, splits, pdl=mode), 3)
        row[f"{name}_vs_copy"] = round(row[f"{name}_TBps"] / row["copy_TBps"], 3)
    return row


def chain(batch, ctx, sms, layers=24, heads=14, kv=2, d=64) -> dict:
    pages = -(-ctx // PAGE)
    caches = [paged(batch, ctx, kv, d)[:2] for _ in range(layers)]
    tables = torch.zeros(batch, MAX_MODEL_LEN // PAGE, dtype=torch.int32, device="cuda")
    tables[:, :pages] = torch.randperm(batch * pages, device="cuda").int().view(batch, pages)
    lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
    q = torch.randn(batch, heads, d, device="cuda", dtype=DT)
    out = torch.empty_like(q)
    splits = num_splits_for(batch, kv, MAX_MODEL_LEN, sms)
    row = {"batch": batch, "ctx": ctx, "splits": splits}
    for name, mode in MODES.items():
        def step():
            for k, v in caches:
                decode_attention(q, k, v, tables, lens, d**-0.5, num_splits=splits, out=out, pdl=mode)
        step()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        row[f"{name}_us_per_layer"] = round(sorted(replay_ms(graph) for _ in range(7))[3] * 1000 / layers, 2)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    result = {**environment(), "has_pdl": HAS_PDL}

    def save():
        print(json.dumps(result), flush=True)
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "decode_pdl.json").write_text(json.dumps(result, indent=1))

    t0 = time.time()
    result["check"] = check(sms)
    save()
    result["chain"] = [chain(b, c, sms) for b, c in [(1, 512), (1, 4096), (1, 32768), (8, 4096), (64, 4096)]]
    save()
    result["independent"] = []
    for heads, kv, d in SHAPES:
        for batch in (1, 8, 64):
            for ctx in (512, 4096, 32768):
                result["independent"].append(independent(batch, ctx, heads, kv, d, sms))
                save()
    result["seconds"] = round(time.time() - t0, 1)
    save()


if __name__ == "__main__":
    main()
