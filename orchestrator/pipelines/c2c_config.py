"""The `c2c` pipeline's config section and per-request params, and the checks that run when the config
loads: the receiver and every sharer defined and hosted, and each fuser checkpoint made for exactly the
pair of configured models (receiver, sharer)."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field, model_validator

from c2c.fuser import MODES
from orchestrator.pipelines.base import Params, check_hosted
from orchestrator.pipelines.r2r_config import resolve

if TYPE_CHECKING:
    from orchestrator.config import TandemConfig


class C2CConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    receiver: str = Field(min_length=1, description="the model that answers, from the fused cache")
    sharers: dict[str, str] = Field(min_length=1, description="sharer model -> fuser checkpoint directory "
                                    "(`tandem c2c train --out`), trained for that sharer and this receiver")
    mode: str = Field("sequential", description="several sharers: sequential (each fuser reads the entries fused "
                      "before it) or parallel (residuals added)")

    @model_validator(mode="after")
    def _check(self) -> C2CConfig:
        if self.mode not in MODES:
            raise ValueError(f"mode: {self.mode!r} is not one of {list(MODES)}")
        self.sharers = {name: str(Path(d).expanduser().resolve()) for name, d in self.sharers.items()}
        return self

    def worker_spec(self, hosted: list[str], server: TandemConfig) -> dict | None:
        """What a worker hosting `hosted` needs to be this pipeline's receiver (`--c2c`), or None."""
        if self.receiver not in hosted:
            return None
        return {"receiver": self.receiver, "mode": self.mode,
                "sharers": {name: {"checkpoint": d, "path": server.model(name).path} for name, d in self.sharers.items()}}


class C2CParams(Params):
    sharers: list[str] = Field(default_factory=list, description="configured sharers this request uses, in "
                               "configured order; empty: all of them")


def check_against_server(config: C2CConfig, server: TandemConfig, key: str) -> None:
    from c2c import checkpoint
    from tandem.errors import CheckpointError

    check_hosted(server, key, [("receiver", config.receiver)] + [(f"sharers.{n}", n) for n in config.sharers])
    if config.receiver in config.sharers:
        raise ValueError(f"{key}.sharers.{config.receiver}: the receiver cannot be its own sharer")
    def read(name: str, what: str):
        try:
            return checkpoint.ModelId.read(resolve(server.model(name).path, f"models {name!r}"))
        except CheckpointError as e:
            raise ValueError(f"{key}.{what}: {e}") from None

    receiver = read(config.receiver, "receiver")
    for name, directory in config.sharers.items():
        pair = checkpoint.Pair(receiver, read(name, f"sharers.{name}"))
        try:
            trained_for, _, _ = checkpoint.read_config(directory)
        except CheckpointError as e:
            raise ValueError(f"{key}.sharers.{name}: {e}") from None
        if trained_for != pair:
            raise ValueError(f"{key}.sharers.{name}: fuser checkpoint {directory} was trained for {trained_for}; "
                             f"the configured models are {pair}")
