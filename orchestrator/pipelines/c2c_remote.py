"""C2C disaggregated: the sharers' side of a c2c request when the receiver's worker does not host them.

For each remote sharer named in the receiver worker's first step (its C2CNeed), concurrently: a worker
hosting the sharer prefills the given ids (`<rid>/sharer/<name>`, prefill_only), and once it streams
`ready` the orchestrator exports the needed layers' entries of tokens [0, N-1) (one ExportKV per contiguous
run of layers), releases the sharer's request, and gives the entries to the receiver's worker with FuseKV,
which checks them in full before it keeps anything and fuses once every sharer has sent its part."""
from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc

from c2c.colocated import runs
from tandem.status import StatusError
from orchestrator.pipelines.base import PipelineRequest
from orchestrator.pipelines.single import read_to_end, relay
from orchestrator.workers import worker_error
from orchestrator.workers import WorkerHandle
from tandem.errors import InvalidRequestError
from tandem.v1 import orchestrator_pb2 as pb
from tandem.v1 import worker_pb2 as wpb

if TYPE_CHECKING:
    from orchestrator.pipelines.c2c import C2C


class SharerEnded(Exception):
    """A remote sharer's request ended before its prefill was ready (aborted, or its worker failed)."""


@dataclass
class Transfer:
    sharer_s: float = 0.0     # summed over remote sharers: Generate until `ready`
    transfer_s: float = 0.0   # summed: ExportKV, Release and FuseKV
    bytes: int = 0            # K and V bytes sent to the receiver's worker


async def feed_sharers(pipeline: C2C, receiver: WorkerHandle, request: PipelineRequest,
                       needs: list[wpb.C2CNeed]) -> Transfer:
    """Run every remote sharer of the request and hand its entries to the receiver's worker. After an abort
    of the request this returns early (the receiver's stream then ends with the abort)."""
    transfer = Transfer()
    for need in needs:
        _check_fits(pipeline, need)
    tasks = [asyncio.create_task(_feed_one(pipeline, receiver, request, need, transfer)) for need in needs]
    try:
        await asyncio.gather(*tasks)
    except (SharerEnded, StatusError) as e:
        if request.request_id in pipeline.aborted:
            return transfer
        if isinstance(e, SharerEnded):
            raise StatusError(grpc.StatusCode.INTERNAL, str(e)) from None
        raise
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return transfer


def _check_fits(pipeline: C2C, need: wpb.C2CNeed) -> None:
    """The sharer prefills N-1 tokens: they must fit its context and its KV pool (as co-located)."""
    info = pipeline.pool.model_info(need.sharer)
    limits = [n for n in (info.max_model_len, info.num_blocks * info.block_size) if n > 0]
    if limits and len(need.token_ids) >= min(limits):
        raise InvalidRequestError("prompt", f"{len(need.token_ids) + 1} tokens do not fit sharer {need.sharer!r}'s "
                                  f"{min(limits)} tokens")


async def _feed_one(pipeline: C2C, receiver: WorkerHandle, request: PipelineRequest, need: wpb.C2CNeed,
                    transfer: Transfer) -> None:
    rid, name = request.request_id, need.sharer
    srid, n = f"{rid}/sharer/{name}", len(need.token_ids)
    handle = pipeline.pool.pick(name)
    started = time.perf_counter()
    submission = wpb.WorkerGenerateRequest(
        request_id=srid, model=name, prompt_token_ids=need.token_ids, sampling=pb.SamplingParams(max_tokens=1),
        priority=request.priority, prefill_only=True)
    placed = (handle, srid)
    pipeline.active.setdefault(rid, []).append(placed)
    async with contextlib.aclosing(relay(handle, submission, request.timeout, repr(name))) as steps:
        async for step in steps:
            if step.ready:
                break
            if step.finished:
                _forget(pipeline, rid, placed)
                raise SharerEnded(f"sharer {name!r} of {rid!r} ended before its prefill: "
                                  f"{step.error or step.finish_reason}")
        else:
            raise SharerEnded(f"sharer {name!r} of {rid!r} ended before its prefill: its stream ended")
        transfer.sharer_s += time.perf_counter() - started
        started = time.perf_counter()
        kv = []
        try:
            for run in runs(need.layers):
                kv.append(await handle.stub.ExportKV(wpb.ExportKVRequest(
                    request_id=srid, layer_start=run.start, layer_end=run.stop, start=0, end=n), timeout=request.timeout))
            _forget(pipeline, rid, placed)  # from here an abort of the request need not reach the sharer
            await handle.stub.Release(wpb.RequestRef(request_id=srid), timeout=request.timeout)
            await read_to_end(steps)
        except grpc.aio.AioRpcError as e:
            raise worker_error(handle, e) from None
    try:
        await receiver.stub.FuseKV(wpb.FuseKVRequest(request_id=rid, sharer=name, kv=kv), timeout=request.timeout)
    except grpc.aio.AioRpcError as e:
        raise worker_error(receiver, e) from None
    transfer.bytes += sum(len(d.k.data) + len(d.v.data) for d in kv)
    transfer.transfer_s += time.perf_counter() - started


def _forget(pipeline: C2C, rid: str, placed: tuple[WorkerHandle, str]) -> None:
    with contextlib.suppress(KeyError, ValueError):
        pipeline.active[rid].remove(placed)
