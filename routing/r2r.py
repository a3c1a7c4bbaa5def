"""R2R inside one engine's step: the SLM proposes every token, a decider flags the path-divergent
ones, and the LLM writes those instead.

Co-located (`llm` is a model of the same engine): a flagged row drops its SLM token and is held; the
LLM's copy of the request (its shadow) is caught up with one extend over every token written since its
last call, prompt included on the first, and samples the token, which is injected into the SLM request.
The SLM has no KV for the dropped token, so nothing is rolled back. Every flagged row of a step is
extended in one LLM batch, in the same engine step (the SLM steps first).

With `llm_prefill="eager"` (co-located only) the shadow is made when the request arrives and prefills the
prompt without sampling, and the SLM starts once it has: the first hand-off is then a catch-up like any
other instead of a prompt-long prefill in the middle of the stream; the first token comes after both
prefills (as the LLM alone would give it, plus the SLM's prefill).

Disaggregated (`llm` None): a flagged row is held and a hand-off output carries the tokens the remote
LLM has not seen; the orchestrator runs the LLM worker and calls `Engine.inject` here with its token."""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from routing.deciders import Decider
from tandem.errors import InvalidRequestError
from workers.engine import (
    DeferredPolicy,
    Engine,
    PolicyDecision,
    RequestOutput,
    SamplingParams,
    StepOutput,
    StepView,
)
from workers.engine.engine import ResidentModel
from workers.engine.sequence import Priority, Sequence


def share_tokenizer(a: ResidentModel, b: ResidentModel) -> bool:
    """Whether every token id both resident models can write is the same token to both (tokens a tokenizer
    adds past the model's vocabulary, which it never writes, aside)."""
    n = min(a.runner.spec.vocab_size, b.runner.spec.vocab_size)
    return _writable(a, n) == _writable(b, n)


def _writable(model: ResidentModel, n: int) -> dict[str, int]:
    return {token: i for token, i in model.tokenizer.get_vocab().items() if i < n}


def llm_seed(seed: int) -> int:
    """The LLM copy's seed: one apart from the SLM's, within the 63 bits a seed may have."""
    return (seed + 1) % 2**63


@dataclass
class RouteState:
    slm_rid: str
    llm_rid: str
    decider: Decider
    threshold: float
    llm_seen: int = 0
    llm_started: bool = False
    slm_tokens: int = 0
    llm_tokens: int = 0
    router_s: float = 0.0
    llm_s: float = 0.0

    def stats(self) -> dict[str, float]:
        total = self.slm_tokens + self.llm_tokens
        return {"llm_tokens": self.llm_tokens, "slm_tokens": self.slm_tokens,
                "llm_token_share": self.llm_tokens / total if total else 0.0,
                "router_s": self.router_s, "llm_s": self.llm_s}


