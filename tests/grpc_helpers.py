"""Shared helpers of the gRPC tests: a server on a tiny model, stubs, waiting for KV blocks to come back."""
from __future__ import annotations

import time

import grpc

from tandem.v1 import orchestrator_pb2 as pb
from tandem.v1 import orchestrator_pb2_grpc


def tiny_config(path, **server):
    from orchestrator.config import parse

    return parse({"server": {"drain_grace_s": 10, **server},
                  "models": [{"name": "tiny", "path": str(path), "kv_cache_mb": 4, "block_size": 4, "dtype": "float32"}],
                  "workers": [{"models": ["tiny"], "threads": 1}]})


def stub(address: str) -> orchestrator_pb2_grpc.OrchestratorStub:
    return orchestrator_pb2_grpc.OrchestratorStub(grpc.insecure_channel(address))


def sampling(**kw) -> pb.SamplingParams:
    kw.setdefault("temperature", 0.0)
    return pb.SamplingParams(**kw)


def wait_blocks_free(s, timeout: float = 5.0) -> pb.Loads:
    """Until every worker's KV pool is entirely free and nothing runs; returns the last loads."""
    deadline = time.monotonic() + timeout
    while True:
        loads = s.GetLoads(pb.GetLoadsRequest())
        models = [m for w in loads.workers for m in w.models]
        done = models and all(m.free_blocks == m.num_blocks and not (m.running or m.waiting or m.paused) for m in models)
        if done and loads.in_flight == 0:
            return loads
        if time.monotonic() > deadline:
            raise AssertionError(f"KV blocks not freed within {timeout} s: {loads}")
        time.sleep(0.05)


def wait_ready(address: str, timeout: float = 60.0) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    h = health_pb2_grpc.HealthStub(grpc.insecure_channel(address))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            r = h.Check(health_pb2.HealthCheckRequest(service="tandem.v1.Orchestrator"), timeout=2)
            if r.status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.RpcError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{address} not ready within {timeout} s")


def check_cancel_and_abort_free_blocks(s, request) -> None:
    """A long request (`request(request_id)`) cancelled by the client, then another aborted by id while it
    streams: the first frees every block; the second ends CANCELLED after a final with finish reason abort."""
    import threading

    call = s.Generate(request("cancel-me"))
    for _, msg in zip(range(3), call):
        assert msg.HasField("chunk")
    call.cancel()
    wait_blocks_free(s)

    msgs, errors = [], []

    def consume():
        try:
            msgs.extend(s.Generate(request("abort-me")))
        except grpc.RpcError as e:
            errors.append(e)

    reader = threading.Thread(target=consume)
    reader.start()
    deadline = time.monotonic() + 10
    while not msgs and time.monotonic() < deadline:
        time.sleep(0.005)
    assert s.Abort(pb.AbortRequest(request_ids=["abort-me"])).aborted == ["abort-me"]
    reader.join(10)
    assert errors and errors[0].code() == grpc.StatusCode.CANCELLED
    assert msgs[-1].HasField("final") and msgs[-1].final.finish_reason == pb.FINISH_REASON_ABORT
    wait_blocks_free(s)
