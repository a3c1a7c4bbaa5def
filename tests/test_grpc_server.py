"""The orchestrator and a worker process over loopback gRPC, on a tiny model."""
from __future__ import annotations

import asyncio
import os
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from grpc_helpers import sampling, stub, tiny_config, wait_blocks_free
from tandem.v1 import orchestrator_pb2 as pb
from tandem.v1 import orchestrator_pb2_grpc


@pytest.fixture(scope="module")
def server(tiny_path):
    from orchestrator.server import launch

    handle = launch(tiny_config(tiny_path, max_queue=256))
    yield handle
    assert handle.stop() == 0


@pytest.fixture(scope="module")
def s(server):
    return stub(server.address)


def test_generate_streams_chunks_then_final(s):
    msgs = list(s.Generate(pb.GenerateRequest(request_id="g1", text="hello there", sampling=sampling(max_tokens=8))))
    assert all(m.request_id == "g1" for m in msgs)
    chunks, final = [m.chunk for m in msgs[:-1]], msgs[-1].final
    assert msgs[-1].HasField("final") and all(m.HasField("chunk") for m in msgs[:-1])
    tokens = [t for c in chunks for t in c.token_ids]
    assert len(tokens) == final.usage.completion_tokens == 8
    assert all(len(c.sources) == len(c.token_ids) and set(c.sources) == {"tiny"} for c in chunks)
    assert final.finish_reason == pb.FINISH_REASON_LENGTH and final.usage.prompt_tokens > 0
    assert final.timings.ttft_s > 0 and final.timings.per_token_s > 0 and final.timings.server_s > 0
    again = list(s.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5, 6, 7, 8]), sampling=sampling(max_tokens=3))))
    assert again[-1].final.usage.prompt_tokens == 4 and again[0].request_id


def test_chat_messages_and_logprobs(s):
    req = pb.GenerateRequest(messages=pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="hi")]),
                             sampling=sampling(max_tokens=3, logprobs=2))
    msgs = list(s.Generate(req))
    lps = [lp for m in msgs if m.HasField("chunk") for lp in m.chunk.logprobs]
    assert len(lps) == 3 and all(len(lp.top) == 2 for lp in lps)


def test_three_turn_session_reuses_prefix(s):
    sess = s.CreateSession(pb.CreateSessionRequest(system_prompt="you are terse"))
    cached = []
    for turn in ("first question", "second question", "third question"):
        final = list(s.Generate(pb.GenerateRequest(session_id=sess.session_id, text=turn,
                                                   sampling=sampling(max_tokens=6))))[-1].final
        assert final.session_id == sess.session_id
        cached.append(final.usage.cached_tokens)
    assert cached[1] > 0 and cached[2] > cached[1]
    info = s.GetSession(pb.GetSessionRequest(session_id=sess.session_id))
    assert info.num_turns == 3 and info.num_tokens > 0
    assert s.CloseSession(pb.CloseSessionRequest(session_id=sess.session_id)).closed
    with pytest.raises(grpc.RpcError) as e:
        list(s.Generate(pb.GenerateRequest(session_id=sess.session_id, text="x")))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND and "session_id" in e.value.details()


def test_session_expires_after_ttl(s):
    sess = s.CreateSession(pb.CreateSessionRequest(ttl_s=0.3))
    time.sleep(0.6)
    with pytest.raises(grpc.RpcError) as e:
        s.GetSession(pb.GetSessionRequest(session_id=sess.session_id))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_discovery_and_health(server, s):
    assert [m.name for m in s.ListModels(pb.ListModelsRequest()).models] == ["tiny"]
    assert s.ListModels(pb.ListModelsRequest()).models[0].vocab_size == 384
    assert [p.name for p in s.ListPipelines(pb.ListPipelinesRequest()).pipelines] == ["single"]
    info = s.GetServerInfo(pb.GetServerInfoRequest())
    assert info.num_ready_workers == 1 and not info.draining and info.max_message_bytes > 0
    h = health_pb2_grpc.HealthStub(grpc.insecure_channel(server.address))
    for name in ("", "tandem.v1.Orchestrator"):
        assert h.Check(health_pb2.HealthCheckRequest(service=name)).status == health_pb2.HealthCheckResponse.SERVING


