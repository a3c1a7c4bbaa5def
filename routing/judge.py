"""Judges for R2R labels: at a position where the SLM's token differs from the LLM's, did the meaning
diverge? A judge is a class behind the `Judge` protocol, chosen by name from `JUDGES`."""
from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from tandem.datasets import GSM8K_STOP, MathItem, extract_answer
from workers.chat import encode, render
from workers.engine import Engine, RequestOutput, SamplingParams

SENTENCE_END = (".", "!", "?", "\n")
JUDGE_SYSTEM = (
    "You compare two continuations of the same text. They share the context and differ from the token "
    "marked <<...>> on. Answer 1 if the difference changes the meaning, the reasoning, a number, the logic "
    "or the conclusion, adds information or contradicts the other. Answer 0 if it is only superficial: "
    "wording, formatting, punctuation or an equivalent phrasing. Reply with a single digit, 0 or 1.")
JUDGE_USER = (
    "Question:\n{question}\n\nCommon context:\n{context}\n\nContinuation A:\n{a}\n\nContinuation B:\n{b}\n\n"
    "Does continuation A differ in meaning from continuation B? Answer 0 (same meaning) or 1 (diverged).")


@dataclass
class StageCost:
    requests: int = 0
    prefill_tokens: int = 0
    generated_tokens: int = 0
    seconds: float = 0.0

    def add(self, other: StageCost) -> None:
        for k in vars(self):
            setattr(self, k, getattr(self, k) + getattr(other, k))


@dataclass
class CostBook:
    stages: dict[str, StageCost] = field(default_factory=dict)

    def stage(self, name: str) -> StageCost:
        return self.stages.setdefault(name, StageCost())

    def record(self, name: str, outputs: list[RequestOutput], seconds: float) -> None:
        s = self.stage(name)
        s.requests += len(outputs)
        s.seconds += seconds
        for o in outputs:
            if o.usage is not None:
                s.prefill_tokens += o.usage.prompt_tokens - o.usage.cached_tokens
                s.generated_tokens += o.usage.completion_tokens


@dataclass
class Case:
    item: MathItem
    prompt: list[int]
    response: list[int]
    pos: int
    slm_token: int

    @property
    def forked(self) -> list[int]:
        return self.prompt + self.response[: self.pos] + [self.slm_token]


@dataclass
class Verdict:
    label: int | None            # 0: same meaning, 1: diverged, None: the judge gave no usable answer
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class JudgeContext:
    engine: Engine
    llm: str
    cost: CostBook
    continuation_tokens: int = 32
    max_new_tokens: int = 256
    _ends: dict[int, bool] = field(default_factory=dict)

    @property
    def tokenizer(self):
        return self.engine.model(self.llm).tokenizer

    @property
    def eos_ids(self) -> set[int]:
        return set(self.engine.model(self.llm).runner.spec.eos_token_ids)

    @property
    def max_prompt_tokens(self) -> int:
        return self.engine.model(self.llm).runner.max_model_len - 16

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def ends_sentence(self, token: int) -> bool:
        if token not in self._ends:
            text = self.tokenizer.decode([token], skip_special_tokens=False)
            self._ends[token] = token in self.eos_ids or any(c in text for c in SENTENCE_END)
        return self._ends[token]

    def generate(self, stage: str, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]):
        if not prompts:
            return []
        t0 = time.perf_counter()
        outs = self.engine.generate(prompts, params, model=self.llm)
        self.cost.record(stage, outs, time.perf_counter() - t0)
        return outs


class Judge(Protocol):
    name: ClassVar[str]

    def __init__(self, ctx: JudgeContext) -> None: ...

    def __call__(self, cases: list[Case]) -> list[Verdict]: ...


JUDGES: dict[str, Callable[[JudgeContext], Judge]] = {}


def register(cls):
    JUDGES[cls.name] = cls
    return cls


def make_judge(name: str, ctx: JudgeContext) -> Judge:
    if name not in JUDGES:
        raise ValueError(f"unknown judge {name!r}; known: {', '.join(sorted(JUDGES))}")
    return JUDGES[name](ctx)


