"""`tandem r2r label`: R2R path-following labels on GSM8K. Stages, each resumable per item under `out`:
answers (LLM greedy) -> teacher forcing (SLM features, mismatches) -> judge (continuations, verdicts)."""
from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from routing import features as feats
from routing.judge import Case, CostBook, JudgeContext, StageCost, make_judge
from routing.r2r import share_tokenizer
from routing.teacher_force import Forced, teacher_force
from tandem.datasets import GSM8K_STOP, MathItem, gsm8k, gsm8k_prompt
from tandem.errors import TandemError
from tandem.evals.store import dtype_name
from workers.chat import encode
from workers.engine import Engine, EngineConfig, ModelConfig, SamplingParams

MANIFEST, ANSWERS, TEACHER, LABELS, STATS = "manifest.json", "answers.jsonl", "teacher.jsonl", "labels.jsonl", "stats.json"
CATEGORIES = ("identical", "neutral", "divergent", "dropped", "capped")


class LabelError(TandemError):
    """A label job that cannot run as configured (another model pair in its directory, mismatched tokenizers)."""


@dataclass
class LabelConfig:
    slm: str
    llm: str
    out: str
    data: str | None = None
    start: int = 0
    stop: int = 800
    judge: str = "llm"
    max_new_tokens: int = 256
    continuation_tokens: int = 32
    max_mismatches_per_item: int = 32
    batch_items: int = 16
    top_k: int = 100
    dtype: str = "auto"
    kv_cache_mb: float = 512.0
    token_budget: int = 4096

    def fixed(self) -> dict:
        """What must not change between runs on one directory (the item range may grow)."""
        keep = ("slm", "llm", "data", "judge", "max_new_tokens", "continuation_tokens",
                "max_mismatches_per_item", "top_k")
        return {**{k: v for k, v in asdict(self).items() if k in keep}, "dtype": dtype_name(self.dtype)}


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def append_jsonl(path: Path, rows: list[dict]) -> None:
    lead = "\n" if path.is_file() and path.stat().st_size and not path.read_bytes().endswith(b"\n") else ""
    with path.open("a") as f:
        f.write(lead + "".join(json.dumps(r) + "\n" for r in rows))


def check_manifest(cfg: LabelConfig, out: Path) -> None:
    """Refuse a directory holding labels of another configuration (its manifest is written once the models load)."""
    path = out / MANIFEST
    if path.is_file():
        old = json.loads(path.read_text())
        diff = {k: (old.get(k), v) for k, v in cfg.fixed().items() if old.get(k) != v}
        if diff:
            detail = "; ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in diff.items())
            raise LabelError(f"{out} holds labels made with another configuration ({detail}); "
                             "use another --out directory")


def write_manifest(cfg: LabelConfig, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).write_text(json.dumps(cfg.fixed(), indent=2))


def load_items(start: int, stop: int, data: str | None) -> list[MathItem]:
    """GSM8K items [start, stop); refused when the range holds none."""
    items = gsm8k(start, stop, data)
    if not items:
        raise LabelError(f"--items: {start}:{stop} holds no items; the data has {len(gsm8k(0, None, data))} items")
    return items


def pair_engine(slm: str, llm: str, dtype: str, kv_cache_mb: float, **engine_options) -> Engine:
    """One engine holding the SLM as "slm" and the LLM as "llm"; refused unless they share one tokenizer."""
    models = [ModelConfig(name, path, dtype=dtype, kv_cache_mb=kv_cache_mb) for name, path in (("slm", slm), ("llm", llm))]
    engine = Engine(EngineConfig(models, **engine_options))
    if not share_tokenizer(engine.model("slm"), engine.model("llm")):
        raise LabelError(f"the SLM ({slm}) and the LLM ({llm}) do not share one tokenizer")
    return engine