def test_generate_through_reflection_alone(server):
    from google.protobuf import descriptor_pool, json_format, message_factory
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    channel = grpc.insecure_channel(server.address)
    db = ProtoReflectionDescriptorDatabase(channel)
    assert "tandem.v1.Orchestrator" in db.get_services()
    pool = descriptor_pool.DescriptorPool(db)
    method = pool.FindServiceByName("tandem.v1.Orchestrator").methods_by_name["Generate"]
    Req = message_factory.GetMessageClass(method.input_type)
    Resp = message_factory.GetMessageClass(method.output_type)
    req = json_format.ParseDict({"text": "hello", "sampling": {"maxTokens": 4, "temperature": 0}}, Req())
    call = channel.unary_stream("/tandem.v1.Orchestrator/Generate", request_serializer=Req.SerializeToString,
                                response_deserializer=Resp.FromString)
    msgs = [json_format.MessageToDict(m) for m in call(req)]
    assert msgs[-1]["final"]["usage"]["completionTokens"] == "4"


def _long(rid: str) -> pb.GenerateRequest:
    return pb.GenerateRequest(request_id=rid, text="a long one", sampling=sampling(max_tokens=400, ignore_eos=True))


def test_client_cancel_frees_blocks(s):
    call = s.Generate(_long("c1"))
    next(call), next(call)
    call.cancel()
    wait_blocks_free(s, timeout=2)


def test_client_disconnect_frees_blocks(server, s):
    channel = grpc.insecure_channel(server.address)
    call = orchestrator_pb2_grpc.OrchestratorStub(channel).Generate(_long("d1"))
    next(call)
    channel.close()
    wait_blocks_free(s, timeout=2)


def test_deadline_is_honoured(s):
    with pytest.raises(grpc.RpcError) as e:
        list(s.Generate(_long("dl1"), timeout=0.3))
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_blocks_free(s, timeout=2)


def test_abort_ends_with_cancelled_and_is_idempotent(s):
    call = s.Generate(_long("a1"))
    next(call)
    assert list(s.Abort(pb.AbortRequest(request_ids=["a1", "nope"])).aborted) == ["a1"]
    with pytest.raises(grpc.RpcError) as e:
        list(call)
    assert e.value.code() == grpc.StatusCode.CANCELLED
    assert s.Abort(pb.AbortRequest(request_ids=["a1"])).aborted == []
    wait_blocks_free(s, timeout=2)


BAD_REQUESTS = [
    (pb.GenerateRequest(), grpc.StatusCode.INVALID_ARGUMENT, "input"),
    (pb.GenerateRequest(text=""), grpc.StatusCode.INVALID_ARGUMENT, "text"),
    (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[])), grpc.StatusCode.INVALID_ARGUMENT, "token_ids.ids"),
    (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 10**6])), grpc.StatusCode.INVALID_ARGUMENT, "token_ids.ids"),
    (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[-1])), grpc.StatusCode.INVALID_ARGUMENT, "token_ids.ids"),
    (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[3] * 600)), grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
    (pb.GenerateRequest(messages=pb.ChatMessages()), grpc.StatusCode.INVALID_ARGUMENT, "messages.messages"),
    (pb.GenerateRequest(messages=pb.ChatMessages(messages=[pb.ChatMessage(role="bot", content="x")])),
     grpc.StatusCode.INVALID_ARGUMENT, "messages.messages[0].role"),
    (pb.GenerateRequest(text="x", request_id="r" * 300), grpc.StatusCode.INVALID_ARGUMENT, "request_id"),
    (pb.GenerateRequest(text="x", request_id="a\nb"), grpc.StatusCode.INVALID_ARGUMENT, "request_id"),
    (pb.GenerateRequest(text="x", priority=7), grpc.StatusCode.INVALID_ARGUMENT, "priority"),
    (pb.GenerateRequest(text="x", pipeline="nope"), grpc.StatusCode.NOT_FOUND, "pipeline"),
    (pb.GenerateRequest(text="x", single=pb.SingleParams(model="ghost")), grpc.StatusCode.NOT_FOUND, "single.model"),
    (pb.GenerateRequest(text="x", session_id="ghost"), grpc.StatusCode.NOT_FOUND, "session_id"),
    (pb.GenerateRequest(text="x", sampling=pb.SamplingParams(stop=[""])), grpc.StatusCode.INVALID_ARGUMENT,
     "sampling.stop[0]"),
    (pb.GenerateRequest(text="x", sampling=pb.SamplingParams(stop_token_ids=[999])), grpc.StatusCode.INVALID_ARGUMENT,
     "sampling.stop_token_ids"),
]


