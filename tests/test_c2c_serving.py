"""C2C and T2T served over gRPC, co-located (one worker hosts the receiver and the sharers) and
disaggregated (sharer KV sent between workers through ExportKV/FuseKV): closed gates equal the receiver
alone, both placements give the same tokens, stats, bad input, cancellation; config refusals."""
from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch
from grpc_helpers import check_cancel_and_abort_free_blocks, sampling, stub, wait_blocks_free

from orchestrator.config import ConfigError, parse
from tandem.v1 import orchestrator_pb2 as pb
from tandem.v1 import worker_pb2 as wpb
from tandem.v1 import worker_pb2_grpc

RECV, SHR, CLOSED, SHORT, OTHER = "recv", "shr", "closed", "short", "other"
PLACEMENTS = ("co-located", "disaggregated")
PROMPTS = [[5, 6, 7, 8, 9, 10], [20, 21, 22, 23, 24, 25, 26, 27, 28]]
N = 8
SHORT_CONTEXT = 24


def _model(name, path) -> dict:
    return {"name": name, "path": str(path), "kv_cache_mb": 4, "block_size": 4, "dtype": "float32"}


def save_fuser(directory, receiver_path, sharer_path, gate: float, seed: int = 0) -> str:
    from c2c import checkpoint
    from c2c.fuser import Fuser, FuserConfig

    r, s = checkpoint.ModelId.read(receiver_path), checkpoint.ModelId.read(sharer_path)
    torch.manual_seed(seed)
    fuser = Fuser(FuserConfig(r.kv, s.kv, hidden=32, intermediate=32, dropout=0.0))
    with torch.no_grad():
        for layer in fuser.layers:
            layer.gate_logits.fill_(gate)
    checkpoint.save(directory, fuser, checkpoint.Pair(r, s))
    return str(directory)


@pytest.fixture(scope="module")
def setup(tiny_paths, tiny_root, tmp_path_factory) -> dict:
    """Model paths and fuser checkpoints: open gates for `shr`, `short` (a Llama with a 24-token context)
    and `other` (a Llama with a tokenizer of its own), closed gates for `closed` (the same Llama as `shr`)."""
    short = tiny_root / "llama-short"
    if not short.exists():
        shutil.copytree(tiny_paths["llama"], short)
        cfg = json.loads((short / "config.json").read_text())
        (short / "config.json").write_text(json.dumps({**cfg, "max_position_embeddings": SHORT_CONTEXT}))
    from test_c2c import _other_tokenizer

    root = tmp_path_factory.mktemp("fusers")
    recv, llama = tiny_paths["qwen3"], tiny_paths["llama"]
    other = _other_tokenizer(llama, tiny_root)
    paths = {RECV: recv, SHR: llama, CLOSED: llama, SHORT: short, OTHER: other}
    ckpts = {SHR: save_fuser(root / "open", recv, llama, 1.0), CLOSED: save_fuser(root / "closed", recv, llama, -1.0),
             SHORT: save_fuser(root / "short", recv, short, 1.0, seed=1),
             OTHER: save_fuser(root / "other", recv, other, 1.0, seed=2)}
    return {"paths": paths, "ckpts": ckpts, "root": root}


def c2c_config(setup, workers, c2c=None, models=None):
    paths = models or setup["paths"]
    return parse({"server": {"drain_grace_s": 5},
                  "models": [_model(name, p) for name, p in paths.items()],
                  "workers": [{"models": w, "threads": 1} for w in workers],
                  "pipelines": {"single": {"model": RECV},
                                "c2c": c2c or {"receiver": RECV, "sharers": setup["ckpts"]},
                                "t2t": {"receiver": RECV, "sharer": SHR, "context_tokens": 8, "max_context_tokens": 16}}})


@pytest.fixture(scope="module")
def servers(setup):
    from orchestrator.server import launch

    every = [RECV, SHR, CLOSED, SHORT, OTHER]
    configs = {"co-located": c2c_config(setup, [every]), "disaggregated": c2c_config(setup, [[RECV], every[1:]])}
    with ThreadPoolExecutor(2) as pool:
        futures = {name: pool.submit(launch, c) for name, c in configs.items()}
    handles = {name: f.result() for name, f in futures.items() if f.exception() is None}
    try:
        assert len(handles) == 2, [f.exception() for f in futures.values()]
        yield {name: h.address for name, h in handles.items()}
    finally:
        with ThreadPoolExecutor(2) as pool:
            assert list(pool.map(lambda h: h.stop(), handles.values())) == [0] * len(handles)


@pytest.fixture(scope="module")
def stubs(servers):
    return {name: stub(address) for name, address in servers.items()}


