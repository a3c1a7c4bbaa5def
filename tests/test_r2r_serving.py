"""R2R served over gRPC, co-located (one worker hosts both models) and disaggregated (hand-offs through
the Worker RPCs), checked token for token against the `single` pipeline on each model; config refusals."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch
from grpc_helpers import check_cancel_and_abort_free_blocks, sampling, stub, wait_blocks_free

from orchestrator.config import ConfigError, parse
from routing.router import Router, RouterConfig
from tandem.v1 import orchestrator_pb2 as pb

SLM, LLM = "slm", "llm"
PLACEMENTS = ("co-located", "disaggregated")
PROMPTS = [[5, 6, 7, 8], [20, 21, 22, 23, 24, 25, 26]]
N = 16


def _model(name, path) -> dict:
    return {"name": name, "path": str(path), "kv_cache_mb": 4, "block_size": 4, "dtype": "float32"}


def r2r_config(slm_path, llm_path, workers, **r2r):
    return parse({"server": {"drain_grace_s": 5},
                  "models": [_model(SLM, slm_path), _model(LLM, llm_path)],
                  "workers": [{"models": w, "threads": 1} for w in workers],
                  "pipelines": {"single": {"model": SLM}, "r2r": {"slm": SLM, "llm": LLM, **r2r}}})


def save_router(directory, hidden_size: int):
    torch.manual_seed(0)
    Router(RouterConfig(hidden_size=hidden_size, top_k=16, width=16, depth=1, threshold=0.5)).save(directory)
    return directory


@pytest.fixture(scope="module")
def servers(tiny_paths, tmp_path_factory):
    from orchestrator.server import launch

    router = str(save_router(tmp_path_factory.mktemp("router"), 64))
    slm, llm = tiny_paths["qwen2"], tiny_paths["llama"]
    # Co-located serves with the LLM prefilling at arrival (the in-process tests cover both modes).
    configs = {"co-located": r2r_config(slm, llm, [[SLM, LLM]], router=router, llm_prefill="eager"),
               "disaggregated": r2r_config(slm, llm, [[SLM], [LLM]], router=router)}
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


def generate(s, prompt, n=N, pipeline="r2r", **kw):
    """(token ids, sources, final) of one request; `kw` are GenerateRequest fields (r2r=..., single=...)."""
    temp = {k: kw.pop(k) for k in ("temperature", "top_p", "seed") if k in kw}
    req = pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt), pipeline=pipeline,
                             sampling=sampling(max_tokens=n, ignore_eos=True, **temp), **kw)
    msgs = list(s.Generate(req))
    chunks = [m.chunk for m in msgs if m.HasField("chunk")]
    assert msgs[-1].HasField("final")
    return [t for c in chunks for t in c.token_ids], [x for c in chunks for x in c.sources], msgs[-1].final


def alone(s, prompt, model):
    return generate(s, prompt, pipeline="single", single=pb.SingleParams(model=model))[0]


@pytest.mark.parametrize("decider", ["forced", "router"])
def test_extremes_equal_each_model_alone(s, decider):
    for prompt in PROMPTS:
        ids, sources, final = generate(s, prompt, r2r=pb.R2RParams(decider=decider, threshold=1.0))
        assert ids == alone(s, prompt, SLM) and set(sources) == {SLM}
        assert final.pipeline_stats["llm_token_share"] == 0 and final.pipeline_stats["slm_tokens"] == N
        ids, sources, final = generate(s, prompt, r2r=pb.R2RParams(decider=decider, threshold=0.0))
        assert ids == alone(s, prompt, LLM) and set(sources) == {LLM}
        assert final.pipeline_stats["llm_token_share"] == 1 and final.pipeline_stats["llm_tokens"] == N
        assert final.finish_reason == pb.FINISH_REASON_LENGTH and final.usage.completion_tokens == N


def test_mixed_share_is_the_same_in_both_placements(stubs):
    outs = {name: [generate(s, p, r2r=pb.R2RParams(decider="forced", threshold=0.7)) for p in PROMPTS]
            for name, s in stubs.items()}
    assert [o[0] for o in outs["co-located"]] == [o[0] for o in outs["disaggregated"]]
    for name, runs in outs.items():
        for ids, sources, final in runs:
            stats = final.pipeline_stats
            assert len(ids) == N and sources.count(LLM) == 4 and sources.count(SLM) == 12, name
            assert stats["llm_tokens"] == 4 and stats["slm_tokens"] == 12, (name, stats)
            assert stats["llm_token_share"] == pytest.approx(0.25)
            assert stats["router_s"] > 0 and stats["llm_s"] > 0
    assert outs["co-located"][0][0] != alone(stubs["co-located"], PROMPTS[0], SLM)


def test_temperature_sampling_is_seeded(stubs):
    kw = dict(temperature=0.9, top_p=0.95, seed=7)
    runs = {name: generate(s, PROMPTS[1], r2r=pb.R2RParams(decider="forced", threshold=0.5), **kw)
            for name, s in stubs.items()}
    assert runs["co-located"][0] == runs["disaggregated"][0]
    for ids, sources, final in runs.values():
        assert len(ids) == N and {SLM, LLM} <= set(sources)
    again = generate(stubs["disaggregated"], PROMPTS[1], r2r=pb.R2RParams(decider="random", threshold=0.5), **kw)
    assert len(again[0]) == N and again[2].finish_reason == pb.FINISH_REASON_LENGTH


def test_largest_seed_and_a_request_id_used_again_at_once(stubs):
    kw = dict(temperature=0.9, seed=2**63 - 1, r2r=pb.R2RParams(decider="forced", threshold=0.5))
    runs = {name: generate(s, PROMPTS[1], **kw) for name, s in stubs.items()}
    assert runs["co-located"][0] == runs["disaggregated"][0]
    assert all(final.pipeline_stats["llm_tokens"] > 0 for _, _, final in runs.values())
    for s in stubs.values():  # the LLM side's id is free again as soon as the request ends
        for _ in range(2):
            ids, _, final = generate(s, PROMPTS[0], request_id="same", r2r=pb.R2RParams(decider="forced", threshold=0.5))
            assert len(ids) == N and final.pipeline_stats["llm_tokens"] > 0


def test_an_aborted_request_id_is_free_again_at_once(s):
    generate(s, PROMPTS[1], r2r=pb.R2RParams(decider="forced", threshold=0.0))  # every worker link is open
    call = s.Generate(pb.GenerateRequest(request_id="aborted", token_ids=pb.TokenIds(ids=PROMPTS[0]), pipeline="r2r",
                                         sampling=sampling(max_tokens=400, ignore_eos=True),
                                         r2r=pb.R2RParams(decider="forced", threshold=1.0)))
    next(call)  # the LLM side was never started: the abort must not mark its id on the LLM's worker
    assert s.Abort(pb.AbortRequest(request_ids=["aborted"])).aborted == ["aborted"]
    with pytest.raises(grpc.RpcError) as e:
        list(call)
    assert e.value.code() == grpc.StatusCode.CANCELLED
    ids, sources, _ = generate(s, PROMPTS[0], request_id="aborted", r2r=pb.R2RParams(decider="forced", threshold=0.0))
    assert len(ids) == N and set(sources) == {LLM}


def test_baseline_deciders_and_defaults(s):
    ids, sources, final = generate(s, PROMPTS[0], r2r=pb.R2RParams(decider="entropy", threshold=0.0))
    assert set(sources) == {LLM}
    ids, sources, final = generate(s, PROMPTS[0])  # the pipeline's default: the router at its threshold
    assert len(ids) == N and set(sources) <= {SLM, LLM} and "router_s" in final.pipeline_stats
    struct = pb.GenerateRequest(token_ids=pb.TokenIds(ids=PROMPTS[0]), pipeline="r2r", sampling=sampling(max_tokens=4))
    struct.params.update({"decider": "random", "threshold": 1.0})
    assert {m.chunk.sources[0] for m in s.Generate(struct) if m.HasField("chunk")} == {SLM}


def test_bad_route_parameters(s):
    cases = [(dict(r2r=pb.R2RParams(threshold=1.5)), "r2r.threshold"),
             (dict(r2r=pb.R2RParams(threshold=-0.1)), "r2r.threshold"),
             (dict(r2r=pb.R2RParams(decider="oracle")), "r2r.decider")]
    for kw, field in cases:
        with pytest.raises(grpc.RpcError) as e:
            generate(s, PROMPTS[0], **kw)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in e.value.details()
    req = pb.GenerateRequest(token_ids=pb.TokenIds(ids=PROMPTS[0]), pipeline="r2r")
    req.params.update({"threshold": 2})
    with pytest.raises(grpc.RpcError) as e:
        list(s.Generate(req))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "params.threshold" in e.value.details()


def test_sdk_and_session(servers):
    from tandem import Client

    for name, address in servers.items():
        with Client(address) as client:
            pipelines = {p.name: p for p in client.list_pipelines()}
            assert pipelines["r2r"].models == [SLM, LLM] and "single" in pipelines["r2r"].description
            r = client.generate(token_ids=PROMPTS[0], pipeline="r2r", max_tokens=8, temperature=0, ignore_eos=True,
                                pipeline_params={"decider": "forced", "threshold": 0.5})
            assert len(r.token_ids) == 8 and r.stats["llm_tokens"] == 4 and r.sources.count(LLM) == 4, name
            with client.session(pipeline="r2r", pipeline_params={"decider": "forced", "threshold": 0.5}) as chat:
                chat.send("hello there", max_tokens=6, temperature=0)
                second = chat.send("and again", max_tokens=6, temperature=0)
                assert second.usage.cached_tokens > 0 and second.stats["llm_tokens"] > 0, name


def _long_request(rid: str) -> pb.GenerateRequest:
    return pb.GenerateRequest(request_id=rid, token_ids=pb.TokenIds(ids=PROMPTS[1]), pipeline="r2r",
                              r2r=pb.R2RParams(decider="forced", threshold=0.5),
                              sampling=sampling(max_tokens=400, ignore_eos=True))


def test_cancel_and_abort_free_both_workers(s):
    check_cancel_and_abort_free_blocks(s, _long_request)


def test_every_worker_ends_with_all_blocks_free(stubs):
    for s in stubs.values():
        loads = wait_blocks_free(s)
        assert len([m for w in loads.workers for m in w.models]) == 2


# ----- refused when the config loads -----

def test_pair_with_different_tokenizers_is_refused(tiny_paths, tmp_path):
    from tiny import make_tiny

    other = make_tiny("llama", tmp_path, vocab=300)
    with pytest.raises(ConfigError) as e:
        r2r_config(tiny_paths["qwen2"], other, [[SLM, LLM]])
    assert "tokenizer" in str(e.value) and repr(SLM) in str(e.value) and repr(LLM) in str(e.value)


def test_router_for_another_hidden_size_is_refused(tiny_paths, tmp_path):
    router = save_router(tmp_path / "router", 32)
    with pytest.raises(ConfigError) as e:
        r2r_config(tiny_paths["qwen2"], tiny_paths["llama"], [[SLM], [LLM]], router=str(router))
    assert "hidden size 32" in str(e.value) and "hidden size 64" in str(e.value)
    with pytest.raises(ConfigError) as e:
        r2r_config(tiny_paths["qwen2"], tiny_paths["llama"], [[SLM], [LLM]], router=str(tmp_path / "nowhere"))
    assert str(tmp_path / "nowhere") in str(e.value)


@pytest.mark.parametrize("r2r, key", [
    ({"slm": "nope"}, "pipelines.r2r.slm"),
    ({"threshold": 1.5}, "threshold"),
    ({"decider": "router"}, "decider"),
    ({"min_threshold": 0.8, "max_threshold": 0.2}, "min_threshold"),
    ({"llm_prefill": "sometimes"}, "llm_prefill"),
    ({"llm_stream": "sometimes"}, "llm_stream"),
])
def test_bad_r2r_sections_name_the_key(tiny_paths, r2r, key):
    with pytest.raises(ConfigError) as e:
        r2r_config(tiny_paths["qwen2"], tiny_paths["llama"], [[SLM, LLM]], **r2r)
    assert key in str(e.value)


def test_request_thresholds_stay_within_the_pipelines_bounds(tiny_paths):
    from types import SimpleNamespace

    from orchestrator.pipelines.r2r import R2R
    from tandem.errors import InvalidRequestError

    config = r2r_config(tiny_paths["qwen2"], tiny_paths["llama"], [[SLM, LLM]], decider="random",
                        min_threshold=0.2, max_threshold=0.9)
    pipeline = R2R(config.pipeline_config("r2r"), SimpleNamespace(config=config))
    resolved = pipeline.parse_params(pb.GenerateRequest(r2r=pb.R2RParams()))
    assert resolved.decider == "random" and resolved.threshold == 0.87
    assert pipeline.parse_params(pb.GenerateRequest(r2r=pb.R2RParams(threshold=0.2))).threshold == 0.2
    for bad in (0.1, 0.95):
        with pytest.raises(InvalidRequestError, match=r"r2r\.threshold.*\[0\.2, 0\.9\]"):
            pipeline.parse_params(pb.GenerateRequest(r2r=pb.R2RParams(threshold=bad)))
    with pytest.raises(InvalidRequestError, match=r"r2r\.decider"):
        pipeline.parse_params(pb.GenerateRequest(r2r=pb.R2RParams(decider="router")))