def run_stages(out: Path, items: list[MathItem], stages: list[tuple[str, str, Callable[[list[MathItem]], None]]],
               batch_items: int, setup: Callable[[], None], echo: Callable[[str], None]) -> dict[str, float]:
    """Each stage `(name, file, fn)` in order over the items its file does not yet record, `batch_items` at a time
    (`setup` first, once there is work); feature shards an interrupted run left are removed before teacher
    forcing. Seconds per stage."""
    seconds = {}
    for stage, path, fn in stages:
        done = {r["index"] for r in read_jsonl(out / path)}
        todo = [it for it in items if it.index not in done]
        echo(f"{stage}: {len(items) - len(todo)} of {len(items)} items already done, {len(todo)} to go")
        if path == TEACHER:
            for p in feats.drop_orphans(out, done):
                echo(f"removed {p.name}, left by an interrupted run")
        t0 = time.perf_counter()
        if todo:
            setup()
            with tqdm(total=len(todo), desc=stage, unit="item") as bar:
                for at in range(0, len(todo), batch_items):
                    chunk = todo[at : at + batch_items]
                    fn(chunk)
                    bar.update(len(chunk))
        seconds[stage] = time.perf_counter() - t0
    return seconds


def answer_rows(out: Path, chunk: list[MathItem]) -> list[dict]:
    by_index = {r["index"]: r for r in read_jsonl(out / ANSWERS)}
    return [by_index[it.index] for it in chunk]


def write_forced(out: Path, rows: list[dict], forced: list[Forced], targets: list[torch.Tensor]) -> None:
    """One feature shard and the teacher lines for these answers: the SLM's teacher forcing `forced`, the LLM's
    token at each position `targets`, and the positions where the SLM's argmax differs from it."""
    parts, lines = [], []
    for r, f, target in zip(rows, forced, targets):
        n = f.num_tokens
        parts.append(feats.Features(f.hidden.half(), f.argmax, f.topk, target, torch.full((n,), r["index"]),
                                    torch.arange(n)))
        miss = (f.argmax != target).nonzero().flatten().tolist()
        lines.append({"index": r["index"], "num_tokens": n, "mismatches": [[p, int(f.argmax[p])] for p in miss]})
    feats.write_shard(out, feats.Features.cat(parts))
    append_jsonl(out / TEACHER, lines)


def cap(positions: list[int], limit: int) -> list[int]:
    """At most `limit` positions, spread evenly over the response."""
    if len(positions) <= limit:
        return positions
    picks = sorted({round(k * (len(positions) - 1) / max(limit - 1, 1)) for k in range(limit)})
    return [positions[i] for i in picks]


