"""T2T, the text-to-text baseline of C2C, co-located: the sharer answers a background prompt with a
sentence of context; the receiver answers the question in a chat that holds that context."""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from c2c.stepping import Meter, detach, run_batch
from tandem.errors import InvalidRequestError, TandemError
from workers.chat import encode, render
from workers.engine import Engine, RequestOutput, SamplingParams, StepOutput
from workers.engine.sequence import Priority, Sequence

CONTEXT_PROMPT = ("In one clear sentence, describe the most essential background knowledge needed to answer "
                  "the question: {question}")


def context_messages(question: str, context_prompt: str = CONTEXT_PROMPT) -> list[dict[str, str]]:
    """The sharer's chat: asked for the background of `question`."""
    return [{"role": "user", "content": context_prompt.format(question=question)}]


def answer_messages(question: str, context: str, context_prompt: str = CONTEXT_PROMPT,
                    before: list[dict[str, str]] | None = None) -> list[dict[str, str]]:
    """The receiver's chat: `before` (e.g. a system message), the background request, the sharer's
    context as the answer, then the question."""
    return (list(before or []) + context_messages(question, context_prompt)
            + [{"role": "assistant", "content": context}, {"role": "user", "content": question}])


@dataclass
class T2TState:
    request_id: str
    question: str
    params: SamplingParams | None
    priority: Priority
    stats: dict[str, float] = field(default_factory=lambda: dict.fromkeys(
        ("sharer_s", "receiver_s", "context_tokens", "context_bytes", "kv_bytes_moved"), 0.0))


class T2T:
    """The text-to-text baseline: the sharer writes one sentence of background, the receiver answers with it."""

    def __init__(self, engine: Engine, receiver: str, sharer: str, context_tokens: int = 64,
                 context_prompt: str = CONTEXT_PROMPT):
        self.engine, self.context_tokens, self.context_prompt = engine, context_tokens, context_prompt
        self.receiver, self.sharer = engine.model(receiver), engine.model(sharer)
        self.states: dict[str, T2TState] = {}
        self.meter = Meter(engine)
        for name in {receiver, sharer}:
            engine.add_policy(name, self.meter.policy)
        engine.step_hooks.append(self.meter.tick)
        engine.retire_hooks.append(self._on_retire)

    def add_request(self, request_id: str, question: str, params: SamplingParams | None = None, *,
                    priority: Priority = Priority.NORMAL) -> None:
        if not isinstance(question, str) or not question:
            raise InvalidRequestError("question", "must be a non-empty string")
        if request_id in self.states or request_id in self.engine.requests:
            raise InvalidRequestError("request_id", f"{request_id!r} is already in use")
        tok = self.sharer.tokenizer
        ids = encode(tok, render(tok, context_messages(question, self.context_prompt), True))
        state = T2TState(request_id, question, params, priority)
        srid = f"{request_id}/sharer"
        self.states[request_id] = state
        self.meter.track(srid, state.stats, "sharer_s")
        try:
            self.engine.add_request(srid, ids, SamplingParams(max_tokens=self.context_tokens, temperature=0),
                                    self.sharer.name, priority)
        except Exception:
            self.states.pop(request_id)
            self.meter.untrack(srid)
            raise

    def abort(self, request_id: str) -> None:
        self.engine.abort(f"{request_id}/sharer")
        self.engine.abort(request_id)

    def generate(self, questions: Iterable[str], params: SamplingParams | None = None) -> list[RequestOutput]:
        return run_batch(self.engine, lambda rid, q: self.add_request(rid, q, params), questions, "t2t")

    def close(self) -> None:
        for rid in list(self.states):
            self.abort(rid)
        detach(self.engine, self.meter, [self.receiver.name, self.sharer.name], self.meter.tick, self._on_retire)

    def _on_retire(self, seq: Sequence) -> None:
        rid = seq.request_id
        if rid in self.states:
            self.meter.untrack(self.states.pop(rid).request_id)
            return
        if not rid.endswith("/sharer") or rid[: -len("/sharer")] not in self.states:
            return
        state = self.states[rid[: -len("/sharer")]]
        self.meter.untrack(rid)
        if seq.finish_reason not in ("stop", "length"):
            self.states.pop(state.request_id)
            self.engine.emit(StepOutput(state.request_id, self.receiver.name, finished=True, finish_reason="abort"))
            return
        context = seq.text.strip()
        state.stats["context_tokens"], state.stats["context_bytes"] = float(seq.num_output), float(len(context.encode()))
        messages = answer_messages(state.question, context, self.context_prompt)
        tok = self.receiver.tokenizer
        try:
            answer = self.engine.add_request(state.request_id, encode(tok, render(tok, messages, True)), state.params,
                                             self.receiver.name, state.priority, immediate=True)
        except TandemError as e:
            self.states.pop(state.request_id)
            self.engine.emit(StepOutput(state.request_id, self.receiver.name, finished=True, finish_reason="error",
                                        error=f"t2t: {e}"))
            return
        answer.stats = state.stats
        self.meter.track(state.request_id, state.stats, "receiver_s")
