"""C2C speed beside its baselines (T2T, the receiver alone) and the KV transfer, co-located beside
disaggregated, in one run.

Per prompt length P, batch 1, greedy, EOS ignored (every run makes exactly `--new-tokens` tokens):
  receiver   the receiver alone: end-to-end latency and time to first token (its prefill of P tokens);
  c2c        `C2C` on one engine hosting both models, a fuser at the reference size (FuserConfig defaults)
             with every gate open (the worst case; speed does not depend on its weights): end-to-end, the
             sharer / fuser / receiver step times, the KV bytes read from the sharer and written fused;
  t2t        the text baseline as a sequence on the same engine: the sharer writes exactly
             `--context-tokens` tokens after the prompt, then the receiver answers over prompt + context;
  transfer   the sharer's KV of P-1 tokens, of the layers an open gate reads: co-located, `export_kv`
             on the device; disaggregated, the real `ExportKV` RPC of a worker served in process on
             loopback, `kv_from_proto` and the copy to the device.
Medians over `--repeats` after one warm-up of each; CUDA is synchronized around every timing. `fuser_ms`
is timed with the device synchronized before and after the fusion; the request's own stats are given
as `stats_*` (the engine's step meter counts host time: on a GPU, whose kernels run asynchronously, its
sharer/receiver split is not the device's, and its `fuser_s` may start while the prefills still run).
The sharer's prefill of P-1 tokens alone is given as well (`sharer_prefill_alone`).

The disaggregated transfer needs the generated gRPC code (tandem/v1, built on import with grpcio-tools,
for the installed grpcio); without it that one figure is replaced by `disaggregated_error`.

GPU: random bf16 weights at real shapes, made in memory (sharer qwen2.5-1.5b or qwen2.5-7b, receiver
qwen2.5-0.5b). CPU: the installed Qwen2.5-Coder 0.5B (receiver) and 1.5B (sharer) in bf16. `--tiny`:
tiny random models and a small fuser, for a smoke test in seconds.

    python bench/c2c_speed.py --device cuda [--sharer qwen2.5-7b] [--out DIR]
    python bench/c2c_speed.py --device cpu --prompts 256 --new-tokens 8
    python bench/c2c_speed.py --device cpu --tiny
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402
from c2c_setup import SyncedC2C, build_engine, make_fuser  # noqa: E402
from c2c_transfer import colocated_transfer, disaggregated_transfer, log, sync  # noqa: E402
from decode_step_gpu import SHAPES  # noqa: E402

from c2c.colocated import runs  # noqa: E402
from c2c.fuser import Fuser, FuserConfig, KVShape  # noqa: E402
from workers.engine import Engine, SamplingParams  # noqa: E402

TARGET_C2C_OVER_T2T = 0.4
TARGET_FUSER_OVER_PREFILL = 0.15


class Bench:
    def __init__(self, engine: Engine, fuser: Fuser, args):
        self.engine, self.fuser, self.args = engine, fuser, args
        self.params = SamplingParams(max_tokens=args.new_tokens, temperature=0, ignore_eos=True, detokenize=False)
        self.vocab = min(engine.model(n).runner.spec.vocab_size for n in ("recv", "shr"))
        self.seed = 0

    def prompt(self, n: int) -> list[int]:
        """A fresh random prompt each call (no run can reuse another's cache)."""
        self.seed += 1
        g = torch.Generator().manual_seed(self.seed)
        return torch.randint(min(100, self.vocab // 4), min(20000, self.vocab), (n,), generator=g).tolist()

    def receiver(self, p: int) -> dict:
        ids = self.prompt(p)
        sync()
        t0 = time.perf_counter()
        out = self.engine.generate([ids], self.params, model="recv")[0]
        sync()
        wall = time.perf_counter() - t0
        assert len(out.token_ids) == self.args.new_tokens, out
        return {"e2e_s": wall, "ttft_s": out.timings["ttft_s"], "per_token_s": out.timings["per_token_s"]}

    def c2c(self, p: int, fuser: Fuser | None = None, ids: list[int] | None = None) -> dict:
        ids = ids or self.prompt(p)
        c2c = SyncedC2C(self.engine, "recv", {"shr": fuser or self.fuser})
        try:
            sync()
            t0 = time.perf_counter()
            out = c2c.generate([ids], self.params)[0]
            sync()
            wall = time.perf_counter() - t0
        finally:
            c2c.close()
        assert len(out.token_ids) == self.args.new_tokens and out.stats.get("fused_tokens") == p - 1, out
        s, n = out.stats, p - 1
        return {"e2e_s": wall, "fuser_s": s["fuser_synced_s"], "fuser_only_s": s["fuser_only_s"],
                "stats_sharer_s": s["sharer_s"],
                "stats_fuser_s": s["fuser_s"], "stats_receiver_s": s["receiver_s"],
                "kv_bytes_sharer_per_token": s["kv_bytes_sharer"] / n,
                "kv_bytes_fused_per_token": s["kv_bytes_fused"] / n, "kv_bytes_receiver_per_token": s["kv_bytes_receiver"] / n,
                "fused_layers": s["fused_layers"], "token_ids": out.token_ids}

    def t2t(self, p: int) -> dict:
        """The sharer writes exactly `context_tokens` after the prompt; the receiver answers over both."""
        ids = self.prompt(p)
        ctx_params = SamplingParams(max_tokens=self.args.context_tokens, temperature=0, ignore_eos=True, detokenize=False)
        sync()
        t0 = time.perf_counter()
        context = self.engine.generate([ids], ctx_params, model="shr")[0].token_ids
        sync()
        t1 = time.perf_counter()
        out = self.engine.generate([ids + context], self.params, model="recv")[0]
        sync()
        t2 = time.perf_counter()
        assert len(context) == self.args.context_tokens and len(out.token_ids) == self.args.new_tokens
        return {"e2e_s": t2 - t0, "sharer_s": t1 - t0, "receiver_s": t2 - t1}

    def sharer_prefill(self, p: int) -> dict:
        """The sharer's part of a c2c request alone: prefill P-1 tokens, no sampling."""
        sync()
        t0 = time.perf_counter()
        rid = self.prefilled_sharer(p)
        sync()
        wall = time.perf_counter() - t0
        self.engine.release(rid)
        self.engine.step()
        return {"e2e_s": wall}

    def sharer_layer_runs(self) -> list[range]:
        return runs(self.fuser.sharer_layers())

    def prefilled_sharer(self, p: int) -> str:
        """A sharer request holding P-1 prefilled tokens (as C2C's sharer part), waiting."""
        rid = f"xfer-{p}-{time.monotonic_ns()}"
        self.engine.add_request(rid, self.prompt(p - 1), SamplingParams(max_tokens=1, detokenize=False), "shr",
                                sample=False)
        while True:
            for o in self.engine.step():
                if o.request_id == rid and o.ready:
                    return rid
                if o.request_id == rid and o.finished:
                    raise RuntimeError(f"sharer prefill {rid} ended: {o.finish_reason} {o.error or ''}")

def medians(rows: list[dict]) -> dict:
    keys = [k for k, v in rows[0].items() if isinstance(v, (int, float))]
    med = {k: statistics.median(r[k] for r in rows) for k in keys}
    return {(k[:-2] + "_ms" if k.endswith("_s") else k): (round(v * 1e3, 3) if k.endswith("_s") else round(v, 3))
            for k, v in med.items()}


def timed(bench: Bench, kind: str, p: int, repeats: int) -> dict:
    fn = getattr(bench, kind)
    fn(p)                                                  # warm-up: kernels compile, autotune for this shape
    rows = []
    for i in range(repeats):
        rows.append(fn(p))
        log(f"P={p} {kind} run {i + 1}/{repeats}: {rows[-1]['e2e_s'] * 1e3:.1f} ms")
    return medians(rows)


def ratio(value: float, target: float) -> dict:
    return {"value": round(value, 4), "target": target, "met": value <= target}


def environment(args) -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                    capture_output=True, text=True).stdout.strip())
    except OSError:
        commit, dirty = "unknown", None
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    device = torch.cuda.get_device_name() if args.device == "cuda" else \
        f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return {"device": device, "torch": torch.__version__, "triton": triton_version, "commit": commit,
            "uncommitted_changes": dirty}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--tiny", action="store_true", help="tiny random models and fuser (a smoke test, seconds)")
    ap.add_argument("--receiver", help="GPU: a shape (default qwen2.5-0.5b); CPU: a model (default "
                    "qwen2.5-coder-0.5b-instruct)")
    ap.add_argument("--sharer", help="GPU: qwen2.5-1.5b (default) or qwen2.5-7b; CPU: a model (default "
                    "qwen2.5-coder-1.5b-instruct)")
    ap.add_argument("--prompts", default="256,2048", help="prompt lengths, comma-separated")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--context-tokens", type=int, default=64, help="t2t: tokens of context the sharer writes")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--fuser-hidden", type=int)
    ap.add_argument("--fuser-intermediate", type=int)
    ap.add_argument("--fuser-depth", type=int)
    ap.add_argument("--kv-mb", type=float, help="KV pool per model (MiB)")
    ap.add_argument("--threads", type=int, help="CPU threads (default: torch's; 1 with --tiny)")
    ap.add_argument("--sanity", action="store_true", help="also check that a fuser with a zero projection leaves "
                    "the receiver's greedy output unchanged (always on with --tiny)")
    ap.add_argument("--out", help="write DIR/c2c_speed.json")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: CUDA is not available")
    args.random = args.device == "cuda" or args.tiny
    ref = FuserConfig(KVShape(1, 1, 1), KVShape(1, 1, 1))
    args.fuser_hidden = args.fuser_hidden or (64 if args.tiny else ref.hidden)
    args.fuser_intermediate = args.fuser_intermediate or (64 if args.tiny else ref.intermediate)
    args.fuser_depth = args.fuser_depth or ref.depth
    if args.tiny:
        args.receiver, args.sharer = args.receiver or "tiny-receiver", args.sharer or "tiny-sharer"
        args.kv_mb = args.kv_mb or 64
        args.sanity = True
    elif args.device == "cuda":
        args.receiver, args.sharer = args.receiver or "qwen2.5-0.5b", args.sharer or "qwen2.5-1.5b"
        for name in (args.receiver, args.sharer):
            if name not in SHAPES:
                ap.error(f"unknown shape {name!r}; known: {', '.join(SHAPES)}")
        args.kv_mb = args.kv_mb or 2048
    else:
        from tandem.assets import resolve

        args.receiver_path = str(resolve(args.receiver or "qwen2.5-coder-0.5b-instruct"))
        args.sharer_path = str(resolve(args.sharer or "qwen2.5-coder-1.5b-instruct"))
        args.receiver, args.sharer = Path(args.receiver_path).name, Path(args.sharer_path).name
        args.kv_mb = args.kv_mb or 512
    if args.threads or args.tiny:
        torch.set_num_threads(args.threads or 1)   # tiny models gain nothing from threads, lose much on busy cores
    lengths = [int(p) for p in args.prompts.split(",")]
    if min(lengths) < 2:
        ap.error("--prompts: each length must be at least 2")

    log(f"building the engine: receiver {args.receiver}, sharer {args.sharer} on {args.device}")
    t0 = time.perf_counter()
    engine = build_engine(args)
    fuser = make_fuser(engine, args)
    bench = Bench(engine, fuser, args)
    sync()
    log(f"engine ready in {time.perf_counter() - t0:.1f} s")
    specs = {n: engine.model(n).runner.spec for n in ("recv", "shr")}
    report = {**environment(args), "dtype": "float32" if args.tiny else "bfloat16",
              "mode": "tiny random" if args.tiny else ("random weights at real shapes" if args.random else "real models"),
              "receiver": args.receiver, "sharer": args.sharer,
              "shapes": {role: {"layers": s.num_layers, "hidden": s.hidden_size, "kv_heads": s.num_kv_heads,
                                "head_dim": s.head_dim, "vocab": s.vocab_size}
                         for role, s in (("receiver", specs["recv"]), ("sharer", specs["shr"]))},
              "fuser": {"hidden": args.fuser_hidden, "intermediate": args.fuser_intermediate, "depth": args.fuser_depth,
                        "gates": "all open", "open_receiver_layers": len(fuser.open_layers()),
                        "sharer_layers_read": len(fuser.sharer_layers()),
                        "parameters": sum(p.numel() for p in fuser.parameters())},
              "batch": 1, "new_tokens": args.new_tokens, "context_tokens": args.context_tokens, "repeats": args.repeats,
              "targets": {"c2c_over_t2t": TARGET_C2C_OVER_T2T, "fuser_over_receiver_prefill": TARGET_FUSER_OVER_PREFILL,
                          "note": "the fuser target is set for the H100"},
              "prompts": {}}

    if args.sanity:
        zero = copy.deepcopy(fuser)
        with torch.no_grad():
            for layer in zero.layers:
                for path in layer.paths:
                    path.proj[-1].weight.zero_()
                    path.proj[-1].bias.zero_()
        p = min(lengths)
        ids = bench.prompt(p)
        alone = engine.generate([ids], bench.params, model="recv")[0].token_ids
        fused = bench.c2c(p, zero, ids)["token_ids"]
        report["sanity_zero_projection_same_ids"] = fused == alone
        log(f"sanity: open gates, zero projection -> same greedy ids as the receiver alone: {fused == alone}")

    for p in lengths:
        log(f"P={p}: receiver alone, c2c, t2t")
        row = {"receiver_alone": timed(bench, "receiver", p, args.repeats),
               "sharer_prefill_alone": timed(bench, "sharer_prefill", p, args.repeats)}
        row["c2c"] = timed(bench, "c2c", p, args.repeats)
        row["t2t"] = timed(bench, "t2t", p, args.repeats)
        row["transfer"] = {"colocated": colocated_transfer(bench, p)}
        log(f"P={p} co-located transfer {json.dumps(row['transfer']['colocated'])}")
        rc, tt, ra = row["c2c"], row["t2t"], row["receiver_alone"]
        row["c2c_over_receiver_alone"] = round(rc["e2e_ms"] / ra["e2e_ms"], 4)
        row["fuser_over_receiver_prefill"] = ratio(rc["fuser_ms"] / ra["ttft_ms"], TARGET_FUSER_OVER_PREFILL)
        row["fuser_only_over_receiver_prefill"] = ratio(rc["fuser_only_ms"] / ra["ttft_ms"], TARGET_FUSER_OVER_PREFILL)
        row["c2c_over_t2t"] = ratio(rc["e2e_ms"] / tt["e2e_ms"], TARGET_C2C_OVER_T2T)
        report["prompts"][str(p)] = row

    log("disaggregated transfer: a worker server on loopback")
    try:
        for p, figures in disaggregated_transfer(bench, lengths).items():
            report["prompts"][str(p)]["transfer"]["disaggregated"] = figures
    except Exception as e:      # e.g. no generated gRPC code (tandem/v1) and no grpcio-tools to build it
        log(f"disaggregated transfer failed: {e!r}")
        report["disaggregated_error"] = (f"{e!r}; the worker RPCs need the generated code in tandem/v1 "
                                         "(python -m tandem._proto.build, which needs grpcio-tools)")
    for row in report["prompts"].values():
        co, dis = row["transfer"]["colocated"], row["transfer"].get("disaggregated")
        if dis and co["ms"]:
            row["transfer"]["disaggregated_over_colocated"] = round(dis["ms"] / co["ms"], 2)

    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "c2c_speed.json").write_text(text)


if __name__ == "__main__":
    main()
