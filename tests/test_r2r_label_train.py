"""R2R labels and router training on tiny random models: teacher forcing, judges, label -> train end to end."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from routing.judge import (
    JUDGES,
    AnswerJudge,
    Case,
    CostBook,
    JudgeContext,
    LLMJudge,
    Verdict,
    register,
)
from routing.labels import cap
from routing.router import Router
from routing.teacher_force import teacher_force
from routing.train import calibrate, load_dataset
from tandem.cli import app
from tandem.datasets import MathItem
from workers.engine import (
    Engine,
    EngineConfig,
    ModelConfig,
    RequestOutput,
    SamplingParams,
)

runner = CliRunner()
QUESTIONS = [("Tom has 3 apples and buys 4 more. How many?", "7"), ("What is 6 times 7?", "42"),
             ("A box holds 5 pens. How many pens in 3 boxes?", "15"), ("Sam had 10 coins and lost 4. How many left?", "6")]


def _scaled(src: Path, dst: Path, scale: float, noise: float) -> Path:
    """Random tiny models collapse onto one token; larger weights make their greedy output vary a little."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name and "bias" not in name:
                p.mul_(scale)
            p.add_(torch.randn(p.shape, generator=gen) * noise * p.std())
    model.config.max_position_embeddings = 2048
    model.save_pretrained(dst)
    AutoTokenizer.from_pretrained(src).save_pretrained(dst)
    return dst


@pytest.fixture(scope="module")
def pair(tiny_path, tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("r2r-pair")
    slm = _scaled(tiny_path, root / "slm", 10.0, 0.0)
    return slm, _scaled(slm, root / "llm", 1.0, 0.1)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("gsm8k") / "gsm8k.jsonl"
    path.write_text("".join(json.dumps({"doc": {"question": q, "answer": f"So #### {a}", "short_answer": a}}) + "\n"
                            for q, a in QUESTIONS))
    return path


@register
class ParityJudge:
    """Divergent at odd positions: a judge that gives both labels, for the tests."""

    name = "parity"

    def __init__(self, ctx):
        pass

    def __call__(self, cases):
        return [Verdict(c.pos % 2, {"pos": c.pos}) for c in cases]


@register
class NeverJudge:
    name = "never"

    def __init__(self, ctx):
        pass

    def __call__(self, cases):
        return [Verdict(0, {"pos": c.pos}) for c in cases]


def _label(pair, data, out, judge="llm", *extra):
    slm, llm = pair
    args = ["r2r", "label", "--slm", str(slm), "--llm", str(llm), "--out", str(out), "--data", str(data),
            "--items", "0:4", "--max-new-tokens", "24", "--max-mismatches-per-item", "6", "--batch-items", "3",
            "--judge", judge, "--dtype", "float32", "--kv-cache-mb", "8", *extra]
    return runner.invoke(app, args)


def test_teacher_force_on_own_greedy_output_has_no_mismatch(pair):
    engine = Engine(EngineConfig([ModelConfig("slm", str(pair[0]), dtype="float32", block_size=4, kv_cache_mb=4)]))
    tok = engine.model("slm").tokenizer
    prompts = [tok.encode(q, add_special_tokens=False) for q, _ in QUESTIONS]
    outs = engine.generate(prompts, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True), model="slm")
    responses = [o.token_ids for o in outs]
    free = engine.model("slm").blocks.num_free
    forced = teacher_force(engine.model("slm"), prompts, responses, top_k=100, token_budget=64)
    assert engine.model("slm").blocks.num_free == free
    for f, r in zip(forced, responses):
        assert f.argmax.tolist() == r
        assert f.hidden.shape == (len(r), 64) and f.topk.shape == (len(r), 100)
        assert torch.all(f.topk[:, :-1] >= f.topk[:, 1:])


def test_cap_spreads_evenly():
    assert cap([1, 2, 3], 5) == [1, 2, 3]
    assert cap(list(range(10)), 3) == [0, 4, 9] or cap(list(range(10)), 3) == [0, 5, 9]
    assert len(cap(list(range(100)), 32)) == 32


def test_calibrate_picks_lowest_share_at_target_recall():
    probs = torch.tensor([0.9, 0.8, 0.3, 0.2, 0.1, 0.05])
    y = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0])
    c = calibrate(probs, y, 0.95)
    assert c["threshold"] == 0.3 and c["recall"] == 1.0 and c["llm_share"] == 0.5
    assert len(c["curve"]["threshold"]) == 99