@pytest.fixture(params=PLACEMENTS)
def s(request, stubs):
    return stubs[request.param]


def generate(s, prompt, n=N, pipeline="c2c", sharers=(SHR,), **kw):
    """(token ids, final) of one greedy request."""
    if pipeline == "c2c":
        kw.setdefault("c2c", pb.C2CParams(sharers=list(sharers)))
    req = pb.GenerateRequest(pipeline=pipeline, sampling=sampling(max_tokens=n, ignore_eos=True), **kw)
    if isinstance(prompt, str):
        req.text = prompt
    else:
        req.token_ids.ids.extend(prompt)
    msgs = list(s.Generate(req))
    assert msgs[-1].HasField("final")
    return [t for m in msgs if m.HasField("chunk") for t in m.chunk.token_ids], msgs[-1].final


def alone(s, prompt):
    return generate(s, prompt, pipeline="single", single=pb.SingleParams(model=RECV))[0]


def test_chat_with_another_tokenizer_fuses_message_contents(s, setup):
    """Served chat input is aligned as in process: only the tokens inside message contents are fused."""
    from c2c.colocated import C2C
    from workers.engine import Engine, EngineConfig, ModelConfig, SamplingParams

    messages = [{"role": "user", "content": "the quick brown fox jumps over the lazy dog"}]
    req = pb.GenerateRequest(pipeline="c2c", sampling=sampling(max_tokens=N, ignore_eos=True),
                             c2c=pb.C2CParams(sharers=[OTHER]))
    req.messages.messages.add(**messages[0])
    msgs = list(s.Generate(req))
    served = [t for m in msgs if m.HasField("chunk") for t in m.chunk.token_ids]
    paths = setup["paths"]
    engine = Engine(EngineConfig([ModelConfig(name, str(paths[name]), dtype="float32", block_size=4, kv_cache_mb=4)
                                  for name in (RECV, OTHER)]))
    c2c = C2C.from_checkpoints(engine, RECV, {OTHER: setup["ckpts"][OTHER]})
    greedy = SamplingParams(max_tokens=N, temperature=0, ignore_eos=True)
    as_chat = c2c.generate([messages], greedy)[0]
    as_ids = c2c.generate([c2c.receiver_ids(messages)], greedy)[0]
    assert served == as_chat.token_ids and msgs[-1].final.pipeline_stats["fused_tokens"] > 0
    assert as_chat.token_ids != as_ids.token_ids          # aligning the template's tokens too changes the answer


def test_closed_gates_equal_the_receiver_alone(s):
    for prompt in PROMPTS:
        ids, final = generate(s, prompt, sharers=[CLOSED])
        assert ids == alone(s, prompt) and len(ids) == N
        stats = final.pipeline_stats
        assert stats["kv_bytes_moved"] == 0 and stats["fused_layers"] == 0 and stats["receiver_s"] > 0
        assert final.usage.prompt_tokens == len(prompt) and final.finish_reason == pb.FINISH_REASON_LENGTH


def test_both_placements_give_the_same_tokens(stubs):
    outs = {name: [generate(s, p, sharers=sharers) for p in PROMPTS for sharers in ([SHR], [SHR, SHORT])]
            for name, s in stubs.items()}
    assert [o[0] for o in outs["co-located"]] == [o[0] for o in outs["disaggregated"]]
    assert any(ids != alone(stubs["co-located"], p) for (ids, _), p in zip(outs["co-located"][::2], PROMPTS))
    for name, runs in outs.items():
        for (ids, final), (prompt, sharers) in zip(runs, [(p, sh) for p in PROMPTS for sh in ([SHR], [SHR, SHORT])]):
            stats, n = final.pipeline_stats, len(prompt) - 1
            sent = 2 * 3 * n * 2 * 16 * 4 * len(sharers)                  # K and V, 3 layers, 2 heads x 16, fp32
            assert len(ids) == N and stats["kv_bytes_sharer"] == sent, (name, dict(stats))
            assert stats["fused_layers"] == 3 and stats["fused_tokens"] == n
            assert stats["sharer_s"] > 0 and stats["fuser_s"] > 0 and stats["receiver_s"] > 0
            if name == "disaggregated":
                assert stats["kv_bytes_moved"] == sent and stats["transfer_s"] > 0
            else:
                assert stats["kv_bytes_moved"] == sent + 2 * (2 * 3 * n * 2 * 32 * 4) and "transfer_s" not in stats


def test_a_request_id_used_again_at_once(s):
    first, _ = generate(s, PROMPTS[0], request_id="same")
    again, final = generate(s, PROMPTS[0], request_id="same")  # the sharer's id is free again at the end
    assert again == first and final.pipeline_stats["fused_tokens"] > 0


