"""Whole decode step on the GPU at real model shapes (random bf16 weights), beside transformers.

Ours: `Engine.step()` with every sequence decoding at a given context (the prefix KV is allocated but
not computed: speed does not depend on its values). transformers: `generate` with its static cache
(which compiles the step), per decode step = (t(N tokens) - t(1 token)) / (N - 1).

    python bench/decode_step_gpu.py [--system tandem|transformers|both] [--out DIR]
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402

SHAPES = {
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
}
BATCHES = (1, 8, 32, 128, 256)
CONTEXTS = (512, 4096)


def config(shape: str):
    from transformers import Qwen2Config

    return Qwen2Config(**SHAPES[shape], max_position_embeddings=32768, rope_parameters={"rope_type": "default", "rope_theta": 1e6})


class NullTokenizer:
    def decode(self, ids, **kw):
        return ""

    def encode(self, text, **kw):
        return [1]


def our_engine(shape: str, kv_mb: float):
    from workers.engine import Engine, EngineConfig, ModelConfig
    from workers.models import LoadedModel
    from workers.models.decoder import CausalLM
    from workers.models.spec import ModelSpec

    spec = ModelSpec.from_hf_config(config(shape))
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = CausalLM(spec).eval()
    torch.set_default_dtype(torch.float32)
    for p in model.parameters():
        p.data.normal_(0, 0.02)
    loaded = LoadedModel(model, spec, NullTokenizer(), Path(shape), torch.bfloat16)
    mc = ModelConfig("m", shape, dtype="bfloat16", device="cuda", kv_cache_mb=kv_mb)
    return Engine(EngineConfig([mc], max_num_seqs=512, max_num_batched_tokens=8192), preloaded={"m": loaded})


def start_decoding(engine, batch: int, ctx: int, steps: int) -> list:
    """Sequences whose first `ctx - 1` tokens count as cached: every step is a pure decode step."""
    from workers.engine import SamplingParams
    from workers.engine.sequence import Status

    rm = engine.model()
    params = SamplingParams(max_tokens=steps + 8, temperature=0, ignore_eos=True, detokenize=False)
    seqs = [engine.add_request(f"b{batch}-c{ctx}-{i}-{time.monotonic_ns()}", [7] * ctx, params) for i in range(batch)]
    engine._inbox.clear()
    for seq in seqs:
        assert rm.blocks.ensure(seq, ctx), "KV pool too small"
        seq.num_computed = ctx - 1
        seq.status = Status.RUNNING
        rm.scheduler.running.append(seq)
    return seqs


def device_ms(engine, batch: int) -> float:
    """GPU time of one step alone: the decode graph's replay, then the LM head and argmax on its output."""
    from gpu_timing import replay_ms

    runner = engine.model().runner
    graph = torch.cuda.CUDAGraph()
    hidden = runner.graphs.hidden[:batch]
    with torch.inference_mode():
        for _ in range(2):
            runner.model.logits(hidden).argmax(-1)
        torch.cuda.synchronize()
        with torch.cuda.graph(graph):
            runner.model.logits(hidden).argmax(-1)
    bucket = next(b for b in runner.graphs.buckets if b >= batch)
    return round(replay_ms(runner.graphs.graphs[bucket]) + replay_ms(graph), 4)


def host_step_ms(engine, batch: int, steps: int) -> float:
    """Host time of an engine step: the same steps with the device's work skipped (the graph's replay
    and the LM head replaced by no-ops), so only the Python around them is timed."""
    runner = engine.model().runner
    graphs, model = runner.graphs, runner.model
    saved = dict(graphs.graphs)
    logits = torch.zeros(batch, 8, device="cuda")

    class Noop:
        def replay(self):
            pass

    graphs.graphs = {b: Noop() for b in saved}
    model.logits = lambda h: logits[: h.shape[0]]
    try:
        t0 = time.perf_counter()
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
        return round((time.perf_counter() - t0) / steps * 1e3, 4)
    finally:
        graphs.graphs = saved
        del model.logits


def bench_ours(shape: str, out: list) -> None:
    per_token = 2 * SHAPES[shape]["num_hidden_layers"] * SHAPES[shape]["num_key_value_heads"] * 128 * 2
    free = torch.cuda.mem_get_info()[0]
    engine = our_engine(shape, kv_mb=min(free * 0.5, 30 * 2**30) / 2**20)
    capacity = engine.model().blocks.num_blocks * engine.model().blocks.block_size
    for ctx in CONTEXTS:
        for batch in BATCHES:
            if batch * (ctx + 48) > capacity:
                out.append({"shape": shape, "batch": batch, "ctx": ctx, "skipped": "KV does not fit"})
                continue
            steps = 32
            seqs = start_decoding(engine, batch, ctx, 2 * steps + 4)
            for _ in range(4):
                engine.step()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(steps):
                engine.step()
            torch.cuda.synchronize()
            ms = (time.perf_counter() - t0) / steps * 1e3
            gpu_ms = device_ms(engine, batch)
            host_ms = host_step_ms(engine, batch, steps)
            for s in seqs:
                engine.abort(s.request_id)
            engine.step()
            row = {"shape": shape, "batch": batch, "ctx": ctx, "tandem_ms_per_step": round(ms, 3),
                   "gpu_ms_per_step": gpu_ms, "host_ms_per_step": host_ms,
                   "tandem_tok_s": round(batch / ms * 1e3, 1), "kv_bytes_per_token": per_token}
            out.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    del engine
    gc.collect()
    torch.cuda.empty_cache()


class StepClock:
    """A generate() streamer that timestamps each new token (its .cpu() waits for the step)."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value):
        value.cpu()
        self.times.append(time.perf_counter())

    def end(self):
        pass


def bench_hf(shape: str, batches, ctx: int, out: list) -> None:
    """transformers' strongest recipe that runs: the static cache, which compiles the decode step.
    The same call is made three times; the last one's median inter-token time is the step time."""
    from transformers import AutoModelForCausalLM

    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config(shape), dtype=torch.bfloat16).eval()
    for batch in batches:
        ids = torch.full((batch, ctx), 7, device="cuda")
        try:
            with torch.inference_mode():
                for _ in range(3):
                    clock = StepClock()
                    model.generate(ids, max_new_tokens=48, min_new_tokens=48, do_sample=False,
                                   cache_implementation="static", pad_token_id=0, streamer=clock)
            gaps = sorted(b - a for a, b in zip(clock.times[2:], clock.times[3:]))
            ms = gaps[len(gaps) // 2] * 1e3
            row = {"shape": shape, "batch": batch, "ctx": ctx, "transformers_static_ms_per_step": round(ms, 3),
                   "transformers_tok_s": round(batch / ms * 1e3, 1)}
        except Exception as e:
            row = {"shape": shape, "batch": batch, "ctx": ctx, "transformers_error": repr(e)[:300]}
        out.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    del model
    gc.collect()
    torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--system", default="both", choices=["tandem", "transformers", "both"])
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--hf-batches", default="1,8,32")
    ap.add_argument("--out")
    args = ap.parse_args()
    from gpu_timing import environment

    report = {**environment(), "rows": []}
    for shape in args.shapes.split(","):
        if args.system in ("tandem", "both"):
            bench_ours(shape, report["rows"])
        if args.system in ("transformers", "both"):
            bench_hf(shape, [int(b) for b in args.hf_batches.split(",")], 512, report["rows"])
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / f"decode_step_{args.system}.json").write_text(text)


if __name__ == "__main__":
    main()
