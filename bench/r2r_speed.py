"""R2R speed beside LLM-only (and SLM-only), co-located in one engine, in one run.

GPU: random bf16 weights at real shapes (SLM 0.5B or 1.5B, LLM 7B); the real router network (paper size,
random weights) scores every token, but its decision is forced to fire on an exact share of tokens.
CPU: the real Qwen2.5-Coder 0.5B + 1.5B pair in bf16, same forcing.

Per request: decode tokens/s after the first token (1 / per-token time); aggregate: batch x that.

    python bench/r2r_speed.py --device cuda [--slm qwen2.5-0.5b] [--out DIR]
    python bench/r2r_speed.py --device cpu --batches 1,8 --tokens 48
"""
from __future__ import annotations

import argparse
import faulthandler
import json
import statistics
import sys
import time
from dataclasses import astuple, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402

from routing.deciders import ForcedDecider, RouterDecider  # noqa: E402
from routing.r2r import R2R  # noqa: E402
from routing.router import Router, RouterConfig  # noqa: E402
from workers.engine import Engine, EngineConfig, ModelConfig, SamplingParams  # noqa: E402


class ForcedRouter(RouterDecider):
    """Runs the router network on every row (its cost is real) and fires on the forced share, each
    sequence at its own phase (rows of a batch do not all fire on the same step)."""

    name = "forced_router"

    def decide(self, step, thresholds):
        if step.prepared is None:                  # scored at launch unless the step was not deferred
            self.scores(step)
        return self.forced.decide(step, thresholds)

    forced = ForcedDecider(spread=True)


def random_model(shape: str, device: str):
    from decode_step_gpu import NullTokenizer, config

    from workers.models import LoadedModel
    from workers.models.decoder import CausalLM
    from workers.models.spec import ModelSpec

    spec = ModelSpec.from_hf_config(config(shape))
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(device):
        model = CausalLM(spec).eval()
    torch.set_default_dtype(torch.float32)
    for p in model.parameters():
        p.data.normal_(0, 0.02)
    return LoadedModel(model, spec, NullTokenizer(), Path(shape), torch.bfloat16)


def build(args) -> R2R:
    if args.device == "cuda":
        preloaded = {"slm": random_model(args.slm, "cuda"), "llm": random_model(args.llm, "cuda")}
        paths = {"slm": args.slm, "llm": args.llm}
    else:
        preloaded = None
        paths = {"slm": args.slm_path, "llm": args.llm_path}
    kv = {"slm": args.slm_kv_mb, "llm": args.llm_kv_mb}
    models = [ModelConfig(n, paths[n], dtype="bfloat16", device=args.device, kv_cache_mb=kv[n]) for n in ("slm", "llm")]
    engine = Engine(EngineConfig(models, max_num_seqs=256, max_num_batched_tokens=8192), preloaded=preloaded)
    slm = engine.models["slm"].runner
    torch.manual_seed(0)
    config = RouterConfig(hidden_size=slm.spec.hidden_size, top_k=100, width=args.router_width, depth=args.router_depth)
    router = Router(config, slm.model.model.embed_tokens.weight).to(slm.device).eval()
    return R2R(engine, "slm", "llm", [ForcedRouter(router)])


@dataclass(frozen=True)
class Setting:
    """One measured configuration: the system, R2R's forced share, and the knobs an A/B turns off."""

    kind: str
    share: float = 0.0
    min_rows: int = 1
    overlap: bool = True
    eager: bool = False
    llm_stream: bool = True
    policy_stream: bool = True