def test_t2t(stubs):
    runs = {name: generate(s, "Why is the sky blue?", pipeline="t2t") for name, s in stubs.items()}
    assert runs["co-located"][0] == runs["disaggregated"][0]
    for ids, final in runs.values():
        stats = final.pipeline_stats
        assert len(ids) == N and 0 < stats["context_tokens"] <= 8 and stats["context_bytes"] > 0
        assert stats["sharer_s"] > 0 and stats["receiver_s"] > 0
    s = stubs["disaggregated"]
    ids, final = generate(s, "Why?", pipeline="t2t", t2t=pb.T2TParams(context_tokens=3))
    assert final.pipeline_stats["context_tokens"] <= 3
    req = pb.GenerateRequest(pipeline="t2t", messages=pb.ChatMessages(messages=[
        pb.ChatMessage(role="system", content="Be brief."), pb.ChatMessage(role="user", content="Why?")]),
        sampling=sampling(max_tokens=4, ignore_eos=True))
    assert list(s.Generate(req))[-1].final.usage.completion_tokens == 4
    for kw, field in [(dict(t2t=pb.T2TParams(context_tokens=17)), "t2t.context_tokens"), (dict(), "input")]:
        with pytest.raises(grpc.RpcError) as e:
            generate(s, "Why?" if kw else PROMPTS[0], pipeline="t2t", **kw)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in e.value.details()


def test_bad_requests(s):
    cases = [(dict(prompt=PROMPTS[0], sharers=["nope"]), grpc.StatusCode.NOT_FOUND, "c2c.sharers: 'nope'"),
             (dict(prompt=[7] * 600), grpc.StatusCode.INVALID_ARGUMENT, "receiver 'recv'"),
             (dict(prompt=[7] * (SHORT_CONTEXT + 6), sharers=[SHR, SHORT]), grpc.StatusCode.INVALID_ARGUMENT,
              "sharer 'short'")]
    for kw, code, text in cases:
        with pytest.raises(grpc.RpcError) as e:
            generate(s, **kw)
        assert e.value.code() == code and text in e.value.details(), e.value.details()
    req = pb.GenerateRequest(token_ids=pb.TokenIds(ids=PROMPTS[0]), pipeline="c2c", sampling=sampling(max_tokens=2))
    req.params.update({"sharers": [SHR], "extra": 1})
    with pytest.raises(grpc.RpcError) as e:
        list(s.Generate(req))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "params.extra" in e.value.details()
    wait_blocks_free(s)


def _worker(s, model: str) -> worker_pb2_grpc.WorkerStub:
    loads = s.GetLoads(pb.GetLoadsRequest())
    address = next(w.address for w in loads.workers if [m.model for m in w.models] == [model])
    return worker_pb2_grpc.WorkerStub(grpc.insecure_channel(address))


def _kv(layers: range, n: int, heads: int, dim: int) -> wpb.KVData:
    from workers.convert import kv_to_proto
    from workers.engine import KVSlice

    shape = (len(layers), n, heads, dim)
    return kv_to_proto(KVSlice(layers, 0, torch.randn(shape), torch.randn(shape)))


def test_fuse_kv_checks_before_it_keeps_anything(stubs):
    """On the receiver's worker directly: wrong shapes, missing layers and unknown sharers are refused and
    leave the request as it was; right entries then let it finish; a cancel frees every block."""
    s = stubs["disaggregated"]
    worker = _worker(s, RECV)
    route = wpb.C2CRoute(enabled=True, sharers=[SHR])
    with pytest.raises(grpc.RpcError) as e:
        list(worker.Generate(wpb.WorkerGenerateRequest(request_id="nope", model=RECV, prompt_token_ids=PROMPTS[0],
                                                       c2c=wpb.C2CRoute(enabled=True, sharers=["nope"]))))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND and "'nope'" in e.value.details()
    for cancel in (False, True):
        rid = f"fuse-{cancel}"
        call = worker.Generate(wpb.WorkerGenerateRequest(request_id=rid, model=RECV, prompt_token_ids=PROMPTS[1],
                                                         sampling=sampling(max_tokens=4, ignore_eos=True), c2c=route))
        steps = iter(call)
        need = next(steps).c2c_need
        n = len(PROMPTS[1]) - 1
        assert [(x.sharer, len(x.token_ids), list(x.layers)) for x in need] == [(SHR, n, [0, 1, 2])]
        bad = [([_kv(range(3), n, 2, 8)], grpc.StatusCode.INVALID_ARGUMENT, "sharer 'shr' layer 0 k has shape (8, 2, 8)"),
               ([_kv(range(2), n, 2, 16)], grpc.StatusCode.INVALID_ARGUMENT, "missing [2]"),
               ([_kv(range(3), n - 1, 2, 16)], grpc.StatusCode.INVALID_ARGUMENT, "the fuser expects (8, 2, 16)")]
        for kv, code, text in bad:
            with pytest.raises(grpc.RpcError) as e:
                worker.FuseKV(wpb.FuseKVRequest(request_id=rid, sharer=SHR, kv=kv))
            assert e.value.code() == code and text in e.value.details(), e.value.details()
        with pytest.raises(grpc.RpcError) as e:
            worker.FuseKV(wpb.FuseKVRequest(request_id=rid, sharer="nope", kv=[_kv(range(3), n, 2, 16)]))
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        if cancel:
            call.cancel()
            wait_blocks_free(s)
            continue
        worker.FuseKV(wpb.FuseKVRequest(request_id=rid, sharer=SHR, kv=[_kv(range(3), n, 2, 16)]))
        rest = list(steps)
        assert sum(len(x.token_ids) for x in rest) == 4 and rest[-1].finish_reason == "length"
        assert rest[-1].stats["kv_bytes_sharer"] == 2 * 3 * n * 2 * 16 * 4
    wait_blocks_free(s)


