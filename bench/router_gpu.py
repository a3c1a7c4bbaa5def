"""The R2R router's step on the GPU as the engine runs it (RouterGraphs: copies in, one CUDA graph per batch
bucket), with its top-100 by `kernels.top_values` (Triton) and by `torch.topk`; beside the top-100 over the
vocabulary alone: torch.topk on whole rows, torch.topk on chunks whose tops are merged (tried, no faster),
and the Triton kernel at several chunk sizes. Real shapes (Qwen2.5-0.5B: hidden 896, vocabulary 151,936),
random weights. Prints one JSON object.

    python bench/router_gpu.py [--batches 1,4,16] [--chunks 1,32,64] [--triton 1024x4,2048x8,4096x8]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_timing import capture, replay_ms  # noqa: E402

import tandem_kernels as kernels  # noqa: E402
from tandem_kernels import reference  # noqa: E402
from tandem_kernels.triton_topk import top_values  # noqa: E402
from routing.router import Router, RouterConfig, RouterGraphs  # noqa: E402


def top_logits(logits: torch.Tensor, k: int, chunks: int) -> torch.Tensor:
    """Each row's k largest values, sorted: the top k of each chunk's top k (exact)."""
    n = logits.shape[-1]
    piece = -(-n // chunks)
    if chunks <= 1 or piece < k:
        return logits.topk(k, dim=-1).values
    padded = torch.nn.functional.pad(logits, (0, piece * chunks - n), value=float("-inf"))
    return padded.view(*logits.shape[:-1], chunks, piece).topk(k, dim=-1).values.flatten(-2).topk(k, dim=-1).values


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=896)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--batches", default="1,4,16")
    ap.add_argument("--chunks", default="1,32,64")
    ap.add_argument("--triton", default="1024x4,1024x8,2048x4,2048x8,4096x8,4096x16")
    ap.add_argument("--routers", default="256x2,1024x6")
    args = ap.parse_args()
    dev = torch.device("cuda")
    torch.manual_seed(0)
    embedding = torch.randn(args.vocab, args.hidden, dtype=torch.bfloat16, device=dev)
    rows = []
    triton_top = kernels.top_values
    for b in map(int, args.batches.split(",")):
        logits = torch.randn(b, args.vocab, device=dev) * 3
        want = logits.topk(100, dim=-1).values
        for c in map(int, args.chunks.split(",")):
            assert torch.equal(top_logits(logits, 100, c), want), (b, c)
            ms = replay_ms(capture(lambda: top_logits(logits, 100, c)), 200)
            rows.append({"what": "topk", "batch": b, "chunks": c, "us": round(ms * 1000, 2)})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        for spec in args.triton.split(","):
            chunk, warps = map(int, spec.split("x"))
            assert torch.equal(top_values(logits, 100, chunk, warps), want), (b, spec)
            ms = replay_ms(capture(lambda: top_values(logits, 100, chunk, warps)), 200)
            rows.append({"what": "triton top_values", "batch": b, "chunk": chunk, "warps": warps, "us": round(ms * 1000, 2)})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    for spec, top in [(r, t) for r in args.routers.split(",") for t in ("triton", "torch")]:
        kernels.top_values = triton_top if top == "triton" else reference.top_values_ref
        width, depth = map(int, spec.split("x"))
        router = Router(RouterConfig(hidden_size=args.hidden, width=width, depth=depth), embedding).to(dev).eval()
        hidden = torch.randn(16, args.hidden, dtype=torch.bfloat16, device=dev)
        logits = torch.randn(16, args.vocab, device=dev)
        graphs = RouterGraphs(router, hidden, logits)
        for b in map(int, args.batches.split(",")):
            tokens = torch.randint(0, args.vocab, (b,), device=dev)
            graphs(hidden[:b], tokens, logits[:b])
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(200):
                graphs(hidden[:b], tokens, logits[:b])
            end.record()
            torch.cuda.synchronize()
            rows.append({"what": f"router {spec} (copies in + graph), top-100 by {top}", "batch": b,
                         "us": round(start.elapsed_time(end) / 200 * 1000, 2)})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
