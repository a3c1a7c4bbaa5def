"""GPU check (one call on a CUDA machine): the kernel tests in bf16 (and fp32/fp16), then the
engine on CUDA against its CPU path and transformers on the same random-weight models.

    python bench/gpu_check.py [--out DIR]      # prints JSON; writes gpu_check.json under DIR
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import torch  # noqa: E402

SHAPES = {  # real widths, few layers (speed does not matter here, numerics do)
    "qwen2": dict(vocab=151936, hidden=896, inter=4864, heads=14, kv=2, head_dim=64, layers=4),
    "llama": dict(vocab=49152, hidden=576, inter=1536, heads=9, kv=3, head_dim=64, layers=4),
    "qwen3": dict(vocab=151936, hidden=1024, inter=3072, heads=16, kv=8, head_dim=128, layers=3),
    "gemma3": dict(vocab=262144, hidden=640, inter=2048, heads=4, kv=1, head_dim=256, layers=4),
}


def make_model(family: str, root: Path) -> Path:
    from transformers import (Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM, Qwen2Config,
                              Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

    s = SHAPES[family]
    common = dict(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["inter"],
                  num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["kv"],
                  max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    cls, cfg = {
        "qwen2": (Qwen2ForCausalLM, lambda: Qwen2Config(**common, tie_word_embeddings=False)),
        "llama": (LlamaForCausalLM, lambda: LlamaConfig(**common, tie_word_embeddings=True)),
        "qwen3": (Qwen3ForCausalLM, lambda: Qwen3Config(**common, head_dim=s["head_dim"])),
        "gemma3": (Gemma3ForCausalLM, lambda: Gemma3TextConfig(
            **common, head_dim=s["head_dim"], sliding_window=64, query_pre_attn_scalar=256,
            layer_types=["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"])),
    }[family]
    torch.manual_seed(0)
    model = cls(cfg()).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.1)
    out = root / family
    model.save_pretrained(out)
    from tiny import _write_tokenizer

    _write_tokenizer(out, 384)
    return out


def engine(path: Path, device: str, dtype: str, graphs: bool = True, overlap: bool = True):
    from workers.engine import Engine, EngineConfig, ModelConfig

    mc = ModelConfig("m", str(path), dtype=dtype, device=device, kv_cache_mb=512, cuda_graphs=graphs, max_graph_batch=16)
    return Engine(EngineConfig([mc], overlap=overlap))


def check_overlap(path: Path, prompts: list[list[int]]) -> dict:
    """Overlapped decode steps give what stepping one at a time gives (the scenario of tests/test_overlap.py:
    requests stopping on a token and on max_tokens after 1-40 tokens, one arriving while the others decode)."""
    from test_overlap import run_staggered, staggered_params

    from workers.engine import SamplingParams

    plain = engine(path, "cuda", "bfloat16", overlap=False)
    free = [o.token_ids for o in plain.generate(prompts, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))]
    params = staggered_params(free)
    results, free_after = [], []
    for overlap in (False, True):
        outs, all_free = run_staggered(engine(path, "cuda", "bfloat16", overlap=overlap), prompts, params)
        results.append([(r.token_ids, r.finish_reason) for r in outs])
        free_after.append(all_free)
    return {"tokens_equal": results[0] == results[1], "every_block_free_after": free_after,
            "finish_reasons": sorted({r for _, r in results[1]})}


def check_family(family: str, path: Path) -> dict:
    from transformers import AutoModelForCausalLM

    from workers.engine import PolicyDecision, SamplingParams

    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(3, 384, (150,), generator=g).tolist()
    greedy = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
    res = {}
    for dtype in ("float32", "bfloat16"):
        rows = []
        eng = engine(path, "cuda", dtype)
        eng.add_policy("m", lambda st: rows.append(st.logits[0].float().cpu()) or PolicyDecision())
        ours = eng.generate([prompt], greedy)[0].token_ids
        del eng
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).cuda().eval()
        hf.generation_config.eos_token_id = None
        with torch.inference_mode():
            ref_tokens = hf.generate(torch.tensor([prompt], device="cuda"), max_new_tokens=32, do_sample=False,
                                     pad_token_id=0)[0, len(prompt):].tolist()
            ref_logits = hf(torch.tensor([prompt + ours], device="cuda")).logits[0, len(prompt) - 1 : -1].float().cpu()
        del hf
        torch.cuda.empty_cache()
        ours_logits = torch.stack(rows)
        err = (ours_logits - ref_logits).abs().max().item()
        scale = ref_logits.abs().max().item()
        same = next((i for i, (a, b) in enumerate(zip(ours, ref_tokens)) if a != b), len(ours))
        res[dtype] = {"tokens_identical_prefix": same, "max_abs_logit_err": err, "max_abs_logit": scale,
                      "rel_err": err / scale}
    cpu = engine(path, "cpu", "float32").generate([prompt], greedy)[0].token_ids
    gpu = engine(path, "cuda", "float32").generate([prompt], greedy)[0].token_ids
    res["cuda_vs_cpu_fp32_identical_prefix"] = next((i for i, (a, b) in enumerate(zip(cpu, gpu)) if a != b), len(cpu))
    prompts = [torch.randint(3, 384, (n,), generator=g).tolist() for n in (5, 130, 17, 64, 1, 300, 33, 9)]
    eng = engine(path, "cuda", "float32")
    together = [o.token_ids for o in eng.generate(prompts, greedy)]
    eager = engine(path, "cuda", "float32", graphs=False)
    alone = [eager.generate([p], greedy)[0].token_ids for p in prompts]
    res["batched_graphs_vs_eager_one_by_one_identical"] = together == alone
    res["overlapped_steps_equal_unoverlapped"] = check_overlap(path, prompts)
    return res


def check_r2r(slm_path: Path, llm_path: Path) -> dict:
    """R2R co-located on CUDA: never-route equals the SLM alone, always-route the LLM alone (graphs on,
    so catch-up extends run as graph rows), and a mixed share equals the CPU path."""
    from routing.deciders import ForcedDecider
    from routing.r2r import R2R
    from workers.engine import Engine, EngineConfig, ModelConfig, SamplingParams

    def pair(device, overlap=True, llm_stream=True):
        models = [ModelConfig(n, str(p), dtype="float32", device=device, kv_cache_mb=256, max_graph_batch=64)
                  for n, p in (("slm", slm_path), ("llm", llm_path))]
        return R2R(Engine(EngineConfig(models, overlap=overlap)), "slm", "llm", [ForcedDecider()], llm_stream=llm_stream)

    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, 384, (n,), generator=g).tolist() for n in (7, 40, 1, 90)]
    greedy = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
    r = pair("cuda")
    res = {}
    for name, path, t in (("slm", slm_path, 1.0), ("llm", llm_path, 0.0)):
        alone = [o.token_ids for o in engine(path, "cuda", "float32").generate(prompts, greedy)]
        res[f"{name}_only_equal"] = [o.token_ids for o in r.generate(prompts, greedy, threshold=t)] == alone
    from routing.router import Router, RouterConfig, RouterGraphs

    torch.manual_seed(0)
    router = Router(RouterConfig(hidden_size=896, top_k=100, width=256, depth=2), torch.randn(1000, 896, device="cuda")).cuda().eval()
    graphs = None
    errs = []
    for b in (1, 3, 16):
        h, lg, tok = torch.randn(b, 896, device="cuda"), torch.randn(b, 151936, device="cuda"), torch.randint(0, 1000, (b,), device="cuda")
        graphs = graphs or RouterGraphs(router, h, lg)
        errs.append((graphs(h, tok, lg) - router.prob(h, tok, lg)).abs().max().item())
    res["router_graph_vs_eager_max_err"] = max(errs)
    r = pair("cuda")
    mixed = [o.token_ids for o in r.generate(prompts, greedy, threshold=0.8)]
    res["mixed_overlapped_slm_steps_chained"] = r.engine.models["slm"].chained_steps
    res["mixed_cuda_equals_cpu"] = mixed == [o.token_ids for o in pair("cpu").generate(prompts, greedy, threshold=0.8)]
    sync = pair("cuda", overlap=False)
    res["mixed_overlapped_equals_one_step_at_a_time"] = mixed == [o.token_ids for o in sync.generate(prompts, greedy, threshold=0.8)]
    one = pair("cuda", llm_stream=False)
    res["mixed_llm_on_slm_stream_equal"] = mixed == [o.token_ids for o in one.generate(prompts, greedy, threshold=0.8)]
    res["all_blocks_free"] = all(s["free_blocks"] == s["num_blocks"] for e in (r.engine, sync.engine, one.engine)
                                 for s in e.stats().values())
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--families", default=",".join(SHAPES))
    ap.add_argument("--no-kernel-tests", action="store_true")
    args = ap.parse_args()
    assert torch.cuda.is_available(), "gpu_check needs a CUDA device"
    import triton

    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
    t0 = time.time()
    if not args.no_kernel_tests:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                               str(ROOT / "tests/test_kernels.py")], capture_output=True, text=True, cwd=ROOT)
        report["kernel_tests"] = {"returncode": proc.returncode, "summary": proc.stdout.strip().splitlines()[-1:],
                                  "failures": [x for x in proc.stdout.splitlines() if x.startswith("FAILED")][:20],
                                  "seconds": round(time.time() - t0, 1)}
    with tempfile.TemporaryDirectory() as tmp:
        for family in args.families.split(","):
            t1 = time.time()
            try:
                report[family] = check_family(family, make_model(family, Path(tmp)))
            except Exception as e:  # report and go on: one family's failure must not hide the others
                import traceback

                report[family] = {"error": repr(e), "trace": traceback.format_exc()[-2000:]}
            report[family]["seconds"] = round(time.time() - t1, 1)
            print(json.dumps({family: report[family]}), file=sys.stderr, flush=True)
            if family == "qwen2":
                try:
                    report["r2r"] = check_r2r(make_model("qwen2", Path(tmp) / "r2r"), make_model("qwen3", Path(tmp) / "r2r"))
                except Exception as e:
                    import traceback

                    report["r2r"] = {"error": repr(e), "trace": traceback.format_exc()[-2000:]}
                print(json.dumps({"r2r": report["r2r"]}), file=sys.stderr, flush=True)
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "gpu_check.json").write_text(text)


if __name__ == "__main__":
    main()
