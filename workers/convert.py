"""Engine objects <-> tandem.v1 messages."""
from __future__ import annotations

import torch

from tandem.errors import InvalidRequestError
from tandem.v1 import orchestrator_pb2 as pb
from tandem.v1 import worker_pb2 as wpb
from workers.engine import KVSlice, SamplingParams, StepOutput

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def sampling_from_proto(p: pb.SamplingParams) -> SamplingParams:
    kw: dict = {}
    for name in ("max_tokens", "temperature", "top_k", "top_p", "seed", "logprobs", "skip_special_tokens"):
        if p.HasField(name):
            kw[name] = getattr(p, name)
    try:
        return SamplingParams(stop=list(p.stop), stop_token_ids=list(p.stop_token_ids), ignore_eos=p.ignore_eos, **kw)
    except InvalidRequestError as e:
        raise InvalidRequestError(f"sampling.{e.field}", str(e).split(": ", 1)[-1]) from None


def step_to_proto(out: StepOutput) -> wpb.WorkerStep:
    msg = wpb.WorkerStep(request_id=out.request_id, model=out.model, token_ids=out.new_token_ids,
                         text=out.text_delta, sources=out.sources, ready=out.ready, finished=out.finished,
                         proposed=out.proposed, stats=out.stats)
    if out.handoff is not None:
        msg.handoff = True
        msg.handoff_token_ids.extend(out.handoff)
    for lp in out.logprobs:
        if lp:
            msg.logprobs.add(token_id=lp["token_id"], logprob=lp["logprob"],
                             top=[pb.TopLogprob(token_id=t, logprob=v) for t, v in _top(lp)])
    if out.finished:
        msg.finish_reason = out.finish_reason or ""
        if out.usage is not None:
            msg.usage.CopyFrom(pb.Usage(prompt_tokens=out.usage.prompt_tokens,
                                        completion_tokens=out.usage.completion_tokens,
                                        cached_tokens=out.usage.cached_tokens))
        t = out.timings
        msg.timings.CopyFrom(pb.Timings(queue_s=t.get("queue_s", 0.0), ttft_s=t.get("ttft_s", 0.0),
                                        per_token_s=t.get("per_token_s", 0.0), total_s=t.get("total_s", 0.0)))
        msg.error = out.error or ""
    return msg


def logprob_from_proto(lp: pb.TokenLogprob) -> dict:
    return {"token_id": lp.token_id, "logprob": lp.logprob, "top": [(t.token_id, t.logprob) for t in lp.top]}


def _top(lp: dict) -> list[tuple[int, float]]:
    top = lp.get("top") or []
    return [(int(t[0]), float(t[1])) if isinstance(t, (list, tuple)) else (int(t["token_id"]), float(t["logprob"]))
            for t in top]


def tensor_to_proto(t: torch.Tensor) -> wpb.Tensor:
    t = t.detach().to("cpu").contiguous()
    name = str(t.dtype).removeprefix("torch.")
    return wpb.Tensor(data=t.reshape(-1).view(torch.uint8).numpy().tobytes(), dtype=name, shape=list(t.shape))


def tensor_from_proto(msg: wpb.Tensor, field: str) -> torch.Tensor:
    dtype = DTYPES.get(msg.dtype)
    if dtype is None:
        raise InvalidRequestError(f"{field}.dtype", f"{msg.dtype!r} is not one of {sorted(DTYPES)}")
    shape = list(msg.shape)
    numel = 1
    for d in shape:
        if d < 0:
            raise InvalidRequestError(f"{field}.shape", f"{shape} has a negative dimension")
        numel *= d
    if numel * dtype.itemsize != len(msg.data):
        raise InvalidRequestError(f"{field}.data", f"{len(msg.data)} bytes do not hold {shape} of {msg.dtype}")
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(msg.data), dtype=torch.uint8).view(dtype).reshape(shape)


def kv_to_proto(kv: KVSlice) -> wpb.KVData:
    return wpb.KVData(layer_start=kv.layers.start, layer_end=kv.layers.stop, start=kv.start,
                      k=tensor_to_proto(kv.k), v=tensor_to_proto(kv.v))


def kv_from_proto(msg: wpb.KVData) -> KVSlice:
    return KVSlice(range(msg.layer_start, msg.layer_end), msg.start,
                   tensor_from_proto(msg.k, "kv.k"), tensor_from_proto(msg.v, "kv.v"))
