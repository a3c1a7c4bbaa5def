"""Bad Worker calls end in INVALID_ARGUMENT naming the proto field, or NOT_FOUND for an unknown request,
and leave nothing behind: no registration, no stuck command stream."""
from __future__ import annotations

import asyncio

import grpc
import pytest
from conftest import make_engine

from tandem.v1 import orchestrator_pb2 as pb
from tandem.v1 import worker_pb2 as wpb
from tandem.v1 import worker_pb2_grpc
from workers.service import WorkerService, start_worker_server


def _greedy(n: int) -> pb.SamplingParams:
    return pb.SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


async def _with_worker(path, body) -> None:
    engine = make_engine(path)
    server, loop, port = await start_worker_server(engine)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await body(worker_pb2_grpc.WorkerStub(channel), loop)
    finally:
        await server.stop(None)
        loop.stop()


async def _drain(call) -> tuple[list[int], str]:
    ids, reason = [], ""
    while (step := await call.read()) is not grpc.aio.EOF:
        ids += list(step.token_ids)
        reason = step.finish_reason or reason
    return ids, reason


async def _refused(rpc) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await rpc
    return e.value


def _zero_kv(layers: int, tokens: int) -> wpb.KVData:
    shape = [layers, tokens, 2, 16]
    zeros = wpb.Tensor(data=bytes(4 * layers * tokens * 2 * 16), dtype="float32", shape=shape)
    return wpb.KVData(layer_start=0, layer_end=layers, k=zeros, v=zeros)


def _connect(s: worker_pb2_grpc.WorkerStub) -> tuple[grpc.aio.StreamStreamCall, asyncio.Queue]:
    commands: asyncio.Queue = asyncio.Queue()

    async def feed():
        while (command := await commands.get()) is not None:
            yield command

    return s.Connect(feed()), commands


async def _steps_until_finished(conn, request_ids: set[str]) -> dict[str, wpb.WorkerStep]:
    finals: dict[str, wpb.WorkerStep] = {}
    while set(finals) != request_ids:
        batch = await asyncio.wait_for(conn.read(), 10)
        finals.update({st.request_id: st for st in batch.steps if st.finished})
    return finals


async def _submission_leaves_nothing_behind(s, loop, bad: wpb.WorkerGenerateRequest, code: grpc.StatusCode) -> None:
    error = await _refused(_drain(s.Generate(bad)))
    assert error.code() == code, error.details()
    assert not loop.sinks and (await s.GetLoad(wpb.GetLoadRequest())).in_flight == 0
    good = wpb.WorkerGenerateRequest(request_id=bad.request_id, prompt_token_ids=[5, 6], sampling=_greedy(2))
    assert (await _drain(s.Generate(good)))[1] == "length"
    conn, commands = _connect(s)
    commands.put_nowait(wpb.WorkerCommand(generate=bad))
    commands.put_nowait(wpb.WorkerCommand(generate=wpb.WorkerGenerateRequest(
        request_id="after", prompt_token_ids=[5, 6], sampling=_greedy(2))))
    finals = await _steps_until_finished(conn, {bad.request_id, "after"})
    assert finals[bad.request_id].status_code == code.value[0]
    assert finals["after"].finish_reason == "length"
    commands.put_nowait(None)
    assert not loop.sinks


def test_unknown_priority_is_refused_and_frees_the_request_id(tiny_path):
    async def body(s, loop) -> None:
        bad = wpb.WorkerGenerateRequest(request_id="p", prompt_token_ids=[5, 6, 7], sampling=_greedy(3), priority=7)
        error = await _refused(_drain(s.Generate(bad)))
        assert error.details().startswith("priority:")
        await _submission_leaves_nothing_behind(s, loop, bad, grpc.StatusCode.INVALID_ARGUMENT)

    asyncio.run(_with_worker(tiny_path, body))


def test_an_unexpected_submission_error_frees_the_request_id(tiny_path, monkeypatch):
    def broken(self, request):
        raise RuntimeError("a bug")

    monkeypatch.setattr(WorkerService, "_add", broken)

    async def body(s, loop) -> None:
        bad = wpb.WorkerGenerateRequest(request_id="b", prompt_token_ids=[5, 6], sampling=_greedy(2))
        error = await _refused(_drain(s.Generate(bad)))
        assert error.code() == grpc.StatusCode.UNKNOWN and not loop.sinks
        conn, commands = _connect(s)
        commands.put_nowait(wpb.WorkerCommand(generate=bad))
        commands.put_nowait(wpb.WorkerCommand(generate=wpb.WorkerGenerateRequest(request_id="c")))
        finals = await _steps_until_finished(conn, {"b", "c"})
        assert finals["b"].status_code == grpc.StatusCode.INTERNAL.value[0]
        assert finals["c"].status_code == grpc.StatusCode.INTERNAL.value[0]
        commands.put_nowait(None)
        assert not loop.sinks

    asyncio.run(_with_worker(tiny_path, body))