class _StubEngine:
    """Answers every request with scripted text, so judges can be checked without a model."""

    def __init__(self, tokenizer, reply):
        self.tokenizer, self.reply, self.prompts = tokenizer, reply, []

    def model(self, name):
        runner = type("Runner", (), {"spec": type("Spec", (), {"eos_token_ids": [2]}), "max_model_len": 512})
        return type("Resident", (), {"tokenizer": self.tokenizer, "runner": runner})

    def generate(self, prompts, params, model=None):
        self.prompts += list(prompts)
        outs = []
        for p in prompts:
            ids = self.tokenizer.encode(self.reply(p), add_special_tokens=False)
            o = RequestOutput("x", text=self.tokenizer.decode(ids), token_ids=ids, finish_reason="stop")
            outs.append(o)
        return outs


def test_answer_judge_compares_final_answers(tiny_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_path)
    item = MathItem(0, "What is 6 times 7?", "", "42")
    response = tok.encode("6 times 7 is 42. The answer is 42.", add_special_tokens=False)
    pos = 3
    engine = _StubEngine(tok, lambda p: "2 is 43. The answer is 43." if p[-1] == 300 else " 42. The answer is 42.")
    judge = JUDGES["answer"](JudgeContext(engine, "llm", CostBook(), max_new_tokens=24))
    assert isinstance(judge, AnswerJudge)
    v = judge([Case(item, [5, 6], response, pos, 300), Case(item, [5, 6], response, pos, 301),
               Case(item, [5, 6], response, pos, 2)])
    assert [x.label for x in v] == [1, 0, 1]
    assert v[0].detail["original"] == "42" and v[0].detail["forked"] == "43"
    assert len(engine.prompts) == 2


def test_llm_judge_marks_the_fork_and_parses_its_verdict(tiny_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_path)
    item = MathItem(0, "What is 6 times 7?", "", "42")
    response = tok.encode("It is 42. Then more.", add_special_tokens=False)
    verdicts = iter(["1", "Verdict: 0", "no idea"])
    engine = _StubEngine(tok, lambda p: next(verdicts) if "Continuation A" in tok.decode(p) else "s 41.")
    ctx = JudgeContext(engine, "llm", CostBook(), continuation_tokens=32)
    fork = tok.convert_tokens_to_ids("\u0120i")
    v = LLMJudge(ctx)([Case(item, [5], response, 1, fork)] * 3)
    assert [x.label for x in v] == [1, 0, None]
    assert v[0].detail["a"] == "<< i>>s 41."
    assert v[0].detail["b"] == "<<t>> is 42."
    assert set(ctx.cost.stages) == {"continuation", "judge"}


def test_label_then_train_end_to_end(pair, data, tmp_path):
    out = tmp_path / "labels"
    r = _label(pair, data, out)
    assert r.exit_code == 0, r.output
    stats = json.loads((out / "stats.json").read_text())
    answers = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    tokens = sum(len(a["response"]) for a in answers)
    assert len(answers) == 4 and stats["labels"]["tokens"] == tokens
    assert sum(stats["labels"]["counts"].values()) == tokens
    assert abs(sum(stats["labels"]["shares"].values()) - 1) < 1e-9
    assert {"answers", "teacher_forcing"} <= set(stats["cost"])
    assert stats["cost"]["answers"]["generated_tokens"] == tokens

    again = _label(pair, data, out)
    assert again.exit_code == 0, again.output
    assert again.output.count("4 of 4 items already done, 0 to go") == 3
    assert json.loads((out / "stats.json").read_text())["this_run"] == {}

    other = _label((pair[1], pair[0]), data, out)
    assert other.exit_code == 2 and "another configuration" in other.output

    parity = tmp_path / "parity"
    assert _label(pair, data, parity, "parity").exit_code == 0
    counts = json.loads((parity / "stats.json").read_text())["labels"]["counts"]
    assert counts["divergent"] > 0 and counts["neutral"] > 0
    ckpt = tmp_path / "router"
    r = runner.invoke(app, ["r2r", "train", "--labels", str(parity), "--slm", str(pair[0]), "--out", str(ckpt),
                            "--width", "32", "--depth", "1", "--epochs", "3", "--lr", "1e-3", "--val-fraction", "0.5"])
    assert r.exit_code == 0, r.output
    assert "epoch   3/3" in r.output or "early stop" in r.output
    router = Router.load(ckpt, slm_hidden_size=64)
    assert 0.0 <= router.config.threshold <= 1.0 and router.config.width == 32
    assert len(router.config.calibration["curve"]["recall"]) == 99
    assert router.config.slm == "slm" and router.config.llm == "llm"
    assert (ckpt / "calibration.png").stat().st_size > 0

    data = load_dataset(parity, "mismatch", 3.0)
    assert len(data.y) == tokens and torch.equal(data.y, (data.feats.token != data.feats.target).float())
    assert bool((data.y[data.divergent == 1] == 1).all()) and set(data.weight.tolist()) <= {1.0, 3.0}
    mm = tmp_path / "router-mismatch"
    r = runner.invoke(app, ["r2r", "train", "--labels", str(parity), "--slm", str(pair[0]), "--out", str(mm),
                            "--width", "32", "--depth", "1", "--epochs", "2", "--target", "mismatch"])
    assert r.exit_code == 0, r.output
    assert Router.load(mm, slm_hidden_size=64).config.calibration["target"] == "mismatch"
    r = runner.invoke(app, ["r2r", "train", "--labels", str(parity), "--slm", str(pair[0]), "--out", str(mm),
                            "--target", "entropy"])
    assert r.exit_code == 2 and "--target" in r.output


