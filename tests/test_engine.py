"""Scheduling, batching, prefix caching and preemption give the same tokens as transformers."""
from __future__ import annotations

import pytest
import torch
from conftest import hf_greedy, make_engine
from tiny import FAMILIES

from tandem.errors import InvalidRequestError
from workers.engine import PolicyDecision, Priority, SamplingParams
from workers.engine.sequence import Status

GREEDY = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = [5, 17, 1, 30, 8, 12, 3, 41][:n]
    return [torch.randint(3, 384, (m,), generator=g).tolist() for m in lengths]


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_equals_transformers_generate_for_64_tokens(family, tiny_paths):
    path = tiny_paths[family]
    prompt = _prompts(4, seed=7)[3]
    out = make_engine(path).generate([prompt], GREEDY)[0]
    assert out.token_ids == hf_greedy(path, prompt, 64)
    assert out.finish_reason == "length"


@pytest.mark.parametrize("family", ["qwen2", "gemma3"])
def test_batch_of_mixed_lengths_equals_one_by_one(family, tiny_paths):
    path = tiny_paths[family]
    prompts = _prompts(8)
    engine = make_engine(path, max_num_batched_tokens=24)
    together = [o.token_ids for o in engine.generate(prompts, GREEDY)]
    alone = [make_engine(path).generate([p], GREEDY)[0].token_ids for p in prompts]
    assert together == alone
    stats = engine.stats()["m"]
    assert stats["free_blocks"] == stats["num_blocks"]


def test_prefix_cache_hit_gives_identical_output(tiny_path):
    engine = make_engine(tiny_path)
    prompt = _prompts(8)[7]
    first = engine.generate([prompt], GREEDY)[0]
    hits_before = engine.stats()["m"]["prefix_hit_tokens"]
    second = engine.generate([prompt], GREEDY)[0]
    assert second.token_ids == first.token_ids
    assert second.usage.cached_tokens == 40
    assert engine.stats()["m"]["prefix_hit_tokens"] - hits_before == 40
    follow_up = engine.generate([prompt + first.token_ids + [9, 9, 9]], SamplingParams(max_tokens=4, temperature=0))[0]
    assert follow_up.usage.cached_tokens >= 100


def test_forced_preemption_gives_identical_output(tiny_path):
    prompts = _prompts(8)
    reference = [o.token_ids for o in make_engine(tiny_path).generate(prompts, GREEDY)]
    tiny = make_engine(tiny_path, kv_cache_mb=0.18)
    blocks = tiny.stats()["m"]["num_blocks"]
    assert blocks * 4 < sum(len(p) + 64 for p in prompts)
    outs = tiny.generate(prompts, GREEDY)
    assert [o.token_ids for o in outs] == reference
    assert tiny.stats()["m"]["free_blocks"] == blocks


def test_preemption_counted(tiny_path):
    engine = make_engine(tiny_path, kv_cache_mb=0.18, enable_prefix_caching=False)
    seqs = [engine.add_request(f"r{i}", p, GREEDY) for i, p in enumerate(_prompts(8))]
    while engine.has_unfinished:
        engine.step()
    assert sum(s.num_preemptions for s in seqs) > 0
    assert all(s.finish_reason == "length" and s.num_output == 64 for s in seqs)


def test_chunked_prefill_respects_token_budget(tiny_path):
    engine = make_engine(tiny_path, max_num_batched_tokens=8)
    seq = engine.add_request("long", list(range(3, 60)), SamplingParams(max_tokens=2, temperature=0))
    steps = 0
    while engine.has_unfinished:
        engine.step()
        steps += 1
    assert steps >= 57 // 8
    assert seq.finish_reason == "length"