@pytest.mark.parametrize("layer_start,layer_end,field", [
    (2, 2, "layer_end"), (2, 1, "layer_end"), (3, 0, "layer_start"), (5, 0, "layer_start"), (7, 9, "layer_start"),
    (0, 4, "layer_end"), (-1, 2, "layer_start"),
])
def test_export_of_a_layer_range_outside_the_model_is_refused(tiny_path, layer_start, layer_end, field):
    async def body(s, loop) -> None:
        call = s.Generate(wpb.WorkerGenerateRequest(request_id="src", prompt_token_ids=list(range(5, 15)),
                                                    sampling=_greedy(3), prefill_only=True))
        assert (await call.read()).ready
        error = await _refused(s.ExportKV(wpb.ExportKVRequest(request_id="src", layer_start=layer_start,
                                                              layer_end=layer_end)))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and error.details().startswith(f"{field}:")
        kv = await s.ExportKV(wpb.ExportKVRequest(request_id="src", layer_start=2))
        assert (kv.layer_start, kv.layer_end) == (2, 3)
        await s.Release(wpb.RequestRef(request_id="src"))

    asyncio.run(_with_worker(tiny_path, body))


@pytest.mark.parametrize("tail", [[-1], [10**12], [5, 384]])
def test_tokenize_with_a_history_tail_outside_the_vocabulary_is_refused(tiny_path, tail):
    async def body(s, loop) -> None:
        turn = wpb.TokenizeRequest(messages=pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="hi")]),
                                   history=[pb.ChatMessage(role="user", content="a"),
                                            pb.ChatMessage(role="assistant", content="b")], history_tail=tail)
        error = await _refused(s.Tokenize(turn))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and error.details().startswith("history_tail:")
        turn.history_tail[:] = [5]
        assert (await s.Tokenize(turn)).token_ids

    asyncio.run(_with_worker(tiny_path, body))


def test_request_scoped_calls_name_token_ids_and_token_id(tiny_path):
    async def body(s, loop) -> None:
        call = s.Generate(wpb.WorkerGenerateRequest(request_id="p", prompt_token_ids=[5, 6, 7], sampling=_greedy(3),
                                                    prefill_only=True))
        assert (await call.read()).ready
        for rpc, field in [(s.Extend(wpb.ExtendRequest(request_id="p", token_ids=[10**6])), "token_ids"),
                           (s.Extend(wpb.ExtendRequest(request_id="p")), "token_ids"),
                           (s.Inject(wpb.InjectRequest(request_id="p", token_id=7)), "request_id")]:
            error = await _refused(rpc)
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and error.details().startswith(f"{field}:")
        await s.Release(wpb.RequestRef(request_id="p"))

    asyncio.run(_with_worker(tiny_path, body))


def test_request_scoped_calls_on_an_unknown_or_finished_request_are_not_found(tiny_path):
    async def body(s, loop) -> None:
        assert (await _drain(s.Generate(wpb.WorkerGenerateRequest(
            request_id="done", prompt_token_ids=[5, 6], sampling=_greedy(2)))))[1] == "length"
        for rid in ("ghost", "done"):
            for rpc in [s.Release(wpb.RequestRef(request_id=rid)), s.Pause(wpb.RequestRef(request_id=rid)),
                        s.Resume(wpb.RequestRef(request_id=rid)),
                        s.Extend(wpb.ExtendRequest(request_id=rid, token_ids=[5])),
                        s.Inject(wpb.InjectRequest(request_id=rid, token_id=5)),
                        s.ExportKV(wpb.ExportKVRequest(request_id=rid, layer_start=1)),
                        s.ImportKV(wpb.ImportKVRequest(request_id=rid, kv=_zero_kv(3, 1)))]:
                error = await _refused(rpc)
                assert error.code() == grpc.StatusCode.NOT_FOUND and error.details().startswith("request_id:")

    asyncio.run(_with_worker(tiny_path, body))
