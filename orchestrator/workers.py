"""The WorkerPool: spawns one worker process per configured worker, watches them, restarts them with
backoff after a crash, and accepts workers started by hand (RegisterWorker)."""
from __future__ import annotations

import asyncio
import itertools
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import grpc

from orchestrator.config import TandemConfig, WorkerEntry
from tandem.status import StatusError, not_found, unavailable
from tandem.errors import TandemError
from orchestrator.worker_link import WorkerLink
from tandem.v1 import orchestrator_pb2 as pb
from tandem.v1 import worker_pb2 as wpb
from tandem.v1 import worker_pb2_grpc
from workers.service import grpc_options

log = logging.getLogger("tandem.orchestrator")
READY_LINE = "TANDEM_WORKER_READY"
START_ATTEMPTS = 2  # a worker that fails this many starts in a row before the server is up: serve gives up


class WorkerStartError(TandemError):
    """A configured worker keeps exiting before it is ready (a model that does not load, say)."""
REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass(eq=False)
class WorkerHandle:
    worker_id: str
    entry: WorkerEntry | None  # None: started by hand
    models: list[str]
    address: str = ""
    state: int = pb.WORKER_STATE_STARTING
    process: asyncio.subprocess.Process | None = None
    channel: grpc.aio.Channel | None = None
    stub: worker_pb2_grpc.WorkerStub | None = None
    infos: dict[str, pb.ModelInfo] = field(default_factory=dict)
    link: WorkerLink | None = None
    restarts: int = 0
    failures: int = 0
    failed_starts: int = 0  # in a row, each ending before the worker was ready
    last_load: pb.WorkerLoad | None = None

    @property
    def ready(self) -> bool:
        return self.state == pb.WORKER_STATE_READY

    @property
    def busy(self) -> int:
        """Requests this orchestrator has in flight on the worker."""
        return len(self.link) if self.link is not None else 0

    @property
    def pid(self) -> int:
        return self.process.pid if self.process else (self.last_load.pid if self.last_load else 0)


def worker_error(handle: WorkerHandle, e: grpc.aio.AioRpcError) -> StatusError:
    """A failed worker call as the status the orchestrator's client sees."""
    if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED) and not handle.ready:
        return unavailable(f"worker {handle.worker_id} is gone: {e.details()}")
    if e.code() == grpc.StatusCode.UNAVAILABLE:
        return unavailable(f"worker {handle.worker_id}: {e.details()}")
    return StatusError(e.code(), e.details() or str(e.code()))


