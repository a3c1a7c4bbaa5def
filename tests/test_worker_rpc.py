"""The Worker RPCs that pipelines build on (R2R catch-up, C2C KV transfer), over real gRPC on loopback."""
from __future__ import annotations

import asyncio

import grpc
import pytest
import torch
from conftest import make_engine

from tandem.v1 import orchestrator_pb2 as pb
from tandem.v1 import worker_pb2 as wpb
from tandem.v1 import worker_pb2_grpc
from workers.convert import tensor_from_proto
from workers.engine import SamplingParams
from workers.service import start_worker_server


def _greedy(n: int) -> pb.SamplingParams:
    return pb.SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def _reference(path, prompt: list[int], n: int) -> list[int]:
    return make_engine(path).generate([prompt], SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))[0].token_ids


async def _with_worker(path, body) -> None:
    engine = make_engine(path)
    server, loop, port = await start_worker_server(engine)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await body(worker_pb2_grpc.WorkerStub(channel))
    finally:
        await server.stop(None)
        loop.stop()


async def _tokens(stream) -> tuple[list[int], str]:
    ids, reason = [], ""
    while (step := await stream.read()) is not grpc.aio.EOF:
        ids += list(step.token_ids)
        reason = step.finish_reason or reason
    return ids, reason


def test_export_import_extend_release(tiny_path):
    src_prompt, dst_prompt = list(range(5, 27)), list(range(40, 62))

    async def body(s: worker_pb2_grpc.WorkerStub) -> None:
        src = s.Generate(wpb.WorkerGenerateRequest(request_id="src", prompt_token_ids=src_prompt,
                                                   sampling=_greedy(6), prefill_only=True))
        assert (await src.read()).ready
        kv = await s.ExportKV(wpb.ExportKVRequest(request_id="src"))
        k = tensor_from_proto(kv.k, "k")
        assert list(kv.k.shape) == [3, 22, 2, 16] and kv.layer_start == 0 and kv.layer_end == 3
        part = await s.ExportKV(wpb.ExportKVRequest(request_id="src", layer_start=1, layer_end=3, start=4, end=9))
        assert torch.equal(tensor_from_proto(part.k, "k"), k[1:3, 4:9])

        dst = s.Generate(wpb.WorkerGenerateRequest(request_id="dst", prompt_token_ids=dst_prompt, sampling=_greedy(6),
                                                   prefill_only=True, cache_salt="dst"))
        assert (await dst.read()).ready
        await s.ImportKV(wpb.ImportKVRequest(request_id="dst", kv=kv))
        again = await s.ExportKV(wpb.ExportKVRequest(request_id="dst"))
        assert again.k.data == kv.k.data and again.v.data == kv.v.data
        await s.Extend(wpb.ExtendRequest(request_id="dst", token_ids=[9, 10, 11], sample=True))
        ids, reason = await _tokens(dst)
        assert reason == "length" and ids == _reference(tiny_path, src_prompt + [9, 10, 11], 6)

        await s.Release(wpb.RequestRef(request_id="src"))
        _, reason = await _tokens(src)
        assert reason == "released"
        load = await s.GetLoad(wpb.GetLoadRequest())
        assert all(m.free_blocks == m.num_blocks for m in load.models)

    asyncio.run(_with_worker(tiny_path, body))


def test_pause_holds_a_sequence_until_resume(tiny_path):
    prompt = [5, 6, 7, 8]

    async def body(s: worker_pb2_grpc.WorkerStub) -> None:
        call = s.Generate(wpb.WorkerGenerateRequest(request_id="p", prompt_token_ids=prompt, sampling=_greedy(40)))
        ids = list((await call.read()).token_ids)
        await s.Pause(wpb.RequestRef(request_id="p"))
        reader = asyncio.create_task(_tokens(call))
        await asyncio.sleep(0.3)  # steps already in flight when the pause landed may still arrive
        load = await s.GetLoad(wpb.GetLoadRequest())
        assert load.models[0].paused == 1 and not reader.done()
        await s.Resume(wpb.RequestRef(request_id="p"))
        rest, reason = await reader
        assert reason == "length" and ids + rest == _reference(tiny_path, prompt, 40)

    asyncio.run(_with_worker(tiny_path, body))


def test_bad_worker_calls_name_the_field(tiny_path):
    async def body(s: worker_pb2_grpc.WorkerStub) -> None:
        call = s.Generate(wpb.WorkerGenerateRequest(request_id="d", prompt_token_ids=list(range(5, 15)),
                                                    sampling=_greedy(4), prefill_only=True, cache_salt="x"))
        assert (await call.read()).ready
        for rpc in (s.ExportKV(wpb.ExportKVRequest(request_id="missing")),
                    s.Extend(wpb.ExtendRequest(request_id="missing", token_ids=[1]))):
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await rpc
            assert e.value.code() == grpc.StatusCode.NOT_FOUND and e.value.details().startswith("request_id:")
        cases = [
            (s.Extend(wpb.ExtendRequest(request_id="d", token_ids=[10**9])), "token_ids"),
            (s.ImportKV(wpb.ImportKVRequest(request_id="d", kv=wpb.KVData(
                layer_start=0, layer_end=3, k=wpb.Tensor(data=b"\0" * 8, dtype="float32", shape=[1, 2]),
                v=wpb.Tensor(data=b"\0" * 8, dtype="float32", shape=[1, 2])))), "kv.k"),
            (s.ImportKV(wpb.ImportKVRequest(request_id="d", kv=wpb.KVData(
                k=wpb.Tensor(data=b"\0" * 3, dtype="float32", shape=[1]),
                v=wpb.Tensor(data=b"", dtype="float32", shape=[0])))), "kv.k.data"),
        ]
        for rpc, field in cases:
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await rpc
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
            assert e.value.details().startswith(f"{field}:"), e.value.details()
        await s.Release(wpb.RequestRef(request_id="d"))
        await _tokens(call)
        load = await s.GetLoad(wpb.GetLoadRequest())
        assert all(m.free_blocks == m.num_blocks for m in load.models)

    asyncio.run(_with_worker(tiny_path, body))