def settings(batch: int, shares: list[float], modes: list[bool], args) -> list[Setting]:
    """LLM and SLM alone, R2R at each share; the A/Bs at 13% only; at batch >= 8 also LLM batches of batch/4."""
    out = [Setting("llm"), Setting("slm")] + [Setting("r2r", s, eager=e) for s in shares for e in modes]
    ab = [(s, e) for s in shares if s == 0.13 for e in modes]
    out += [Setting("r2r", s, eager=e, overlap=False) for s, e in ab if args.ab_overlap]
    out += [Setting("r2r", s, eager=e, llm_stream=False) for s, e in ab if args.ab_llm_stream]
    out += [Setting("r2r", s, eager=e, policy_stream=False) for s, e in ab if args.ab_policy_stream]
    if batch >= 8:
        out += [Setting("r2r", s, eager=e, min_rows=batch // 4) for s in shares for e in modes]
    return out


def run(r2r: R2R, setting: Setting, batch: int, tokens: int, prompt_len: int, seed: int = 0) -> dict:
    kind, share, min_rows, overlap, eager, llm_stream, policy_stream = astuple(setting)
    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True, detokenize=False)
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(100, 20000, (prompt_len,), generator=g).tolist() for _ in range(batch)]
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    t0 = time.perf_counter()
    r2r.llm_min_rows = min_rows
    r2r.eager = eager
    r2r.engine.config.overlap = overlap
    set_llm_stream(r2r, llm_stream and kind == "r2r")
    set_policy_stream(r2r, policy_stream)
    chained = r2r.engine.models["slm"].chained_steps
    if STALL_S:
        faulthandler.dump_traceback_later(STALL_S, exit=True)     # a stalled run ends the call with every stack
    if kind == "r2r":
        outs = r2r.generate(prompts, params, threshold=1.0 - share)
    else:
        outs = r2r.engine.generate(prompts, params, model=kind)
    sync()
    faulthandler.cancel_dump_traceback_later()
    wall = time.perf_counter() - t0
    per_token = statistics.mean(o.timings["per_token_s"] for o in outs)
    row = {"kind": kind, "batch": batch, "tokens": tokens, "prompt_len": prompt_len,
           "per_request_tok_s": round(1 / per_token, 2), "aggregate_tok_s": round(batch / per_token, 1),
           "ttft_ms": round(1e3 * statistics.mean(o.timings["ttft_s"] for o in outs), 2), "wall_s": round(wall, 3)}
    if not overlap:
        row["overlap"] = False
    if kind == "r2r" and not llm_stream:
        row["llm_stream"] = False
    if kind == "r2r" and not policy_stream:
        row["policy_stream"] = False
    if kind != "llm":
        row["slm_chained_steps"] = r2r.engine.models["slm"].chained_steps - chained
    if kind == "r2r":
        row["forced_share"] = share
        row["llm_min_rows"] = min_rows
        row["llm_prefill"] = "eager" if eager else "lazy"
        row["llm_token_share"] = round(sum(o.stats["llm_tokens"] for o in outs) / sum(len(o.token_ids) for o in outs), 4)
        row["router_ms_per_token"] = round(1e3 * sum(o.stats["router_s"] for o in outs) / (batch * tokens), 4)
        row["llm_ms_per_token"] = round(1e3 * sum(o.stats["llm_s"] for o in outs) / (batch * tokens), 4)
    return row


STALL_S = 60.0


def set_policy_stream(r2r: R2R, on: bool) -> None:
    """The router on a stream of its own, beside the next SLM step (the default on CUDA), or on the SLM's."""
    slm = r2r.engine.models["slm"]
    if not on:
        slm.policy_stream = None
    elif slm.policy_stream is None and slm.runner.device.type == "cuda":
        slm.policy_stream = torch.cuda.Stream(slm.runner.device)


def set_llm_stream(r2r: R2R, on: bool) -> None:
    """The LLM on the stream of its own that R2R gave it (the default), or on the SLM's."""
    r2r.llm.stream = r2r.llm_stream if on else None


def host_time(r2r: R2R, kind: str, args) -> dict:
    """Per engine step, milliseconds of host work and of waiting for the device (in `InFlight.token_list`
    and `prepared_rows`, where the host reads what a step computed)."""
    from workers.engine.overlap import InFlight

    waits, originals = [0.0], {n: getattr(InFlight, n) for n in ("token_list", "prepared_rows")}

    def timed(fn):
        def wrapper(*a, **kw):
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                waits[0] += time.perf_counter() - t
        return wrapper

    steps, step = [0], r2r.engine.step

    def counted():
        steps[0] += 1
        return step()

    for n, fn in originals.items():
        setattr(InFlight, n, timed(fn))
    r2r.engine.step = counted
    try:
        t0 = time.perf_counter()
        run(r2r, Setting(kind, 0.13), 1, args.tokens, args.prompt_len)
        wall = time.perf_counter() - t0
    finally:
        for n, fn in originals.items():
            setattr(InFlight, n, fn)
        del r2r.engine.step
    return {"engine_steps": steps[0], "wall_ms_per_step": round(1e3 * wall / steps[0], 4),
            "wait_ms_per_step": round(1e3 * waits[0] / steps[0], 4),
            "host_ms_per_step": round(1e3 * (wall - waits[0]) / steps[0], 4)}