def parse_binary(text: str) -> int | None:
    m = re.search(r"[01]", text)
    return int(m.group()) if m else None


@register
class LLMJudge:
    """The LLM continues from the fork with the SLM's token to the end of the sentence (A) and is shown
    its own original sentence (B); then, with a fixed prompt, says 0 (same meaning) or 1 (diverged)."""

    name = "llm"

    def __init__(self, ctx: JudgeContext):
        self.ctx = ctx

    def __call__(self, cases: list[Case]) -> list[Verdict]:
        ctx = self.ctx
        pending = [i for i, c in enumerate(cases) if not ctx.ends_sentence(c.slm_token)]
        params = SamplingParams(max_tokens=ctx.continuation_tokens, temperature=0, stop=list(SENTENCE_END))
        outs = ctx.generate("continuation", [cases[i].forked for i in pending], params)
        tails: dict[int, list[int]] = {i: o.token_ids for i, o in zip(pending, outs)}
        pairs = [(self._marked(c.slm_token, tails.get(i, [])), self._marked(*self._own_sentence(c)))
                 for i, c in enumerate(cases)]
        prompts = [self._prompt(c, a, b) for c, (a, b) in zip(cases, pairs)]
        fits = [i for i, p in enumerate(prompts) if p is not None]
        answers = ctx.generate("judge", [prompts[i] for i in fits], SamplingParams(max_tokens=8, temperature=0))
        raw = dict(zip(fits, (o.text for o in answers)))
        return [Verdict(parse_binary(raw[i]) if i in raw else None,
                        {"pos": c.pos, "a": a, "b": b, "raw": raw.get(i, "(judge prompt too long)")})
                for i, (c, (a, b)) in enumerate(zip(cases, pairs))]

    def _own_sentence(self, case: Case) -> tuple[int, list[int]]:
        rest = case.response[case.pos + 1 : case.pos + 1 + self.ctx.continuation_tokens]
        if self.ctx.ends_sentence(case.response[case.pos]):
            return case.response[case.pos], []
        for n, t in enumerate(rest):
            if self.ctx.ends_sentence(t):
                return case.response[case.pos], rest[: n + 1]
        return case.response[case.pos], rest

    def _marked(self, token: int, tail: list[int]) -> str:
        return f"<<{self.ctx.decode([token])}>>{self.ctx.decode(tail)}"

    def _prompt(self, case: Case, a: str, b: str) -> list[int] | None:
        """The judge prompt; the common context loses tokens from its start if the prompt would not fit."""
        context, limit = case.response[: case.pos], self.ctx.max_prompt_tokens
        while True:
            user = JUDGE_USER.format(question=case.item.question, context=self.ctx.decode(context), a=a, b=b)
            messages = [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": user}]
            ids = encode(self.ctx.tokenizer, render(self.ctx.tokenizer, messages, True))
            if len(ids) <= limit:
                return ids
            if not context:
                return None
            context = context[len(ids) - limit :]


@register
class AnswerJudge:
    """For tasks with a checkable answer: the LLM continues from the fork with the SLM's token to the end
    of its answer; divergent iff the final answer differs from the one in the LLM's original response."""

    name = "answer"

    def __init__(self, ctx: JudgeContext):
        self.ctx = ctx

    def __call__(self, cases: list[Case]) -> list[Verdict]:
        ctx = self.ctx
        pending = [i for i, c in enumerate(cases) if c.slm_token not in ctx.eos_ids]
        params = [SamplingParams(max_tokens=max(1, ctx.max_new_tokens - cases[i].pos - 1), temperature=0,
                                 stop=GSM8K_STOP) for i in pending]
        outs = ctx.generate("continuation", [cases[i].forked for i in pending], params)
        tails: dict[int, list[int]] = {i: o.token_ids for i, o in zip(pending, outs)}
        verdicts = []
        for i, c in enumerate(cases):
            original = extract_answer(ctx.decode(c.response))
            forked = extract_answer(ctx.decode(c.response[: c.pos] + [c.slm_token] + tails.get(i, [])))
            verdicts.append(Verdict(int(forked != original), {"pos": c.pos, "original": original, "forked": forked}))
        return verdicts
