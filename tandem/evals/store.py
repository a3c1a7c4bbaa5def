"""Where an evaluation keeps its state: per-config JSONL of per-item results (append-only, resumable),
the run's manifest, and the cached entropy calibration."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from tandem.errors import TandemError

MANIFEST = "eval.json"
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


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


def dtype_name(dtype: str) -> str:
    """One name per dtype (fp32 and float32 are the same run)."""
    return DTYPE_ALIASES.get(dtype, dtype)


def files_sha256(directory: str | Path, names: tuple[str, ...]) -> str:
    """One digest of the named files of a checkpoint directory (those present), to tell a replaced checkpoint."""
    digest = hashlib.sha256()
    for name in names:
        path = Path(directory) / name
        if path.is_file():
            digest.update(name.encode())
            with open(path, "rb") as f:
                while chunk := f.read(1 << 20):
                    digest.update(chunk)
    return digest.hexdigest()


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

    def check_manifest(self, fixed: dict, optional: tuple[str, ...] = ()) -> dict:
        """Refuse to mix runs of other models, data or settings in one directory; return the manifest to
        `write_manifest` once the models load. The `optional` keys (a checkpoint's path and digest) are given
        together or not at all: compared when given both then and now, else filled in."""
        old = self.manifest()
        if (self.out / MANIFEST).is_file():
            given_before = any(old.get(k) is not None for k in optional)
            for key, value in fixed.items():
                if key not in optional or (value is not None and given_before):
                    self._compare(old, key, value)
        return {**old, **{k: v for k, v in fixed.items() if v is not None}}

    def _compare(self, old: dict, key: str, value) -> None:
        if key not in old:
            raise EvalError(f"--out: {self.out} holds an evaluation that does not record its {key} (an earlier "
                            "version made it); use another --out directory")
        if old[key] != value:
            raise EvalError(f"--out: {self.out} holds an evaluation with {key}={old[key]!r}, not {value!r}; "
                            "use another --out directory")

    def write_manifest(self, manifest: dict) -> None:
        """Record `manifest` (from `check_manifest`), keeping the configs registered since."""
        configs = self.manifest().get("configs", {})
        (self.out / MANIFEST).write_text(json.dumps({**manifest, "configs": configs}, indent=2))

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