@pytest.mark.parametrize("request_, code, field", BAD_REQUESTS)
def test_bad_field_gives_code_naming_it(s, request_, code, field):
    with pytest.raises(grpc.RpcError) as e:
        list(s.Generate(request_))
    assert e.value.code() == code
    assert e.value.details().startswith(field + ":") or e.value.details().startswith(field + " "), e.value.details()


def test_bad_struct_params_name_the_key(s):
    from google.protobuf import struct_pb2

    params = struct_pb2.Struct()
    params.update({"modle": "tiny"})
    with pytest.raises(grpc.RpcError) as e:
        list(s.Generate(pb.GenerateRequest(text="x", params=params)))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and e.value.details().startswith("params.modle")


def test_bad_session_requests(s):
    for req, code, field in [(pb.CreateSessionRequest(ttl_s=-1), grpc.StatusCode.INVALID_ARGUMENT, "ttl_s"),
                             (pb.CreateSessionRequest(pipeline="x"), grpc.StatusCode.NOT_FOUND, "pipeline"),
                             (pb.CreateSessionRequest(single=pb.SingleParams(model="g")), grpc.StatusCode.NOT_FOUND,
                              "single.model")]:
        with pytest.raises(grpc.RpcError) as e:
            s.CreateSession(req)
        assert e.value.code() == code and e.value.details().startswith(field), e.value.details()
    sess = s.CreateSession(pb.CreateSessionRequest(session_id="dup"))
    with pytest.raises(grpc.RpcError) as e:
        s.CreateSession(pb.CreateSessionRequest(session_id=sess.session_id))
    assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS


SAMPLING_FIELDS = {
    "max_tokens": st.integers(min_value=-(2**63), max_value=0),
    "temperature": st.one_of(st.floats(max_value=-1e-9), st.just(float("nan")), st.just(float("inf"))),
    "top_k": st.integers(max_value=-1, min_value=-(2**63)),
    "top_p": st.one_of(st.floats(max_value=0.0), st.floats(min_value=1.0, exclude_min=True), st.just(float("nan"))),
    "seed": st.integers(max_value=-1, min_value=-(2**63)),
    "logprobs": st.one_of(st.integers(max_value=-1, min_value=-(2**63)), st.integers(min_value=21, max_value=2**63 - 1)),
}


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_fuzzed_sampling_fields_are_named(s, data):
    field = data.draw(st.sampled_from(sorted(SAMPLING_FIELDS)))
    value = data.draw(SAMPLING_FIELDS[field])
    with pytest.raises(grpc.RpcError) as e:
        list(s.Generate(pb.GenerateRequest(text="x", sampling=pb.SamplingParams(**{field: value}))))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details().startswith(f"sampling.{field}:"), e.value.details()


def test_duplicate_request_id_is_rejected(s):
    call = s.Generate(_long("dup1"))
    next(call)
    with pytest.raises(grpc.RpcError) as e:
        list(s.Generate(pb.GenerateRequest(request_id="dup1", text="x")))
    assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS and "request_id" in e.value.details()
    call.cancel()
    wait_blocks_free(s)


def test_concurrent_streams_no_error_no_leak(server, s):
    duration = float(os.environ.get("TANDEM_STRESS_S", "30"))
    errors: list[BaseException] = []
    counts = {"requests": 0}

    async def client(i: int, channel) -> None:
        stub_ = orchestrator_pb2_grpc.OrchestratorStub(channel)
        deadline = time.monotonic() + duration
        n = 0
        while time.monotonic() < deadline:
            n += 1
            max_tokens = 1 + (i * 7 + n) % 24
            req = pb.GenerateRequest(request_id=f"st-{i}-{n}", text=f"stream {i} turn {n}",
                                     sampling=sampling(max_tokens=max_tokens, ignore_eos=True, temperature=0.7, seed=i))
            try:
                msgs = [m async for m in stub_.Generate(req)]
                assert msgs[-1].final.usage.completion_tokens == max_tokens
                counts["requests"] += 1
            except BaseException as e:  # noqa: BLE001
                errors.append(e)
                return

    async def main() -> None:
        async with grpc.aio.insecure_channel(server.address) as channel:
            await asyncio.gather(*(client(i, channel) for i in range(64)))

    asyncio.run(main())
    assert not errors, errors[:3]
    assert counts["requests"] >= 64
    wait_blocks_free(s)
