"""`r2r`: the SLM writes every token; a per-token decider inside the SLM worker's engine step flags the
path-divergent ones, and the LLM writes those instead (Roads to Rome, shared/research/r2r.md).

Placement follows the `workers:` entries: when one worker hosts both models the request is one routed
Generate there (co-located, the fast path: hand-offs never leave the engine step); otherwise the SLM's
worker ends each flagged step with a `handoff` and the orchestrator runs the LLM's worker and injects its
token back (disaggregated, `r2r_remote`).

Baselines in the same server: the SLM alone or the LLM alone is `single` with `model` set; random routing
at an LLM share p is `r2r` with decider `random` and threshold 1 - p; entropy routing is decider `entropy`."""
from __future__ import annotations

import contextlib
import json
from typing import AsyncIterator

from orchestrator.pipelines.base import PipelineRequest
from orchestrator.pipelines.r2r_config import R2RConfig, R2RParams, check_against_server
from orchestrator.pipelines.r2r_remote import run_disaggregated
from orchestrator.pipelines.single import MultiWorkerPipeline, relay_events
from orchestrator.workers import WorkerHandle
from tandem.errors import InvalidRequestError
from tandem.v1 import orchestrator_pb2 as pb
from tandem.v1 import worker_pb2 as wpb

DESCRIPTION = (
    "R2R token routing: the SLM writes every token and a per-token decider in its worker's step hands the "
    "flagged ones to the LLM (deciders: router, entropy, random, forced; threshold 0 sends every token to the "
    "LLM, 1 none). Baselines: decider random with threshold 1 - LLM share; decider entropy; the SLM or the LLM "
    "alone is pipeline single with model set. Final pipeline_stats: llm_token_share, llm_tokens, slm_tokens, "
    "router_s, llm_s.")


class R2R(MultiWorkerPipeline):
    name = "r2r"
    description = DESCRIPTION
    Config = R2RConfig
    Params = R2RParams
    typed_field = "r2r"

    def __init__(self, config: R2RConfig, pool):
        super().__init__(config, pool)
        self.thresholds = {d: config.default_threshold(d) for d in config.deciders}
        together = any(config.slm in w.models and config.llm in w.models for w in pool.config.workers)
        placement = "co-located (one worker hosts both)" if together else "disaggregated (hand-offs over RPC)"
        self.description = (f"{DESCRIPTION} SLM {config.slm!r}, LLM {config.llm!r}, {placement}; default decider "
                            f"{config.decider!r} at threshold {config.threshold}.")

    @classmethod
    def check_config(cls, config: R2RConfig, server) -> None:
        check_against_server(config, server, f"pipelines.{cls.name}")

    @classmethod
    def worker_args(cls, config: R2RConfig, models: list[str], server=None) -> list[str]:
        spec = config.worker_spec(models)
        return ["--r2r", json.dumps(spec)] if spec else []

    def models(self, params: R2RParams | None = None) -> list[str]:
        return [self.config.slm, self.config.llm]

    def parse_params(self, request: pb.GenerateRequest | pb.CreateSessionRequest) -> R2RParams:
        """Validated and resolved: the decider named, the threshold within the server's bounds."""
        params = super().parse_params(request)
        prefix = request.WhichOneof("pipeline_params") or "params"
        decider = params.decider or self.config.decider
        if decider not in self.thresholds:
            raise InvalidRequestError(f"{prefix}.decider", f"{decider!r} is not one of {sorted(self.thresholds)}")
        threshold = self.thresholds[decider] if params.threshold is None else params.threshold
        lo, hi = self.config.min_threshold, self.config.max_threshold
        if not lo <= threshold <= hi:
            raise InvalidRequestError(f"{prefix}.threshold",
                                      f"{threshold} is outside this server's bounds [{lo}, {hi}]")
        return R2RParams(decider=decider, threshold=threshold)

    def route(self, params: R2RParams) -> wpb.R2RRoute:
        return wpb.R2RRoute(enabled=True, decider=params.decider, threshold=params.threshold)

    def co_located(self) -> WorkerHandle | None:
        """A ready worker hosting both models, least busy first; None when there is none."""
        both = [h for h in self.pool.handles.values()
                if h.ready and self.config.slm in h.models and self.config.llm in h.models]
        return min(both, key=lambda h: h.busy) if both else None

    async def run(self, request: PipelineRequest) -> AsyncIterator[pb.Chunk | pb.Final]:
        handle = self.co_located()
        events = self._run_co_located(handle, request) if handle else run_disaggregated(self, request)
        try:
            async with contextlib.aclosing(events) as stream:
                async for event in stream:
                    yield event
        finally:
            self.forget(request.request_id)

    async def _run_co_located(self, handle: WorkerHandle,
                              request: PipelineRequest) -> AsyncIterator[pb.Chunk | pb.Final]:
        rid = request.request_id
        submission = wpb.WorkerGenerateRequest(
            request_id=rid, model=self.config.slm, prompt_token_ids=request.token_ids, sampling=request.sampling,
            priority=request.priority, route=self.route(request.params))
        self.active[rid] = [(handle, rid)]
        what = f"{self.config.slm!r} and {self.config.llm!r}"
        async with contextlib.aclosing(relay_events(handle, submission, request.timeout, what)) as events:
            async for event in events:
                yield event