def test_answer_judge_label_run(pair, data, tmp_path):
    out = tmp_path / "answer"
    r = _label(pair, data, out, "answer", "--batch-items", "4", "--max-new-tokens", "12")
    assert r.exit_code == 0, r.output
    stats = json.loads((out / "stats.json").read_text())
    assert sum(stats["labels"]["counts"].values()) == stats["labels"]["tokens"] > 0
    assert stats["labels"]["counts"]["dropped"] == 0


def test_train_without_divergent_labels_says_so(pair, data, tmp_path):
    out = tmp_path / "never"
    assert _label(pair, data, out, "never", "--batch-items", "4", "--max-new-tokens", "12").exit_code == 0
    r = runner.invoke(app, ["r2r", "train", "--labels", str(out), "--slm", str(pair[0]), "--out", str(tmp_path / "r")])
    assert r.exit_code == 2 and "no divergent labels" in r.output and "Traceback" not in r.output


def test_bad_inputs_name_the_path(pair, data, tmp_path):
    missing = tmp_path / "nope"
    r = _label((missing, pair[1]), data, tmp_path / "a")
    assert r.exit_code == 2 and f"--slm: {missing} does not exist" in r.output
    r = _label(pair, missing, tmp_path / "b")
    assert r.exit_code == 2 and f"--data: {missing} does not exist" in r.output
    r = runner.invoke(app, ["r2r", "train", "--labels", str(missing), "--slm", str(pair[0]), "--out", str(tmp_path / "c")])
    assert r.exit_code == 2 and f"--labels: {missing} does not exist" in r.output
    r = runner.invoke(app, ["r2r", "train", "--labels", str(tmp_path), "--slm", str(missing), "--out", str(tmp_path / "c")])
    assert r.exit_code == 2 and f"--slm: {missing} does not exist" in r.output
    r = runner.invoke(app, ["r2r", "train", "--labels", str(tmp_path), "--slm", str(pair[0]), "--out", str(tmp_path / "c")])
    assert r.exit_code == 2 and "holds no finished labels" in r.output


