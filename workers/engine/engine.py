"""The Engine: resident models, each with its KV pool and scheduler, stepped in one loop."""
from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from tandem.assets import resolve
from tandem.errors import InvalidRequestError, ModelNotFoundError
from workers.engine import kv_transfer
from workers.engine.block_manager import BlockManager
from workers.engine.config import EngineConfig
from workers.engine.detokenizer import IncrementalDetokenizer
from workers.engine.model_runner import ModelRunner
from workers.engine.outputs import KVSlice, RequestOutput, StepOutput
from workers.engine.overlap import HostCopies, InFlight, chain, commit_chained, may_defer
from workers.engine.policy import TokenPolicy, apply_policies
from workers.engine.postprocess import append_token, finish_output
from workers.engine.sampler import Sampler
from workers.engine.sampling_params import SamplingParams
from workers.engine.scheduler import Scheduler
from workers.engine.sequence import Priority, Sequence, Status
from workers.models import LoadedModel, load_model


@dataclass
class ResidentModel:
    name: str
    runner: ModelRunner
    blocks: BlockManager
    scheduler: Scheduler
    policies: list[TokenPolicy]
    step_started: float = 0.0
    in_flight: InFlight | None = None
    chained_steps: int = 0
    host_copies: HostCopies = field(default_factory=HostCopies)
    stream: torch.cuda.Stream | None = None     # this model's device work, when not on the current stream
    policy_stream: torch.cuda.Stream | None = None   # its deferred policies' device work (see `InFlight.prepare`)

    def on_stream(self):
        return torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()

    @property
    def tokenizer(self):
        return self.runner.loaded.tokenizer

    @property
    def max_len(self) -> int:
        """The most tokens one sequence may hold: within the model's context and the whole KV pool."""
        return min(self.runner.max_model_len, self.blocks.num_blocks * self.blocks.block_size)

    def check_token_ids(self, token_ids: list[int], field: str) -> None:
        vocab = self.runner.spec.vocab_size
        bad = [t for t in token_ids if not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise InvalidRequestError(field, f"ids {bad[:5]} are outside the vocabulary [0, {vocab})")


class Engine:
    """Thread-safe at its door (`add_request`, `abort`, `call`); everything else runs in `step`."""

    def __init__(self, config: EngineConfig, preloaded: dict[str, LoadedModel] | None = None):
        self.config = config
        self.models: dict[str, ResidentModel] = {}
        for mc in config.models:
            loaded = (preloaded or {}).get(mc.name) or load_model(resolve(mc.path), mc.dtype, mc.device)
            runner = ModelRunner(loaded, mc)
            blocks = BlockManager(runner.num_blocks, mc.block_size, config.enable_prefix_caching)
            sched = Scheduler(blocks, config.max_num_batched_tokens, config.max_num_seqs)
            self.models[mc.name] = rm = ResidentModel(mc.name, runner, blocks, sched, [])
            if config.policy_stream and runner.device.type == "cuda":
                rm.policy_stream = torch.cuda.Stream(runner.device)
        self.default_model = config.models[0].name
        self.sampler = Sampler(config.seed)
        self.requests: dict[str, Sequence] = {}
        self._lock = threading.Lock()
        self._inbox: deque[Callable[[], None]] = deque()
        self._outbox: list[StepOutput] = []
        self.retire_hooks: list[Callable[[Sequence], None]] = []
        self.step_hooks: list[Callable[[], None]] = []      # after every step, also while one is in flight

    # ----- the door: validation in the caller's thread, effects in the engine's -----

    def model(self, name: str | None = None) -> ResidentModel:
        name = name or self.default_model
        if name not in self.models:
            raise ModelNotFoundError(f"model {name!r} is not loaded; loaded: {sorted(self.models)}")
        return self.models[name]

    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        model: str | None = None,
        priority: Priority = Priority.NORMAL,
        sample: bool = True,
        cache_salt: str = "",
        propose_only: bool = False,
        immediate: bool = False,
        vocab_limit: int | None = None,
        paused: bool = False,
        max_len: int | None = None,
    ) -> Sequence:
        """With `propose_only`, each sampled token is streamed as a proposal and not appended: the
        sequence then waits for `extend`; `vocab_limit` keeps its proposals below that id (for a model whose
        vocabulary is padded beyond its partner's). `immediate` adds it at once (only on the engine's thread).
        `paused`: it starts only when `resume`d. `max_len`: a tighter bound on its length than the model's own
        (a pipeline whose partner model has a shorter context)."""
        rm = self.model(model)
        params = params or SamplingParams()
        if not isinstance(request_id, str) or not request_id:
            raise InvalidRequestError("request_id", "must be a non-empty string")
        token_ids = self._tokens(rm, prompt)
        limit = rm.max_len if max_len is None else min(rm.max_len, max_len)
        if len(token_ids) >= limit:
            bound = "" if max_len is None else f", pipeline {max_len}"
            raise InvalidRequestError(
                "prompt", f"{len(token_ids)} tokens leave no room to generate within {limit} tokens "
                f"(model context {rm.runner.max_model_len}, KV pool {rm.blocks.num_blocks * rm.blocks.block_size}{bound})")
        seq = Sequence(request_id, rm.name, token_ids, params, Priority(priority), sample, cache_salt)
        seq.max_len = limit
        seq.propose_only = propose_only
        if vocab_limit:
            if not 0 < vocab_limit <= rm.runner.spec.vocab_size:
                raise InvalidRequestError("vocab_limit", f"must be within (0, {rm.runner.spec.vocab_size}], got {vocab_limit}")
            seq.vocab_limit = vocab_limit
        seq.set_eos(rm.runner.spec.eos_token_ids)
        if params.seed is not None:
            seq.generator = torch.Generator().manual_seed(params.seed)
        seq.detokenizer = IncrementalDetokenizer(rm.tokenizer, token_ids, params.skip_special_tokens)
        with self._lock:
            if request_id in self.requests:
                raise InvalidRequestError("request_id", f"{request_id!r} is already in use")
            self.requests[request_id] = seq
            if not immediate:
                self._inbox.append(lambda: rm.scheduler.add(seq, paused))
        if immediate:
            rm.scheduler.add(seq, paused)
        return seq

    def _tokens(self, rm: ResidentModel, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            token_ids = rm.tokenizer.encode(prompt, add_special_tokens=False) if prompt else []
        else:
            token_ids = list(prompt)
        if not token_ids:
            raise InvalidRequestError("prompt", "is empty")
        rm.check_token_ids(token_ids, "prompt_token_ids")
        return token_ids

    def abort(self, request_id: str) -> None:
        """Idempotent: an unknown or finished request is ignored. Blocks are freed at the next step."""
        self.call(lambda: self._finish_now(request_id, "abort"))

    def call(self, fn: Callable[[], None]) -> None:
        with self._lock:
            self._inbox.append(fn)

    # ----- operations for pipelines; call them from the engine's thread (or through `call`) -----

    def extend(self, request_id: str, token_ids: list[int], sample: bool = True) -> None:
        """Append given tokens to a sequence without sampling them (catch-up prefill)."""
        seq = self._live(request_id)
        rm = self.models[seq.model]
        if not token_ids:
            raise InvalidRequestError("token_ids", "is empty")
        rm.check_token_ids(token_ids, "token_ids")
        if seq.num_tokens + len(token_ids) >= seq.max_len:
            raise InvalidRequestError("token_ids", f"extending to {seq.num_tokens + len(token_ids)} tokens exceeds {seq.max_len}")
        seq.token_ids.extend(token_ids)
        seq.sample_on_complete = sample
        seq.held = False
        rm.scheduler.resume(seq)

    def inject(self, request_id: str, token: int, source: str, logprob: dict | None = None) -> None:
        """Give a held sequence (see `PolicyDecision.hold`) its next token, produced elsewhere. One that was
        preempted while held is recomputed with it."""
        seq = self._live(request_id)
        rm = self.models[seq.model]
        if not seq.held:
            raise InvalidRequestError("request_id", f"{request_id!r} is not waiting for a token")
        assert seq.status is Status.PAUSED
        rm.check_token_ids([token], "token_id")
        seq.held = False
        out = append_token(seq, token, source, logprob)
        if out.finished:
            self._retire(rm, seq)
        else:
            rm.scheduler.resume(seq)
        self._outbox.append(out)

    def emit(self, out: StepOutput) -> None:
        """Add an output to this step's results (for policies that report events)."""
        self._outbox.append(out)

    def pause(self, request_id: str) -> None:
        seq = self._live(request_id)
        self.models[seq.model].scheduler.pause(seq)

    def resume(self, request_id: str) -> None:
        seq = self._live(request_id)
        if seq.held:
            raise InvalidRequestError("request_id", f"{request_id!r} waits for a token from Inject, not for resume")
        if seq.status is Status.PAUSED and seq.num_tokens and not seq.num_uncomputed:
            raise InvalidRequestError("request_id", f"{request_id!r} has nothing to compute: it waits for Extend")
        self.models[seq.model].scheduler.resume(seq)

    def release(self, request_id: str) -> None:
        self._finish_now(request_id, "released")

    def export_kv(self, request_id: str, layers: range | None = None, start: int = 0, end: int | None = None) -> KVSlice:
        """K/V of tokens `[start, end)` (default: every computed token) of a sequence, for `layers`."""
        seq = self._live(request_id)
        return kv_transfer.export_kv(self.models[seq.model], seq, layers, start, end)

    def import_kv(self, request_id: str, kv: KVSlice, mark_computed: bool = False) -> None:
        """Write K/V for tokens `[kv.start, kv.start + n)` of a sequence's known tokens. With
        `mark_computed` and every layer given, those tokens count as computed (no prefill needed), all but
        its last token: that one is always computed, so that the step samples (or reports `ready`)."""
        seq = self._live(request_id)
        kv_transfer.import_kv(self.models[seq.model], seq, kv, mark_computed)

    def add_policy(self, model: str, policy: TokenPolicy) -> None:
        self.model(model).policies.append(policy)

    def _live(self, request_id: str) -> Sequence:
        seq = self.requests.get(request_id)
        if seq is None:
            raise InvalidRequestError("request_id", f"no live request {request_id!r}")
        return seq

    # ----- the step -----

    @property
    def has_unfinished(self) -> bool:
        return bool(self._inbox) or any(rm.scheduler.num_unfinished or rm.in_flight for rm in self.models.values())

    @property
    def has_work(self) -> bool:
        return bool(self._inbox) or any(rm.scheduler.has_work or rm.in_flight for rm in self.models.values())

    def step(self) -> list[StepOutput]:
        with self._lock:
            inbox, self._inbox = self._inbox, deque()
        if inbox:
            for rm in self.models.values():
                with rm.on_stream():
                    self._land(rm)
        for fn in inbox:
            fn()
        for rm in self.models.values():
            with rm.on_stream():
                self._step_model(rm)
        for hook in self.step_hooks:
            hook()
        outputs, self._outbox = self._outbox, []
        return outputs

    def _land(self, rm: ResidentModel) -> None:
        """Read and append the tokens of the step still in flight, if any."""
        fl, rm.in_flight = rm.in_flight, None
        if fl is not None:
            self._finish(rm, fl)

    def _step_model(self, rm: ResidentModel) -> None:
        if rm.in_flight is not None:
            nxt = chain(self, rm, rm.in_flight)
            self._land(rm)
            if nxt is not None:
                rm.chained_steps += 1
                commit_chained(rm, nxt)
                rm.in_flight = nxt
                return
        batch = rm.scheduler.schedule()
        if not batch:
            return
        fl = self._launch(rm, batch)
        if fl is None:
            return
        if may_defer(self, rm, fl):
            fl.keep(self.sampler(fl.logits, fl.seqs).tokens, rm.host_copies)
            if rm.policies:
                fl.prepare(rm)
            rm.in_flight = fl
        else:
            self._finish(rm, fl)

    def _launch(self, rm: ResidentModel, batch) -> InFlight | None:
        """Forward the batch and count its tokens computed (no wait for the GPU); None when no row samples."""
        rm.step_started = time.perf_counter()
        now = time.monotonic()
        sample_rows = []
        for i, s in enumerate(batch):
            s.seq.first_scheduled_time = s.seq.first_scheduled_time or now
            if s.start + s.num_new == s.seq.num_tokens and s.seq.sample_on_complete:
                sample_rows.append(i)
        hidden, logits = rm.runner.run(batch, sample_rows)
        for s in batch:
            s.seq.num_computed += s.num_new
            rm.blocks.commit(s.seq)
            if s.seq.num_uncomputed == 0 and not s.seq.sample_on_complete:
                rm.scheduler.pause(s.seq)
                self._outbox.append(StepOutput(s.seq.request_id, rm.name, ready=True))
        if not sample_rows:
            return None
        return InFlight(batch, sample_rows, hidden, logits)

    def _finish(self, rm: ResidentModel, fl: InFlight) -> None:
        """Wait for the step's tokens, let the policies decide, and append them."""
        if fl.tokens is None:
            result = self.sampler(fl.logits, fl.seqs)
            fl.tokens, logprobs = result.tokens, result.logprobs
            if rm.policies:
                fl.prepare(rm)
        else:
            logprobs = [None] * len(fl.seqs)
        token_list = fl.token_list()
        seqs = fl.seqs
        stale = fl.stale or ()
        rows = [i for i, s in enumerate(seqs) if s.status is not Status.FINISHED and i not in stale]
        if len(rows) < len(seqs):
            seqs, token_list, logprobs = [seqs[i] for i in rows], [token_list[i] for i in rows], [logprobs[i] for i in rows]
        token_list, decision = apply_policies(rm.name, rm.policies, fl, rows, token_list, logprobs)
        pause = decision.pause.tolist() if decision.pause is not None else [False] * len(seqs)
        hold = decision.hold.tolist() if decision.hold is not None else [False] * len(seqs)
        for i, seq in enumerate(seqs):
            if hold[i] or seq.propose_only:
                rm.scheduler.pause(seq)
                seq.held = hold[i]
                if seq.propose_only and not hold[i]:
                    if seq.vocab_limit and token_list[i] >= seq.vocab_limit:
                        token_list[i] = int(fl.logits[rows[i], : seq.vocab_limit].argmax())
                    self._outbox.append(StepOutput(seq.request_id, rm.name, [token_list[i]], logprobs=[
                        logprobs[i]] if logprobs[i] else [], proposed=True))
                continue
            source = decision.sources[i] if decision.sources else rm.name
            out = append_token(seq, token_list[i], source, logprobs[i])
            if out.finished:
                self._retire(rm, seq)
            elif pause[i]:
                rm.scheduler.pause(seq)
            self._outbox.append(out)

    def _finish_now(self, request_id: str, reason: str) -> None:
        with self._lock:
            seq = self.requests.get(request_id)
        if seq is None or seq.is_finished:
            return
        rm = self.models[seq.model]
        seq.finish_reason = reason
        self._outbox.append(finish_output(seq))
        self._retire(rm, seq)

    def _retire(self, rm: ResidentModel, seq: Sequence) -> None:
        seq.status = Status.FINISHED
        rm.scheduler.remove(seq)
        with self._lock:
            if self.requests.get(seq.request_id) is seq:
                del self.requests[seq.request_id]
        for hook in self.retire_hooks:
            hook(seq)

    # ----- in-process convenience -----

    def generate(
        self, prompts: Iterable[str | list[int]], params: SamplingParams | list[SamplingParams] | None = None,
        model: str | None = None,
    ) -> list[RequestOutput]:
        prompts = list(prompts)
        plist = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        ids = [f"gen-{id(self)}-{i}" for i in range(len(prompts))]
        for rid, prompt, p in zip(ids, prompts, plist):
            self.add_request(rid, prompt, p, model)
        return self.collect(ids)

    def collect(self, request_ids: list[str]) -> list[RequestOutput]:
        """Step until every one of these requests has finished; their outputs, in order."""
        results = {rid: RequestOutput(rid) for rid in request_ids}
        while any(r.finish_reason is None for r in results.values()):
            for out in self.step():
                result = results.get(out.request_id)
                if result is not None and result.finish_reason is None:
                    result.add(out)
        return [results[rid] for rid in request_ids]

    def stats(self) -> dict[str, dict]:
        return {
            name: {
                "num_blocks": rm.blocks.num_blocks,
                "free_blocks": rm.blocks.num_free,
                "block_size": rm.blocks.block_size,
                "kv_cache_bytes": rm.runner.kv_cache_bytes,
                "prefix_hit_tokens": rm.blocks.hit_tokens,
                "prefix_hit_rate": rm.blocks.hit_rate,
                "waiting": len(rm.scheduler.waiting),
                "running": len(rm.scheduler.running),
                "paused": len(rm.scheduler.paused),
            }
            for name, rm in self.models.items()
        }
