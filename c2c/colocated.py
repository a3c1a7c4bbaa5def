"""C2C co-located: receiver and sharer(s) are models of one engine (its text baseline: `c2c.t2t`).

C2C, per request of N prompt tokens (the reference's flow): the receiver prefills tokens 0..N-2 into
its own blocks (a private cache salt, so no block is shared) and each sharer prefills its aligned ids of
the same positions. Once all are ready, the step hook reads the entries of the layers with an open gate
(closed ones are neither read nor projected nor written), fuses them, writes the fused entries into the
receiver's blocks, releases the sharers, and extends the receiver with token N-1, which it reads over
the fused cache before decoding alone. Everything is computed and checked before the first write.

A sharer may also be *remote* (`c2c.remote`: hosted by another worker, known here by its tokenizer and
config): it adds no engine request; `need(rid)` says what it must send, and `supply(rid, sharer, kv)`
gives its entries (checked before they are kept); fusion waits for every part.

Per request, `stats` (in the final output) holds `sharer_s`, `fuser_s`, `receiver_s` (seconds of the
engine steps that advanced the request on each side: its latency, not a share of the batch) and the
bytes of KV read from the sharers (`kv_bytes_sharer`, what would cross between workers; for a remote
sharer, what did), from the receiver (`kv_bytes_receiver`), written fused (`kv_bytes_fused`) and in all
(`kv_bytes_moved`)."""
from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import astuple, dataclass, field
from pathlib import Path

import torch

from c2c import checkpoint
from c2c.align import Aligned, TokenAligner
from c2c.fuser import MODES, Fuser, KVDict, fuse
from c2c.remote import RemoteModel, RemoteSharers
from c2c.stacked import freeze
from c2c.stepping import Meter, detach, run_batch
from tandem.errors import (
    CheckpointError,
    InvalidRequestError,
    ModelNotFoundError,
    TandemError,
)
from workers.chat import encode, render
from workers.engine import (
    Engine,
    KVSlice,
    RequestOutput,
    SamplingParams,
    StepOutput,
)
from workers.engine.detokenizer import IncrementalDetokenizer
from workers.engine.sequence import Priority, Sequence, Status

Prompt = str | list[int] | list[dict[str, str]]
def runs(layers: Iterable[int]) -> list[range]:
    """Sorted layer indices as contiguous ranges."""
    out: list[range] = []
    for n in sorted(layers):
        if out and out[-1].stop == n:
            out[-1] = range(out[-1].start, n + 1)
        else:
            out.append(range(n, n + 1))
    return out


@dataclass
class Sharer:
    model: str
    fuser: Fuser
    aligner: TokenAligner
    layers: list[int]                 # sharer layers some open gate reads
    remote: RemoteModel | None = None  # hosted by another worker


@dataclass
class Part:
    """One sharer's side of one request: its engine request (local) or the entries it supplied (remote)."""

    aligned: Aligned
    request_id: str = ""
    kv: KVDict | None = None


@dataclass
class C2CState:
    request_id: str
    prompt: list[int]
    parts: dict[str, Part]                           # sharer model -> its part, in the fusers' order
    layers: list[int] = field(default_factory=list)  # receiver layers this request's open gates write
    stats: dict[str, float] = field(default_factory=lambda: dict.fromkeys(
        ("sharer_s", "fuser_s", "receiver_s", "kv_bytes_sharer", "kv_bytes_receiver", "kv_bytes_fused",
         "kv_bytes_moved", "fused_layers", "fused_tokens"), 0.0))
    fused: bool = False
    preemptions: int = 0