def _long_request(rid: str) -> pb.GenerateRequest:
    return pb.GenerateRequest(request_id=rid, token_ids=pb.TokenIds(ids=PROMPTS[1]), pipeline="c2c",
                              c2c=pb.C2CParams(sharers=[SHR, SHORT]), sampling=sampling(max_tokens=400, ignore_eos=True))


def test_cancel_and_abort_free_every_worker(s):
    check_cancel_and_abort_free_blocks(s, _long_request)


def test_sdk_sessions_and_listing(servers):
    from tandem import Client

    for name, address in servers.items():
        with Client(address) as client:
            pipelines = {p.name: p for p in client.list_pipelines()}
            assert pipelines["c2c"].models == [RECV, SHR, CLOSED, SHORT, OTHER] and pipelines["t2t"].models == [RECV, SHR]
            assert name in pipelines["c2c"].description
            r = client.generate(token_ids=PROMPTS[0], pipeline="c2c", max_tokens=4, temperature=0, ignore_eos=True,
                                pipeline_params={"sharers": [SHR]})
            assert len(r.token_ids) == 4 and r.stats["kv_bytes_moved"] > 0, name
            with client.session(pipeline="c2c", pipeline_params={"sharers": [SHR]}) as chat:
                chat.send("hello there", max_tokens=4, temperature=0)
                assert chat.send("and again", max_tokens=4, temperature=0).stats["fused_layers"] == 3
    with pytest.raises(grpc.RpcError) as e:
        stub(servers["co-located"]).CreateSession(pb.CreateSessionRequest(pipeline="t2t"))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "sessions" in e.value.details()


def test_every_worker_ends_with_all_blocks_free(stubs):
    for s in stubs.values():
        loads = wait_blocks_free(s)
        assert len([m for w in loads.workers for m in w.models]) == 5


# ----- refused when the config loads -----

def test_checkpoint_for_another_pair_is_refused(setup, tiny_paths):
    other = save_fuser(setup["root"] / "other-pair", tiny_paths["qwen2"], tiny_paths["llama"], 1.0)
    with pytest.raises(ConfigError) as e:
        c2c_config(setup, [[RECV, SHR]], {"receiver": RECV, "sharers": {SHR: other}},
                   {RECV: setup["paths"][RECV], SHR: setup["paths"][SHR]})
    message = str(e.value)
    assert "pipelines.c2c.sharers.shr" in message and "trained for receiver qwen2-0" in message
    assert "configured models are receiver qwen3-0" in message and "sharer llama-0" in message


@pytest.mark.parametrize("c2c, key", [
    ({"receiver": "nope", "sharers": {SHR: "x"}}, "pipelines.c2c.receiver"),
    ({"receiver": RECV, "sharers": {"nope": "x"}}, "pipelines.c2c.sharers.nope"),
    ({"receiver": RECV, "sharers": {SHR: "/nowhere"}}, "/nowhere"),
    ({"receiver": RECV, "sharers": {}}, "sharers"),
    ({"receiver": RECV, "sharers": {SHR: "x"}, "mode": "sideways"}, "mode"),
])
def test_bad_c2c_sections_name_the_key(setup, c2c, key):
    with pytest.raises(ConfigError) as e:
        c2c_config(setup, [[RECV, SHR, CLOSED, SHORT]], c2c)
    assert key in str(e.value)
