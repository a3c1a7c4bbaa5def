"""Decode attention as the engine's step runs it: 24 calls in a row (one per layer, each its own KV pool), in
one CUDA graph, at the 0.5B shape (14/2 heads x 64) and the split count the engine would choose. Times per
layer. To compare two versions of the kernels, run it against each checkout (a `git worktree` of the other):

    python bench/decode_chain.py [--root CHECKOUT] [--label NAME]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ap = argparse.ArgumentParser()
ap.add_argument("--root", default=str(Path(__file__).resolve().parents[1]))
ap.add_argument("--label", default="this checkout")
ap.add_argument("--splits", type=int, default=0, help="force this split count (default: the engine's choice)")
ap.add_argument("--cases", default="1x512,1x4096,8x512,8x4096,128x512,128x4096,256x512", help="BATCHxCTX,...")
args = ap.parse_args()
sys.path.insert(0, args.root)

import torch  # noqa: E402

from gpu_timing import replay_ms  # noqa: E402
from tandem_kernels.triton_decode import decode_attention, num_splits_for  # noqa: E402

PAGE, LAYERS, HEADS, KV_HEADS, D, MAX_MODEL_LEN = 16, 24, 14, 2, 64, 32768


def per_layer_us(batch: int, ctx: int) -> dict:
    g = torch.Generator(device="cuda").manual_seed(0)
    pages = -(-ctx // PAGE)
    shape = (batch * pages, PAGE, KV_HEADS, D)
    caches = [(torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=g),
               torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=g)) for _ in range(LAYERS)]
    tables = torch.zeros(batch, MAX_MODEL_LEN // PAGE, dtype=torch.int32, device="cuda")
    tables[:, :pages] = torch.randperm(batch * pages, device="cuda", generator=g).int().view(batch, pages)
    lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
    q = torch.randn(batch, HEADS, D, device="cuda", dtype=torch.bfloat16)
    out = torch.empty_like(q)
    splits = args.splits or num_splits_for(batch, KV_HEADS, MAX_MODEL_LEN,
                                           torch.cuda.get_device_properties(0).multi_processor_count)

    def step():
        for k, v in caches:
            decode_attention(q, k, v, tables, lens, D**-0.5, num_splits=splits, out=out)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    median_ms = sorted(replay_ms(graph) for _ in range(7))[3]
    return {"batch": batch, "ctx": ctx, "splits": splits, "us_per_layer": round(median_ms * 1000 / LAYERS, 2)}


if __name__ == "__main__":
    cases = [tuple(int(x) for x in case.split("x")) for case in args.cases.split(",")]
    rows = [per_layer_us(b, c) for b, c in cases]
    print(json.dumps({"label": args.label, "device": torch.cuda.get_device_name(), "rows": rows}, indent=1))