class LabelJob:
    def __init__(self, cfg: LabelConfig, echo: Callable[[str], None] = print):
        self.cfg, self.echo = cfg, echo
        self.out = Path(cfg.out)
        self.cost = CostBook()
        self.engine: Engine | None = None

    def run(self) -> dict:
        cfg = self.cfg
        items = load_items(cfg.start, cfg.stop, cfg.data)
        check_manifest(cfg, self.out)
        stages = [("answers", ANSWERS, self._answers), ("teacher forcing", TEACHER, self._teacher),
                  ("judge", LABELS, self._judge)]
        run_stages(self.out, items, stages, cfg.batch_items, self._setup, self.echo)
        return self.finish()

    def _setup(self) -> None:
        if self.engine is None:
            self.engine = pair_engine(self.cfg.slm, self.cfg.llm, self.cfg.dtype, self.cfg.kv_cache_mb)
            write_manifest(self.cfg, self.out)

    def _answers(self, chunk: list[MathItem]) -> None:
        tok = self.engine.model("llm").tokenizer
        prompts = [encode(tok, gsm8k_prompt(it)) for it in chunk]
        t0 = time.perf_counter()
        params = SamplingParams(max_tokens=self.cfg.max_new_tokens, temperature=0, stop=GSM8K_STOP)
        outs = self.engine.generate(prompts, params, model="llm")
        self.cost.record("answers", outs, time.perf_counter() - t0)
        append_jsonl(self.out / ANSWERS, [
            {"index": it.index, "prompt": p, "response": o.token_ids, "finish_reason": o.finish_reason, "text": o.text}
            for it, p, o in zip(chunk, prompts, outs)])

    def _teacher(self, chunk: list[MathItem]) -> None:
        rows = answer_rows(self.out, chunk)
        t0 = time.perf_counter()
        forced = teacher_force(self.engine.model("slm"), [r["prompt"] for r in rows], [r["response"] for r in rows],
                               self.cfg.top_k, self.cfg.token_budget)
        stage = self.cost.stage("teacher_forcing")
        stage.seconds += time.perf_counter() - t0
        stage.requests += len(rows)
        stage.prefill_tokens += sum(len(r["prompt"]) + len(r["response"]) for r in rows)
        write_forced(self.out, rows, forced, [torch.tensor(r["response"], dtype=torch.long) for r in rows])

    def _judge(self, chunk: list[MathItem]) -> None:
        cfg = self.cfg
        answers = answer_rows(self.out, chunk)
        teacher = {r["index"]: r for r in read_jsonl(self.out / TEACHER)}
        cases, lines = [], []
        for it, a in zip(chunk, answers):
            t = teacher[it.index]
            chosen = cap([p for p, _ in t["mismatches"]], cfg.max_mismatches_per_item)
            slm_token = {p: s for p, s in t["mismatches"]}
            cases += [Case(it, a["prompt"], a["response"], p, slm_token[p]) for p in chosen]
            lines.append({"index": it.index, "num_tokens": t["num_tokens"], "mismatches": [p for p, _ in t["mismatches"]],
                          "neutral": [], "divergent": [], "dropped": [],
                          "capped": sorted(set(slm_token) - set(chosen)), "cases": []})
        ctx = JudgeContext(self.engine, "llm", self.cost, cfg.continuation_tokens, cfg.max_new_tokens)
        verdicts = make_judge(cfg.judge, ctx)(cases) if cases else []
        by_index = {line["index"]: line for line in lines}
        for case, v in zip(cases, verdicts):
            line = by_index[case.item.index]
            line[{None: "dropped", 0: "neutral", 1: "divergent"}[v.label]].append(case.pos)
            line["cases"].append(v.detail)
        append_jsonl(self.out / LABELS, lines)

    def finish(self) -> dict:
        stats = label_stats(read_jsonl(self.out / LABELS))
        old = json.loads((self.out / STATS).read_text()) if (self.out / STATS).is_file() else {}
        total: dict[str, StageCost] = {k: StageCost(**v) for k, v in old.get("cost", {}).items()}
        for name, s in self.cost.stages.items():
            total.setdefault(name, StageCost()).add(s)
        result = {
            "labels": stats,
            "cost": {k: asdict(v) for k, v in total.items()},
            "cost_total": _sum_costs(total.values()),
            "this_run": {k: asdict(v) for k, v in self.cost.stages.items()},
            "config": asdict(self.cfg),
        }
        (self.out / STATS).write_text(json.dumps(result, indent=2))
        self.echo(format_stats(result))
        return result


def _sum_costs(costs) -> dict:
    total = StageCost()
    for c in costs:
        total.add(c)
    return asdict(total)


def label_stats(lines: list[dict]) -> dict:
    counts = dict.fromkeys(CATEGORIES, 0)
    for line in lines:
        counts["identical"] += line["num_tokens"] - len(line["mismatches"])
        for k in CATEGORIES[1:]:
            counts[k] += len(line[k])
    tokens = sum(line["num_tokens"] for line in lines)
    return {"items": len(lines), "tokens": tokens, "counts": counts,
            "shares": {k: (v / tokens if tokens else 0.0) for k, v in counts.items()}}


def format_stats(result: dict) -> str:
    lab = result["labels"]
    rows = [f"labels: {lab['items']} items, {lab['tokens']} response tokens"]
    rows += [f"  {k:<10} {lab['counts'][k]:>8}  {lab['shares'][k]:7.2%}" for k in CATEGORIES]
    rows.append("cost (all runs):")
    for name, c in list(result["cost"].items()) + [("total", result["cost_total"])]:
        rows.append(f"  {name:<16} prefill {c['prefill_tokens']:>9}  generated {c['generated_tokens']:>8}  "
                    f"{c['seconds']:8.1f} s  ({c['requests']} requests)")
    return "\n".join(rows)


def run_label_job(cfg: LabelConfig, echo: Callable[[str], None] = print) -> dict:
    return LabelJob(cfg, echo).run()
