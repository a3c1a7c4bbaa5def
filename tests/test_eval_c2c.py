"""`tandem eval c2c`: configs, resume, results; the MMLU arrow reader. Tiny models, synthetic items."""
from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from c2c import checkpoint
from c2c.fuser import Fuser, FuserConfig
from tandem.evals import c2c_mc
from tandem.evals.c2c_mc import C2CEvalSpec, run_eval
from tandem.errors import TandemError
from tandem.evals.store import EvalError
from tandem.mc_datasets import MCItem

ITEMS = [MCItem("arc_challenge", "test", i, f"q{i}", f"Which number comes after {i}?",
                (str(i + 1), str(i + 2), str(i + 3)), i % 3) for i in range(5)]


@pytest.fixture(autouse=True)
def synthetic_items(monkeypatch):
    monkeypatch.setattr(c2c_mc, "eval_items", lambda task, n, seed=0: ITEMS[:n])
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _closed_fuser(receiver, sharer, out, gate: float = -1.0):
    pair = checkpoint.Pair(checkpoint.ModelId.read(receiver), checkpoint.ModelId.read(sharer))
    fuser = Fuser(FuserConfig(pair.receiver.kv, pair.sharer.kv, hidden=16, intermediate=16, dropout=0.0))
    with torch.no_grad():
        for layer in fuser.layers:
            layer.gate_logits.fill_(gate)
    checkpoint.save(out, fuser, pair)
    return str(out)


def test_configs_resume_and_closed_gates(tiny_paths, tmp_path):
    receiver, sharer = str(tiny_paths["qwen3"]), str(tiny_paths["llama"])
    spec = C2CEvalSpec(receiver=receiver, sharer=sharer, out=str(tmp_path / "ev"), tasks=["arc_challenge"],
                       items=4, fuser=_closed_fuser(receiver, sharer, tmp_path / "fuser"), dtype="float32",
                       batch=3, max_new_tokens=3, context_tokens=4, kv_cache_mb=4)
    doc = run_eval(spec, lambda _: None, progress=False)
    by = doc["results"]["arc_challenge"]
    assert set(by) == {"receiver", "sharer", "t2t", "c2c"} and all(s["n"] == 4 for s in by.values())
    rows = {c: [json.loads(x) for x in (tmp_path / "ev" / f"{c}.jsonl").read_text().splitlines()] for c in by}
    assert [r["text"] for r in rows["c2c"]] == [r["text"] for r in rows["receiver"]]   # closed gates: the receiver
    assert all(r["stats"]["context_tokens"] == 4 for r in rows["t2t"])
    assert (tmp_path / "ev" / "results.md").read_text().startswith("| task | config |")

    again = run_eval(C2CEvalSpec(**{**spec.__dict__, "items": 5}), lambda _: None, progress=False)
    assert all(s["n"] == 5 for s in again["results"]["arc_challenge"].values())
    assert len((tmp_path / "ev" / "c2c.jsonl").read_text().splitlines()) == 5            # only the new item ran
    with pytest.raises(EvalError, match="--out"):
        run_eval(C2CEvalSpec(**{**spec.__dict__, "sharer": str(tiny_paths["qwen2"])}), lambda _: None, False)


def test_failed_run_leaves_no_manifest_and_a_replaced_fuser_is_refused(tiny_paths, tmp_path):
    receiver, sharer = str(tiny_paths["qwen3"]), str(tiny_paths["llama"])
    spec = C2CEvalSpec(receiver=receiver, sharer=sharer, out=str(tmp_path / "ev"), tasks=["arc_challenge"], items=1,
                       configs=["c2c"], fuser=_closed_fuser(receiver, sharer, tmp_path / "fuser"), dtype="fp8",
                       batch=1, max_new_tokens=2, kv_cache_mb=4)
    with pytest.raises(TandemError, match="fp8"):
        run_eval(spec, lambda _: None, progress=False)
    assert not (tmp_path / "ev" / "eval.json").exists()
    run_eval(C2CEvalSpec(**{**spec.__dict__, "dtype": "fp32"}), lambda _: None, progress=False)
    run_eval(C2CEvalSpec(**{**spec.__dict__, "dtype": "float32"}), lambda _: None, progress=False)
    _closed_fuser(receiver, sharer, tmp_path / "fuser", gate=-2.0)
    with pytest.raises(EvalError, match="--out: .* holds an evaluation with fuser_sha256="):
        run_eval(C2CEvalSpec(**{**spec.__dict__, "dtype": "float32"}), lambda _: None, progress=False)


def test_bad_options(tiny_paths, tmp_path):
    from tandem.cli import app

    with pytest.raises(EvalError, match="--fuser"):
        C2CEvalSpec(receiver="r", sharer="s", out=str(tmp_path)).check()
    with pytest.raises(EvalError, match="--configs"):
        C2CEvalSpec(receiver="r", sharer="s", out=str(tmp_path), configs=["c3c"]).check()
    run = CliRunner().invoke(app, ["eval", "c2c", "--receiver", str(tiny_paths["qwen3"]), "--sharer",
                                   str(tiny_paths["llama"]), "--tasks", "arc_challenge,trivia"])
    assert run.exit_code == 2 and "--tasks" in run.output and "trivia" in run.output
    run = CliRunner().invoke(app, ["eval", "c2c", "--fuser", str(tmp_path)])
    assert run.exit_code == 2 and "--fuser" in run.output


def test_mmlu_arrow_reader(tmp_path):
    pa = pytest.importorskip("pyarrow")
    from tandem.mc_datasets import DatasetError, mmlu_items

    for subject, n in (("anatomy", 2), ("astronomy", 3)):
        d = tmp_path / subject / "test"
        d.mkdir(parents=True)
        table = pa.table({"question": [f"{subject} q{i} " for i in range(n)], "subject": [subject] * n,
                          "choices": [["a", "b", "c", "d"]] * n, "answer": list(range(n))})
        with pa.OSFile(str(d / "data-00000-of-00001.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
            w.write_table(table)
    items = mmlu_items("test", tmp_path)
    assert [i.id for i in items] == ["anatomy/0", "anatomy/1", "astronomy/0", "astronomy/1", "astronomy/2"]
    assert items[4].question == "astronomy q2" and items[4].answer == 2 and items[4].index == 4
    with pytest.raises(DatasetError, match="no MMLU 'dev' split"):
        mmlu_items("dev", tmp_path)
