"""`tandem eval c2c`: multiple-choice accuracy of the receiver alone, the sharer alone, T2T and C2C, on
held-out test items (ARC-Challenge, OpenBookQA, an MMLU sample), with 95% Wilson intervals.

Every config runs through the serving code on one in-process engine (`c2c.colocated.C2C`, `c2c.t2t.T2T`).
Each item is one chat turn (`mc_messages`); the answer is generated greedily, without chain of thought,
and its letter read by `extract_choice` (no letter: wrong). Resumable: per-item records go to
`<out>/<config>.jsonl`; results.json and results.md hold the table."""
from __future__ import annotations

import json
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tandem.evals.stats import wilson
from tandem.evals.store import EvalError, RunConfig, Store, dtype_name, files_sha256, read_jsonl
from tandem.mc_datasets import MMLU, MCItem, extract_choice, mc_items, mc_messages

CONFIGS = ("receiver", "sharer", "t2t", "c2c")
TASKS = ("arc_challenge", "openbookqa", MMLU)
STAT_KEYS = ("sharer_s", "fuser_s", "receiver_s", "kv_bytes_moved", "context_tokens")


@dataclass
class C2CEvalSpec:
    receiver: str
    sharer: str
    out: str
    fuser: str | None = None               # checkpoint directory (`tandem c2c train`); needed for c2c
    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    items: int = 300                       # per task: the first N test items (MMLU: a seeded sample)
    configs: list[str] = field(default_factory=lambda: list(CONFIGS))
    dtype: str = "bfloat16"
    batch: int = 16
    max_new_tokens: int = 8
    context_tokens: int = 64
    kv_cache_mb: float = 512.0
    seed: int = 0

    def check(self) -> None:
        unknown = [c for c in self.configs if c not in CONFIGS]
        if unknown or not self.configs:
            raise EvalError(f"--configs: unknown {unknown or 'empty list'}; choose from {','.join(CONFIGS)}")
        if "c2c" in self.configs and not self.fuser:
            raise EvalError("--fuser: config c2c needs a fuser checkpoint directory")
        if self.items < 1:
            raise EvalError(f"--items: must be at least 1, got {self.items}")


def eval_items(task: str, n: int, seed: int = 0) -> list[MCItem]:
    """Held-out items of a task: its test split's first `n`; MMLU's, a seeded sample over all subjects."""
    items = mc_items(task, "test")
    if task == MMLU:
        picked = sorted(random.Random(seed).sample(range(len(items)), min(n, len(items))))
        return [items[i] for i in picked]
    return items[:n]


class Runner:
    """One engine hosting `receiver` and `sharer`, with the C2C and T2T coordinators attached."""

    def __init__(self, spec: C2CEvalSpec):
        from c2c.colocated import C2C
        from c2c.t2t import T2T
        from workers.engine import Engine, EngineConfig, ModelConfig, SamplingParams

        models = [ModelConfig(name, path, dtype=spec.dtype, kv_cache_mb=spec.kv_cache_mb)
                  for name, path in (("receiver", spec.receiver), ("sharer", spec.sharer))]
        self.engine = Engine(EngineConfig(models, max_num_seqs=spec.batch))
        self.params = SamplingParams(max_tokens=spec.max_new_tokens, temperature=0.0)
        self.c2c = C2C.from_checkpoints(self.engine, "receiver", {"sharer": spec.fuser}) if spec.fuser else None
        self.t2t = T2T(self.engine, "receiver", "sharer", context_tokens=spec.context_tokens)

    def submit(self, config: str, rid: str, item: MCItem) -> None:
        from workers.chat import encode, render

        messages = mc_messages(item)
        if config in ("receiver", "sharer"):
            tok = self.engine.model(config).tokenizer
            self.engine.add_request(rid, encode(tok, render(tok, messages, True)), self.params, config)
        elif config == "c2c":
            self.c2c.add_request(rid, messages, self.params)
        else:
            self.t2t.add_request(rid, messages[0]["content"], self.params)

    def run(self, config: str, items: list[MCItem]) -> list[dict]:
        ids = [f"{config}-{item.task}-{item.index}-{time.monotonic_ns()}" for item in items]
        t0 = time.perf_counter()
        for rid, item in zip(ids, items):
            self.submit(config, rid, item)
        outputs = self.engine.collect(ids)
        wall = (time.perf_counter() - t0) / max(len(items), 1)
        return [record(item, out, wall) for item, out in zip(items, outputs)]


def record(item: MCItem, out, wall_s: float) -> dict:
    choice = extract_choice(out.text, len(item.choices)) if not out.error else None
    return {"index": item.index, "task": item.task, "id": item.id, "answer": item.answer, "choice": choice,
            "correct": choice == item.answer, "text": out.text, "error": out.error, "wall_s": wall_s,
            "stats": {k: out.stats[k] for k in STAT_KEYS if k in out.stats}}


