"""gRPC overhead: the same generation through orchestrator + worker over loopback beside the engine called
in process, in one run, at 1 and 64 concurrent streams. Prints one JSON object.

    python bench/grpc_overhead.py [--model PATH] [--streams 1,64] [--max-tokens 64] [--reps 3]

Default model: a tiny random Qwen2 (tests/tiny.py), so it runs anywhere and the engine's step is short,
which makes the gRPC path's cost visible. Both sides: same engine config, same prompts (token ids),
greedy, ignore_eos, every stream `max_tokens` tokens, one engine thread.

- in process: `Engine.add_request` x N, then `step()` until done (one StepOutput per request per step);
- over gRPC: N concurrent `Generate` streams from one asyncio client (tandem.AsyncClient) to one
  orchestrator process, which runs them on one worker process over one Connect stream (one message per
  engine step for all of them) and streams one message per request per step to the client.

Figures: `added_ms_per_message` = (gRPC wall - in-process wall) / messages per stream (the extra time a
stream waits per streamed message; it carries the difference between the worker's engine and the in-process
one, which on an idle many-core host varies by +-0.3 ms per step between processes);
`stream_gap_over_engine_ms` = the mean gap between a stream's messages at the client minus the engine's
own time per token reported in its Final (both over first to last token), same run; median over streams
(what the serving path adds to each message's interval); `messages_per_s` = messages delivered through the
orchestrator per second of wall time (bounded by the engine's step rate, which the in-process figure shows);
`orchestrator_cpu_s_per_message` = the orchestrator's CPU time per message (its capacity: 1 / that; null
when the run used under 50 ms of CPU, below /proc's 10 ms tick resolution).

`floor_*`: the same streams served by a bare grpc.aio server process that only relays: every `step` (the
in-process engine's step time) it yields one pre-serialized GenerateResponse to each open stream. Its CPU per
message is what grpc.aio itself costs per streamed message on this machine, the floor under the orchestrator's.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def prompts(n: int, rep: int, length: int = 16, vocab: int = 300) -> list[list[int]]:
    """Distinct prompts per stream and repetition (no prefix-cache hits between them)."""
    return [[3 + (rep * 7919 + i * 131 + j * 17) % (vocab - 3) for j in range(length)] for i in range(n)]


def in_process(engine, n: int, rep: int, max_tokens: int) -> dict:
    from workers.engine import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    t0 = time.perf_counter()
    for i, p in enumerate(prompts(n, rep)):
        engine.add_request(f"r{rep}-{i}", p, params)
    messages = steps = 0
    while engine.has_unfinished:
        outs = engine.step()
        messages += sum(1 for o in outs if o.new_token_ids or o.finished)
        steps += 1
    return {"wall_s": time.perf_counter() - t0, "messages": messages, "steps": steps}


async def over_grpc(address: str, n: int, rep: int, max_tokens: int) -> dict:
    from tandem import AsyncClient

    async with AsyncClient(address, timeout=600) as client:
        async def one(p: list[int]) -> tuple[int, int, float]:
            stream = await client.generate(token_ids=p, max_tokens=max_tokens, temperature=0.0, ignore_eos=True,
                                           stream=True)
            arrivals = [time.perf_counter() async for _ in stream]
            gap = (arrivals[-1] - arrivals[0]) / (len(arrivals) - 1) if len(arrivals) > 2 else 0.0
            # the client's gap between messages beside the engine's own time per token, in the same run
            return len(arrivals) + 1, len(stream.result.token_ids), gap - stream.result.timings.per_token_s

        t0 = time.perf_counter()
        got = await asyncio.gather(*(one(p) for p in prompts(n, rep)))
        wall = time.perf_counter() - t0
    assert all(tokens == max_tokens for _, tokens, _ in got), got
    return {"wall_s": wall, "messages": sum(m for m, _, _ in got),
            "gap_over_engine_s": statistics.median(g for _, _, g in got)}


async def _floor_serve(ready, max_tokens: int, step_s: float) -> None:
    import grpc

    from tandem.v1 import orchestrator_pb2 as pb

    message = pb.GenerateResponse(request_id="r-0123456789abcdef", chunk=pb.Chunk(
        token_ids=[1234], text=" word", sources=["m"])).SerializeToString()
    streams: set[asyncio.Queue] = set()

    async def tick() -> None:
        while True:
            await asyncio.sleep(step_s)
            for queue in list(streams):
                queue.put_nowait(message)

    async def generate(request: bytes, context):
        queue: asyncio.Queue = asyncio.Queue()
        streams.add(queue)
        try:
            for _ in range(max_tokens + 1):
                yield await queue.get()
        finally:
            streams.discard(queue)

    handler = grpc.method_handlers_generic_handler("floor.Floor", {
        "Generate": grpc.unary_stream_rpc_method_handler(generate)})
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    ticker = asyncio.create_task(tick())
    ready.put((os.getpid(), port))
    await server.wait_for_termination()
    ticker.cancel()


def _floor_process(ready, max_tokens: int, step_s: float) -> None:
    asyncio.run(_floor_serve(ready, max_tokens, step_s))


async def _floor_client(port: int, n: int) -> int:
    import grpc

    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_stream("/floor.Floor/Generate")

        async def one() -> int:
            return sum([1 async for _ in call(b"")])

        return sum(await asyncio.gather(*(one() for _ in range(n))))


def floor(n: int, max_tokens: int, step_s: float, reps: int) -> dict:
    """grpc.aio's own cost per streamed message: a bare relay server at the engine's step rate."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Queue()
    proc = ctx.Process(target=_floor_process, args=(ready, max_tokens, step_s), daemon=True)
    proc.start()
    try:
        pid, port = ready.get(timeout=60)
        asyncio.run(_floor_client(port, n))
        cpu, walls, messages = [], [], 0
        for _ in range(reps):
            c0, t0 = cpu_seconds(pid), time.perf_counter()
            messages = asyncio.run(_floor_client(port, n))
            walls.append(time.perf_counter() - t0)
            cpu.append(cpu_seconds(pid) - c0)
    finally:
        proc.kill()
        proc.join()
    c = statistics.median(cpu)
    return {"floor_messages_per_s": round(messages / statistics.median(walls), 1),
            "floor_cpu_s_per_message": round(c / messages, 7),
            "floor_capacity_messages_per_s": round(messages / c, 1) if c >= 0.05 else None}


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="model directory (default: a tiny random qwen2)")
    ap.add_argument("--streams", default="1,64")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()

    import torch

    from orchestrator.config import parse
    from orchestrator.launch import launch
    from workers.engine import Engine, EngineConfig, ModelConfig

    torch.set_num_threads(1)
    tmp = tempfile.TemporaryDirectory()
    if args.model is None:
        from tiny import make_tiny

        path, name = str(make_tiny("qwen2", Path(tmp.name))), "tiny-qwen2 (random, 3 layers, hidden 64)"
    else:
        path, name = args.model, args.model
    streams = [int(s) for s in args.streams.split(",")]
    model = dict(name="m", path=path, dtype=args.dtype, kv_cache_mb=64, block_size=16)
    engine = Engine(EngineConfig([ModelConfig(**model)], max_num_seqs=max(streams)))
    config = parse({"server": {"max_in_flight": 1024, "drain_grace_s": 5}, "models": [model],
                    "workers": [{"models": ["m"], "threads": 1, "max_num_seqs": max(streams)}]})
    results = []
    with launch(config, timeout=300) as server:
        for n in streams:
            asyncio.run(over_grpc(server.address, n, -1, 4))  # warm-up both paths
            in_process(engine, n, -1, 4)
            base, grpc_runs, cpu = [], [], []
            for rep in range(args.reps):
                base.append(in_process(engine, n, rep, args.max_tokens))
                c0 = cpu_seconds(server.pid)
                grpc_runs.append(asyncio.run(over_grpc(server.address, n, 1000 + rep, args.max_tokens)))
                cpu.append(cpu_seconds(server.pid) - c0)
            b = statistics.median(r["wall_s"] for r in base)
            g = statistics.median(r["wall_s"] for r in grpc_runs)
            msgs = grpc_runs[0]["messages"]
            per_stream = msgs / n
            results.append({
                "streams": n, "max_tokens": args.max_tokens,
                "in_process_wall_s": round(b, 4), "grpc_wall_s": round(g, 4), "ratio": round(g / b, 3),
                "messages": msgs, "in_process_messages": base[0]["messages"],
                "added_ms_per_message": round((g - b) / per_stream * 1e3, 4),
                "stream_gap_over_engine_ms": round(statistics.median(r["gap_over_engine_s"] for r in grpc_runs) * 1e3, 4),
                "in_process_ms_per_step": round(b / base[0]["steps"] * 1e3, 4),
                "messages_per_s": round(msgs / g, 1),
                "in_process_messages_per_s": round(base[0]["messages"] / b, 1),
                "orchestrator_cpu_s_per_message": round(statistics.median(cpu) / msgs, 7),
                "orchestrator_capacity_messages_per_s": (round(msgs / statistics.median(cpu), 1)
                                                         if statistics.median(cpu) >= 0.05 else None),
                **floor(n, args.max_tokens, b / base[0]["steps"], args.reps),
            })
    print(json.dumps({
        "benchmark": "grpc_overhead", "model": name, "reps": args.reps, "torch_threads": 1,
        "machine": {"cpu_count": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "python": platform.python_version(), "torch": torch.__version__},
        "note": "client, orchestrator, worker and the in-process engine share this machine's cores",
        "results": results,
    }, indent=2))
    tmp.cleanup()


if __name__ == "__main__":
    main()
