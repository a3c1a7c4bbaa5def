"""The KV transfer half of `c2c_speed.py`: the sharer's KV read co-located (`export_kv` on the device)
and disaggregated (a worker's real ExportKV RPC on loopback, `kv_from_proto`, the copy to the device);
and the two helpers both halves use (device sync, progress log)."""
from __future__ import annotations

import asyncio
import json
import statistics
import sys
import time

import torch

MAX_MESSAGE_BYTES = 1 << 30


def sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def log(msg: str) -> None:
    print(f"[c2c_speed {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def colocated_transfer(bench, p: int) -> dict:
    """The sharer's KV of P-1 tokens of the layers an open gate reads, read on the device (`export_kv`)."""
    rid = bench.prefilled_sharer(p)
    rows = []
    try:
        for _ in range(bench.args.repeats + 1):
            sync()
            t0 = time.perf_counter()
            nbytes = 0
            for run in bench.sharer_layer_runs():
                kv = bench.engine.export_kv(rid, run, 0, p - 1)
                nbytes += 2 * kv.k.numel() * kv.k.element_size()
            sync()
            rows.append({"s": time.perf_counter() - t0, "bytes": nbytes})
    finally:
        bench.engine.release(rid)
        bench.engine.step()
    rows = rows[1:]
    sec = statistics.median(r["s"] for r in rows)
    return {"bytes": rows[0]["bytes"], "ms": round(sec * 1e3, 3), "GB_s": round(rows[0]["bytes"] / sec / 1e9, 2)}


def disaggregated_transfer(bench, lengths: list[int]) -> dict[int, dict]:
    return asyncio.run(_disaggregated(bench, lengths))


async def _disaggregated(bench, lengths: list[int]) -> dict[int, dict]:
    """The sharer's KV through a worker's real ExportKV RPC on loopback, decoded and copied to the device.
    The worker serves this same engine (its thread steps it from here on)."""
    import grpc

    from tandem.v1 import orchestrator_pb2 as pb
    from tandem.v1 import worker_pb2 as wpb
    from tandem.v1 import worker_pb2_grpc
    from workers.convert import kv_from_proto
    from workers.service import grpc_options, start_worker_server

    device = bench.engine.model("recv").runner.device
    server, loop, port = await start_worker_server(bench.engine, device=str(device), max_message_bytes=MAX_MESSAGE_BYTES)
    out: dict[int, dict] = {}
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=grpc_options(MAX_MESSAGE_BYTES)) as channel:
            stub = worker_pb2_grpc.WorkerStub(channel)
            for p in lengths:
                n, rid = p - 1, f"rpc-xfer-{p}-{time.monotonic_ns()}"
                stream = stub.Generate(wpb.WorkerGenerateRequest(
                    request_id=rid, model="shr", prompt_token_ids=bench.prompt(n), prefill_only=True, cache_salt=rid,
                    sampling=pb.SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)))
                first = await stream.read()
                assert first.ready, first
                rows = []
                for _ in range(bench.args.repeats + 1):
                    sync()
                    t0 = time.perf_counter()
                    msgs = [await stub.ExportKV(wpb.ExportKVRequest(request_id=rid, layer_start=r.start, layer_end=r.stop,
                                                                    start=0, end=n))
                            for r in bench.sharer_layer_runs()]
                    t1 = time.perf_counter()
                    slices = [kv_from_proto(m) for m in msgs]
                    t2 = time.perf_counter()
                    on_device = [(s.k.to(device), s.v.to(device)) for s in slices]
                    sync()
                    t3 = time.perf_counter()
                    assert all(k.shape[1] == n for k, _ in on_device)
                    rows.append({"rpc": t1 - t0, "decode": t2 - t1, "to_device": t3 - t2, "total": t3 - t0,
                                 "bytes": sum(len(m.k.data) + len(m.v.data) for m in msgs)})
                await stub.Release(wpb.RequestRef(request_id=rid))
                while await stream.read() is not grpc.aio.EOF:
                    pass
                rows = rows[1:]
                med = {k: statistics.median(r[k] for r in rows) for k in ("rpc", "decode", "to_device", "total")}
                nbytes = rows[0]["bytes"]
                out[p] = {"bytes": nbytes, "ms": round(med["total"] * 1e3, 3), "GB_s": round(nbytes / med["total"] / 1e9, 2),
                          "rpc_ms": round(med["rpc"] * 1e3, 3), "kv_from_proto_ms": round(med["decode"] * 1e3, 3),
                          "to_device_ms": round(med["to_device"] * 1e3, 3)}
                log(f"P={p} disaggregated transfer {json.dumps(out[p])}")
    finally:
        await server.stop(None)
        loop.stop()
    return out
