"""`c2c`: cache-to-cache fusion. Sharers prefill the prompt, a learned fuser per sharer rewrites the
receiver's KV cache of it, and the receiver answers alone from the fused cache (`c2c/`, docs/c2c.md).

Every request is one c2c Generate on a worker hosting the receiver, which owns the fusers (`--c2c`). A
worker hosting the receiver and the request's sharers does everything inside its engine (co-located: the
sharers' KV is read and the fused entries written by pointer). Sharers it does not host are remote: the
worker's first step names what each must send, and the orchestrator has a worker hosting that sharer
prefill its ids, exports the open-gate layers and hands them to the receiver's worker with FuseKV
(disaggregated, `c2c_remote`). The receiver's steps are relayed to the client either way."""
from __future__ import annotations

import contextlib
import json
from typing import AsyncIterator

from tandem.status import not_found
from orchestrator.pipelines.base import PipelineRequest
from orchestrator.pipelines.c2c_config import C2CConfig, C2CParams, check_against_server
from orchestrator.pipelines.c2c_remote import Transfer, feed_sharers
from orchestrator.pipelines.single import MultiWorkerPipeline, chunk_of, final_of, relay
from orchestrator.workers import WorkerHandle
from tandem.v1 import orchestrator_pb2 as pb
from tandem.v1 import worker_pb2 as wpb

DESCRIPTION = (
    "C2C cache-to-cache fusion: the sharers prefill the prompt, their fusers write into the receiver's KV cache "
    "of it, and the receiver answers alone. Params: sharers (a subset of the configured ones; empty: all). "
    "Baselines: the receiver alone is pipeline single with model set; text-to-text is pipeline t2t. Final "
    "pipeline_stats: sharer_s, fuser_s, receiver_s, kv_bytes_moved (co-located: KV read and written on the "
    "worker; disaggregated: KV bytes sent between workers, with transfer_s), kv_bytes_sharer, kv_bytes_receiver, "
    "kv_bytes_fused, fused_layers, fused_tokens.")


class C2C(MultiWorkerPipeline):
    name = "c2c"
    description = DESCRIPTION
    Config = C2CConfig
    Params = C2CParams
    typed_field = "c2c"

    def __init__(self, config: C2CConfig, pool):
        super().__init__(config, pool)
        models = {config.receiver, *config.sharers}
        together = any(models <= set(w.models) for w in pool.config.workers)
        placement = ("co-located (one worker hosts the receiver and every sharer)" if together
                     else "disaggregated (sharer KV sent between workers)")
        self.description = (f"{DESCRIPTION} Receiver {config.receiver!r}, sharers {list(config.sharers)}, "
                            f"mode {config.mode}, {placement}.")

    @classmethod
    def check_config(cls, config: C2CConfig, server) -> None:
        check_against_server(config, server, f"pipelines.{cls.name}")

    @classmethod
    def worker_args(cls, config: C2CConfig, models: list[str], server=None) -> list[str]:
        spec = config.worker_spec(models, server) if server is not None else None
        return ["--c2c", json.dumps(spec)] if spec else []

    def models(self, params: C2CParams | None = None) -> list[str]:
        return [self.config.receiver, *((params.sharers if params else None) or self.config.sharers)]

    def parse_params(self, request: pb.GenerateRequest | pb.CreateSessionRequest) -> C2CParams:
        """Resolved: the request's sharers, in configured order; one that is not a sharer is NOT_FOUND."""
        params = super().parse_params(request)
        prefix = request.WhichOneof("pipeline_params") or "params"
        for name in params.sharers:
            if name not in self.config.sharers:
                raise not_found(f"{prefix}.sharers: {name!r} is not a sharer of pipeline {self.name!r}; "
                                f"sharers: {list(self.config.sharers)}")
        return C2CParams(sharers=[n for n in self.config.sharers if not params.sharers or n in params.sharers])

    def receiver_worker(self, sharers: list[str]) -> WorkerHandle:
        """A ready worker hosting the receiver: one hosting the most of `sharers` first, then the least busy."""
        hosts = [h for h in self.pool.handles.values() if h.ready and self.config.receiver in h.models]
        if not hosts:
            return self.pool.pick(self.config.receiver)    # NOT_FOUND or UNAVAILABLE, naming the receiver
        return min(hosts, key=lambda h: (-sum(s in h.models for s in sharers), h.busy))

    async def run(self, request: PipelineRequest) -> AsyncIterator[pb.Chunk | pb.Final]:
        rid, receiver = request.request_id, self.config.receiver
        handle = self.receiver_worker(request.params.sharers)
        submission = wpb.WorkerGenerateRequest(
            request_id=rid, model=receiver, prompt_token_ids=request.token_ids, sampling=request.sampling,
            priority=request.priority, c2c=wpb.C2CRoute(enabled=True, sharers=request.params.sharers, messages=[
                pb.ChatMessage(role=m["role"], content=m["content"]) for m in request.messages or []]))
        self.active[rid] = [(handle, rid)]
        transfer: Transfer | None = None
        try:
            async with contextlib.aclosing(relay(handle, submission, request.timeout, repr(receiver))) as steps:
                async for step in steps:
                    if step.c2c_need:
                        transfer = await feed_sharers(self, handle, request, list(step.c2c_need))
                        continue
                    if step.token_ids or step.text:
                        yield chunk_of(step)
                    if step.finished:
                        yield _final(step, transfer)
        finally:
            self.forget(rid)


def _final(step: wpb.WorkerStep, transfer: Transfer | None) -> pb.Final:
    """The receiver's worker reports its fuser and receiver times and the KV it read and wrote; with
    remote sharers, their prefill time, the transfer time and the bytes sent are measured here."""
    final = final_of(step)
    if transfer is not None:
        stats = final.pipeline_stats
        stats["sharer_s"] = stats["sharer_s"] + transfer.sharer_s
        stats["transfer_s"] = transfer.transfer_s
        stats["kv_bytes_moved"] = float(transfer.bytes)
    return final
