"""Pipelines by name. A pipeline turns one request into worker calls (see `base.Pipeline`)."""
from __future__ import annotations

from orchestrator.pipelines.base import Params, Pipeline, PipelineRequest
from orchestrator.pipelines.c2c import C2C
from orchestrator.pipelines.r2r import R2R
from orchestrator.pipelines.single import Single
from orchestrator.pipelines.t2t import T2T

REGISTRY: dict[str, type[Pipeline]] = {Single.name: Single, R2R.name: R2R, C2C.name: C2C, T2T.name: T2T}


def register(cls: type[Pipeline]) -> type[Pipeline]:
    REGISTRY[cls.name] = cls
    return cls


__all__ = ["REGISTRY", "Params", "Pipeline", "PipelineRequest", "register"]
