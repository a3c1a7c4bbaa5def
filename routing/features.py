"""Router training features on disk: safetensors shards under `<labels>/features/`, one row per response
position: the SLM's hidden state (fp16), its chosen token, its top-k raw logits (fp32, sorted
descending), the LLM's token there, and (item, position) to join the labels."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

FEATURES = "features"
KEYS = ("hidden", "token", "topk", "target", "item", "pos")


@dataclass
class Features:
    hidden: torch.Tensor   # [N, H] fp16
    token: torch.Tensor    # [N] int64, the SLM's argmax
    topk: torch.Tensor     # [N, k] fp32
    target: torch.Tensor   # [N] int64, the LLM's token
    item: torch.Tensor     # [N] int64
    pos: torch.Tensor      # [N] int64, index in the response

    @property
    def num_rows(self) -> int:
        return self.token.shape[0]

    def select(self, mask: torch.Tensor) -> Features:
        return Features(*(getattr(self, k)[mask] for k in KEYS))

    @classmethod
    def cat(cls, parts: list[Features]) -> Features:
        return cls(*(torch.cat([getattr(p, k) for p in parts]) for k in KEYS))


def shard_dir(root: str | Path) -> Path:
    return Path(root) / FEATURES


def shards(root: str | Path) -> list[Path]:
    d = shard_dir(root)
    return sorted(d.glob("shard-*.safetensors")) if d.is_dir() else []


def write_shard(root: str | Path, feats: Features) -> Path:
    """Written to a temporary name and renamed, so a shard is either whole or absent."""
    d = shard_dir(root)
    d.mkdir(parents=True, exist_ok=True)
    existing = shards(root)
    number = int(existing[-1].stem.split("-")[1]) + 1 if existing else 0
    path = d / f"shard-{number:05d}.safetensors"
    tmp = path.with_suffix(".tmp")
    save_file({k: getattr(feats, k).contiguous() for k in KEYS}, str(tmp))
    os.replace(tmp, path)
    return path


def shard_items(path: Path) -> set[int]:
    return set(load_file(str(path))["item"].unique().tolist())


def drop_orphans(root: str | Path, finished: set[int]) -> list[Path]:
    """Shards holding items that were never recorded as finished (an interrupted run) are removed."""
    removed = [p for p in shards(root) if not shard_items(p) <= finished]
    for p in removed:
        p.unlink()
    return removed


def load_features(root: str | Path) -> Features | None:
    parts = [Features(*(t[k] for k in KEYS)) for t in (load_file(str(p)) for p in shards(root))]
    return Features.cat(parts) if parts else None