def summary(records: list[dict]) -> dict:
    n, correct = len(records), sum(r["correct"] for r in records)
    low, high = wilson(correct, n)
    stats = {k: statistics.mean(r["stats"][k] for r in records if k in r["stats"])
             for k in STAT_KEYS if any(k in r["stats"] for r in records)}
    return {"n": n, "correct": correct, "accuracy": correct / n if n else None, "ci_low": low, "ci_high": high,
            "no_letter": sum(r["choice"] is None for r in records), "wall_s_per_item": statistics.mean(
                r["wall_s"] for r in records) if records else None, **{f"mean_{k}": v for k, v in stats.items()}}


def run_eval(spec: C2CEvalSpec, echo: Callable[[str], None] = print, progress: bool = True) -> dict:
    spec.check()
    store = Store(spec.out)
    manifest = store.check_manifest(fixed(spec), optional=("fuser", "fuser_sha256"))
    items = {task: eval_items(task, spec.items, spec.seed) for task in spec.tasks}
    runner: Runner | None = None
    from tqdm import tqdm

    for config in spec.configs:
        cfg = RunConfig(config, config)
        done = _done_keys(store, cfg)
        todo = [it for task in spec.tasks for it in items[task] if (task, it.index) not in done]
        if not todo:
            store.register(cfg)
            continue
        if runner is None:
            runner = Runner(spec)
            store.write_manifest(manifest)
        store.register(cfg)
        bar = tqdm(total=len(todo), desc=config, disable=not progress)
        for start in range(0, len(todo), spec.batch):
            for rec in runner.run(config, todo[start:start + spec.batch]):
                store.append(cfg, rec)
                bar.update(1)
        bar.close()
    return write(spec, store, items, echo)


def fixed(spec: C2CEvalSpec) -> dict:
    """What must not change between runs on one directory (the fuser may be first given later)."""
    from c2c.checkpoint import CONFIG, WEIGHTS

    digest = files_sha256(spec.fuser, (CONFIG, WEIGHTS)) if spec.fuser else None
    return {"receiver": spec.receiver, "sharer": spec.sharer, "fuser": spec.fuser, "fuser_sha256": digest,
            "dtype": dtype_name(spec.dtype), "max_new_tokens": spec.max_new_tokens,
            "context_tokens": spec.context_tokens, "seed": spec.seed}


def _done_keys(store: Store, cfg: RunConfig) -> set[tuple[str, int]]:
    return {(r["task"], r["index"]) for r in read_jsonl(store.path(cfg))}


def write(spec: C2CEvalSpec, store: Store, items: dict[str, list[MCItem]], echo: Callable[[str], None]) -> dict:
    results: dict[str, dict[str, dict]] = {}
    for config in spec.configs:
        rows = read_jsonl(store.path(RunConfig(config, config)))
        for task, its in items.items():
            wanted = {it.index for it in its}
            last = {r["index"]: r for r in rows if r["task"] == task and r["index"] in wanted}
            results.setdefault(task, {})[config] = summary(list(last.values()))
    targets = {task: _target(by) for task, by in results.items()}
    doc = {"spec": asdict(spec), "results": results, "targets": targets}
    out = Path(spec.out)
    (out / "results.json").write_text(json.dumps(doc, indent=2))
    (out / "results.md").write_text(markdown(results, targets))
    echo(markdown(results, targets))
    return doc


def _target(by: dict[str, dict]) -> dict:
    acc = {c: s["accuracy"] for c, s in by.items()}
    c2c = acc.get("c2c")
    above = {c: (None if c2c is None or acc.get(c) is None else c2c > acc[c]) for c in ("receiver", "t2t")}
    return {"c2c_above_receiver": above["receiver"], "c2c_above_t2t": above["t2t"]}


def markdown(results: dict[str, dict[str, dict]], targets: dict[str, dict]) -> str:
    lines = ["| task | config | items | accuracy | 95% CI | no letter | s/item |", "|---|---|---|---|---|---|---|"]
    for task, by in results.items():
        for config, s in by.items():
            if not s["n"]:
                continue
            lines.append(f"| {task} | {config} | {s['n']} | {100 * s['accuracy']:.1f}% | {100 * s['ci_low']:.1f}–"
                         f"{100 * s['ci_high']:.1f}% | {s['no_letter']} | {s['wall_s_per_item']:.2f} |")
    lines.append("")
    for task, t in targets.items():
        lines.append(f"- {task}: c2c above receiver alone: {t['c2c_above_receiver']}, above t2t: {t['c2c_above_t2t']}")
    return "\n".join(lines) + "\n"