def test_an_abort_that_overtakes_its_request_still_aborts_it(tiny_path):
    """Abort and Generate travel on different streams; an abort that lands first must not be lost."""
    prompt = list(range(5, 20))

    async def body(s: worker_pb2_grpc.WorkerStub) -> None:
        assert list((await s.Abort(pb.AbortRequest(request_ids=["late/llm"]))).aborted) == []
        call = s.Generate(wpb.WorkerGenerateRequest(request_id="late/llm", prompt_token_ids=prompt,
                                                    sampling=_greedy(8), propose_only=True))
        assert await _tokens(call) == ([], "abort")
        load = await s.GetLoad(wpb.GetLoadRequest())
        assert all(m.free_blocks == m.num_blocks for m in load.models) and load.models[0].running == 0
        again = s.Generate(wpb.WorkerGenerateRequest(request_id="late/llm", prompt_token_ids=prompt,
                                                     sampling=_greedy(3)))
        assert await _tokens(again) == (_reference(tiny_path, prompt, 3), "length")   # the mark is used once

    asyncio.run(_with_worker(tiny_path, body))


def test_connect_multiplexes_requests_one_message_per_step(tiny_path):
    """Worker.Connect: requests submitted as commands, every engine step's steps for all of them in one
    WorkerSteps, refusals as finished steps with a status code, abort as a command, and the stream's end
    aborting what is still running."""
    prompts = {f"m{i}": list(range(5 + i, 17 + i)) for i in range(3)}

    async def body(s: worker_pb2_grpc.WorkerStub) -> None:
        commands: asyncio.Queue = asyncio.Queue()

        async def feed():
            while (command := await commands.get()) is not None:
                yield command

        call = s.Connect(feed())
        for rid, prompt in prompts.items():
            commands.put_nowait(wpb.WorkerCommand(generate=wpb.WorkerGenerateRequest(
                request_id=rid, prompt_token_ids=prompt, sampling=_greedy(6))))
        commands.put_nowait(wpb.WorkerCommand(generate=wpb.WorkerGenerateRequest(request_id="", sampling=_greedy(2))))
        commands.put_nowait(wpb.WorkerCommand(generate=wpb.WorkerGenerateRequest(
            request_id="nomodel", model="nope", prompt_token_ids=[5], sampling=_greedy(2))))
        commands.put_nowait(wpb.WorkerCommand(generate=wpb.WorkerGenerateRequest(
            request_id="long", prompt_token_ids=list(range(30, 50)), sampling=_greedy(10_000))))
        tokens: dict[str, list[int]] = {rid: [] for rid in [*prompts, "long"]}
        ends: dict[str, wpb.WorkerStep] = {}
        widest = 0
        while len(ends) < len(prompts) + 3:
            batch = await call.read()
            assert batch is not grpc.aio.EOF
            assert len({step.request_id for step in batch.steps}) == len(batch.steps)
            widest = max(widest, len(batch.steps))
            for step in batch.steps:
                if step.request_id in tokens:
                    tokens[step.request_id] += step.token_ids
                if step.finished:
                    ends[step.request_id] = step
            if len(tokens["long"]) >= 3 and "long" not in ends:
                commands.put_nowait(wpb.WorkerCommand(abort=pb.AbortRequest(request_ids=["long"])))
        assert widest >= 3   # one message carried several requests' steps
        for rid, prompt in prompts.items():
            assert ends[rid].finish_reason == "length" and ends[rid].status_code == 0
            assert tokens[rid] == _reference(tiny_path, prompt, 6)
        assert ends[""].status_code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and "request_id" in ends[""].error
        assert ends["nomodel"].status_code == grpc.StatusCode.NOT_FOUND.value[0]
        assert ends["long"].finish_reason == "abort" and len(tokens["long"]) < 10_000

        commands.put_nowait(wpb.WorkerCommand(generate=wpb.WorkerGenerateRequest(
            request_id="orphan", prompt_token_ids=list(range(60, 70)), sampling=_greedy(10_000))))
        assert (await call.read()).steps[0].request_id == "orphan"
        call.cancel()   # the orchestrator is gone: its open requests are aborted and their blocks freed
        for _ in range(100):
            load = await s.GetLoad(wpb.GetLoadRequest())
            if load.in_flight == 0 and all(m.free_blocks == m.num_blocks for m in load.models):
                break
            await asyncio.sleep(0.05)
        assert load.in_flight == 0 and all(m.free_blocks == m.num_blocks for m in load.models)

    asyncio.run(_with_worker(tiny_path, body))
