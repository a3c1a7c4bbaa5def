"""Overlapped decode steps (`workers/engine/overlap.py`) give exactly the tokens of one step at a time.
CUDA graphs are what enable the overlap; here a stand-in with the same row interface runs the rows
eagerly on the CPU, so the chaining logic runs in CI."""
from __future__ import annotations

import torch
from conftest import make_engine

import tandem_kernels as kernels
from workers.engine import SamplingParams
from workers.engine.outputs import RequestOutput


class EagerRows:
    """DecodeGraphs' interface (`fits`, `run`, `run_rows`) without graphs."""

    def __init__(self, runner):
        self.runner = runner
        self.chained = 0

    def fits(self, batch) -> bool:
        return all(s.num_new == 1 for s in batch)

    def run(self, batch):
        return self.run_rows([(s.seq, s.start) for s in batch])

    @torch.inference_mode()
    def run_rows(self, rows, device_ids=None):
        r = self.runner
        ids = device_ids if device_ids is not None else torch.tensor([seq.token_ids[p] for seq, p in rows])
        self.chained += device_ids is not None
        meta = kernels.build_metadata([seq.block_table for seq, _ in rows], [p for _, p in rows], [1] * len(rows),
                                      r.block_size, r.device)
        return r.model(ids.to(r.device), r.forward_batch(meta))


def staggered_params(free: list[list[int]]) -> list[SamplingParams]:
    """Greedy requests ending on max_tokens after 1-40 tokens; the 3rd and 7th stop on the first token of their
    unbounded output (`free`) that is new after position 4."""
    params = [SamplingParams(max_tokens=[1, 3, 40, 25][i % 4], temperature=0, ignore_eos=True) for i in range(len(free))]
    for i in (2, 6):
        params[i].stop_token_ids = [t for j, t in enumerate(free[i]) if j >= 4 and t not in free[i][:j]][:1]
    return params


def run_staggered(engine, prompts, params) -> tuple[list[RequestOutput], bool]:
    """All but the last request at once, the last while the others decode; their outputs, and whether every
    KV block is free afterwards. (bench/gpu_check.py runs this on CUDA.)"""
    results = {f"r{i}": RequestOutput(f"r{i}") for i in range(len(prompts))}
    for i, (p, sp) in enumerate(zip(prompts, params)):
        if i == len(prompts) - 1:
            for _ in range(4):
                for out in engine.step():
                    results[out.request_id].add(out)
        engine.add_request(f"r{i}", p, sp)
    for _ in range(500):
        for out in engine.step():
            results[out.request_id].add(out)
        if all(r.finish_reason for r in results.values()) and not engine.has_unfinished:
            break
    blocks = engine.model().blocks
    return list(results.values()), blocks.num_free == blocks.num_blocks


def _run(path, prompts, params, overlap: bool):
    engine = make_engine(path)
    engine.config.overlap = overlap
    rows = engine.model().runner.graphs = EagerRows(engine.model().runner)
    outs, all_free = run_staggered(engine, prompts, params)
    return outs, rows.chained, all_free


def test_overlapped_steps_equal_one_at_a_time(tiny_paths):
    tiny_path = tiny_paths["gemma3"]                      # its random weights do not repeat one token
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 384, (n,), generator=g).tolist() for n in (5, 30, 1, 12, 7, 20, 3)]
    free = make_engine(tiny_path).generate(prompts, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))
    params = staggered_params([o.token_ids for o in free])
    plain, chained_plain, free_plain = _run(tiny_path, prompts, params, overlap=False)
    over, chained, free_over = _run(tiny_path, prompts, params, overlap=True)
    assert chained_plain == 0 and chained > 10
    assert [o.token_ids for o in over] == [o.token_ids for o in plain]
    assert [o.finish_reason for o in over] == [o.finish_reason for o in plain]
    assert {o.finish_reason for o in plain} == {"stop", "length"}
    assert free_plain and free_over


def test_r2r_keeps_steps_overlapped_and_gives_the_same_tokens(tiny_paths):
    """R2R's SLM policy is deferred: its scores are queued at launch, so SLM steps stay chained; a row the
    router hands to the LLM was speculated on in the chained step and is dropped there, not appended."""
    from test_r2r import pair_engine, tiny_router

    from routing.deciders import ForcedDecider, RouterDecider
    from routing.r2r import R2R

    prompts = [[5, 6, 7], [9, 10, 11, 12, 13, 14], [20]]
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    cases = [("forced", 0.8, False, 1), ("forced", 0.8, True, 1), ("router", 0.028, False, 1), ("forced", 0.7, False, 2)]
    for decider, threshold, one_at_a_time, min_rows in cases:
        results = []
        for overlap in (False, True):
            engine = pair_engine(tiny_paths, overlap=overlap)
            rows = engine.models["slm"].runner.graphs = EagerRows(engine.models["slm"].runner)
            # raw, unstandardised features: this random router's scores then straddle 0.028 on these prompts
            router = tiny_router(engine, logit_features="raw", standardize=False)
            deciders = [ForcedDecider(spread=True), RouterDecider(router)]
            r = R2R(engine, "slm", "llm", deciders, llm_min_rows=min_rows, llm_max_wait_steps=2)
            outs = []
            for group in ([[p] for p in prompts] if one_at_a_time else [prompts]):
                ids = [f"req-{prompts.index(p)}" for p in group]        # the forced decider's phase comes from the id
                for rid, p in zip(ids, group):
                    r.add_request(rid, p, params, decider=decider, threshold=threshold)
                outs += engine.collect(ids)
            results.append(([o.token_ids for o in outs], [o.sources for o in outs], rows.chained))
            assert all(s["free_blocks"] == s["num_blocks"] for s in engine.stats().values())
            assert not engine.requests
        (plain, plain_sources, plain_chained), (over, over_sources, chained) = results
        assert plain_chained == 0 and chained > 5, (decider, chained)
        assert over == plain and over_sources == plain_sources, decider
        assert any("llm" in s for s in plain_sources) and any("slm" in s for s in plain_sources), decider
