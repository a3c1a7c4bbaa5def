"""The server's YAML config as pydantic models: server, models, workers, pipelines. Unknown keys are errors."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tandem.errors import TandemError


class ConfigError(TandemError):
    """A config file that does not validate; the message names each offending key."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ServerConfig(Strict):
    host: str = "127.0.0.1"
    port: int = Field(50051, ge=0, le=65535)
    max_message_mb: int = Field(64, ge=1, le=2047)
    max_queue: int = Field(1024, ge=0, description="requests waiting for admission before RESOURCE_EXHAUSTED")
    max_in_flight: int = Field(256, ge=1, description="requests admitted at once")
    drain_grace_s: float = Field(30.0, ge=0)
    session_ttl_s: float = Field(600.0, gt=0)
    max_sessions: int = Field(4096, ge=1)
    metrics_port: int | None = Field(None, ge=0, le=65535, description="Prometheus endpoint; 0 picks a port")
    worker_start_timeout_s: float = Field(300.0, gt=0)
    restart_backoff_s: float = Field(0.5, gt=0)
    restart_backoff_max_s: float = Field(30.0, gt=0)


class ModelEntry(Strict):
    name: str = Field(min_length=1)
    path: str = Field(min_length=1, description="a model directory, a .gguf file or a known model name")
    dtype: Literal["auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16"] = "auto"
    kv_cache_mb: float = Field(512.0, gt=0)
    block_size: int = Field(16, ge=1, le=4096, description="tokens per KV block, a power of two")
    max_model_len: int | None = Field(None, ge=1)

    @field_validator("block_size")
    @classmethod
    def _power_of_two(cls, value: int) -> int:
        if value & (value - 1):
            raise ValueError(f"must be a power of two, got {value}")
        return value


class WorkerEntry(Strict):
    models: list[str] = Field(min_length=1, description="names of entries under `models` hosted together")
    device: str = Field("cpu", pattern=r"^(cpu|cuda(:\d+)?)$")
    max_num_seqs: int = Field(64, ge=1)
    max_num_batched_tokens: int = Field(2048, ge=1)
    threads: int = Field(0, ge=0)


class TandemConfig(Strict):
    server: ServerConfig = ServerConfig()
    models: list[ModelEntry] = Field(min_length=1)
    workers: list[WorkerEntry] = Field(default_factory=list, description="empty: one worker hosting every model")
    pipelines: dict[str, dict[str, Any]] = Field(default_factory=lambda: {"single": {}})

    @model_validator(mode="after")
    def _check(self) -> TandemConfig:
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ValueError(f"models: names must be unique, got {names}")
        if not self.workers:
            self.workers = [WorkerEntry(models=names)]
        for i, w in enumerate(self.workers):
            unknown = [m for m in w.models if m not in names]
            if unknown:
                raise ValueError(f"workers.{i}.models: {unknown} are not defined under models {names}")
        from orchestrator.pipelines import REGISTRY

        for name, params in self.pipelines.items():
            if name not in REGISTRY:
                raise ValueError(f"pipelines.{name}: unknown pipeline; known: {sorted(REGISTRY)}")
            try:
                section = REGISTRY[name].Config.model_validate(params)
            except ValidationError as e:
                raise ValueError(f"pipelines.{name}: {format_errors(e)}") from None
            REGISTRY[name].check_config(section, self)
        return self

    def model(self, name: str) -> ModelEntry:
        return next(m for m in self.models if m.name == name)

    def pipeline_config(self, name: str) -> BaseModel:
        from orchestrator.pipelines import REGISTRY

        return REGISTRY[name].Config.model_validate(self.pipelines.get(name, {}))


def format_errors(e: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in e.errors())


def parse(data: dict[str, Any], source: str = "config") -> TandemConfig:
    try:
        return TandemConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"{source}: {format_errors(e)}") from None


def load(path: str | Path) -> TandemConfig:
    text = Path(path).read_text()
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return parse(data, str(path))


def from_model(path: str, name: str | None = None, **model_fields: Any) -> TandemConfig:
    """A one-model config: `tandem serve --model PATH`."""
    name = name or Path(path).name or "model"
    return parse({"models": [{"name": name, "path": str(path), **model_fields}],
                  "pipelines": {"single": {"model": name}}})


def default_config() -> TandemConfig:
    """The built-in default: the default installed model behind the `single` pipeline."""
    from tandem import assets

    return from_model(assets.DEFAULT_MODEL, name=assets.DEFAULT_MODEL)
