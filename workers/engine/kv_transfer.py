"""K/V in and out of a sequence's blocks: what C2C's fuser reads and writes, checked at the boundary."""
from __future__ import annotations

from typing import TYPE_CHECKING

from tandem.errors import InvalidRequestError
from workers.engine.outputs import KVSlice
from workers.engine.sequence import Sequence

if TYPE_CHECKING:
    from workers.engine.engine import ResidentModel


def export_kv(rm: ResidentModel, seq: Sequence, layers: range | None, start: int, end: int | None) -> KVSlice:
    num_layers = rm.runner.spec.num_layers
    layers = range(num_layers) if layers is None else layers
    end = seq.num_computed if end is None else end
    if not 0 <= start <= end <= seq.num_computed:
        field = "end" if 0 <= start <= seq.num_computed else "start"
        raise InvalidRequestError(field, f"[{start}, {end}) is not within the {seq.num_computed} computed tokens")
    if not (0 <= layers.start < layers.stop <= num_layers and layers.step == 1):
        raise InvalidRequestError("layers", f"{layers} is not a layer range of a {num_layers}-layer model")
    slots = rm.blocks.slots(seq, start, end)
    k, v = rm.runner.read_kv(slots.to(rm.runner.device), layers)
    return KVSlice(layers, start, k, v)


def import_kv(rm: ResidentModel, seq: Sequence, kv: KVSlice, mark_computed: bool) -> None:
    spec = rm.runner.spec
    n = kv.num_tokens
    want = (len(kv.layers), n, spec.num_kv_heads, spec.head_dim)
    for name, t in (("kv.k", kv.k), ("kv.v", kv.v)):
        if tuple(t.shape) != want:
            raise InvalidRequestError(name, f"shape {tuple(t.shape)} does not match {want} for this model")
    if not (0 <= kv.layers.start < kv.layers.stop <= spec.num_layers):
        raise InvalidRequestError("kv.layers", f"{kv.layers} is outside the model's {spec.num_layers} layers")
    if not 0 <= kv.start <= seq.num_computed or kv.start + n > seq.num_tokens:
        raise InvalidRequestError("kv.start", f"tokens [{kv.start}, {kv.start + n}) do not fit the sequence")
    if not rm.blocks.ensure(seq, kv.start + n):
        raise InvalidRequestError("kv", "the KV pool has no room for these tokens now")
    if any(rm.blocks.blocks[b].ref_count > 1 for b in seq.block_table):
        raise InvalidRequestError("kv", "the sequence shares cached prefix blocks; give it a cache_salt to import KV")
    seq.has_imported_kv = True
    rm.blocks.invalidate_from(seq, kv.start)
    slots = rm.blocks.slots(seq, kv.start, kv.start + n)
    rm.runner.write_kv(slots.to(rm.runner.device), kv.layers, kv.k, kv.v)
    if mark_computed and len(kv.layers) == spec.num_layers:
        seq.num_computed = max(seq.num_computed, min(kv.start + n, seq.num_tokens - 1))
