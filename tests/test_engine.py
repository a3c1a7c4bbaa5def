"""Scheduling, batching, prefix caching and preemption give the same tokens as transformers."""
from __future__ import annotations

import pytest
import torch
from conftest import hf_greedy, make_engine
from tiny import FAMILIES

from workers.engine import Priority, SamplingParams

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
