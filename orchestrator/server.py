"""The orchestrator's gRPC server: service wiring, health, reflection, metrics, SIGTERM drain.

Entry points:
- `await serve(config, port)`: run in this event loop until SIGTERM/SIGINT (then drain).
- `run(config, port)`: the same, blocking (what `tandem serve` calls).
- `launch(config, port=0)`: start orchestrator + workers in a child process; returns a
  `ServerHandle` with `.address` and `.stop()` (for tests, the CLI's client commands, the demo).
"""
from __future__ import annotations

import asyncio
import logging
import signal
import time
from typing import Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from orchestrator.config import TandemConfig
from orchestrator.launch import ServerHandle, launch
from orchestrator.metrics import Metrics
from orchestrator.service import OrchestratorService
from orchestrator.workers import WorkerPool
from tandem.v1 import orchestrator_pb2, orchestrator_pb2_grpc
from workers.service import grpc_options

log = logging.getLogger("tandem.orchestrator")
SERVICE_NAME = orchestrator_pb2.DESCRIPTOR.services_by_name["Orchestrator"].full_name
READY_LINE = "TANDEM_ORCHESTRATOR_READY"

__all__ = ["OrchestratorServer", "ServerHandle", "launch", "run", "serve"]


class OrchestratorServer:
    def __init__(self, config: TandemConfig, port: int | None = None):
        self.config = config
        self.port = config.server.port if port is None else port
        self.metrics = Metrics()
        self.pool = WorkerPool(config, on_change=self._update_health)
        self.service = OrchestratorService(config, self.pool, self.metrics)
        self.health = health.aio.HealthServicer()
        self.server = grpc.aio.server(options=grpc_options(config.server.max_message_mb << 20))
        self.address = ""
        self._sweeper: asyncio.Task | None = None

    async def start(self, wait_workers: bool = True) -> str:
        orchestrator_pb2_grpc.add_OrchestratorServicer_to_server(self.service, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        names = (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, self.server)
        host = self.config.server.host
        try:
            bound = self.server.add_insecure_port(f"{host}:{self.port}")
        except RuntimeError:
            bound = 0
        if not bound:
            raise OSError(f"--port: cannot bind {host}:{self.port} (in use by another server?)")
        self.address = f"{host}:{bound}"
        await self.server.start()
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        await self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
        if self.config.server.metrics_port is not None:
            self.metrics.serve(host, self.config.server.metrics_port)
        await self.pool.start()
        self._sweeper = asyncio.create_task(self._sweep())
        if wait_workers:
            await self.pool.wait_ready(self.config.server.worker_start_timeout_s)
        return self.address

    def _update_health(self) -> None:
        if self.service.draining:
            return
        ready = all(self.pool.model_ready(m.name) for m in self.config.models)
        status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
        asyncio.get_running_loop().create_task(self.health.set(SERVICE_NAME, status))

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(min(1.0, self.config.server.session_ttl_s / 4))
            self.service.sessions.sweep()
            self.metrics.queue_depth.set(self.service.admission.waiting)
            self.metrics.observe_loads([h.last_load for h in self.pool.handles.values() if h.last_load is not None])

    async def drain_and_stop(self, grace_s: float | None = None) -> None:
        """No new admissions; in-flight requests get `grace_s` to finish; then workers and server stop."""
        grace_s = self.config.server.drain_grace_s if grace_s is None else grace_s
        self.service.draining = True
        await self.health.enter_graceful_shutdown()
        deadline = time.monotonic() + grace_s
        while self.service.inflight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await self.server.stop(grace=0.5)
        if self._sweeper is not None:
            self._sweeper.cancel()
        await self.pool.stop()


async def serve(config: TandemConfig, port: int | None = None,
                on_ready: Callable[[OrchestratorServer], None] | None = None) -> None:
    """Serve until SIGTERM or SIGINT, then drain within `config.server.drain_grace_s`."""
    server = OrchestratorServer(config, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        if await _started_before(server, stop):
            if on_ready is not None:
                on_ready(server)
            await stop.wait()
    finally:
        await server.drain_and_stop()


async def _started_before(server: OrchestratorServer, stop: asyncio.Event) -> bool:
    """Start the server unless `stop` comes first (a signal while workers load); False then."""
    start, stopped = asyncio.ensure_future(server.start()), asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait((start, stopped), return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
        if not start.done():
            start.cancel()
            await asyncio.gather(start, return_exceptions=True)
    return not start.cancelled() and start.result() is not None


def run(config: TandemConfig, port: int | None = None,
        on_ready: Callable[[OrchestratorServer], None] | None = None) -> None:
    asyncio.run(serve(config, port, on_ready))