class WorkerPool:
    def __init__(self, config: TandemConfig, on_change: Callable[[], None] = lambda: None):
        self.config = config
        self.on_change = on_change
        self.max_message_bytes = config.server.max_message_mb << 20
        self.handles: dict[str, WorkerHandle] = {}
        self.stopping = False
        self._ids = itertools.count()
        self._tasks: list[asyncio.Task] = []

    # ----- placement -----

    @property
    def model_names(self) -> list[str]:
        names = [m.name for m in self.config.models]
        extra = {m for h in self.handles.values() for m in h.models if m not in names}
        return names + sorted(extra)

    def pick(self, model: str) -> WorkerHandle:
        hosts = [h for h in self.handles.values() if model in h.models]
        if not hosts:
            raise not_found(f"model: {model!r} is not served here; models: {self.model_names}")
        ready = [h for h in hosts if h.ready]
        if not ready:
            raise unavailable(f"no worker serving model {model!r} is ready")
        return min(ready, key=lambda h: h.busy)

    def model_ready(self, model: str) -> bool:
        return any(h.ready and model in h.models for h in self.handles.values())

    def model_info(self, model: str) -> pb.ModelInfo:
        info = pb.ModelInfo(name=model, ready=self.model_ready(model))
        for h in self.handles.values():
            if model in h.infos:
                info.MergeFrom(h.infos[model])
                info.ready = self.model_ready(model)
                info.workers.append(h.worker_id)
        if not info.path and any(m.name == model for m in self.config.models):
            info.path = self.config.model(model).path
        return info

    # ----- lifecycle -----

    async def start(self) -> None:
        for entry in self.config.workers:
            handle = WorkerHandle(f"w{next(self._ids)}", entry, list(entry.models))
            self.handles[handle.worker_id] = handle
            self._tasks.append(asyncio.create_task(self._supervise(handle)))
        self._tasks.append(asyncio.create_task(self._poll()))

    async def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not all(h.ready for h in self.handles.values() if h.entry):
            if time.monotonic() > deadline:
                raise TimeoutError(f"workers not ready within {timeout:.0f} s")
            failing = [h for h in self.handles.values() if h.entry and h.failed_starts >= START_ATTEMPTS]
            if failing:
                h = failing[0]
                raise WorkerStartError(f"worker {h.worker_id} ({', '.join(h.models)}) exited before it was ready "
                                       f"{h.failed_starts} times in a row; its error is above")
            await asyncio.sleep(0.05)

    def _command(self, handle: WorkerHandle) -> list[str]:
        entry = handle.entry
        cmd = [sys.executable, "-m", "workers", "--port", "0", "--worker-id", handle.worker_id,
               "--parent-pid", str(os.getpid()), "--device", entry.device,
               "--max-num-seqs", str(entry.max_num_seqs), "--threads", str(entry.threads),
               "--max-num-batched-tokens", str(entry.max_num_batched_tokens),
               "--max-message-mb", str(self.config.server.max_message_mb)]
        first = self.config.model(entry.models[0])
        for name in entry.models:
            cmd += ["--model", f"{name}={self.config.model(name).path}"]
        cmd += ["--dtype", first.dtype, "--kv-cache-mb", str(first.kv_cache_mb), "--block-size", str(first.block_size)]
        if first.max_model_len:
            cmd += ["--max-model-len", str(first.max_model_len)]
        from orchestrator.pipelines import REGISTRY

        for name in self.config.pipelines:
            cmd += REGISTRY[name].worker_args(self.config.pipeline_config(name), list(entry.models), self.config)
        return cmd

    async def _supervise(self, handle: WorkerHandle) -> None:
        server = self.config.server
        backoff = server.restart_backoff_s
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
        while not self.stopping:
            started = time.monotonic()
            try:
                handle.process = await asyncio.create_subprocess_exec(
                    *self._command(handle), stdout=asyncio.subprocess.PIPE, env=env)
                line = await asyncio.wait_for(handle.process.stdout.readline(), server.worker_start_timeout_s)
                if not line.startswith(READY_LINE.encode()):
                    raise RuntimeError(f"worker {handle.worker_id} exited before it was ready")
                await self._connect(handle, f"127.0.0.1:{int(line.split()[1])}")
                handle.failed_starts = 0
                await handle.process.wait()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                handle.failed_starts += 1
                log.warning("worker %s failed to start: %s", handle.worker_id, e)
            self._mark_gone(handle, "exited")
            if handle.process and handle.process.returncode is None:
                handle.process.kill()
                await handle.process.wait()
            if self.stopping:
                break
            backoff = server.restart_backoff_s if time.monotonic() - started > 60 else backoff
            log.warning("worker %s is gone; restarting in %.1f s", handle.worker_id, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, server.restart_backoff_max_s)
            handle.restarts += 1

    async def _connect(self, handle: WorkerHandle, address: str) -> None:
        if handle.link is not None:
            await handle.link.close()
        if handle.channel is not None:
            await handle.channel.close(grace=None)
        handle.address = address
        handle.channel = grpc.aio.insecure_channel(address, options=grpc_options(self.max_message_bytes))
        handle.stub = worker_pb2_grpc.WorkerStub(handle.channel)
        handle.link = WorkerLink(handle.stub, lambda e: worker_error(handle, e))
        desc = await handle.stub.Describe(wpb.DescribeRequest(), timeout=10)
        handle.infos = {m.name: m for m in desc.models}
        handle.models = list(handle.infos)
        handle.failures = 0
        handle.state = pb.WORKER_STATE_READY
        self.on_change()

    def _mark_gone(self, handle: WorkerHandle, why: str) -> None:
        if handle.state == pb.WORKER_STATE_UNAVAILABLE:
            return
        handle.state = pb.WORKER_STATE_UNAVAILABLE
        if handle.link is not None:  # requests on a dead worker end now, not at a transport timeout
            handle.link.fail(unavailable(f"worker {handle.worker_id} ({handle.address}) is gone: {why}"))
        log.warning("worker %s (%s) is unavailable: %s", handle.worker_id, handle.address, why)
        self.on_change()

    async def register(self, request: pb.RegisterWorkerRequest) -> str:
        new = False
        if request.worker_id in self.handles:
            handle = self.handles[request.worker_id]
            if handle.ready and handle.address == request.address:
                return handle.worker_id
        else:
            known = [h for h in self.handles.values() if h.entry is None and h.address == request.address]
            new = not known
            handle = known[0] if known else WorkerHandle(f"r{next(self._ids)}", None, list(request.models))
            self.handles[handle.worker_id] = handle
        try:
            await self._connect(handle, request.address)
        except grpc.aio.AioRpcError as e:
            self._mark_gone(handle, e.details() or "unreachable")
            if new:  # a worker never reached leaves no model behind
                del self.handles[handle.worker_id]
                if handle.channel is not None:
                    await handle.channel.close(grace=None)
                self.on_change()
            raise unavailable(f"address: worker at {request.address} is not reachable: {e.details()}") from None
        return handle.worker_id

    async def _poll(self) -> None:
        """Loads every second; doubles as the health check of hand-started workers."""
        while not self.stopping:
            await asyncio.gather(*(self._poll_one(h) for h in list(self.handles.values()) if h.ready))
            await asyncio.sleep(1.0)

    async def _poll_one(self, handle: WorkerHandle) -> None:
        try:
            handle.last_load = await handle.stub.GetLoad(wpb.GetLoadRequest(), timeout=2)
            handle.failures = 0
        except (grpc.aio.AioRpcError, AttributeError) as e:
            handle.failures += 1
            if handle.entry is None and handle.failures >= 3:
                self._mark_gone(handle, str(e))

    async def loads(self) -> list[pb.WorkerLoad]:
        async def one(h: WorkerHandle) -> pb.WorkerLoad:
            load = pb.WorkerLoad()
            if h.ready:
                try:
                    load = await h.stub.GetLoad(wpb.GetLoadRequest(), timeout=2)
                except grpc.aio.AioRpcError:
                    load = pb.WorkerLoad()
            load.worker_id, load.address, load.state = h.worker_id, h.address, h.state
            load.pid, load.restarts = load.pid or h.pid, h.restarts
            load.device = load.device or (h.entry.device if h.entry else "")
            return load

        return list(await asyncio.gather(*(one(h) for h in self.handles.values())))

    async def stop(self) -> None:
        self.stopping = True
        for handle in self.handles.values():
            if handle.process and handle.process.returncode is None:
                handle.process.send_signal(signal.SIGTERM)
        for handle in self.handles.values():
            if handle.process and handle.process.returncode is None:
                try:
                    await asyncio.wait_for(handle.process.wait(), 5)
                except asyncio.TimeoutError:
                    handle.process.kill()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for handle in self.handles.values():
            handle.state = pb.WORKER_STATE_STOPPED
            if handle.link is not None:
                await handle.link.close()
            if handle.channel is not None:
                await handle.channel.close(grace=None)
