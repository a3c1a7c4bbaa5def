"""Faults with real processes: a worker killed mid-stream, and SIGTERM drain of the orchestrator."""
from __future__ import annotations

import os
import signal
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from grpc_helpers import sampling, stub, tiny_config, wait_blocks_free, wait_ready
from tandem.v1 import orchestrator_pb2 as pb


def _long(rid: str, n: int = 400) -> pb.GenerateRequest:
    return pb.GenerateRequest(request_id=rid, text="go on", sampling=sampling(max_tokens=n, ignore_eos=True))


def test_worker_kill_mid_stream_then_restart(tiny_path):
    from orchestrator.server import launch

    with launch(tiny_config(tiny_path, restart_backoff_s=0.2)) as server:
        s = stub(server.address)
        pid = s.GetLoads(pb.GetLoadsRequest()).workers[0].pid
        call = s.Generate(_long("k1"))
        next(call)
        os.kill(pid, signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as e:
            list(call)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        assert time.monotonic() - t0 < 2.0
        deadline = time.monotonic() + 60
        while True:
            w = s.GetLoads(pb.GetLoadsRequest()).workers[0]
            if w.state == pb.WORKER_STATE_READY and w.pid != pid:
                break
            assert time.monotonic() < deadline, w
            time.sleep(0.1)
        assert w.restarts >= 1
        wait_ready(server.address)
        final = list(s.Generate(pb.GenerateRequest(text="after", sampling=sampling(max_tokens=4))))[-1].final
        assert final.usage.completion_tokens == 4
        wait_blocks_free(s)


def test_sigterm_drains_in_flight_and_refuses_new(tiny_path):
    from orchestrator.server import launch

    server = launch(tiny_config(tiny_path, drain_grace_s=30))
    s = stub(server.address)
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(server.address))
    n_streams, n_tokens = 8, 450
    results: dict = {}
    started = [threading.Event() for _ in range(n_streams)]

    def consume(i: int) -> None:
        try:
            msgs = []
            for msg in s.Generate(_long(f"dr{i}", n_tokens)):
                msgs.append(msg)
                started[i].set()
            results[i] = msgs
        except grpc.RpcError as e:
            results[i] = e
            started[i].set()

    threads = [threading.Thread(target=consume, args=(i,)) for i in range(n_streams)]
    for t in threads:
        t.start()
    for ev in started:
        assert ev.wait(30)
    server.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 2
    while health.Check(health_pb2.HealthCheckRequest(service="tandem.v1.Orchestrator")).status != \
            health_pb2.HealthCheckResponse.NOT_SERVING:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    with pytest.raises(grpc.RpcError) as e:
        list(s.Generate(pb.GenerateRequest(text="late", sampling=sampling(max_tokens=2))))
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "draining" in e.value.details()
    for t in threads:
        t.join(60)
    for i in range(n_streams):
        assert not isinstance(results[i], Exception), results[i]
        assert results[i][-1].final.usage.completion_tokens == n_tokens
    assert server.process.wait(30) == 0


def test_hand_started_worker_registers_and_metrics(tiny_path):
    import subprocess
    import sys
    import urllib.request

    from orchestrator.server import launch

    with launch(tiny_config(tiny_path, metrics_port=0)) as server:
        s = stub(server.address)
        worker = subprocess.Popen([sys.executable, "-m", "workers", "--model", f"hand={tiny_path}", "--kv-cache-mb", "2",
                                   "--block-size", "4", "--orchestrator", server.address], stdout=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 60
            while not any(m.name == "hand" and m.ready for m in s.ListModels(pb.ListModelsRequest()).models):
                assert time.monotonic() < deadline and worker.poll() is None
                time.sleep(0.2)
            req = pb.GenerateRequest(text="hi", single=pb.SingleParams(model="hand"), sampling=sampling(max_tokens=3))
            assert list(s.Generate(req))[-1].final.usage.completion_tokens == 3
        finally:
            worker.terminate()
            worker.wait(10)
        with pytest.raises(grpc.RpcError) as e:
            s.RegisterWorker(pb.RegisterWorkerRequest(address="127.0.0.1:1", models=["ghost"]))
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "address" in e.value.details()
        assert "ghost" not in [m.name for m in s.ListModels(pb.ListModelsRequest()).models]
        for name in ("bogus-1", "bogus-2"):
            with pytest.raises(grpc.RpcError) as e:
                list(s.Generate(pb.GenerateRequest(text="hi", pipeline=name)))
            assert e.value.code() == grpc.StatusCode.NOT_FOUND
        address = s.GetServerInfo(pb.GetServerInfoRequest()).metrics_address
        text = urllib.request.urlopen(f"http://{address}/metrics", timeout=5).read().decode()
        assert 'tandem_requests_total{outcome="length",pipeline="single"}' in text
        assert 'tandem_requests_total{outcome="invalid",pipeline="unknown"} 2.0' in text and "bogus" not in text
        assert "tandem_ttft_seconds_bucket" in text and "tandem_kv_usage_ratio" in text


def test_admission_queue_sheds_load_and_aborts_leave_it(tiny_path):
    from orchestrator.server import launch

    with launch(tiny_config(tiny_path, max_in_flight=1, max_queue=2)) as server:
        s = stub(server.address)
        busy = s.Generate(_long("busy", 400))
        next(busy)
        sid = s.CreateSession(pb.CreateSessionRequest()).session_id
        turn = s.Generate(pb.GenerateRequest(request_id="turn", session_id=sid, text="a", sampling=sampling(max_tokens=2)))
        _wait_queued(s, 1)
        with pytest.raises(grpc.RpcError) as e:  # a second turn of a session whose turn is queued
            list(s.Generate(pb.GenerateRequest(session_id=sid, text="b", sampling=sampling(max_tokens=2))))
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "busy" in e.value.details()
        queued = s.Generate(_long("queued", 2))
        _wait_queued(s, 2)
        with pytest.raises(grpc.RpcError) as e:
            list(s.Generate(pb.GenerateRequest(text="more", sampling=sampling(max_tokens=2))))
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert s.Abort(pb.AbortRequest(request_ids=["queued"])).aborted == ["queued"]
        with pytest.raises(grpc.RpcError) as e:  # at once, while `busy` still holds the only slot
            list(queued)
        assert e.value.code() == grpc.StatusCode.CANCELLED and "queued" in e.value.details()
        _wait_queued(s, 1)
        busy.cancel()
        assert list(turn)[-1].final.usage.completion_tokens == 2
        assert s.GetSession(pb.GetSessionRequest(session_id=sid)).num_turns == 1
        wait_blocks_free(s)
        final = list(s.Generate(pb.GenerateRequest(text="after", sampling=sampling(max_tokens=2))))[-1].final
        assert final.usage.completion_tokens == 2


def _wait_queued(s, n: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while s.GetLoads(pb.GetLoadsRequest()).queued != n:
        assert time.monotonic() < deadline, f"never {n} queued"
        time.sleep(0.02)
