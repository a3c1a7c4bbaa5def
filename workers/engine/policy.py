"""Per-token policies: run after each step over every sampled row of a model, batched."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from workers.engine.sequence import Sequence

if TYPE_CHECKING:
    from workers.engine.overlap import InFlight


@dataclass
class StepView:
    """What a policy sees of one model's step: one row per sequence that sampled a token."""

    model: str
    seqs: list[Sequence]
    hidden: torch.Tensor
    logits: torch.Tensor
    tokens: torch.Tensor
    logprobs: list[dict | None] | None = None
    prepared: torch.Tensor | None = None


@dataclass
class PolicyDecision:
    """Any field left None changes nothing. `tokens` replaces the sampled tokens; rows with
    `pause` set are held (KV kept, not scheduled) after their token is appended, for a hand-off;
    rows with `hold` set drop their token and wait, paused, for `Engine.inject` to give them one;
    `sources` tags each row's token with the model or path that produced it."""

    tokens: torch.Tensor | None = None
    pause: torch.Tensor | None = None
    hold: torch.Tensor | None = None
    sources: list[str] | None = None


class TokenPolicy(Protocol):
    def __call__(self, step: StepView) -> PolicyDecision | None: ...


@dataclass
class DeferredPolicy:
    """A policy in two halves, so that its model's steps stay overlapped (see `overlap`). `prepare` runs
    when the step is launched, with the sampled tokens still on the device: it queues the device work of
    the decision and returns one row per sequence (scores, say), or None; the engine copies that home
    without waiting. `decide` runs when the step lands and finds those rows, on the host, in
    `step.prepared`; its `tokens` are on the host too. By then the next step may have overwritten
    `step.hidden`, so `decide` must not read it."""

    prepare: Callable[[StepView], torch.Tensor | None]
    decide: Callable[[StepView], PolicyDecision | None]

    def __call__(self, step: StepView) -> PolicyDecision | None:
        return self.decide(step)


def apply_policies(model: str, policies: list[TokenPolicy], fl: InFlight, rows: list[int], token_list: list[int],
                   logprobs: list[dict | None]) -> tuple[list[int], PolicyDecision]:
    """Run a landed step's policies, in order, over its live `rows` (tokens already on the host); each
    sees the tokens the one before chose. The final tokens and the last decision given."""
    decision = PolicyDecision()
    if not policies or not rows:
        return token_list, decision
    full = len(rows) == len(fl.seqs)
    index = None if full else torch.tensor(rows, device=fl.logits.device)
    hidden, logits = (fl.hidden, fl.logits) if full else (fl.hidden[index], fl.logits[index])
    seqs, tokens = fl.seqs if full else [fl.seqs[i] for i in rows], torch.tensor(token_list)
    for k, policy in enumerate(policies):
        prepared = fl.prepared_rows(k)
        prepared = prepared if prepared is None or full else prepared[rows]
        decision = policy(StepView(model, seqs, hidden, logits, tokens, logprobs, prepared)) or decision
        tokens = decision.tokens if decision.tokens is not None else tokens
    return tokens.tolist(), decision
