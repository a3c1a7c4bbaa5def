"""Remote sharers of a C2C receiver: models hosted by another worker (C2C disaggregated).

The receiver's worker knows a remote sharer only by its tokenizer and its config (no weights): enough to
align the prompt, to say what the sharer must send (`Need`: its aligned ids of prompt tokens 0..N-2 and
the sharer layers some open gate reads), and to check what arrives (`kv_entries`) before anything is
kept. The sharer's own worker prefills those ids and exports the layers; the orchestrator carries them
to the receiver's worker (`FuseKV`), which fuses them into the receiver's blocks."""
from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from c2c.fuser import KVDict, KVShape
from tandem.errors import CheckpointError, InvalidRequestError
from workers.engine import KVSlice
from workers.models.spec import ModelSpec


@dataclass
class RemoteModel:
    """A sharer model of another worker: its name there, path, spec and tokenizer."""

    name: str
    path: Path
    spec: ModelSpec
    tokenizer: object

    @property
    def max_len(self) -> int:
        return self.spec.max_model_len

    @classmethod
    def load(cls, name: str, path: str | os.PathLike) -> RemoteModel:
        """Tokenizer and config from a model directory or GGUF file, without its weights."""
        from transformers import AutoConfig, AutoTokenizer

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        path = Path(path)
        where = dict(pretrained_model_name_or_path=path.parent, gguf_file=path.name) if path.is_file() \
            else dict(pretrained_model_name_or_path=path)
        try:
            spec = ModelSpec.from_hf_config(AutoConfig.from_pretrained(**where))
            tokenizer = AutoTokenizer.from_pretrained(**where)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"remote sharer {name!r}: {path} has no readable config and tokenizer: {e}") from None
        return cls(name, path, spec, tokenizer)


@dataclass
class Need:
    """What one remote sharer must send for one request."""

    sharer: str
    token_ids: list[int]           # the sharer's aligned ids of prompt tokens 0..N-2, to prefill
    layers: list[int]              # the sharer layers to export, entries of tokens [0, N-1)


def kv_entries(slices: Iterable[KVSlice], sharer: str, layers: list[int], shape: KVShape, n: int) -> KVDict:
    """The supplied slices as one (K, V) per sharer layer, after checking that they hold exactly `layers`,
    tokens [0, n) and the cache shape the fuser reads. Raises InvalidRequestError naming what is wrong."""
    out: KVDict = {}
    want = (n, shape.num_kv_heads, shape.head_dim)
    for kv in slices:
        if kv.start != 0:
            raise InvalidRequestError("kv.start", f"sharer {sharer!r} entries must start at token 0, not {kv.start}")
        for name, t in (("k", kv.k), ("v", kv.v)):
            if t.dim() != 4 or t.shape[0] != len(kv.layers) or not t.is_floating_point():
                raise InvalidRequestError(f"kv.{name}", f"sharer {sharer!r} layers {kv.layers.start}..{kv.layers.stop - 1} "
                                          f"{name} has shape {tuple(t.shape)} ({t.dtype}); expected floating "
                                          f"[{len(kv.layers)}, {n}, {shape.num_kv_heads}, {shape.head_dim}]")
        for i, layer in enumerate(kv.layers):
            if layer in out:
                raise InvalidRequestError("kv.layer_start", f"sharer {sharer!r} layer {layer} is given twice")
            for name, t in (("k", kv.k[i]), ("v", kv.v[i])):
                if tuple(t.shape) != want:
                    raise InvalidRequestError(f"kv.{name}", f"sharer {sharer!r} layer {layer} {name} has shape "
                                              f"{tuple(t.shape)}, the fuser expects {want}")
            out[layer] = (kv.k[i], kv.v[i])
    if sorted(out) != sorted(layers):
        missing, extra = sorted(set(layers) - set(out)), sorted(set(out) - set(layers))
        raise InvalidRequestError("kv", f"sharer {sharer!r} must send layers {layers}" +
                                  (f"; missing {missing}" if missing else "") + (f"; not read {extra}" if extra else ""))
    return out


class RemoteSharers:
    """The remote-sharer side of the C2C coordinator (`c2c.colocated.C2C`, which provides `sharers`,
    `states`, `receiver` and `_chosen`): what each remote sharer must send, and taking it."""

    def need(self, request_id: str) -> list[Need]:
        """What each remote sharer of this request must send: its ids of tokens 0..N-2 and its layers."""
        state = self.states.get(request_id)
        if state is None:
            return []
        return [Need(name, part.aligned.sharer_ids[:-1], self.sharers[name].layers)
                for name, part in state.parts.items() if self.sharers[name].remote]

    def supply(self, request_id: str, sharer: str, slices: Iterable[KVSlice]) -> None:
        """A remote sharer's entries for tokens 0..N-2 of its layers (on the engine's thread). Checked in
        full before they are kept; a refusal leaves the request as it was."""
        if sharer not in self.sharers:
            self._chosen([sharer])
        state = self.states.get(request_id)
        if state is None or state.fused:
            raise InvalidRequestError("request_id", f"no c2c request {request_id!r} waits for sharer entries here")
        part, s = state.parts.get(sharer), self.sharers[sharer]
        if part is None or s.remote is None:
            raise InvalidRequestError("sharer", f"request {request_id!r} takes no remote entries from {sharer!r}")
        if part.kv is not None:
            raise InvalidRequestError("sharer", f"sharer {sharer!r} already sent its entries for {request_id!r}")
        kv = kv_entries(slices, sharer, s.layers, s.fuser.config.sharer, len(state.prompt) - 1)
        device = self.receiver.runner.device
        part.kv = {layer: (k.to(device), v.to(device)) for layer, (k, v) in kv.items()}
