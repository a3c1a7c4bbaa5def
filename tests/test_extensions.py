"""The extension points: policies, several models, catch-up extend, KV export and import."""
from __future__ import annotations

import torch
from conftest import make_engine

from workers.engine import Engine, EngineConfig, KVSlice, ModelConfig, PolicyDecision, SamplingParams

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


def _two_models(paths) -> Engine:
    return Engine(EngineConfig([
        ModelConfig("small", str(paths["qwen2"]), dtype="float32", block_size=4, kv_cache_mb=4),
        ModelConfig("large", str(paths["llama"]), dtype="float32", block_size=4, kv_cache_mb=4),
    ]))


def test_policy_sees_batched_rows_and_tags_sources(tiny_path):
    engine = make_engine(tiny_path)
    seen = []

    def policy(step):
        seen.append((len(step.seqs), tuple(step.hidden.shape), tuple(step.logits.shape)))
        return PolicyDecision(sources=["large" if t % 2 else "small" for t in step.tokens.tolist()])

    engine.add_policy("m", policy)
    outs = engine.generate([[5, 6], [7, 8, 9], [10]], GREEDY)
    assert max(n for n, _, _ in seen) == 3
    assert all(h[0] == lg[0] == n and h[1] == 64 for n, h, lg in seen)
    for o in outs:
        assert o.sources == ["large" if t % 2 else "small" for t in o.token_ids]


def test_policy_pause_holds_sequence_until_resumed(tiny_path):
    engine = make_engine(tiny_path)
    engine.add_policy("m", lambda step: PolicyDecision(pause=torch.tensor([s.num_output == 2 for s in step.seqs])))
    seq = engine.add_request("p", [5, 6, 7], GREEDY)
    for _ in range(6):
        engine.step()
    assert seq.num_output == 3 and seq.status.value == "paused"
    assert not engine.has_work and engine.has_unfinished
    engine.resume("p")
    while engine.has_unfinished:
        engine.step()
    assert seq.num_output == 12
    assert seq.output_token_ids == make_engine(tiny_path).generate([[5, 6, 7]], GREEDY)[0].token_ids


def test_two_models_step_in_one_loop(tiny_paths):
    engine = _two_models(tiny_paths)
    engine.add_request("a", [5, 6, 7], GREEDY, model="small")
    engine.add_request("b", [5, 6, 7], GREEDY, model="large")
    per_step = []
    results = {}
    while engine.has_unfinished:
        outs = engine.step()
        per_step.append({o.model for o in outs})
        for o in outs:
            results.setdefault(o.request_id, []).extend(o.new_token_ids)
    assert {"small", "large"} in per_step
    assert results["a"] == make_engine(tiny_paths["qwen2"]).generate([[5, 6, 7]], GREEDY)[0].token_ids
    assert results["b"] == make_engine(tiny_paths["llama"]).generate([[5, 6, 7]], GREEDY)[0].token_ids


def test_extend_without_sampling_then_sample(tiny_path):
    engine = make_engine(tiny_path)
    reference = make_engine(tiny_path).generate([[5, 6, 7, 8, 9, 10, 11]], SamplingParams(max_tokens=5, temperature=0))[0]
    seq = engine.add_request("x", [5, 6, 7], SamplingParams(max_tokens=5, temperature=0), sample=False)
    outs = []
    while engine.has_work:
        outs += engine.step()
    assert any(o.ready for o in outs) and seq.num_computed == 3 and seq.num_output == 0
    engine.call(lambda: engine.extend("x", [8, 9, 10, 11], sample=True))
    while engine.has_unfinished:
        engine.step()
    assert seq.output_token_ids == reference.token_ids


def test_export_import_kv_round_trip(tiny_path):
    engine = make_engine(tiny_path)
    prompt = list(range(5, 27))
    engine.add_request("src", prompt, GREEDY, sample=False)
    while engine.has_work:
        engine.step()
    kv = engine.export_kv("src")
    assert kv.k.shape == (3, 22, 2, 16) and kv.v.shape == kv.k.shape
    part = engine.export_kv("src", layers=range(1, 3), start=4, end=9)
    assert torch.equal(part.k, kv.k[1:3, 4:9])
    dst = engine.add_request("dst", prompt, GREEDY, sample=True, cache_salt="imported")
    engine.step()
    engine.import_kv("dst", KVSlice(range(0, 3), 0, kv.k, kv.v), mark_computed=True)
    assert dst.num_computed == 22
    assert torch.equal(engine.export_kv("dst").k, kv.k)
    while engine.has_unfinished and dst.num_output < 12:
        engine.step()
    assert dst.output_token_ids == make_engine(tiny_path).generate([prompt], GREEDY)[0].token_ids
    engine.release("src")
    engine.step()
    stats = engine.stats()["m"]
    assert stats["free_blocks"] == stats["num_blocks"]


def test_import_rejects_mismatched_shapes(tiny_path):
    import pytest

    from tandem.errors import InvalidRequestError

    engine = make_engine(tiny_path)
    engine.add_request("d", list(range(5, 15)), GREEDY, sample=False, cache_salt="x")
    while engine.has_work:
        engine.step()
    bad = KVSlice(range(0, 3), 0, torch.zeros(3, 4, 2, 8), torch.zeros(3, 4, 2, 8))
    with pytest.raises(InvalidRequestError, match="kv.k"):
        engine.import_kv("d", bad)
    with pytest.raises(InvalidRequestError, match="kv.layers"):
        engine.import_kv("d", KVSlice(range(2, 5), 0, torch.zeros(3, 4, 2, 16), torch.zeros(3, 4, 2, 16)))
    with pytest.raises(InvalidRequestError, match="request_id"):
        engine.export_kv("missing")
