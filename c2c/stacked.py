"""The fuser at inference: every open (layer, path) projector of one fuser runs as one chain of batched
matmuls over a stack of its weights, instead of ~14 small kernels per projector and a host sync per gate.

Same math as `Projector.forward` with hard gates (an open gate is exactly 1), so `fuse` gives the same
entries either way. The stack is rebuilt when a parameter changes (moves or its version counter moves),
except for a fuser being served (`freeze`), whose stack is built once."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from c2c.fuser import Block, Fuser, KVDict, Part


class StackedBlock:
    def __init__(self, blocks: list[Block]):
        self.norm = torch.stack([b.norm.weight for b in blocks]).unsqueeze(1)
        self.eps = blocks[0].norm.eps or torch.finfo(self.norm.dtype).eps
        self.up = torch.stack([b.up.weight.t() for b in blocks])
        self.down = torch.stack([b.down.weight.t() for b in blocks])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.norm
        return x + torch.bmm(F.gelu(torch.bmm(h, self.up)), self.down)


def _linear(layers) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.stack([lin.weight.t() for lin in layers]), torch.stack([lin.bias for lin in layers]).unsqueeze(1)


class StackedFuser:
    def __init__(self, fuser: Fuser):
        self.version = _version(fuser)
        self.keys = [(n, path) for n, gates in fuser.open_layers().items() for path in (0, 1) if gates[path]]
        mods = [fuser.layers[n].paths[path] for n, path in self.keys]
        self.shape = mods[0].shape if mods else None
        with torch.no_grad():
            self.inp = _linear([m.inp for m in mods]) if mods else None
            self.trunk = StackedBlock([m.trunk for m in mods]) if mods else None
            self.proj = [StackedBlock([m.proj[i] for m in mods]) for i in range(len(mods[0].proj) - 1)] if mods else []
            self.out = _linear([m.proj[-1] for m in mods]) if mods else None
            self.wblock = StackedBlock([m.weight[0] for m in mods]) if mods else None
            self.wout = _linear([m.weight[1] for m in mods]) if mods else None

    def deltas(self, x: torch.Tensor) -> torch.Tensor:
        """`x`: [keys, tokens, sharer width + receiver width] -> `w * P`: [keys, tokens, heads, head_dim]."""
        z = self.trunk(torch.baddbmm(self.inp[1], x, self.inp[0]))
        p = z
        for block in self.proj:
            p = block(p)
        p = torch.baddbmm(self.out[1], p, self.out[0]).unflatten(-1, self.shape)
        w = torch.sigmoid(torch.baddbmm(self.wout[1], self.wblock(z), self.wout[0]))
        return w.unsqueeze(-1) * p


def _version(fuser: Fuser) -> tuple:
    """Changes when any parameter is updated in place or moved (walking the module tree is too slow here)."""
    params = fuser.__dict__.get("_param_list")
    if params is None:
        params = fuser.__dict__["_param_list"] = list(fuser.parameters())
    return tuple((p.data_ptr(), p._version) for p in params)


def freeze(fuser: Fuser) -> None:
    """Serve `fuser` as it is now: its stack is built once and never checked against its parameters again."""
    fuser._frozen = stacked(fuser)


def stacked(fuser: Fuser) -> StackedFuser:
    frozen = getattr(fuser, "_frozen", None)
    if frozen is not None:
        return frozen
    cached = getattr(fuser, "_stacked", None)
    if cached is None or cached.version != _version(fuser):
        cached = StackedFuser(fuser)
        fuser._stacked = cached
    return cached


def fuse_stacked(receiver: KVDict, parts: list[Part], mode: str) -> KVDict:
    """`c2c.fuser.fuse` for fusers in eval mode."""
    cur = {n: list(kv) for n, kv in receiver.items()}
    changed: set[int] = set()
    for fuser, sharer, mask in parts:
        s = stacked(fuser)
        keys = [(n, path) for n, path in s.keys if n in receiver]
        if not keys:
            continue
        if len(keys) < len(s.keys):
            raise ValueError(f"receiver layers {sorted({n for n, _ in s.keys} - set(receiver))} are open but not given")
        r = torch.stack([(cur[n] if mode == "sequential" else receiver[n])[path] for n, path in keys])
        sh = torch.stack([sharer[fuser.sharer_layer[n]][path] for n, path in keys]).to(r.dtype)
        lead = r.shape[1:-2]
        width = sh.shape[-2] * sh.shape[-1] + r.shape[-2] * r.shape[-1]
        x = torch.cat([sh.flatten(-2), r.flatten(-2)], dim=-1).reshape(len(keys), -1, width)
        d = s.deltas(x.to(s.inp[0].dtype)).reshape(len(keys), *lead, *r.shape[-2:]).to(r.dtype)
        if mask is not None:
            d = d * mask.to(d.device, d.dtype).view(-1, 1, 1)
        new = torch.stack([cur[n][path] for n, path in keys]) + d if mode == "parallel" else r + d
        for (n, path), entry in zip(keys, new.unbind(0)):
            cur[n][path] = entry
            changed.add(n)
    return {n: (cur[n][0], cur[n][1]) for n in sorted(changed)}
