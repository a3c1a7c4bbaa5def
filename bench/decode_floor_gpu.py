"""Where decode attention's time goes at small reads: the paged kernel beside kernels that only read the same
K/V bytes, one step of the decode kernel's work added at a time, all in one run:

- copy: a device-to-device copy of the same bytes (the issue's yardstick; it reads and writes them);
- read: one launch that streams the bytes from contiguous memory and keeps one sum per program, over the
  same grid as the decode kernel (batch x KV heads x splits);
- paged read: the same through the page table (each tile's page numbers loaded first), as the decode kernel
  reads;
- paged read + combine: a second launch over (batch, heads) reading the first's sums, as the combine does;
- decode attention, ordinary launches and PDL.

Each is timed as `bench/kernels_gpu.py` times the kernel (graph replays over inputs larger than L2). If even
"read" falls short of 90% of the copy, no kernel that reads the bytes reaches the issue's target there.

    python bench/decode_floor_gpu.py [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from gpu_timing import environment  # noqa: E402
from kernels_gpu import DT, MAX_MODEL_LEN, PAGE, copy_bw, decode_tbps, graph_ms, paged  # noqa: E402
from tandem_kernels.triton_decode import num_splits_for  # noqa: E402

CASES = [(h, kv, d, b, c) for b in (1, 8, 64) for h, kv, d in [(14, 2, 64), (32, 8, 128)] for c in (4096, 512, 32768)]


@triton.jit
def _read_kernel(k_ptr, v_ptr, out_ptr, per_prog, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    acc = tl.zeros((BLOCK,), tl.float32)
    for i in range(0, per_prog, BLOCK):
        offs = pid * per_prog + i + tl.arange(0, BLOCK)
        acc += tl.load(k_ptr + offs).to(tl.float32) + tl.load(v_ptr + offs).to(tl.float32)
    tl.store(out_ptr + pid, tl.sum(acc, 0))


@triton.jit
def _paged_read_kernel(k_ptr, v_ptr, table_ptr, out_ptr, ctx, stride_bt, KV_HEADS: tl.constexpr, D: tl.constexpr,
                       PAGE: tl.constexpr, SPLITS: tl.constexpr, BLOCK_N: tl.constexpr):
    b, kvh, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    per_split = tl.cdiv(tl.cdiv(ctx, SPLITS), BLOCK_N) * BLOCK_N
    start, stop = split * per_split, tl.minimum(split * per_split + per_split, ctx)
    d = tl.arange(0, D)
    acc = tl.zeros((BLOCK_N, D), tl.float32)
    for n0 in range(start, stop, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        mask = n < stop
        page = tl.load(table_ptr + b * stride_bt + n // PAGE, mask=mask, other=0).to(tl.int64)
        row = ((page * PAGE + n % PAGE) * KV_HEADS + kvh) * D
        acc += tl.load(k_ptr + row[:, None] + d[None, :], mask=mask[:, None], other=0.0).to(tl.float32)
        acc += tl.load(v_ptr + row[:, None] + d[None, :], mask=mask[:, None], other=0.0).to(tl.float32)
    tl.store(out_ptr + (b * KV_HEADS + kvh) * SPLITS + split, tl.sum(tl.sum(acc, 1), 0))


@triton.jit
def _combine_kernel(part_ptr, out_ptr, KV_HEADS: tl.constexpr, GROUP: tl.constexpr, SPLITS: tl.constexpr):
    b, h = tl.program_id(0), tl.program_id(1)
    s = tl.arange(0, SPLITS)
    tl.store(out_ptr + b * KV_HEADS * GROUP + h, tl.sum(tl.load(part_ptr + (b * KV_HEADS + h // GROUP) * SPLITS + s), 0))


def case(heads, kv, d, batch, ctx, sms) -> dict:
    nbytes = 2 * batch * ctx * kv * d * 2
    splits = num_splits_for(batch, kv, MAX_MODEL_LEN, sms)
    progs = batch * kv * splits
    per_prog = batch * ctx * kv * d // progs
    block = min(2048, per_prog)

    def read():
        k = torch.randn(batch * ctx * kv * d, device="cuda", dtype=DT)
        v, out = torch.randn_like(k), torch.empty(progs, device="cuda")
        return lambda: _read_kernel[(progs,)](k, v, out, per_prog, BLOCK=block)

    def paged_read(combine: bool):
        def make():
            k, v, tables = paged(batch, ctx, kv, d)
            part = torch.empty(progs, device="cuda")
            out = torch.empty(batch * heads, device="cuda")

            def run():
                _paged_read_kernel[(batch, kv, splits)](k, v, tables, part, ctx, tables.stride(0), KV_HEADS=kv, D=d,
                                                        PAGE=PAGE, SPLITS=splits, BLOCK_N=64)
                if combine:
                    _combine_kernel[(batch, heads)](part, out, KV_HEADS=kv, GROUP=heads // kv, SPLITS=splits)
            return run
        return make

    row = {"heads": f"{heads}/{kv}x{d}", "batch": batch, "ctx": ctx, "MB": round(nbytes / 2**20, 1),
           "splits": splits, "copy_TBps": round(copy_bw(nbytes), 3)}
    tbps = {name: nbytes / graph_ms(make, nbytes) / 1e9 for name, make in
            [("read", read), ("paged_read", paged_read(False)), ("paged_read_combine", paged_read(True))]}
    tbps["decode"] = decode_tbps(batch, ctx, heads, kv, d, splits, pdl=False)
    tbps["decode_pdl"] = decode_tbps(batch, ctx, heads, kv, d, splits, pdl=True)
    for name, tb in tbps.items():
        row[f"{name}_TBps"] = round(tb, 3)
        row[f"{name}_vs_copy"] = round(tb / row["copy_TBps"], 3)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    result = {**environment(), "cases": []}
    for c in CASES:
        result["cases"].append(case(*c, sms))
        print(json.dumps(result["cases"][-1]), file=sys.stderr, flush=True)
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "decode_floor.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
