"""Engine on CPU beside transformers `generate`, same model, same prompts, one run.

Each measurement runs in its own subprocess, so peak memory (ru_maxrss) is that system's alone; the
two systems alternate `--repeats` times and the best run of each is kept (a shared machine is noisy).
Prints one JSON object; `docs/benchmarks.md` records the figures.

    python bench/engine_cpu.py [--model NAME_OR_PATH] [--dtypes bfloat16,float32] [--batches 1,16]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = [
    "Write a Python function that checks whether a string is a palindrome.",
    "Explain the difference between a list and a tuple in Python.",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many clips did Natalia sell altogether in April and May?",
    "What does the SQL keyword JOIN do? Give a short example.",
    "Write a function that returns the n-th Fibonacci number iteratively.",
    "How do I read a CSV file with pandas and print its first five rows?",
    "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. How much did she earn?",
    "What is a race condition? Explain briefly.",
]


def prompts(tokenizer, batch: int) -> list[list[int]]:
    out = []
    for i in range(batch):
        msgs = [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]
        out.append(tokenizer.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True, return_dict=False))
    return [list(p) for p in out]


def run_ours(path: str, dtype: str, batch: int, new_tokens: int, kv_mb: float) -> dict:
    import transformers  # noqa: F401  (the runtime's fixed cost belongs to the baseline)

    from workers.engine import Engine, EngineConfig, ModelConfig, SamplingParams

    baseline = _rss_now()
    engine = Engine(EngineConfig([ModelConfig("m", path, dtype=dtype, kv_cache_mb=kv_mb)], max_num_seqs=max(64, batch)))
    ps = prompts(engine.model().tokenizer, batch)
    engine.generate(ps[:1], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    t0 = time.perf_counter()
    outs = engine.generate(ps, params)
    elapsed = time.perf_counter() - t0
    weights = engine.model().runner.weight_bytes
    return {"tokens": sum(len(o.token_ids) for o in outs), "seconds": elapsed,
            "weights_bytes": weights, "kv_bytes": engine.model().runner.kv_cache_bytes, "first_tokens": outs[0].token_ids[:16],
            "baseline_rss_bytes": baseline}


def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_hf(path: str, dtype: str, batch: int, new_tokens: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
    ps = prompts(tok, batch)
    width = max(len(p) for p in ps)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in ps])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in ps])
    kw = dict(do_sample=False, pad_token_id=pad)
    with torch.inference_mode():
        model.generate(ids[:1, -len(ps[0]):], max_new_tokens=4, min_new_tokens=4, **kw)
        t0 = time.perf_counter()
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw)
        elapsed = time.perf_counter() - t0
    return {"tokens": int((out.shape[1] - width) * batch), "seconds": elapsed, "first_tokens": out[0, width:width + 16].tolist()}


def child(args) -> None:
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    fn = run_ours if args.system == "tandem" else run_hf
    extra = (args.kv_mb,) if args.system == "tandem" else ()
    result = fn(args.model_path, args.dtype, args.batch, args.new_tokens, *extra)
    result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print("RESULT " + json.dumps(result))


def measure(system: str, path: str, dtype: str, batch: int, new_tokens: int, kv_mb: float) -> dict:
    cmd = [sys.executable, __file__, "--child", system, "--model-path", path, "--dtype", dtype,
           "--batch", str(batch), "--new-tokens", str(new_tokens), "--kv-mb", str(kv_mb)]
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"{system} failed:\n{proc.stderr[-3000:]}")
    r = json.loads(line[7:])
    r["tokens_per_s"] = r["tokens"] / r["seconds"]
    return r


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--kv-mb", type=float, default=256.0)
    ap.add_argument("--repeats", type=int, default=2, help="alternate the two systems this often; best of each")
    ap.add_argument("--child", choices=["tandem", "transformers"])
    ap.add_argument("--model-path")
    ap.add_argument("--dtype")
    ap.add_argument("--batch", type=int)
    args = ap.parse_args()
    if args.child:
        args.system = args.child
        return child(args)
    sys.path.insert(0, str(ROOT))
    from tandem import assets

    path = str(assets.resolve(args.model or assets.DEFAULT_MODEL))
    rows = []
    for dtype in args.dtypes.split(","):
        for batch in map(int, args.batches.split(",")):
            hfs, ourss = [], []
            for _ in range(args.repeats):
                hfs.append(measure("transformers", path, dtype, batch, args.new_tokens, args.kv_mb))
                ourss.append(measure("tandem", path, dtype, batch, args.new_tokens, args.kv_mb))
            hf = max(hfs, key=lambda r: r["tokens_per_s"])
            ours = max(ourss, key=lambda r: r["tokens_per_s"])
            budget = ours["weights_bytes"] + ours["kv_bytes"]
            rows.append({
                "dtype": dtype, "batch": batch, "new_tokens": args.new_tokens,
                "transformers_tok_s": round(hf["tokens_per_s"], 2), "tandem_tok_s": round(ours["tokens_per_s"], 2),
                "speedup": round(ours["tokens_per_s"] / hf["tokens_per_s"], 2),
                "tandem_peak_rss_gb": round(ours["peak_rss_bytes"] / 2**30, 2),
                "transformers_peak_rss_gb": round(hf["peak_rss_bytes"] / 2**30, 2),
                "weights_plus_kv_gb": round(budget / 2**30, 2),
                "peak_over_budget": round(ours["peak_rss_bytes"] / budget, 2),
                "tandem_runtime_baseline_gb": round(ours["baseline_rss_bytes"] / 2**30, 2),
                "engine_peak_over_budget": round((ours["peak_rss_bytes"] - ours["baseline_rss_bytes"]) / budget, 2),
                "same_first_16_tokens": hf["first_tokens"] == ours["first_tokens"],
            })
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(json.dumps({"model": path, "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                      "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
