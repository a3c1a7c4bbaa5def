"""The client SDK against a real server (orchestrator + worker processes) on loopback, tiny model."""
from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from tandem import AsyncClient, Client
from tandem.client_errors import (
    FailedPreconditionError, InvalidArgumentError, NotFoundError, RequestCancelledError, UnavailableError,
)

GREEDY = dict(temperature=0.0, max_tokens=6)


@pytest.fixture(scope="module")
def server(tiny_path):
    from orchestrator.config import parse
    from orchestrator.launch import launch

    config = parse({"server": {"drain_grace_s": 5},
                    "models": [{"name": "tiny", "path": str(tiny_path), "kv_cache_mb": 4, "block_size": 4,
                                "dtype": "float32"}],
                    "workers": [{"models": ["tiny"], "threads": 1}]})
    handle = launch(config, timeout=120)
    yield handle
    assert handle.stop(timeout=20) == 0


@pytest.fixture()
def client(server):
    with Client(server.address, timeout=30) as c:
        yield c


def wait_idle(client: Client, timeout: float = 5.0) -> dict:
    """Until nothing runs and every KV block is free again."""
    deadline = time.monotonic() + timeout
    while True:
        loads = client.loads()
        models = [m for w in loads["workers"] for m in w["models"]]
        if loads["in_flight"] == 0 and all(m["free_blocks"] == m["num_blocks"] and not m["running"] for m in models):
            return loads
        assert time.monotonic() < deadline, f"not idle after {timeout} s: {loads}"
        time.sleep(0.05)


def test_discovery_and_health(client):
    assert client.health() == "SERVING"
    assert client.health("tandem.v1.Orchestrator") == "SERVING"
    with pytest.raises(NotFoundError):
        client.health("no.such.Service")
    [model] = client.list_models()
    assert model.name == "tiny" and model.ready and model.vocab_size == 384
    single = next(p for p in client.list_pipelines() if p.name == "single")
    assert single.ready and "model" in single.params_schema["properties"]
    info = client.server_info()
    assert info["num_ready_workers"] == 1 and "single" in info["pipelines"] and not info["draining"]
    assert client.loads()["workers"][0]["state"] == "ready"


def test_generate_and_stream_agree(client):
    r = client.generate("hello there", **GREEDY)
    assert r.finish_reason == "length" and len(r.token_ids) == 6 == r.usage.completion_tokens
    assert r.sources == ["tiny"] * 6 and r.usage.prompt_tokens > 0 and r.timings.ttft_s > 0
    stream = client.generate("hello there", stream=True, **GREEDY)
    chunks = list(stream)
    assert stream.result is not None and stream.result.token_ids == r.token_ids
    assert [t for c in chunks for t in c.token_ids] == r.token_ids
    assert "".join(c.text for c in chunks) + "" == stream.result.text or stream.result.text.startswith(
        "".join(c.text for c in chunks))
    by_ids = client.generate(token_ids=[5, 6, 7, 8], model="tiny", request_id="fixed-id", **GREEDY)
    assert by_ids.request_id == "fixed-id" and by_ids.usage.prompt_tokens == 4
    chat = client.generate(messages=[{"role": "user", "content": "hi"}], logprobs=2, **GREEDY)
    assert len(chat.logprobs) == 6 and len(chat.logprobs[0].top) == 2


def test_session_three_turns_reuse_prefix(client):
    with client.session(system="You are terse.") as chat:
        sid = chat.session_id
        results = [chat.send(t, **GREEDY) for t in ("first question", "second one", "and a third")]
        assert chat.info().num_turns == 3
        streamed = chat.stream("fourth", **GREEDY)
        assert sum(len(c.token_ids) for c in streamed) == 6
    cached = [r.usage.cached_tokens for r in results]
    assert cached[1] > 0 and cached[2] > cached[1], cached
    assert all(r.usage.prompt_tokens > c for r, c in zip(results, cached))
    with pytest.raises(NotFoundError):  # closed on leaving `with`
        client.generate("more", session_id=sid, **GREEDY)


@pytest.mark.parametrize("kwargs, cls, field", [
    (dict(prompt="x", top_p=2.0), InvalidArgumentError, "sampling.top_p"),
    (dict(prompt="x", max_tokens=0), InvalidArgumentError, "sampling.max_tokens"),
    (dict(prompt="x", temperature=-1.0), InvalidArgumentError, "sampling.temperature"),
    (dict(prompt=""), InvalidArgumentError, "text"),
    (dict(messages=[{"role": "robot", "content": "x"}]), InvalidArgumentError, "messages.messages[0].role"),
    (dict(token_ids=[10**6]), InvalidArgumentError, "token_ids.ids"),
    (dict(prompt="x", model="nope"), NotFoundError, "single.model"),
    (dict(prompt="x", pipeline="nope"), NotFoundError, "pipeline"),
    (dict(prompt="x", session_id="no-such-session"), NotFoundError, "session_id"),
])
def test_typed_errors_carry_server_message(client, kwargs, cls, field):
    with pytest.raises(cls) as info:
        client.generate(**kwargs)
    assert info.value.field == field and field in info.value.message
    assert info.value.code.name == cls.code_name