def profile(r2r: R2R, args) -> dict:
    """Where a batch-1 token's time goes: the GPU time of one SLM step, of the router and of an LLM step
    (graph replays), beside cProfile's view of the host in SLM-only and R2R runs at 13%."""
    import cProfile
    import io
    import pstats

    from gpu_timing import replay_ms

    out = {}
    if args.device == "cuda":
        out["slm_step_gpu_ms"] = round(replay_ms(r2r.engine.models["slm"].runner.graphs.graphs[1]), 4)
        out["llm_step_gpu_ms"] = round(replay_ms(r2r.engine.models["llm"].runner.graphs.graphs[1]), 4)
        out["llm_8_rows_gpu_ms"] = round(replay_ms(r2r.engine.models["llm"].runner.graphs.graphs[8]), 4)
        router_graphs = r2r.deciders["forced_router"].graphs
        if router_graphs is not None:
            out["router_gpu_ms"] = round(replay_ms(router_graphs.graphs[1]), 4)
    for kind in ("slm", "r2r"):
        out[f"{kind}_host_ms"] = host_time(r2r, kind, args)
    for kind in ("slm", "r2r"):
        prof = cProfile.Profile()
        prof.enable()
        t0 = time.perf_counter()
        run(r2r, Setting(kind, 0.13), 1, args.tokens, args.prompt_len)
        out[f"{kind}_profiled_wall_s"] = round(time.perf_counter() - t0, 3)
        prof.disable()
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(25)
        out[f"{kind}_tottime"] = buf.getvalue()[-5000:]
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(35)
        out[f"{kind}_cumulative"] = buf.getvalue()[-6000:]
    return out


def main() -> None:
    global STALL_S
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--slm", default="qwen2.5-0.5b")
    ap.add_argument("--llm", default="qwen2.5-7b")
    ap.add_argument("--slm-path", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--llm-path", default="qwen2.5-coder-1.5b-instruct")
    ap.add_argument("--slm-kv-mb", type=float, default=4096)
    ap.add_argument("--llm-kv-mb", type=float, default=16384)
    ap.add_argument("--router-width", type=int, default=1024)
    ap.add_argument("--router-depth", type=int, default=6)
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--shares", default="0.05,0.13,0.25")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=1, help="measured runs of each configuration")
    ap.add_argument("--stall-dump", type=float, default=STALL_S,
                    help="a run longer than this many seconds ends the call with every thread's stack (0: never)")
    ap.add_argument("--ab-overlap", action="store_true", help="also R2R at 13%% with SLM steps not overlapped")
    ap.add_argument("--ab-llm-stream", action="store_true", help="also R2R at 13%% with the LLM on the SLM's stream "
                    "(the default is a stream of its own)")
    ap.add_argument("--ab-policy-stream", action="store_true", help="also R2R at 13%% with the router on the SLM's "
                    "stream, behind the next step (the default is a stream of its own, beside it)")
    ap.add_argument("--profile", action="store_true", help="cProfile one batch-1 R2R run at 13%%")
    ap.add_argument("--llm-prefill", default="lazy", choices=["lazy", "eager", "both"],
                    help="when the LLM reads the prompt: at the first hand-off (lazy) or at arrival (eager)")
    ap.add_argument("--out")
    args = ap.parse_args()
    STALL_S = args.stall_dump
    if args.device == "cpu":
        from tandem.assets import resolve

        args.slm_path, args.llm_path = str(resolve(args.slm_path)), str(resolve(args.llm_path))
        args.slm_kv_mb, args.llm_kv_mb = min(args.slm_kv_mb, 256), min(args.llm_kv_mb, 512)
        args.slm, args.llm = Path(args.slm_path).name, Path(args.llm_path).name
    r2r = build(args)
    report = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
              "torch": torch.__version__, "slm": args.slm, "llm": args.llm,
              "router": {"width": args.router_width, "depth": args.router_depth}, "rows": []}
    shares = [float(s) for s in args.shares.split(",")]
    modes = {"lazy": [False], "eager": [True], "both": [False, True]}[args.llm_prefill]
    for batch in (int(b) for b in args.batches.split(",")):
        for setting in settings(batch, shares, modes, args):
            run(r2r, setting, batch, args.tokens, args.prompt_len, seed=1)  # warm-up
            for _ in range(args.repeat):
                row = run(r2r, setting, batch, args.tokens, args.prompt_len, seed=2 + len(report["rows"]))
                report["rows"].append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
    if args.profile:
        report["profile"] = profile(r2r, args)
    llm = {r["batch"]: r for r in report["rows"] if r["kind"] == "llm"}
    for r in report["rows"]:
        r["speedup_per_request_vs_llm"] = round(r["per_request_tok_s"] / llm[r["batch"]]["per_request_tok_s"], 2)
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / f"r2r_speed_{args.device}.json").write_text(text)


if __name__ == "__main__":
    main()