def test_abort_frees_blocks_within_one_step(tiny_path):
    engine = make_engine(tiny_path)
    total = engine.stats()["m"]["num_blocks"]
    engine.add_request("a", list(range(3, 40)), GREEDY)
    engine.add_request("b", list(range(3, 20)), GREEDY)
    for _ in range(3):
        engine.step()
    assert engine.stats()["m"]["free_blocks"] < total
    engine.abort("a")
    engine.abort("a")
    outs = engine.step()
    assert any(o.request_id == "a" and o.finish_reason == "abort" for o in outs)
    engine.abort("b")
    engine.abort("never-existed")
    engine.step()
    assert engine.stats()["m"]["free_blocks"] == total
    assert not engine.has_unfinished


def test_normal_priority_runs_before_background(tiny_path):
    engine = make_engine(tiny_path, max_num_seqs=1)
    bg = engine.add_request("bg", [5, 6, 7], SamplingParams(max_tokens=3, temperature=0), priority=Priority.BACKGROUND)
    fg = engine.add_request("fg", [5, 6, 8], SamplingParams(max_tokens=3, temperature=0))
    order = []
    while engine.has_unfinished:
        order += [o.request_id for o in engine.step() if o.finished]
    assert order == ["fg", "bg"]
    assert fg.finish_reason == bg.finish_reason == "length"


def test_background_is_preempted_first(tiny_path):
    engine = make_engine(tiny_path, kv_cache_mb=0.1, enable_prefix_caching=False)
    bg = engine.add_request("bg", list(range(3, 30)), GREEDY, priority=Priority.BACKGROUND)
    engine.step()
    fg = engine.add_request("fg", list(range(3, 30)), GREEDY)
    while engine.has_unfinished:
        engine.step()
    assert fg.num_preemptions == 0 and bg.num_preemptions > 0
    assert fg.num_output == bg.num_output == 64


def _greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)


def _ready(engine, request_id: str) -> None:
    while not any(o.ready and o.request_id == request_id for o in engine.step()):
        pass


def _hold_first_token_of(request_id: str):
    """A policy standing in for R2R's router: it holds the request's first sampled token for a remote LLM."""
    held = set()

    def policy(view):
        hold = torch.tensor([s.request_id == request_id and s.request_id not in held for s in view.seqs])
        held.update(s.request_id for s, h in zip(view.seqs, hold.tolist()) if h)
        return PolicyDecision(hold=hold)

    return policy


def test_import_marking_the_whole_prompt_still_computes_its_last_token(tiny_path):
    prompt = list(range(5, 15))
    reference = make_engine(tiny_path).generate([prompt], _greedy(4))[0].token_ids
    engine = make_engine(tiny_path, max_num_batched_tokens=4, max_num_seqs=2)
    engine.add_request("src", prompt, _greedy(4), sample=False)
    _ready(engine, "src")
    kv = engine.export_kv("src")
    engine.add_request("mid", prompt, _greedy(4), cache_salt="mid")
    engine.step()
    assert 0 < engine.requests["mid"].num_computed < len(prompt)
    engine.import_kv("mid", kv, mark_computed=True)
    engine.add_request("waiting", prompt, _greedy(4), cache_salt="waiting", immediate=True)
    engine.import_kv("waiting", kv, mark_computed=True)
    outs = engine.collect(["mid", "waiting"])
    assert [o.token_ids for o in outs] == [reference, reference]


def test_imported_kv_never_enters_the_prefix_cache(tiny_paths):
    path = tiny_paths["llama"]
    src_prompt, dst_prompt = list(range(5, 27)), list(range(40, 62))
    reference = make_engine(path).generate([dst_prompt + [9]], _greedy(6))[0].token_ids
    engine = make_engine(path)
    engine.add_request("src", src_prompt, _greedy(6), sample=False)
    _ready(engine, "src")
    engine.add_request("dst", dst_prompt, _greedy(6), sample=False)
    _ready(engine, "dst")
    engine.import_kv("dst", engine.export_kv("src"), mark_computed=True)
    engine.extend("dst", [9, 10, 11])
    engine.collect(["dst"])
    engine.release("src")
    later = engine.generate([dst_prompt + [9]], _greedy(6))[0]
    assert later.usage.cached_tokens == 0 and later.token_ids == reference