def test_bad_calls_fail_locally(client):
    with pytest.raises(TypeError):
        client.generate()
    with pytest.raises(TypeError):
        client.generate("x", token_ids=[1])
    with pytest.raises(NotFoundError):
        client.session(model="nope")


def test_break_cancels_stream_and_frees_blocks(client):
    stream = client.generate("a long answer", max_tokens=400, ignore_eos=True, temperature=0.0, stream=True)
    for i, _ in enumerate(stream):
        if i == 2:
            break
    assert stream.result is None
    with pytest.raises(RequestCancelledError):
        stream.wait()
    wait_idle(client)
    for i, _ in enumerate(client.generate("again", max_tokens=400, ignore_eos=True, stream=True)):
        if i == 1:
            break  # the stream object is dropped: garbage collection cancels it
    wait_idle(client)


def test_abort_ends_stream_with_abort(client):
    stream = client.generate("abort me", max_tokens=400, ignore_eos=True, stream=True, request_id="to-abort")
    next(iter([next(stream)]))
    assert client.abort(["to-abort", "never-existed"]) == ["to-abort"]
    try:
        result = stream.wait()
        assert result.finish_reason == "abort" and result.usage.completion_tokens < 400
    except RequestCancelledError:
        pass
    assert client.abort("to-abort") == []  # idempotent
    wait_idle(client)


def test_deadline(client):
    from tandem.client_errors import DeadlineExceededError

    with pytest.raises(DeadlineExceededError):
        client.generate("slow", max_tokens=400, ignore_eos=True, timeout=0.3)
    wait_idle(client)


def test_busy_session_is_a_precondition_error(client):
    with client.session() as chat:
        first = chat.stream("one", max_tokens=200, ignore_eos=True)
        next(first)
        with pytest.raises(FailedPreconditionError):
            chat.send("two", **GREEDY)
        first.cancel()
    wait_idle(client)


def test_async_client(server):
    async def main():
        async with AsyncClient(server.address, timeout=30) as ac:
            assert await ac.health() == "SERVING"
            assert [m.name for m in await ac.list_models()] == ["tiny"]
            r = await ac.generate("hello there", **GREEDY)
            stream = await ac.generate("hello there", stream=True, **GREEDY)
            ids = [t async for c in stream for t in c.token_ids]
            assert ids == r.token_ids == stream.result.token_ids
            async with ac.session(system="s") as chat:
                rs = [await chat.send(t, **GREEDY) for t in ("one", "two", "three")]
            assert rs[1].usage.cached_tokens > 0 and rs[2].usage.cached_tokens > 0
            with pytest.raises(InvalidArgumentError):
                await ac.generate("x", top_p=0.0)
            s = await ac.generate("long", max_tokens=400, ignore_eos=True, stream=True)
            async for i, _ in _aenumerate(s):
                if i == 1:
                    break
            s.cancel()
            with pytest.raises(RequestCancelledError):
                await s.wait()
            unopened = ac.session(system="s")
            with pytest.raises(FailedPreconditionError, match="not open"):
                await unopened.send("hi", **GREEDY)

    asyncio.run(main())
    with Client(server.address) as c:
        wait_idle(c)


async def _aenumerate(it):
    i = 0
    async for x in it:
        yield i, x
        i += 1


class _FakeError(grpc.RpcError):
    def __init__(self, code):
        self._code = code

    def code(self):
        return self._code

    def details(self):
        return f"fake {self._code.name}"


def test_generate_retries_unavailable_once_before_any_message():
    from tandem.client import GenerationStream

    class Call:
        def __init__(self, messages):
            self.messages = list(messages)

        def __next__(self):
            item = self.messages.pop(0)
            if isinstance(item, Exception):
                raise item
            return item

        def cancel(self):
            pass

    calls = []

    def failing():
        calls.append(1)
        return Call([_FakeError(grpc.StatusCode.UNAVAILABLE)])

    with pytest.raises(UnavailableError):
        list(GenerationStream(failing, "r"))
    assert len(calls) == 2  # the first try and one retry, same request

    from tandem.v1 import orchestrator_pb2 as pb

    calls.clear()

    def fails_after_a_chunk():
        calls.append(1)
        return Call([pb.GenerateResponse(chunk=pb.Chunk(token_ids=[1])), _FakeError(grpc.StatusCode.UNAVAILABLE)])

    stream = GenerationStream(fails_after_a_chunk, "r")
    assert next(stream).token_ids == [1]
    with pytest.raises(UnavailableError):
        next(stream)
    assert len(calls) == 1  # never retried once a chunk arrived


def test_unreachable_server_is_unavailable():
    with Client("127.0.0.1:1", timeout=5, max_retries=1, retry_backoff_s=0.01) as c:
        with pytest.raises(UnavailableError):
            c.list_models()
        with pytest.raises(UnavailableError):
            c.generate("x")
