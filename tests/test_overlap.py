"""Overlapped decode steps (`workers/engine/overlap.py`) give exactly the tokens of one step at a time.
CUDA graphs are what enable the overlap; here a stand-in with the same row interface runs the rows
eagerly on the CPU, so the chaining logic runs in CI."""
from __future__ import annotations

import torch
from conftest import make_engine

import kernels
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
