"""Typed configuration of one engine: its resident models and its scheduler budget."""
from __future__ import annotations

from dataclasses import dataclass, field

from tandem.errors import InvalidRequestError


@dataclass
class ModelConfig:
    name: str
    path: str
    dtype: str = "auto"
    device: str = "cpu"
    block_size: int = 16
    kv_cache_mb: float = 512.0
    max_model_len: int | None = None
    cuda_graphs: bool = True
    cpu_packed_linear: bool = True
    max_graph_batch: int = 256

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise InvalidRequestError("block_size", f"must be a power of two, got {self.block_size}")
        if self.kv_cache_mb <= 0:
            raise InvalidRequestError("kv_cache_mb", f"must be positive, got {self.kv_cache_mb}")


@dataclass
class EngineConfig:
    models: list[ModelConfig] = field(default_factory=list)
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 64
    enable_prefix_caching: bool = True
    seed: int = 0
    overlap: bool = True                  # CUDA: launch the next decode step before reading this one's tokens
    policy_stream: bool = True            # CUDA: a step's deferred policies (R2R's router) run beside the next step

    def __post_init__(self) -> None:
        if not self.models:
            raise InvalidRequestError("models", "an engine needs at least one model")
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise InvalidRequestError("models", f"model names must be unique, got {names}")
        if self.max_num_batched_tokens < 1:
            raise InvalidRequestError("max_num_batched_tokens", "must be at least 1")
        if self.max_num_seqs < 1:
            raise InvalidRequestError("max_num_seqs", "must be at least 1")
