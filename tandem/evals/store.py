"""Where an evaluation keeps its state: per-config JSONL of per-item results (append-only, resumable),
the run's manifest, and the cached entropy calibration."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from tandem.errors import TandemError

MANIFEST = "eval.json"


class EvalError(TandemError):
    """Bad evaluation input; the message names the option (e.g. --limit) and the value."""


@dataclass
class RunConfig:
    """One point of the evaluation: a model alone or a routing at a threshold."""

    name: str
    kind: str                   # slm | llm | r2r | random | entropy
    threshold: float | None = None
    matches: str | None = None  # a matched baseline: the R2R config whose LLM-token share it targets


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut short by an interrupted run: its item is simply redone
    return rows


def _same(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return abs(a - b) < 1e-9


class Store:
    def __init__(self, out: str | Path):
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)

    def path(self, cfg: RunConfig) -> Path:
        return self.out / f"{cfg.name}.jsonl"

    def done(self, cfg: RunConfig) -> dict[int, dict]:
        """The finished items of `cfg` by index (the last record wins), only those made at its threshold."""
        return {r["index"]: r for r in read_jsonl(self.path(cfg)) if _same(r.get("threshold"), cfg.threshold)}

    def append(self, cfg: RunConfig, record: dict) -> None:
        with open(self.path(cfg), "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def manifest(self) -> dict:
        path = self.out / MANIFEST
        return json.loads(path.read_text()) if path.is_file() else {}

    def register(self, cfg: RunConfig) -> None:
        """Remember a config, so later partial runs still report it."""
        data = self.manifest()
        data.setdefault("configs", {})[cfg.name] = asdict(cfg)
        (self.out / MANIFEST).write_text(json.dumps(data, indent=2))

    def known(self) -> list[RunConfig]:
        return [RunConfig(**c) for c in self.manifest().get("configs", {}).values()]

    def check_manifest(self, fixed: dict) -> dict:
        """Refuse to mix runs of other models, data or settings in one directory; a value first given
        now (e.g. the router, on a rerun that adds r2r) is filled in."""
        old = self.manifest()
        for key, value in fixed.items():
            before = old.get(key)
            if before is not None and value is not None and before != value:
                raise EvalError(f"--out: {self.out} holds an evaluation with {key}={before!r}, not {value!r}; "
                                "use another --out directory")
        merged = {**old, **{k: v for k, v in fixed.items() if v is not None}}
        (self.out / MANIFEST).write_text(json.dumps(merged, indent=2))
        return merged

    def cached(self, name: str, key: dict) -> dict | None:
        path = self.out / name
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError:
            return None
        return data if data.get("key") == key else None

    def cache(self, name: str, key: dict, **values) -> None:
        (self.out / name).write_text(json.dumps({"key": key, **values}))