def test_a_held_request_preempted_while_held_takes_its_injected_token(tiny_paths):
    path = tiny_paths["llama"]
    prompt = list(range(20, 32))
    reference = make_engine(path).generate([prompt + [7]], _greedy(4))[0].token_ids
    engine = make_engine(path, kv_cache_mb=8 * 3072 / 2**20)
    assert engine.stats()["m"]["num_blocks"] == 8
    engine.add_policy("m", _hold_first_token_of("held"))
    engine.add_request("grower", list(range(5, 13)), _greedy(20))
    held = engine.add_request("held", prompt, _greedy(5))
    engine.step()
    assert held.status is Status.PAUSED and held.block_table
    while held.block_table:
        engine.step()
    assert held.num_preemptions == 1 and held.status is Status.PAUSED
    engine.inject("held", 7, "llm")
    out = engine.collect(["held"])[0]
    assert out.token_ids == [7] + reference and out.finish_reason == "length"


def test_resume_of_a_held_request_is_refused_and_inject_still_works(tiny_paths):
    path = tiny_paths["llama"]
    prompt = list(range(20, 32))
    reference = make_engine(path).generate([prompt + [7]], _greedy(4))[0].token_ids
    engine = make_engine(path)
    engine.add_policy("m", _hold_first_token_of("held"))
    held = engine.add_request("held", prompt, _greedy(5))
    engine.step()
    with pytest.raises(InvalidRequestError) as e:
        engine.resume("held")
    assert e.value.field == "request_id"
    engine.step()
    assert engine.stats()["m"]["running"] == 0 and held.status is Status.PAUSED
    with pytest.raises(InvalidRequestError) as e:
        engine.inject("held", 10**6, "llm")
    assert e.value.field == "token_id"
    engine.inject("held", 7, "llm")
    assert engine.collect(["held"])[0].token_ids == [7] + reference


def test_pause_of_a_waiting_request_holds_it_until_resume(tiny_path):
    engine = make_engine(tiny_path, max_num_seqs=1)
    engine.add_request("first", [5, 6, 7], _greedy(3))
    engine.step()
    waiting = engine.add_request("waiting", [8, 9, 10], _greedy(3))
    engine.step()
    engine.pause("waiting")
    engine.collect(["first"])
    for _ in range(3):
        engine.step()
    assert waiting.num_output == 0 and engine.stats()["m"]["paused"] == 1
    engine.resume("waiting")
    out = engine.collect(["waiting"])[0]
    assert out.token_ids == make_engine(tiny_path).generate([[8, 9, 10]], _greedy(3))[0].token_ids
    stats = engine.stats()["m"]
    assert stats["free_blocks"] == stats["num_blocks"] and not engine.has_unfinished


def test_extend_and_inject_errors_name_their_own_fields(tiny_path):
    engine = make_engine(tiny_path)
    engine.add_request("p", [5, 6, 7], _greedy(3), sample=False)
    _ready(engine, "p")
    for call, field in [(lambda: engine.extend("p", []), "token_ids"),
                        (lambda: engine.extend("p", [10**6]), "token_ids"),
                        (lambda: engine.inject("p", 7, "llm"), "request_id")]:
        with pytest.raises(InvalidRequestError) as e:
            call()
        assert e.value.field == field, str(e.value)


def test_resume_of_a_prefilled_request_waiting_for_extend_is_refused(tiny_path):
    engine = make_engine(tiny_path)
    engine.add_request("p", [5, 6, 7], _greedy(3), sample=False)
    _ready(engine, "p")
    with pytest.raises(InvalidRequestError, match="waits for Extend") as e:
        engine.resume("p")
    assert e.value.field == "request_id" and engine.stats()["m"]["running"] == 0
    engine.extend("p", [8], sample=True)
    assert len(engine.collect(["p"])[0].token_ids) == 3