class C2C(RemoteSharers):
    def __init__(self, engine: Engine, receiver: str, sharers: dict[str, Fuser], mode: str = "sequential",
                 alignment: str | dict[str, str] = "first", remote: dict[str, RemoteModel] | None = None):
        """`sharers` maps an engine model, or a `remote` model of another worker, to its fuser (trained for
        that sharer and this receiver)."""
        if mode not in MODES:
            raise InvalidRequestError("mode", f"unknown multi-sharer mode {mode!r}; known: {', '.join(MODES)}")
        self.engine, self.mode = engine, mode
        self.receiver = engine.model(receiver)
        rspec, runner = self.receiver.runner.spec, self.receiver.runner
        self.sharers: dict[str, Sharer] = {}
        for name, fuser in sharers.items():
            far = (remote or {}).get(name) if name not in engine.models else None
            sspec = far.spec if far else engine.model(name).runner.spec
            cfg = fuser.config
            have = tuple((s.num_layers, s.num_kv_heads, s.head_dim) for s in (rspec, sspec))
            want = (astuple(cfg.receiver), astuple(cfg.sharer))
            if have != want:
                raise CheckpointError(f"the fuser for sharer {name!r} expects receiver and sharer caches (layers, KV heads, "
                                      f"head dim) {want}; receiver {receiver!r} and sharer {name!r} have {have}")
            fuser = fuser.to(runner.device, runner.dtype).eval()
            freeze(fuser)
            strategy = alignment if isinstance(alignment, str) else alignment.get(name, "first")
            aligner = TokenAligner(self.receiver.tokenizer, far.tokenizer if far else engine.model(name).tokenizer,
                                   strategy)
            self.sharers[name] = Sharer(name, fuser, aligner, fuser.sharer_layers(), far)
        self.active = {name: s for name, s in self.sharers.items() if s.layers}
        self.layers = sorted({n for s in self.active.values() for n in s.fuser.open_layers()})
        self.states: dict[str, C2CState] = {}
        self.parts: dict[str, C2CState] = {}
        self.alone: dict[str, dict] = {}                 # requests with no open gate: the receiver alone
        self.meter = Meter(engine)
        engine.add_policy(receiver, self.meter.policy)
        engine.step_hooks.append(self._after_step)
        engine.retire_hooks.append(self._on_retire)

    @classmethod
    def from_checkpoints(cls, engine: Engine, receiver: str, checkpoints: dict[str, str | Path],
                         mode: str = "sequential", remote: dict[str, RemoteModel] | None = None) -> C2C:
        """Fusers from `tandem c2c train` directories, per sharer model (of this engine, else of `remote`);
        each must name this pair."""
        rm = engine.model(receiver)
        rid = checkpoint.ModelId.of(rm.runner.loaded.path, rm.runner.spec)
        fusers, alignment = {}, {}
        for name, path in checkpoints.items():
            far = (remote or {}).get(name) if name not in engine.models else None
            where, spec = (far.path, far.spec) if far else (engine.model(name).runner.loaded.path,
                                                             engine.model(name).runner.spec)
            pair = checkpoint.Pair(rid, checkpoint.ModelId.of(where, spec))
            fusers[name], doc = checkpoint.load(path, pair)
            alignment[name] = doc.get("alignment", "first")
        return cls(engine, receiver, fusers, mode, alignment, remote)

    # ----- the door -----

    def add_request(self, request_id: str, prompt: Prompt, params: SamplingParams | None = None, *,
                    priority: Priority = Priority.NORMAL, sharers: Iterable[str] | None = None) -> Sequence:
        """`sharers`: the sharers this request uses (default: all), in the order the fusers apply."""
        engine, receiver = self.engine, self.receiver.name
        chosen = self._chosen(sharers)
        aligned = {name: self._align(self.sharers[name].aligner, prompt) for name in chosen}
        ids = next(iter(aligned.values())).receiver_ids if aligned else self.receiver_ids(prompt)
        if len(ids) >= engine.model(receiver).max_len:
            raise InvalidRequestError("prompt", f"{len(ids)} tokens leave no room to generate within receiver "
                                      f"{receiver!r}'s {engine.model(receiver).max_len} tokens")
        for name in aligned:
            if len(ids) - 1 >= self._max_len(name):
                raise InvalidRequestError("prompt", f"{len(ids)} tokens do not fit sharer {name!r}'s "
                                          f"{self._max_len(name)} tokens")
        if not aligned or len(ids) < 2:
            seq = engine.add_request(request_id, ids, params, receiver, priority)
            seq.stats = C2CState(request_id, ids, {}).stats
            self.alone[request_id] = seq.stats
            self.meter.track(request_id, seq.stats, "receiver_s")
            return seq
        if request_id in self.states or request_id in engine.requests:
            raise InvalidRequestError("request_id", f"{request_id!r} is already in use")
        parts = {name: Part(a, "" if self.sharers[name].remote else f"{request_id}/sharer/{name}")
                 for name, a in aligned.items()}
        layers = sorted({n for name in parts for n in self.sharers[name].fuser.open_layers()})
        state = C2CState(request_id, ids, parts, layers)
        self._register(state)          # before the engine sees any part: its thread may step meanwhile
        added: list[str] = []
        try:
            for name, part in parts.items():
                if part.request_id:
                    engine.add_request(part.request_id, part.aligned.sharer_ids[:-1],
                                       SamplingParams(max_tokens=1, detokenize=False), name, priority, sample=False)
                    added.append(part.request_id)
            seq = engine.add_request(request_id, ids[:-1], params, receiver, priority, sample=False,
                                     cache_salt=f"c2c/{request_id}/{time.monotonic_ns()}")
        except Exception:
            self._unregister(state)
            for srid in added:
                engine.abort(srid)
            raise
        seq.stats = state.stats
        return seq

    def _chosen(self, sharers: Iterable[str] | None) -> list[str]:
        """The request's sharers with an open gate, in configured order; unknown names are NOT_FOUND."""
        names = list(sharers or ())
        unknown = [n for n in names if n not in self.sharers]
        if unknown:
            raise ModelNotFoundError(f"sharer {unknown[0]!r} is not a sharer of receiver {self.receiver.name!r} "
                                     f"here; sharers: {sorted(self.sharers)}")
        return [n for n in self.active if not names or n in names]

    def _max_len(self, name: str) -> int:
        remote = self.sharers[name].remote
        return remote.max_len if remote else self.engine.model(name).max_len

    def _register(self, state: C2CState) -> None:
        self.states[state.request_id] = state
        self.meter.track(state.request_id, state.stats, "receiver_s")
        for srid in _local(state):
            self.parts[srid] = state
            self.meter.track(srid, state.stats, "sharer_s")

    def _unregister(self, state: C2CState) -> None:
        self.states.pop(state.request_id, None)
        self.meter.untrack(state.request_id)
        for srid in _local(state):
            self.parts.pop(srid, None)
            self.meter.untrack(srid)

    def receiver_ids(self, prompt: Prompt) -> list[int]:
        tok = self.receiver.tokenizer
        if isinstance(prompt, str):
            return encode(tok, prompt)
        if prompt and isinstance(prompt[0], dict):
            return encode(tok, render(tok, prompt, True))
        vocab = self.receiver.runner.spec.vocab_size
        bad = [t for t in prompt if not isinstance(t, int) or not 0 <= t < vocab]
        if bad or not prompt:
            raise InvalidRequestError("prompt_token_ids", f"ids {bad[:5]} are outside the receiver's vocabulary [0, {vocab})"
                                      if bad else "is empty")
        return list(prompt)

    def _align(self, aligner: TokenAligner, prompt: Prompt) -> Aligned:
        if isinstance(prompt, str):
            return aligner.align_text(prompt)
        if prompt and isinstance(prompt[0], dict):
            return aligner.align_chat(prompt)
        return aligner.align_ids(self.receiver_ids(prompt))

    def abort(self, request_id: str) -> None:
        state = self.states.get(request_id)
        for srid in _local(state) if state else []:
            self.engine.abort(srid)
        self.engine.abort(request_id)

    def generate(self, prompts: Iterable[Prompt], params: SamplingParams | None = None) -> list[RequestOutput]:
        return run_batch(self.engine, lambda rid, p: self.add_request(rid, p, params), prompts, "c2c")

    def close(self) -> None:
        """Detach from the engine (requests in flight are aborted)."""
        for rid in list(self.states):
            self.abort(rid)
        detach(self.engine, self.meter, [self.receiver.name], self._after_step, self._on_retire)

    # ----- on the engine's thread -----

    def _after_step(self) -> None:
        self.meter.tick()
        for state in list(self.states.values()):
            if not state.fused:
                self._try_fuse(state)
            else:
                seq = self.engine.requests.get(state.request_id)
                if seq is not None and seq.num_preemptions > state.preemptions:
                    state.stats["fusion_lost"] = 1.0   # recomputed from tokens: the receiver's own entries

    def _try_fuse(self, state: C2CState) -> None:
        seqs = [self.engine.requests.get(rid) for rid in [state.request_id] + _local(state)]
        if any(s is None for s in seqs) or any(p.kv is None for p in state.parts.values() if not p.request_id):
            return
        waiting = [s for s in seqs if s.num_computed < s.num_tokens]
        for s in waiting:
            if s.status is Status.PAUSED and not s.block_table:
                self.engine.resume(s.request_id)   # preempted while it waited: prefill it again
        if not waiting:
            self._fuse(state, seqs[0])

    def _fuse(self, state: C2CState, seq: Sequence) -> None:
        t0, n, stats = time.perf_counter(), len(state.prompt) - 1, state.stats
        runner = self.receiver.runner
        try:
            own = self._read(state.request_id, state.layers, n, "kv_bytes_receiver", stats)
            parts = []
            for name, part in state.parts.items():
                sharer = self.active[name]
                if part.request_id:
                    kv = self._read(part.request_id, sharer.layers, n, "kv_bytes_sharer", stats)
                else:
                    kv = part.kv
                    stats["kv_bytes_sharer"] += sum(k.numel() * k.element_size() + v.numel() * v.element_size()
                                                    for k, v in kv.values())
                self._check(kv, sharer.fuser.config.sharer, n, f"sharer {name!r}")
                fusable = part.aligned.fuse[:n]
                mask = None if all(fusable) else torch.tensor(fusable, device=runner.device)
                kv = {i: (k.to(runner.device), v.to(runner.device)) for i, (k, v) in kv.items()}
                parts.append((sharer.fuser, kv, mask))
            with torch.inference_mode():
                fused = fuse(own, parts, self.mode)
            receiver_shape = next(iter(self.active.values())).fuser.config.receiver
            self._check(fused, receiver_shape, n, f"receiver {self.receiver.name!r}")
            for run in runs(fused):
                k = torch.stack([fused[i][0] for i in run])
                v = torch.stack([fused[i][1] for i in run])
                self.engine.import_kv(state.request_id, KVSlice(run, 0, k, v))
                stats["kv_bytes_fused"] += 2 * k.numel() * k.element_size()
        except (TandemError, RuntimeError, ValueError) as e:
            self._fail(state, f"c2c fusion failed: {e}")
            return
        state.fused, state.preemptions = True, seq.num_preemptions
        stats["fused_layers"], stats["fused_tokens"] = float(len(fused)), float(n)
        stats["kv_bytes_moved"] = stats["kv_bytes_sharer"] + stats["kv_bytes_receiver"] + stats["kv_bytes_fused"]
        stats["fuser_s"] += time.perf_counter() - t0
        for part in state.parts.values():
            part.kv = None
        for srid in _local(state):
            self.engine.release(srid)
        self.engine.extend(state.request_id, state.prompt[-1:], sample=True)
        seq.num_prompt_tokens = len(state.prompt)
        seq.detokenizer = IncrementalDetokenizer(self.receiver.tokenizer, state.prompt, seq.params.skip_special_tokens)

    def _read(self, request_id: str, layers: list[int], n: int, bucket: str, stats: dict) -> KVDict:
        out: KVDict = {}
        for run in runs(layers):
            kv = self.engine.export_kv(request_id, run, 0, n)
            stats[bucket] += 2 * kv.k.numel() * kv.k.element_size()
            out.update({layer: (kv.k[i], kv.v[i]) for i, layer in enumerate(run)})
        return out

    @staticmethod
    def _check(kv: KVDict, shape, n: int, whose: str) -> None:
        want = (n, shape.num_kv_heads, shape.head_dim)
        for layer, (k, v) in kv.items():
            for name, t in (("k", k), ("v", v)):
                if tuple(t.shape) != want:
                    raise InvalidRequestError("kv", f"{whose} layer {layer} {name} has shape {tuple(t.shape)}, "
                                              f"the fuser expects {want}")

    def _fail(self, state: C2CState, message: str) -> None:
        self.engine.emit(StepOutput(state.request_id, self.receiver.name, finished=True, finish_reason="error",
                                    error=message))
        self.abort(state.request_id)

    def _on_retire(self, seq: Sequence) -> None:
        rid = seq.request_id
        if self.alone.pop(rid, None) is not None:
            self.meter.untrack(rid)
            return
        state = self.states.get(rid)
        if state is not None:
            self._unregister(state)
            for srid in _local(state):
                if srid in self.engine.requests:
                    self.engine.release(srid)
            return
        state = self.parts.pop(rid, None)
        if state is not None:
            self.meter.untrack(rid)
            if not state.fused and state.request_id in self.states:
                self._fail(state, f"sharer request {rid!r} ended ({seq.finish_reason}) before fusion")


def _local(state: C2CState) -> list[str]:
    """The engine request ids of a request's local sharers."""
    return [p.request_id for p in state.parts.values() if p.request_id]
