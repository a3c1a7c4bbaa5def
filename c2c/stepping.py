"""What C2C and T2T share on one engine: the per-request step-time meter, unhooking, and running a batch."""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from tandem.errors import TandemError
from workers.engine import Engine, RequestOutput, StepView


class C2CError(TandemError):
    """A C2C request that failed after it was accepted."""


class Meter:
    """Charges each model's step time to the tracked requests it advanced, into `stats[bucket]`: sampled
    rows from a policy (before the step's output is built), prefill chunks from the step hook."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.tracked: dict[str, tuple[dict, str]] = {}
        self.seen: dict[str, int] = {}
        self.charged: set[str] = set()
        self.last = time.perf_counter()

    def track(self, request_id: str, stats: dict, bucket: str) -> None:
        self.tracked[request_id] = (stats, bucket)

    def untrack(self, request_id: str) -> None:
        self.tracked.pop(request_id, None)
        self.seen.pop(request_id, None)

    def policy(self, step: StepView) -> None:
        elapsed = time.perf_counter() - self.engine.model(step.model).step_started
        for seq in step.seqs:
            entry = self.tracked.get(seq.request_id)
            if entry is not None:
                entry[0][entry[1]] += elapsed
                self.charged.add(seq.request_id)
                self.seen[seq.request_id] = seq.num_computed

    def tick(self) -> None:
        now = time.perf_counter()
        ran = sorted((rm.step_started, name) for name, rm in self.engine.models.items() if rm.step_started > self.last)
        spent = {name: (ran[i + 1][0] if i + 1 < len(ran) else now) - start for i, (start, name) in enumerate(ran)}
        for rid, (stats, bucket) in list(self.tracked.items()):
            seq = self.engine.requests.get(rid)
            if rid not in self.charged and seq is not None and seq.num_computed != self.seen.get(rid, 0):
                stats[bucket] += spent.get(seq.model, 0.0)
                self.seen[rid] = seq.num_computed
        self.charged.clear()
        self.last = now


def detach(engine: Engine, meter: Meter, models: list[str], step_hook, retire_hook) -> None:
    for name in set(models):
        policies = engine.model(name).policies
        if meter.policy in policies:
            policies.remove(meter.policy)
    for hooks, hook in ((engine.step_hooks, step_hook), (engine.retire_hooks, retire_hook)):
        if hook in hooks:
            hooks.remove(hook)


def run_batch(engine: Engine, add: Callable, prompts: Iterable, prefix: str) -> list[RequestOutput]:
    ids = []
    for i, prompt in enumerate(prompts):
        rid = f"{prefix}-{id(engine)}-{time.monotonic_ns()}-{i}"
        add(rid, prompt)
        ids.append(rid)
    results = engine.collect(ids)
    errors = [f"{r.request_id}: {r.error}" for r in results if r.error]
    if errors:
        raise C2CError("; ".join(errors))
    return results