def test_rollout_then_train_on_both(pair, data, tmp_path):
    parity = tmp_path / "parity"
    assert _label(pair, data, parity, "parity").exit_code == 0
    ckpt = tmp_path / "router"
    r = runner.invoke(app, ["r2r", "train", "--labels", str(parity), "--slm", str(pair[0]), "--out", str(ckpt),
                            "--width", "32", "--depth", "1", "--epochs", "2", "--val-fraction", "0.5"])
    assert r.exit_code == 0, r.output
    roll = tmp_path / "rollout"
    args = ["r2r", "rollout", "--slm", str(pair[0]), "--llm", str(pair[1]), "--router", str(ckpt), "--out", str(roll),
            "--data", str(data), "--items", "0:3", "--max-new-tokens", "12", "--batch-items", "2",
            "--kv-cache-mb", "16", "--threshold", "0.5"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    answers = [json.loads(line) for line in (roll / "answers.jsonl").read_text().splitlines()]
    assert sorted(a["index"] for a in answers) == [0, 1, 2]
    assert all(len(a["sources"]) == len(a["response"]) for a in answers)
    rows = load_dataset(roll, "mismatch")
    assert len(rows.y) == sum(len(a["response"]) for a in answers) and bool((rows.divergent == -1).all())
    # the rows are the two models' argmaxes on R2R's answer: where the LLM wrote, its argmax is the token
    for a in answers:
        mine = rows.feats.select(rows.feats.item == a["index"])
        llm_pos = [p for p, s in enumerate(a["sources"]) if s == "llm"]
        assert mine.target[llm_pos].tolist() == [a["response"][p] for p in llm_pos]
    again = runner.invoke(app, args)
    assert again.exit_code == 0 and again.output.count("3 of 3 items already done, 0 to go") == 2, again.output

    both = load_dataset([parity, roll], "mismatch")
    assert len(both.y) == len(load_dataset(parity, "mismatch").y) + len(rows.y)
    r = runner.invoke(app, ["r2r", "train", "--labels", str(parity), "--labels", str(roll), "--slm", str(pair[0]),
                            "--out", str(tmp_path / "r2"), "--width", "32", "--depth", "1", "--epochs", "2",
                            "--target", "mismatch"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["r2r", "train", "--labels", str(roll), "--slm", str(pair[0]), "--out", str(tmp_path / "r3")])
    assert r.exit_code == 2 and "mismatch only" in r.output
    r = runner.invoke(app, args[:-2] + ["--threshold", "1.5"])
    assert r.exit_code == 2 and "--threshold" in r.output
    r = runner.invoke(app, ["r2r", "rollout", "--slm", str(pair[0]), "--llm", str(pair[1]), "--router",
                            str(tmp_path / "nope"), "--out", str(roll)])
    assert r.exit_code == 2 and "--router" in r.output


@pytest.fixture(scope="module")
def parity_labels(pair, data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("parity") / "labels"
    r = _label(pair, data, out, "parity")
    assert r.exit_code == 0, r.output
    return out


def _edited_copy(labels: Path, out: Path, edit) -> Path:
    """A copy of a labels directory with `edit` applied to every feature shard's tensors."""
    from safetensors.torch import load_file, save_file

    from routing.features import shards

    shutil.copytree(labels, out)
    for path in shards(out):
        tensors = load_file(str(path))
        edit(tensors)
        save_file(tensors, str(path))
    return out


def _train(labels, slm, out, *extra):
    args = ["r2r", "train", *(a for d in labels for a in ("--labels", str(d))), "--slm", str(slm), "--out", str(out),
            "--width", "32", "--depth", "1", "--epochs", "2", "--val-fraction", "0.5", *extra]
    return runner.invoke(app, args)


def test_train_refuses_non_finite_features_and_losses(pair, parity_labels, tmp_path):
    def poison(t):
        t["hidden"][0, 0] = float("inf")
    bad = _edited_copy(parity_labels, tmp_path / "inf", poison)
    r = _train([bad], pair[0], tmp_path / "r")
    assert r.exit_code == 2 and f"--labels: {bad} holds non-finite features" in r.output
    assert "Traceback" not in r.output and not (tmp_path / "r" / "router.safetensors").exists()
    r = _train([parity_labels], pair[0], tmp_path / "r", "--lr", "1e30")
    assert r.exit_code == 2 and f"loss on {parity_labels} is nan" in r.output, r.output
    assert not (tmp_path / "r" / "router.safetensors").exists()


@pytest.mark.parametrize("extra, needle", [(["--lr", "-1"], "--lr"), (["--lr", "nan"], "--lr"), (["--lr", "0"], "--lr"),
                                           (["--weight-decay", "-0.1"], "--weight-decay"),
                                           (["--weight-decay", "inf"], "--weight-decay")])
def test_train_refuses_bad_optimizer_settings(pair, tmp_path, extra, needle):
    r = _train([tmp_path], pair[0], tmp_path / "r", *extra)
    assert r.exit_code == 2 and f"error: {needle}: must be a finite number" in r.output, r.output


def test_train_refuses_labels_of_other_sizes(pair, parity_labels, tmp_path):
    def narrow(t):
        t["hidden"] = t["hidden"][:, :32].contiguous()
    other = _edited_copy(parity_labels, tmp_path / "narrow", narrow)
    r = _train([parity_labels, other], pair[0], tmp_path / "r")
    assert r.exit_code == 2 and f"--labels: {other} holds features of hidden size 32" in r.output, r.output
    assert "Traceback" not in r.output


def test_failed_label_run_leaves_no_manifest_and_dtype_aliases_match(pair, data, tmp_path):
    out = tmp_path / "labels"
    r = _label(pair, data, out, "parity", "--items", "0:2", "--dtype", "fp8")
    assert r.exit_code == 2 and "fp8" in r.output and not (out / "manifest.json").exists()
    r = _label(pair, data, out, "parity", "--items", "0:2", "--dtype", "fp32")
    assert r.exit_code == 0, r.output
    again = _label(pair, data, out, "parity", "--items", "0:2", "--dtype", "float32")
    assert again.exit_code == 0 and again.output.count("2 of 2 items already done, 0 to go") == 3, again.output


def test_items_beyond_the_data_are_refused(pair, data, tmp_path):
    r = _label(pair, data, tmp_path / "labels", "parity", "--items", "10:20")
    assert r.exit_code == 2 and "--items: 10:20 holds no items; the data has 4 items" in r.output, r.output
    assert not (tmp_path / "labels").exists()
    r = runner.invoke(app, ["r2r", "rollout", "--slm", str(pair[0]), "--llm", str(pair[1]), "--router", str(tmp_path),
                            "--out", str(tmp_path / "rollout"), "--data", str(data), "--items", "10:20"])
    assert r.exit_code == 2 and "the data has 4 items" in r.output and not (tmp_path / "rollout").exists()
