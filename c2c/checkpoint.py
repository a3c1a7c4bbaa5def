"""A fuser checkpoint: `fuser.safetensors` (weights) and `fuser.json` (the model pair it was trained for,
its FuserConfig, the alignment strategy, training facts). Loading it for another pair is refused."""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from c2c.fuser import Fuser, FuserConfig, KVShape
from tandem.errors import CheckpointError
from workers.models.spec import ModelSpec

WEIGHTS, CONFIG = "fuser.safetensors", "fuser.json"


@dataclass(frozen=True)
class ModelId:
    """What a fuser depends on: the model's name (its directory) and its cache and vocabulary shape."""

    name: str
    family: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int

    @classmethod
    def of(cls, path: str | os.PathLike, spec: ModelSpec) -> ModelId:
        path = Path(path)
        name = path.stem if path.is_file() else path.name
        return cls(name, spec.family, spec.num_layers, spec.num_kv_heads, spec.head_dim, spec.vocab_size)

    @classmethod
    def read(cls, path: str | os.PathLike) -> ModelId:
        """From a model directory's config.json, without loading weights."""
        from transformers import AutoConfig

        try:
            return cls.of(path, ModelSpec.from_hf_config(AutoConfig.from_pretrained(path)))
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{path}: not a model directory with a readable config.json: {e}") from None

    @property
    def kv(self) -> KVShape:
        return KVShape(self.num_layers, self.num_kv_heads, self.head_dim)

    def __str__(self) -> str:
        return (f"{self.name} ({self.family}, {self.num_layers} layers, {self.num_kv_heads}x{self.head_dim} KV, "
                f"vocab {self.vocab_size})")


@dataclass(frozen=True)
class Pair:
    receiver: ModelId
    sharer: ModelId

    def __str__(self) -> str:
        return f"receiver {self.receiver} <- sharer {self.sharer}"

    @classmethod
    def from_dict(cls, d: dict) -> Pair:
        return cls(ModelId(**d["receiver"]), ModelId(**d["sharer"]))


def save(directory: str | os.PathLike, fuser: Fuser, pair: Pair, meta: dict | None = None) -> Path:
    """Write weights then config, each through a temporary file, so a crash leaves the old checkpoint."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().cpu().contiguous() for k, v in fuser.state_dict().items()}
    _replace(directory / WEIGHTS, lambda tmp: save_file(state, str(tmp)))
    doc = {"pair": asdict(pair), "fuser": fuser.config.to_dict(), **(meta or {})}
    _replace(directory / CONFIG, lambda tmp: tmp.write_text(json.dumps(doc, indent=2)))
    return directory


def _replace(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def read_config(directory: str | os.PathLike) -> tuple[Pair, FuserConfig, dict]:
    directory = Path(directory)
    for name in (CONFIG, WEIGHTS):
        if not (directory / name).is_file():
            raise CheckpointError(f"fuser checkpoint {directory}: {name} is missing")
    try:
        doc = json.loads((directory / CONFIG).read_text())
        return Pair.from_dict(doc["pair"]), FuserConfig(**doc["fuser"]), doc
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"fuser checkpoint {directory}: {CONFIG} is not valid: {e}") from None


def load(directory: str | os.PathLike, pair: Pair | None = None, device: str | torch.device = "cpu",
         dtype: torch.dtype = torch.float32) -> tuple[Fuser, dict]:
    """The fuser (in eval mode) and its config document; with `pair`, refuse a checkpoint of another pair."""
    trained_for, cfg, doc = read_config(directory)
    if pair is not None and pair != trained_for:
        raise CheckpointError(f"fuser checkpoint {directory} was trained for {trained_for}; "
                              f"it cannot serve {pair}")
    fuser = Fuser(cfg)
    try:
        weights = load_file(str(Path(directory) / WEIGHTS))
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"fuser checkpoint {directory}: {WEIGHTS} is missing or damaged: {e}") from None
    try:
        fuser.load_state_dict(weights)
    except RuntimeError as e:
        raise CheckpointError(f"fuser checkpoint {directory}: weights do not match its config: {e}") from None
    return fuser.to(device, dtype).eval(), doc
