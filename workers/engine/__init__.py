"""The engine: paged KV, continuous batching, sampling, per-token policies, several models in one loop."""
from __future__ import annotations

from workers.engine.config import EngineConfig, ModelConfig
from workers.engine.engine import Engine
from workers.engine.outputs import KVSlice, RequestOutput, StepOutput, Usage
from workers.engine.policy import DeferredPolicy, PolicyDecision, StepView, TokenPolicy
from workers.engine.sampling_params import SamplingParams
from workers.engine.sequence import Priority

__all__ = [
    "DeferredPolicy", "Engine", "EngineConfig", "KVSlice", "ModelConfig", "PolicyDecision", "Priority", "RequestOutput",
    "SamplingParams", "StepOutput", "StepView", "TokenPolicy", "Usage",
]
