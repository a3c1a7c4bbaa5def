"""The pipeline interface: typed server config, typed per-request params, and `run`, an async
generator over worker calls that yields Chunk messages and ends with one Final."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, AsyncIterator, ClassVar

from google.protobuf.json_format import MessageToDict
from pydantic import BaseModel, ConfigDict, ValidationError

from tandem.errors import InvalidRequestError
from tandem.v1 import orchestrator_pb2 as pb

if TYPE_CHECKING:
    from orchestrator.config import TandemConfig
    from orchestrator.workers import WorkerPool

FINISH_REASONS = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH, "abort": pb.FINISH_REASON_ABORT,
                  "released": pb.FINISH_REASON_ABORT, "error": pb.FINISH_REASON_ERROR}


def check_hosted(server: TandemConfig, key: str, roles: list[tuple[str, str]]) -> None:
    """Each (config key, model name) names a model defined under `models` and hosted by some `workers` entry."""
    names = [m.name for m in server.models]
    for role, name in roles:
        if name not in names:
            raise ValueError(f"{key}.{role}: {name!r} is not defined under models {names}")
        if not any(name in w.models for w in server.workers):
            raise ValueError(f"{key}.{role}: no entry of workers hosts {name!r}")


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")


@dataclass
class PipelineRequest:
    request_id: str
    token_ids: list[int]
    sampling: pb.SamplingParams
    params: Params
    priority: int = 0
    timeout: float | None = None
    text: str = ""                                   # the request's input as given, for pipelines that
    messages: list[dict[str, str]] | None = None     # re-render it (t2t); neither: token ids (or a session turn)


class Pipeline(ABC):
    name: ClassVar[str]
    description: ClassVar[str]
    Config: ClassVar[type[BaseModel]]   # the pipeline's section of the server config
    Params: ClassVar[type[Params]]      # per request: a typed oneof field or a Struct `params`
    typed_field: ClassVar[str] = ""     # the GenerateRequest oneof field carrying typed Params

    def __init__(self, config: BaseModel, pool: WorkerPool):
        self.config = config
        self.pool = pool

    @classmethod
    def check_config(cls, config: BaseModel, server: TandemConfig) -> None:
        """Checks of the pipeline's section against the rest of the server config (its models, workers);
        raise ValueError naming the key. Runs when the config loads."""

    @classmethod
    def worker_args(cls, config: BaseModel, models: list[str], server: TandemConfig | None = None) -> list[str]:
        """Extra command-line arguments of a spawned worker hosting `models` (e.g. r2r's `--r2r`); `server`
        is the whole config (c2c needs the paths of sharers hosted elsewhere)."""
        return []

    def parse_params(self, request: pb.GenerateRequest | pb.CreateSessionRequest) -> Params:
        which = request.WhichOneof("pipeline_params")
        if which == "params":
            data, prefix = MessageToDict(request.params), "params"
        elif which is None:
            data, prefix = {}, "params"
        elif which == self.typed_field:
            data = MessageToDict(getattr(request, which), preserving_proto_field_name=True)
            prefix = which
        else:
            raise InvalidRequestError(which, f"does not belong to pipeline {self.name!r}")
        try:
            return self.Params.model_validate(data)
        except ValidationError as e:
            err = e.errors()[0]
            loc = ".".join([prefix, *(str(p) for p in err["loc"])])
            raise InvalidRequestError(loc, err["msg"]) from None

    @abstractmethod
    def models(self, params: Params | None = None) -> list[str]:
        """The models a request with these params uses; the first one tokenizes its prompt."""

    @abstractmethod
    def run(self, request: PipelineRequest) -> AsyncIterator[pb.Chunk | pb.Final]:
        """Yield Chunk messages (one per engine step) and end with one Final."""

    @abstractmethod
    async def abort(self, request_id: str) -> bool:
        """Abort a request in its workers; True when it was running there. Idempotent."""
