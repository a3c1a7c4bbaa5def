"""The C2C fuser: for every receiver layer, separate K and V projectors read the sharer's and the
receiver's cache entries of one token (sharer first, heads flattened), and the receiver's entry becomes
`R + g * w * P`: P the projection, w a per-(token, head) weight, g a learned gate per layer and path
(Gumbel-sigmoid with an annealed temperature in training, hard `logit > 0` at inference).

Entries are cache-space tensors, keys after RoPE (and after k_norm where the model has one), laid out
token-major `[..., tokens, heads, head_dim]`: the engine's KVSlice rows and the transpose of a
transformers cache. A closed gate is an exact no-op, and `open_layers` tells callers which sharer and
receiver layers they need to move at all."""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

MAPPINGS = ("last_aligned", "nearest")
MODES = ("sequential", "parallel")
K, V = 0, 1


def layer_map(receiver_layers: int, sharer_layers: int, mapping: str = "last_aligned") -> list[int]:
    """The sharer layer read by each receiver layer. `last_aligned` pairs the last layers and clamps
    (a deeper sharer's front layers go unused; a shallower sharer's layer 0 serves the receiver's extra
    front layers); `nearest` pairs layers at the nearest normalised depth."""
    t, s = receiver_layers, sharer_layers
    if mapping == "last_aligned":
        return [min(max(n + s - t, 0), s - 1) for n in range(t)]
    if mapping == "nearest":
        return [round(n * (s - 1) / max(t - 1, 1)) for n in range(t)]
    raise ValueError(f"unknown layer mapping {mapping!r}; known: {', '.join(MAPPINGS)}")


def temperature(step: int, anneal_steps: int, start: float = 1.0, end: float = 0.001) -> float:
    """The gate's Gumbel-sigmoid temperature after `step` optimizer steps: geometric from start to end."""
    frac = min(step / anneal_steps, 1.0) if anneal_steps > 0 else 1.0
    return start * (end / start) ** frac


@dataclass(frozen=True)
class KVShape:
    num_layers: int
    num_kv_heads: int
    head_dim: int

    @property
    def width(self) -> int:
        return self.num_kv_heads * self.head_dim


@dataclass
class FuserConfig:
    receiver: KVShape
    sharer: KVShape
    hidden: int = 1024
    intermediate: int = 1024
    depth: int = 3
    dropout: float = 0.1
    mapping: str = "last_aligned"

    def __post_init__(self) -> None:
        if isinstance(self.receiver, dict):
            self.receiver = KVShape(**self.receiver)
        if isinstance(self.sharer, dict):
            self.sharer = KVShape(**self.sharer)
        if self.depth < 3:
            raise ValueError(f"fuser depth must be at least 3, got {self.depth}")
        if self.mapping not in MAPPINGS:
            raise ValueError(f"unknown layer mapping {self.mapping!r}; known: {', '.join(MAPPINGS)}")

    def to_dict(self) -> dict:
        return asdict(self)


class Block(nn.Module):
    """Pre-norm residual feed-forward block: `x + Dropout(W2 GELU(W1 RMSNorm(x)))`."""

    def __init__(self, dim: int, inner: int, dropout: float):
        super().__init__()
        self.norm = nn.RMSNorm(dim, eps=1e-6)
        self.up = nn.Linear(dim, inner, bias=False)
        self.down = nn.Linear(inner, dim, bias=False)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop(self.down(F.gelu(self.up(self.norm(x)))))


