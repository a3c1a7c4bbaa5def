"""Per-token policies: run after each step over every sampled row of a model, batched."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from workers.engine.sequence import Sequence


@dataclass
class StepView:
    """What a policy sees of one model's step: one row per sequence that sampled a token."""

    model: str
    seqs: list[Sequence]
    hidden: torch.Tensor
    logits: torch.Tensor
    tokens: torch.Tensor
    logprobs: list[dict | None] | None = None


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
