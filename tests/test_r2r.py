"""R2R co-located in one engine: the extremes equal each model alone, catch-up KV equals a fresh prefill."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import make_engine

from routing.deciders import EntropyDecider, ForcedDecider, RandomDecider, RouterDecider
from routing.r2r import R2R
from routing.router import Router, RouterCheckpointError, RouterConfig
from tandem.errors import InvalidRequestError
from workers.engine import Engine, EngineConfig, ModelConfig, SamplingParams

GREEDY = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
PROMPTS = [[5, 6, 7], [9, 10, 11, 12, 13, 14], [20]]


def pair_engine(paths, **kw) -> Engine:
    return Engine(EngineConfig([
        ModelConfig("slm", str(paths["qwen2"]), dtype="float32", block_size=4, kv_cache_mb=4),
        ModelConfig("llm", str(paths["llama"]), dtype="float32", block_size=4, kv_cache_mb=4),
    ], **kw))


def tiny_router(engine: Engine, **config) -> Router:
    torch.manual_seed(0)
    slm = engine.models["slm"].runner
    config = RouterConfig(**{"hidden_size": slm.spec.hidden_size, "top_k": 16, "width": 32, "depth": 1, "threshold": 0.5,
                             **config})
    return Router(config, slm.model.model.embed_tokens.weight.detach()).eval()


def r2r(paths, llm_prefill: str = "lazy", **kw) -> R2R:
    engine = pair_engine(paths, **kw)
    deciders = [RouterDecider(tiny_router(engine)), ForcedDecider(), RandomDecider(0), EntropyDecider()]
    return R2R(engine, "slm", "llm", deciders, llm_prefill=llm_prefill)


def alone(path, prompts, params=GREEDY):
    return [o.token_ids for o in make_engine(path).generate(prompts, params)]


@pytest.mark.parametrize("decider,llm_prefill", [("router", "lazy"), ("forced", "lazy"), ("entropy", "lazy"),
                                                ("forced", "eager")])
def test_extremes_equal_each_model_alone(tiny_paths, decider, llm_prefill):
    r = r2r(tiny_paths, llm_prefill)
    never = r.generate(PROMPTS, GREEDY, decider=decider, threshold=1.0)
    assert [o.token_ids for o in never] == alone(tiny_paths["qwen2"], PROMPTS)
    assert all(set(o.sources) == {"slm"} and o.stats["llm_token_share"] == 0 for o in never)
    always = r.generate(PROMPTS, GREEDY, decider=decider, threshold=0.0)
    assert [o.token_ids for o in always] == alone(tiny_paths["llama"], PROMPTS)
    assert all(set(o.sources) == {"llm"} and o.stats["llm_token_share"] == 1 for o in always)
    stats = r.engine.stats()
    assert all(s["free_blocks"] == s["num_blocks"] for s in stats.values())


@pytest.mark.parametrize("llm_prefill", ["lazy", "eager"])
def test_mixed_routing_shares_and_sources(tiny_paths, llm_prefill):
    r = r2r(tiny_paths, llm_prefill)
    outs = r.generate(PROMPTS, GREEDY, decider="forced", threshold=0.75)
    assert all(s["free_blocks"] == s["num_blocks"] for s in r.engine.stats().values())
    for o in outs:
        assert len(o.token_ids) == 16
        assert o.sources.count("llm") == 4 and o.stats["llm_tokens"] == 4 and o.stats["slm_tokens"] == 12
        assert o.stats["llm_token_share"] == pytest.approx(0.25)
        assert o.stats["router_s"] > 0 and o.stats["llm_s"] > 0
    assert outs[0].token_ids != alone(tiny_paths["qwen2"], PROMPTS[:1])[0]


@pytest.mark.parametrize("llm_prefill", ["lazy", "eager"])
def test_catch_up_kv_equals_fresh_prefill(tiny_paths, llm_prefill):
    r = r2r(tiny_paths, llm_prefill)
    seq = r.add_request("a", list(range(5, 19)), GREEDY, decider="forced", threshold=0.7, cache_salt="a")
    while seq.num_output < 11:
        r.engine.step()
    shadow = r.engine.requests["a/llm"]
    assert shadow.num_computed == len(shadow.token_ids) > 14
    ours = r.engine.export_kv("a/llm")
    fresh = make_engine(tiny_paths["llama"])
    fresh.add_request("f", list(shadow.token_ids), GREEDY, model="m", sample=False)
    while fresh.has_work:
        fresh.step()
    ref = fresh.export_kv("f")
    torch.testing.assert_close(ours.k, ref.k, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.v, ref.v, atol=1e-5, rtol=1e-5)


def test_temperature_sampling_is_seeded_and_mixed(tiny_paths):
    params = SamplingParams(max_tokens=24, temperature=0.9, top_p=0.95, seed=7, ignore_eos=True)
    a = r2r(tiny_paths).generate(PROMPTS, params, decider="random", threshold=0.6)
    b = r2r(tiny_paths).generate(PROMPTS, params, decider="random", threshold=0.6)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    sources = [s for o in a for s in o.sources]
    assert 0 < sources.count("llm") < len(sources)


def test_abort_frees_both_pools(tiny_paths):
    r = r2r(tiny_paths)
    r.add_request("x", list(range(5, 30)), SamplingParams(max_tokens=50, temperature=0), decider="forced", threshold=0.5)
    for _ in range(6):
        r.engine.step()
    assert "x/llm" in r.engine.requests
    r.engine.abort("x")
    r.engine.step()
    assert not r.engine.requests and not r.states and not r.shadows
    assert all(s["free_blocks"] == s["num_blocks"] for s in r.engine.stats().values())


def test_eager_llm_prefill_reads_the_prompt_at_arrival(tiny_paths):
    lazy, eager = r2r(tiny_paths), r2r(tiny_paths, "eager")
    for r in (lazy, eager):
        r.add_request("a", list(range(5, 19)), GREEDY, decider="forced", threshold=1.0)
        r.engine.step()
    assert "a/llm" not in lazy.engine.requests
    shadow = eager.engine.requests["a/llm"]
    assert shadow.num_computed == 13 and shadow.token_ids == list(range(5, 18))   # the last waits for a hand-off
    assert eager.engine.requests["a"].num_computed == 0 and lazy.engine.requests["a"].num_output == 1
    eager.engine.step()
    assert eager.engine.requests["a"].num_output == 1    # the SLM started once the LLM had read the prompt
    eager.engine.abort("a")
    eager.engine.step()
    assert not eager.engine.requests and not eager.shadows
    assert all(s["free_blocks"] == s["num_blocks"] for s in eager.engine.stats().values())
    with pytest.raises(InvalidRequestError, match="llm_prefill"):
        R2R(eager.engine, "slm", "llm", [ForcedDecider()], llm_prefill="sometimes")


@pytest.mark.parametrize("llm_prefill", ["lazy", "eager"])
def test_prompt_beyond_the_llms_context_is_refused(tiny_paths, llm_prefill):
    engine = Engine(EngineConfig([
        ModelConfig("slm", str(tiny_paths["qwen2"]), dtype="float32", block_size=4, kv_cache_mb=4),
        ModelConfig("llm", str(tiny_paths["llama"]), dtype="float32", block_size=4, kv_cache_mb=4, max_model_len=8),
    ]))
    r = R2R(engine, "slm", "llm", [ForcedDecider()], llm_prefill=llm_prefill)
    with pytest.raises(InvalidRequestError, match="prompt.*12 tokens.*within 8"):
        r.add_request("long", list(range(5, 17)), GREEDY, threshold=0.5)
    out = r.generate([[5, 6, 7]], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True), threshold=0.5)
    assert len(out[0].token_ids) == 4
    assert not engine.requests and not r.states and not r.awaiting_llm
    assert all(s["free_blocks"] == s["num_blocks"] for s in engine.stats().values())


def test_bad_route_parameters(tiny_paths):
    r = r2r(tiny_paths)
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(InvalidRequestError, match="threshold"):
            r.add_request("b", [5, 6], GREEDY, threshold=bad)
    with pytest.raises(InvalidRequestError, match="decider"):
        r.add_request("b", [5, 6], GREEDY, decider="oracle")
    assert not r.states


def test_router_checkpoint_round_trip_and_size_check(tiny_paths, tmp_path):
    engine = pair_engine(tiny_paths)
    router = tiny_router(engine)
    router.save(tmp_path / "router")
    emb = engine.models["slm"].runner.model.model.embed_tokens.weight
    loaded = Router.load(tmp_path / "router", emb, slm_hidden_size=64)
    h, lg, tok = torch.randn(3, 64), torch.randn(3, 384), torch.tensor([1, 2, 3])
    torch.testing.assert_close(loaded.prob(h, tok, lg), router.prob(h, tok, lg))
    with pytest.raises(RouterCheckpointError, match="hidden size 64.*hidden size is 896"):
        Router.load(tmp_path / "router", emb, slm_hidden_size=896)
    with pytest.raises(RouterCheckpointError, match="missing"):
        Router.load(tmp_path / "nothing", emb)


def test_router_standardises_its_inputs_with_the_training_statistics(tiny_paths, tmp_path):
    engine = pair_engine(tiny_paths)
    router = tiny_router(engine)
    g = torch.Generator().manual_seed(0)
    batches = [(3 + 50 * torch.randn(32, 64, generator=g), torch.randn(32, 64, generator=g),
                torch.randn(32, 16, generator=g).sort(-1, descending=True).values) for _ in range(4)]
    router.fit_standardization(batches)
    x = torch.cat([router.inputs(*b) for b in batches])
    z = (x - router.feature_mean) / router.feature_std
    torch.testing.assert_close(z.mean(0), torch.zeros(x.shape[1]), atol=1e-4, rtol=0)
    torch.testing.assert_close(z.std(0), torch.ones(x.shape[1]), atol=1e-4, rtol=0)
    # the top-k logits enter as log-probabilities over the top k: a shift of every logit changes nothing
    h, emb, topk = batches[0]
    torch.testing.assert_close(router(h, emb, topk + 7.0), router(h, emb, topk))
    router.save(tmp_path / "router")
    loaded = Router.load(tmp_path / "router", engine.models["slm"].runner.model.model.embed_tokens.weight)
    torch.testing.assert_close(loaded.feature_std, router.feature_std)
    torch.testing.assert_close(loaded(h, emb, topk), router(h, emb, topk))


def test_router_checkpoint_from_before_the_feature_keys_loads_as_raw(tmp_path):
    old = Router(RouterConfig(hidden_size=64, top_k=16, width=32, depth=1, logit_features="raw", standardize=False)).eval()
    old.save(tmp_path / "old")
    cfg = json.loads((tmp_path / "old" / "router.json").read_text())
    del cfg["logit_features"], cfg["standardize"]
    (tmp_path / "old" / "router.json").write_text(json.dumps(cfg))
    loaded = Router.load(tmp_path / "old")
    assert loaded.config.logit_features == "raw" and not loaded.config.standardize
    h, emb, topk = torch.randn(2, 64), torch.randn(2, 64), torch.randn(2, 16)
    torch.testing.assert_close(loaded(h, emb, topk), old(h, emb, topk))
    cfg["logit_features"] = "softmax"
    (tmp_path / "old" / "router.json").write_text(json.dumps(cfg))
    with pytest.raises(RouterCheckpointError, match="logit_features"):
        Router.load(tmp_path / "old")


def test_router_packed_for_cpu_serving_scores_as_before(tiny_paths):
    engine = pair_engine(tiny_paths)
    router = tiny_router(engine)
    h, lg, tok = torch.randn(5, 64), torch.randn(5, 384), torch.tensor([1, 2, 3, 4, 5])
    want = router.prob(h, tok, lg)
    decider = RouterDecider(router)
    assert decider.router is router
    torch.testing.assert_close(router.prob(h, tok, lg), want, atol=1e-6, rtol=1e-5)


def test_propose_only_respects_vocab_limit(tiny_paths):
    engine = pair_engine(tiny_paths)
    free = engine.add_request("p", [5, 6, 7], GREEDY, model="llm", propose_only=True)
    limited = engine.add_request("q", [5, 6, 7], GREEDY, model="llm", propose_only=True, vocab_limit=3)
    proposals = {}
    while engine.has_work:
        for out in engine.step():
            if out.proposed:
                proposals[out.request_id] = out.new_token_ids[0]
    assert free.num_output == limited.num_output == 0
    assert proposals["q"] < 3 and proposals["p"] >= 3
    with pytest.raises(InvalidRequestError, match="vocab_limit"):
        engine.add_request("r", [5], GREEDY, model="llm", propose_only=True, vocab_limit=10**6)


def run_ids(r: R2R, prompts, **route) -> dict[str, list[int]]:
    for i, p in enumerate(prompts):
        r.add_request(f"req-{i}", p, GREEDY, **route)
    out: dict[str, list[int]] = {}
    while r.engine.has_unfinished:
        for o in r.engine.step():
            out.setdefault(o.request_id, []).extend(o.new_token_ids)
    return {k: v for k, v in out.items() if k.startswith("req-") and "/" not in k}


def test_batched_hand_offs_give_the_same_tokens(tiny_paths):
    """Hand-offs that wait for each other change when the LLM runs, not what it writes."""
    prompts = [[5 + i, 6, 7, 8 + i] for i in range(6)]
    at_once = R2R(pair_engine(tiny_paths), "slm", "llm", [ForcedDecider(spread=True)])
    engine = pair_engine(tiny_paths)
    batched = R2R(engine, "slm", "llm", [ForcedDecider(spread=True)], llm_min_rows=4, llm_max_wait_steps=3)
    expected = run_ids(at_once, prompts, threshold=0.7)
    assert run_ids(batched, prompts, threshold=0.7) == expected
    assert len({tuple(v) for v in expected.values()}) > 1
    assert not batched.pending and not engine.requests
    assert all(s["free_blocks"] == s["num_blocks"] for s in engine.stats().values())



def swapped_tokenizer(model: Path, out: Path) -> Path:
    """The same model with the ids of two tokens of its tokenizer swapped (same size, same specials)."""
    if not out.exists():
        shutil.copytree(model, out)
        data = json.loads((out / "tokenizer.json").read_text())
        vocab = data["model"]["vocab"]
        vocab["a"], vocab["b"] = vocab["b"], vocab["a"]
        (out / "tokenizer.json").write_text(json.dumps(data))
    return out


def test_colocated_pair_must_share_one_tokenizer(tiny_paths, tiny_root):
    other = swapped_tokenizer(tiny_paths["llama"], tiny_root / "llama-swapped-tok")
    engine = pair_engine({**tiny_paths, "llama": other})
    with pytest.raises(InvalidRequestError, match="llm: 'slm' and 'llm' do not share one tokenizer"):
        R2R(engine, "slm", "llm", [ForcedDecider()])
    R2R(pair_engine(tiny_paths), "slm", "llm", [ForcedDecider()])    # Qwen2's tokenizer adds a token past the vocabulary


def test_router_checkpoint_damage_is_a_checkpoint_error(tmp_path, monkeypatch):
    import routing.router as router_module

    Router(RouterConfig(hidden_size=64, top_k=16, width=32, depth=1)).save(tmp_path / "r")
    weights = (tmp_path / "r" / "router.safetensors").read_bytes()

    def broken_save(state, path):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")
    monkeypatch.setattr(router_module, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        Router(RouterConfig(hidden_size=64, top_k=16, width=32, depth=1)).save(tmp_path / "r")
    assert (tmp_path / "r" / "router.safetensors").read_bytes() == weights      # the old checkpoint is whole
    Router.load(tmp_path / "r")

    (tmp_path / "r" / "router.safetensors").write_bytes(weights[: len(weights) // 2])
    with pytest.raises(RouterCheckpointError, match="router.safetensors is not readable"):
        Router.load(tmp_path / "r")
    (tmp_path / "r" / "router.safetensors").write_bytes(weights)
    cfg = json.loads((tmp_path / "r" / "router.json").read_text())
    for key, value in (("width", "32"), ("threshold", "0.5"), ("standardize", 1), ("width", -1)):
        (tmp_path / "r" / "router.json").write_text(json.dumps({**cfg, key: value}))
        with pytest.raises(RouterCheckpointError, match="router.json is not valid"):
            Router.load(tmp_path / "r")