class Projector(nn.Module):
    """One path (K or V) of one receiver layer: the projection P and the per-head weight w."""

    def __init__(self, cfg: FuserConfig):
        super().__init__()
        h, inner, heads = cfg.hidden, cfg.intermediate, cfg.receiver.num_kv_heads
        self.shape = (heads, cfg.receiver.head_dim)
        self.inp = nn.Linear(cfg.sharer.width + cfg.receiver.width, h)
        self.trunk = Block(h, inner, cfg.dropout)
        self.proj = nn.Sequential(*[Block(h, inner, cfg.dropout) for _ in range(cfg.depth - 2)],
                                  nn.Linear(h, cfg.receiver.width))
        self.weight = nn.Sequential(Block(h, h, cfg.dropout), nn.Linear(h, heads))

    def forward(self, sharer: torch.Tensor, receiver: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.trunk(self.inp(torch.cat([sharer.flatten(-2), receiver.flatten(-2)], dim=-1)))
        p = self.proj(z).unflatten(-1, self.shape)
        return p, torch.sigmoid(self.weight(z)).unsqueeze(-1)


class LayerFuser(nn.Module):
    def __init__(self, cfg: FuserConfig):
        super().__init__()
        self.paths = nn.ModuleList([Projector(cfg), Projector(cfg)])
        self.gate_logits = nn.Parameter(torch.zeros(2))

    def gate(self, path: int, like: torch.Tensor, tau: float) -> torch.Tensor:
        """Hard 0/1 in eval mode; in training a Gumbel-sigmoid sample per (token, head)."""
        logit = self.gate_logits[path]
        if not self.training:
            return (logit > 0).to(like.dtype)
        u = torch.rand(like.shape[:-1] + (1,), device=like.device, dtype=torch.float32)
        gumbel = -torch.log(-torch.log(u + 1e-20) + 1e-20)
        return torch.sigmoid((logit + gumbel) / tau).to(like.dtype)

    def delta(self, path: int, sharer: torch.Tensor, receiver: torch.Tensor, tau: float) -> torch.Tensor:
        p, w = self.paths[path](sharer, receiver)
        return self.gate(path, p, tau) * w * p


class Fuser(nn.Module):
    """All receiver layers' fusers for one sharer. `tau` is the training temperature (see `temperature`)."""

    def __init__(self, cfg: FuserConfig):
        super().__init__()
        self.config = cfg
        self.layers = nn.ModuleList(LayerFuser(cfg) for _ in range(cfg.receiver.num_layers))
        self.sharer_layer = layer_map(cfg.receiver.num_layers, cfg.sharer.num_layers, cfg.mapping)
        self.tau = 1.0

    def is_open(self, layer: int, path: int) -> bool:
        return self.training or bool(self.layers[layer].gate_logits[path] > 0)

    def open_layers(self) -> dict[int, tuple[bool, bool]]:
        """Receiver layers with an open K or V gate, and which of the two (in training: all)."""
        if self.training:
            return {n: (True, True) for n in range(len(self.layers))}
        gates = torch.stack([f.gate_logits.detach() for f in self.layers]).cpu() > 0
        return {n: (bool(k), bool(v)) for n, (k, v) in enumerate(gates.tolist()) if k or v}

    def sharer_layers(self) -> list[int]:
        return sorted({self.sharer_layer[n] for n in self.open_layers()})


KVDict = dict[int, tuple[torch.Tensor, torch.Tensor]]
Part = tuple[Fuser, KVDict, "torch.Tensor | None"]


def fuse(receiver: KVDict, parts: Sequence[Part], mode: str = "sequential") -> KVDict:
    """Fused entries of the receiver layers that change. `receiver` maps a receiver layer to its (K, V);
    a part is a fuser, its sharer's (K, V) by sharer layer, all `[..., tokens, heads, head_dim]`, and a
    `[tokens]` mask of the positions it may change (None: all). Several sharers: `sequential` feeds each
    fuser the entries fused by the ones before it, `parallel` feeds every fuser the receiver's own
    entries and adds up their residuals."""
    if mode not in MODES:
        raise ValueError(f"unknown multi-sharer mode {mode!r}; known: {', '.join(MODES)}")
    if not any(fuser.training for fuser, _, _ in parts):
        from c2c.stacked import fuse_stacked

        return fuse_stacked(receiver, list(parts), mode)
    out: KVDict = {}
    for n, own in receiver.items():
        fused, changed = [], False
        for path in (K, V):
            base = cur = own[path]
            for fuser, sharer, mask in parts:
                if not fuser.is_open(n, path):
                    continue
                s = sharer[fuser.sharer_layer[n]][path].to(cur.dtype)
                d = fuser.layers[n].delta(path, s, cur if mode == "sequential" else base, fuser.tau)
                if mask is not None:
                    d = d.masked_fill(~mask.view(-1, 1, 1).to(d.device), 0)
                cur, changed = cur + d, True
            fused.append(cur)
        if changed:
            out[n] = (fused[K], fused[V])
    return out


def needed_layers(fusers: Iterable[Fuser]) -> list[int]:
    """Receiver layers that at least one fuser writes."""
    return sorted({n for f in fusers for n in f.open_layers()})
