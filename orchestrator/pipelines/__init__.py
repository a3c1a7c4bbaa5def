"""Pipelines by name. A pipeline turns one request into worker calls (see `base.Pipeline`)."""
from __future__ import annotations

from orchestrator.pipelines.base import Params, Pipeline, PipelineRequest
from orchestrator.pipelines.r2r import R2R
from orchestrator.pipelines.single import Single

REGISTRY: dict[str, type[Pipeline]] = {Single.name: Single, R2R.name: R2R}


def register(cls: type[Pipeline]) -> type[Pipeline]:
    REGISTRY[cls.name] = cls
    return cls


__all__ = ["REGISTRY", "Params", "Pipeline", "PipelineRequest", "register"]
