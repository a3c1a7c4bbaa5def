"""Prometheus metrics of the orchestrator, in a registry of its own."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from tandem.v1 import orchestrator_pb2 as pb

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("tandem_requests", "requests by pipeline and outcome", ["pipeline", "outcome"], registry=r)
        self.ttft = Histogram("tandem_ttft_seconds", "arrival to first streamed token", ["pipeline"],
                              buckets=LATENCY_BUCKETS, registry=r)
        self.inter_token = Histogram("tandem_inter_token_seconds", "time between streamed tokens", ["pipeline"],
                                     buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("tandem_queue_depth", "requests waiting for admission", registry=r)
        self.in_flight = Gauge("tandem_in_flight", "requests admitted and not finished", registry=r)
        self.kv_usage = Gauge("tandem_kv_usage_ratio", "used / total KV blocks", ["worker", "model"], registry=r)
        self.prefix_hit_rate = Gauge("tandem_prefix_cache_hit_rate", "prefix-cache hit rate (tokens)",
                                     ["worker", "model"], registry=r)
        self.worker_up = Gauge("tandem_worker_up", "1 while the worker is ready", ["worker"], registry=r)
        self.address = ""

    def serve(self, host: str, port: int) -> str:
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        self.address = f"{host}:{server.server_port}"
        return self.address

    def observe_loads(self, loads: list[pb.WorkerLoad]) -> None:
        for load in loads:
            self.worker_up.labels(load.worker_id).set(1.0 if load.state == pb.WORKER_STATE_READY else 0.0)
            for m in load.models:
                used = (m.num_blocks - m.free_blocks) / m.num_blocks if m.num_blocks else 0.0
                self.kv_usage.labels(load.worker_id, m.model).set(used)
                self.prefix_hit_rate.labels(load.worker_id, m.model).set(m.prefix_hit_rate)