class R2R:
    def __init__(self, engine: Engine, slm: str, llm: str | None, deciders: Iterable[Decider], default: str = "",
                 llm_min_rows: int = 1, llm_max_wait_steps: int = 4, llm_prefill: str = "lazy",
                 llm_stream: bool = True):
        """Co-located, flagged rows wait (held) until `llm_min_rows` of them are pending, or the oldest has
        waited `llm_max_wait_steps` steps, so the LLM runs on bigger batches while the other rows go on.
        `llm_prefill`: "lazy" (the LLM sees the prompt at the first hand-off) or "eager" (at arrival).
        `llm_stream` (CUDA): the LLM's work goes on a stream of its own, so a catch-up runs beside the SLM
        step already launched on the token it replaces instead of behind it (each model's graphs are
        captured on their own stream, so the two never share a cuBLAS workspace)."""
        if llm_prefill not in ("lazy", "eager"):
            raise InvalidRequestError("llm_prefill", f'must be "lazy" or "eager", got {llm_prefill!r}')
        self.engine = engine
        self.eager = llm_prefill == "eager" and llm is not None
        self.llm_min_rows = max(1, llm_min_rows)
        self.llm_max_wait_steps = llm_max_wait_steps
        self.pending: list[tuple[Sequence, RouteState, int, int]] = []
        self.steps = 0
        self.prepare_s = 0.0
        self.slm = engine.model(slm)
        self.llm = engine.model(llm) if llm else None
        self.deciders = {d.name: d for d in deciders}
        if not self.deciders:
            raise InvalidRequestError("deciders", "R2R needs at least one decider")
        self.default = default or next(iter(self.deciders))
        if self.llm is not None:
            slm_spec, llm_spec = self.slm.runner.spec, self.llm.runner.spec
            if slm_spec.eos_token_ids != llm_spec.eos_token_ids:
                raise InvalidRequestError("llm", f"{slm!r} and {llm!r} do not share special tokens")
            if not share_tokenizer(self.slm, self.llm):
                raise InvalidRequestError("llm", f"{slm!r} and {llm!r} do not share one tokenizer")
        self.llm_stream = (torch.cuda.Stream(self.llm.runner.device)
                           if llm_stream and self.llm is not None and self.llm.runner.device.type == "cuda" else None)
        if self.llm_stream is not None:
            self.llm.stream = self.llm_stream
        self.states: dict[str, RouteState] = {}
        self.shadows: dict[str, RouteState] = {}
        self.awaiting_llm: set[str] = set()      # eager: SLM requests whose shadow has not read the prompt yet
        engine.add_policy(slm, DeferredPolicy(self._score_slm_step, self._on_slm_step))
        if self.llm is not None:
            engine.add_policy(llm, self._on_llm_step)
        engine.retire_hooks.append(self._on_retire)
        engine.step_hooks.append(self._after_step)

    @property
    def max_len(self) -> int:
        lens = [rm.runner.max_model_len for rm in (self.slm, self.llm) if rm is not None]
        return min(lens)

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None, *,
                    decider: str = "", threshold: float | None = None, priority: Priority = Priority.NORMAL,
                    cache_salt: str = "") -> Sequence:
        name = decider or self.default
        if name not in self.deciders:
            raise InvalidRequestError("decider", f"unknown decider {name!r}; known: {sorted(self.deciders)}")
        d = self.deciders[name]
        threshold = d.default_threshold if threshold is None else threshold
        if not isinstance(threshold, (int, float)) or not 0.0 <= threshold <= 1.0:
            raise InvalidRequestError("threshold", f"must be within [0, 1], got {threshold}")
        state = RouteState(request_id, f"{request_id}/llm", d, float(threshold))
        self.states[request_id] = state
        try:
            seq = self.engine.add_request(request_id, prompt, params, self.slm.name, priority, cache_salt=cache_salt,
                                          paused=self.eager, max_len=self.max_len)
        except Exception:
            self.states.pop(request_id, None)
            raise
        seq.stats = state.stats()
        if self.eager:
            self.engine.call(lambda: self._start_eagerly(seq, state))
        return seq

    def generate(self, prompts: Iterable[str | list[int]], params: SamplingParams | None = None, **route) -> list[RequestOutput]:
        ids = []
        for i, prompt in enumerate(prompts):
            rid = f"r2r-{id(self)}-{time.monotonic_ns()}-{i}"
            self.add_request(rid, prompt, params, **route)
            ids.append(rid)
        return self.engine.collect(ids)

    # ----- on the engine's thread -----

    def _groups(self, step: StepView) -> dict[str, list[int]]:
        by_decider: dict[str, list[int]] = {}
        for i, s in enumerate(step.seqs):
            state = self.states.get(s.request_id)
            if state is not None:
                by_decider.setdefault(state.decider.name, []).append(i)
        return by_decider

    def _score_slm_step(self, step: StepView) -> torch.Tensor | None:
        """At launch, on the device: the scores of the rows whose deciders score there (NaN elsewhere)."""
        t0 = time.perf_counter()
        groups = {n: idx for n, idx in self._groups(step).items() if self.deciders[n].on_device}
        if not groups:
            return None
        if len(groups) == 1 and len(next(iter(groups.values()))) == len(step.seqs):
            scores = self.deciders[next(iter(groups))].scores(step).float()
        else:
            scores = torch.full((len(step.seqs),), float("nan"), device=step.logits.device)
            for name, idx in groups.items():
                scores[idx] = self.deciders[name].scores(_rows(step, idx)).float()
        self.prepare_s += time.perf_counter() - t0
        return scores

    def _on_slm_step(self, step: StepView) -> PolicyDecision | None:
        by_decider = self._groups(step)
        if not by_decider:
            return None
        t0 = time.perf_counter()
        rows = [i for idx in by_decider.values() for i in idx]
        fire = torch.zeros(len(step.seqs), dtype=torch.bool)
        for name, idx in by_decider.items():
            sub = _rows(step, idx)
            thresholds = torch.tensor([self.states[s.request_id].threshold for s in sub.seqs])
            fire[idx] = self.deciders[name].decide(sub, thresholds)
        fired = fire.tolist()
        router_s = (time.perf_counter() - t0 + self.prepare_s) / len(rows)
        self.prepare_s = 0.0
        tokens = step.tokens.tolist() if any(fired) else []
        for i in rows:
            seq = step.seqs[i]
            state = self.states[seq.request_id]
            state.router_s += router_s
            if fired[i] and self.llm is not None and self.llm_min_rows > 1:
                self.pending.append((seq, state, self.steps, tokens[i]))
            elif fired[i] and not self._hand_off(seq, state):
                fire[i] = False
            if not fire[i]:
                state.slm_tokens += 1
            seq.stats = state.stats()
        return PolicyDecision(hold=fire)

    def _after_step(self) -> None:
        self.steps += 1
        self._start_prefilled()
        self._flush()

    def _start_eagerly(self, seq: Sequence, state: RouteState) -> None:
        """On the engine's thread, right after the (paused) SLM request arrived: the shadow reads the prompt
        first; the SLM goes at once when there is no prompt to read or the LLM cannot take it."""
        if seq.is_finished:
            return
        if len(seq.token_ids) > 1:
            try:
                self._start_llm(seq, state, sample=False, immediate=True)
                self.awaiting_llm.add(seq.request_id)
                return
            except InvalidRequestError:
                pass
        self.engine.resume(seq.request_id)

    def _start_prefilled(self) -> None:
        """Eager: let each SLM request go once its shadow has read the prompt (or is gone)."""
        for slm_rid in list(self.awaiting_llm):
            shadow = self.engine.requests.get(self.states[slm_rid].llm_rid)
            if shadow is None or shadow.num_uncomputed == 0:
                self.awaiting_llm.discard(slm_rid)
                self.engine.resume(slm_rid)

    def _flush(self) -> None:
        """Hand off the pending rows together once there are enough of them, one has waited too long, or
        nothing else is left for the SLM to run."""
        if not self.pending:
            return
        enough = len(self.pending) >= min(self.llm_min_rows, len(self.states))
        stale = self.steps - self.pending[0][2] >= self.llm_max_wait_steps
        if not (enough or stale or not self.slm.scheduler.running):
            return
        pending, self.pending = self.pending, []
        for seq, state, _, token in pending:
            if seq.is_finished:
                continue
            if not self._hand_off(seq, state):
                state.slm_tokens += 1
                self.engine.inject(seq.request_id, token, self.slm.name)

    def _hand_off(self, seq: Sequence, state: RouteState) -> bool:
        """Send the tokens the LLM has not seen; False when the LLM cannot take them (then the SLM's token stands)."""
        delta = seq.token_ids[state.llm_seen :]
        if self.llm is None:
            self.engine.emit(StepOutput(seq.request_id, self.slm.name, handoff=list(delta)))
        elif not state.llm_started:
            try:
                self._start_llm(seq, state, sample=True, immediate=True)
            except InvalidRequestError:
                return False
        else:
            try:
                self.engine.extend(state.llm_rid, delta, sample=True)
            except InvalidRequestError:
                return False
        state.llm_seen = len(seq.token_ids)
        return True

    def _start_llm(self, seq: Sequence, state: RouteState, sample: bool, immediate: bool) -> None:
        """The LLM's copy of the request; it samples when `sample`. Without sampling it stops one token short,
        so that the first hand-off always brings a token to compute and sample from."""
        params = dataclasses.replace(seq.params, detokenize=False, stop=[])
        if seq.params.seed is not None:
            params = dataclasses.replace(params, seed=llm_seed(seq.params.seed))
        end = len(seq.token_ids) - (0 if sample else 1)
        self.engine.add_request(state.llm_rid, seq.token_ids[state.llm_seen : end], params, self.llm.name,
                                seq.priority, sample=sample, cache_salt=seq.cache_salt, immediate=immediate)
        state.llm_started = True
        state.llm_seen = end
        self.shadows[state.llm_rid] = state

    def _on_llm_step(self, step: StepView) -> PolicyDecision | None:
        rows = [i for i, s in enumerate(step.seqs) if s.request_id in self.shadows]
        if not rows:
            return None
        hold = torch.zeros(len(step.seqs), dtype=torch.bool)
        hold[rows] = True
        tokens = step.tokens.tolist()
        vocab = self.slm.runner.spec.vocab_size
        llm_s = (time.perf_counter() - self.llm.step_started) / len(rows)
        for i in rows:
            state = self.shadows[step.seqs[i].request_id]
            token = tokens[i] if tokens[i] < vocab else int(step.logits[i, :vocab].argmax())
            state.llm_tokens += 1
            state.llm_s += llm_s
            slm_seq = self.engine.requests.get(state.slm_rid)
            if slm_seq is not None:
                slm_seq.stats = state.stats()
                logprob = step.logprobs[i] if step.logprobs else None
                self.engine.inject(state.slm_rid, token, self.llm.name, logprob)
        return PolicyDecision(hold=hold)

    def _on_retire(self, seq: Sequence) -> None:
        self.awaiting_llm.discard(seq.request_id)
        state = self.states.pop(seq.request_id, None)
        if state is not None:
            if self.shadows.pop(state.llm_rid, None) is not None:
                self.engine.release(state.llm_rid)
            return
        state = self.shadows.pop(seq.request_id, None)
        if state is not None and state.slm_rid in self.engine.requests:
            self.engine.abort(state.slm_rid)


def _rows(step: StepView, idx: list[int]) -> StepView:
    if len(idx) == len(step.seqs):
        return step
    t = torch.tensor(idx, device=step.logits.device)
    return StepView(step.model, [step.seqs[i] for i in idx], step.hidden[t], step.logits[t], step.tokens[t.to(step.tokens.device)],
                    [step.logprobs[i] for i in idx] if step.logprobs else None,
                    step.prepared[idx] if step.prepared is not None else None)
