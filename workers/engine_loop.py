"""The engine on its own thread: steps while there is work and fans StepOutputs out to their sinks."""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any, Callable, Protocol

from workers.engine import Engine, StepOutput

log = logging.getLogger("tandem.worker")


class Sink(Protocol):
    def put_nowait(self, out: StepOutput) -> None: ...


class EngineLoop:
    """Owns the engine's thread. `open(rid)` registers the sink a request's StepOutputs go to: its own asyncio
    queue (a Generate call) or the Connection it was submitted on."""

    aborted_ttl_s = 10.0
    max_aborted = 1 << 16

    def __init__(self, engine: Engine, loop: asyncio.AbstractEventLoop):
        self.engine = engine
        self.loop = loop
        self.sinks: dict[str, Sink] = {}
        self._aborted: dict[str, float] = {}
        self.steps = 0
        self._wake = threading.Event()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="tandem-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped = True
        self._wake.set()
        self._thread.join(timeout=5)

    def wake(self) -> None:
        self._wake.set()

    def _run(self) -> None:
        while not self._stopped:
            self._wake.clear()
            if not self.engine.has_work:
                self._wake.wait(0.5)
                continue
            try:
                outputs = self.engine.step()
            except Exception as e:  # an engine bug must not take the worker down silently
                log.exception("engine step failed")
                outputs = [StepOutput(rid, "", finished=True, finish_reason="error", error=f"engine step failed: {e}")
                           for rid in list(self.sinks)]
                for out in outputs:
                    self.engine.abort(out.request_id)
            self.steps += 1
            if outputs:
                self._post(self._dispatch, outputs)

    def _post(self, fn: Callable[..., Any], *args: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the event loop is closed: shutting down
            self._stopped = True

    def _dispatch(self, outputs: list[StepOutput]) -> None:
        for out in outputs:
            sink = self.sinks.get(out.request_id)
            if sink is not None:
                sink.put_nowait(out)

    def open(self, request_id: str, sink: Sink | None = None) -> Sink | None:
        """Registers `sink` (default: a new asyncio.Queue) for the request; None when the id is in use."""
        if request_id in self.sinks:
            return None
        sink = asyncio.Queue() if sink is None else sink
        self.sinks[request_id] = sink
        return sink

    def close(self, request_id: str) -> None:
        self.sinks.pop(request_id, None)

    def mark_aborted(self, request_ids: list[str]) -> None:
        """Ids aborted while no stream had them open. An abort can overtake its own request (two RPCs on
        two streams); a Generate for one of these within `aborted_ttl_s` then ends at once, unrun."""
        now = time.monotonic()
        self._aborted = {rid: t for rid, t in self._aborted.items() if t > now}
        for rid in request_ids:
            self._aborted[rid] = now + self.aborted_ttl_s
        for rid in list(self._aborted)[: max(0, len(self._aborted) - self.max_aborted)]:
            del self._aborted[rid]

    def was_aborted(self, request_id: str) -> bool:
        return self._aborted.pop(request_id, 0.0) > time.monotonic()

    async def run(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the engine's thread at the next step; return its result or raise its error."""
        future: asyncio.Future = self.loop.create_future()

        def settle(ok: bool, value: Any) -> None:
            if not future.done():
                future.set_result(value) if ok else future.set_exception(value)

        def call() -> None:
            try:
                result = fn()
            except Exception as e:
                self._post(settle, False, e)
            else:
                self._post(settle, True, result)

        self.engine.call(call)
        self._wake.set()
        return await future

    async def abort(self, request_id: str, timeout: float = 5.0) -> None:
        """Idempotent. The abort is enqueued before the first await, so it happens even if this is cancelled."""
        self.engine.abort(request_id)
        try:
            await asyncio.wait_for(self.run(lambda: None), timeout)
        except (asyncio.TimeoutError, asyncio.CancelledError):
            pass
