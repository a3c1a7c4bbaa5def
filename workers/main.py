"""`python -m workers --model [NAME=]PATH ... [--port P] [--orchestrator HOST:PORT]`: one worker process.

Prints `TANDEM_WORKER_READY <port>` on stdout once serving (the only line it writes there); logs go to
stderr. With `--orchestrator` it registers itself there (and again every few seconds, so an
orchestrator restart finds it). With `--parent-pid` it exits when that process is gone. With
`--r2r '{"slm": NAME, "llm": NAME|null, "router": DIR|null, "decider": NAME}'` it hosts the SLM of an r2r
pipeline: routed Generate calls go through an R2R coordinator (co-located when `llm` is hosted here). With
`--c2c '{"receiver": NAME, "sharers": {NAME: {"checkpoint": DIR, "path": MODEL_PATH}}, "mode": MODE}'` it
hosts the receiver of a c2c pipeline: sharers hosted here run here, the others are remote (their tokenizer
and config are read from `path`; their KV arrives through FuseKV)."""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from pathlib import Path

READY_LINE = "TANDEM_WORKER_READY"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m workers", description=__doc__)
    ap.add_argument("--model", action="append", required=True, help="[NAME=]PATH or a known model name; repeatable")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--advertise", default="", help="HOST:PORT the orchestrator should dial (default host:port)")
    ap.add_argument("--orchestrator", default="", help="HOST:PORT of an orchestrator to register with")
    ap.add_argument("--worker-id", default="")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--kv-cache-mb", type=float, default=512.0)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--max-model-len", type=int, default=None)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--max-message-mb", type=int, default=256)
    ap.add_argument("--parent-pid", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--r2r", type=json.loads, default=None,
                    help='JSON {"slm": NAME, "llm": NAME or null, "router": DIR or null, "decider": NAME, "seed": N, '
                         '"llm_prefill": "lazy" or "eager", "llm_stream": BOOL}')
    ap.add_argument("--c2c", type=json.loads, default=None,
                    help='JSON {"receiver": NAME, "sharers": {NAME: {"checkpoint": DIR, "path": MODEL_PATH}}, '
                         '"mode": "sequential" or "parallel"}')
    return ap.parse_args(argv)


def model_configs(args: argparse.Namespace):
    from tandem import assets
    from workers.engine import ModelConfig

    configs = []
    for spec in args.model:
        name, _, path = spec.rpartition("=")
        resolved = assets.resolve(path)
        name = name or (path if path.lower() in assets.REGISTRY else Path(resolved).name)
        configs.append(ModelConfig(name, str(resolved), dtype=args.dtype, device=args.device,
                                   block_size=args.block_size, kv_cache_mb=args.kv_cache_mb,
                                   max_model_len=args.max_model_len))
    return configs


def build_r2r(engine, spec: dict):
    """The R2R coordinator over this engine's SLM, with every decider this worker can run."""
    from routing.deciders import EntropyDecider, ForcedDecider, RandomDecider, RouterDecider
    from routing.r2r import R2R
    from routing.router import Router

    deciders = []
    if spec.get("router"):
        runner = engine.model(spec["slm"]).runner
        router = Router.load(spec["router"], runner.model.model.embed_tokens.weight,
                             slm_hidden_size=runner.spec.hidden_size, device=runner.device)
        deciders.append(RouterDecider(router))
    deciders += [EntropyDecider(), RandomDecider(int(spec.get("seed", 0))), ForcedDecider()]
    return R2R(engine, spec["slm"], spec.get("llm") or None, deciders, spec.get("decider", ""),
               llm_prefill=spec.get("llm_prefill", "lazy"), llm_stream=bool(spec.get("llm_stream", True)))


def build_c2c(engine, spec: dict):
    """The C2C coordinator over this engine's receiver; sharers not hosted here are remote."""
    from c2c.colocated import C2C
    from c2c.remote import RemoteModel
    from tandem import assets

    sharers = spec["sharers"]
    remote = {name: RemoteModel.load(name, assets.resolve(s["path"])) for name, s in sharers.items()
              if name not in engine.models}
    return C2C.from_checkpoints(engine, spec["receiver"], {name: s["checkpoint"] for name, s in sharers.items()},
                                spec.get("mode", "sequential"), remote)


async def _register(args: argparse.Namespace, address: str, models: list[str]) -> None:
    import grpc

    from tandem.v1 import orchestrator_pb2 as pb
    from tandem.v1 import orchestrator_pb2_grpc

    log = logging.getLogger("tandem.worker")
    async with grpc.aio.insecure_channel(args.orchestrator) as channel:
        stub = orchestrator_pb2_grpc.OrchestratorStub(channel)
        request = pb.RegisterWorkerRequest(address=address, models=models, pid=os.getpid(), device=args.device,
                                           worker_id=args.worker_id)
        while True:
            try:
                reply = await stub.RegisterWorker(request, timeout=5)
                request.worker_id = reply.worker_id
            except grpc.aio.AioRpcError as e:
                log.warning("registering with %s failed: %s", args.orchestrator, e.details())
            await asyncio.sleep(5)


async def _watch_parent(pid: int, stop: asyncio.Event) -> None:
    while not stop.is_set():
        if os.getppid() != pid:
            stop.set()
        await asyncio.sleep(1)


async def amain(args: argparse.Namespace) -> None:
    import torch

    from workers.engine import Engine, EngineConfig
    from workers.service import start_worker_server

    if args.threads:
        torch.set_num_threads(args.threads)
    config = EngineConfig(model_configs(args), max_num_batched_tokens=args.max_num_batched_tokens,
                          max_num_seqs=args.max_num_seqs)
    engine = await asyncio.to_thread(Engine, config)
    r2r = build_r2r(engine, args.r2r) if args.r2r else None
    c2c = build_c2c(engine, args.c2c) if args.c2c else None
    server, loop, port = await start_worker_server(engine, args.host, args.port, args.device,
                                                   args.max_message_mb << 20, r2r, c2c)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    tasks = []
    if args.parent_pid:
        tasks.append(asyncio.create_task(_watch_parent(args.parent_pid, stop)))
    if args.orchestrator:
        address = args.advertise or f"{args.host}:{port}"
        tasks.append(asyncio.create_task(_register(args, address, list(engine.models))))
    print(f"{READY_LINE} {port}", flush=True)
    await stop.wait()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await server.stop(grace=1.0)
    loop.stop()


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=os.environ.get("TANDEM_LOG", "WARNING"), stream=sys.stderr,
                        format="%(asctime)s worker[%(process)d] %(levelname)s %(message)s")
    asyncio.run(amain(parse_args(argv)))
