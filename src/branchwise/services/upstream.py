"""Every call to a model goes through here, whatever its backend: what the operator sees of it
(its metrics, a `warning` line when it fails, with the cause), and the line in front of a
backend that works on a fixed number of requests at once (`Capabilities.slots`; the embedded
model: one).

The line is kept here, before the backend is called, rather than inside the backend: a request
that must wait is visible (an `info` line with its place in the line, the
`branchwise_model_queue_depth` gauge, its wait in the access line's upstream time) whatever
the backend does inside, and the backend never holds more than its `slots` requests.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from branchwise.backends.base import Backend, BackendError
from branchwise.core.chat import ChatDelta, ChatRequest, ChatResult, Usage
from branchwise.observe import metrics, traces

if TYPE_CHECKING:
    from branchwise.services.responses import Plan

log = logging.getLogger("branchwise.upstream")


class Line:
    """First come, first served: `slots` requests at once, the others wait their turn."""

    def __init__(self, upstream: str, slots: int):
        self.upstream = upstream
        self.free = slots
        self.waiting: deque[asyncio.Future] = deque()

    async def enter(self, response_id: str) -> None:
        if self.free > 0 and not self.waiting:
            self.free -= 1
            return
        turn = asyncio.get_running_loop().create_future()
        self.waiting.append(turn)
        position = len(self.waiting)
        log.info("%s waits for the %s model: number %d in line", response_id, self.upstream, position,
                 extra={"fields": {"response_id": response_id, "upstream": self.upstream, "position": position}})
        gauges = (metrics.model_queue(self.upstream), metrics.queued("model"))
        for g in gauges:
            g.inc()
        started = time.monotonic()
        try:
            await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():
                self.leave()  # the slot was handed over as this request gave up: pass it on
            else:
                self.waiting.remove(turn)
            raise
        finally:
            for g in gauges:
                g.dec()
        log.info("%s starts on the %s model after waiting %.1f s", response_id, self.upstream,
                 time.monotonic() - started)

    def leave(self) -> None:
        while self.waiting:
            turn = self.waiting.popleft()
            if not turn.done():
                turn.set_result(None)  # the slot goes straight to the next in line
                return
        self.free += 1


@dataclass(slots=True)
class _Call:
    backend: Backend
    model: str
    line: Line | None
    span: Any
    started: float


class Upstream:
    def __init__(self) -> None:
        self._lines: dict[int, Line | None] = {}

    def _line(self, backend: Backend) -> Line | None:
        key = id(backend)
        try:
            return self._lines[key]
        except KeyError:
            slots = backend.capabilities.slots
            line = self._lines[key] = Line(backend.name, slots) if slots else None
            return line

    @staticmethod
    def _failed(plan: Plan, backend: Backend, e: BackendError) -> None:
        rid = plan.ids[0]
        log.warning("%s failed: the %s upstream (model %s) answered %s: %s", rid, backend.name, plan.req.model,
                    e.code, e.message, extra={"fields": {"response_id": rid, "upstream": backend.name,
                                                        "model": plan.req.model, "code": e.code,
                                                        "upstream_status": e.status}})

    async def _start(self, plan: Plan, chat: ChatRequest) -> _Call:
        """A model call begins: its place in the backend's line (waited for), the running
        gauge, its span."""
        backend = plan.backend
        line = self._line(backend)
        if line is not None:
            await line.enter(plan.ids[0])
        metrics.running += 1
        span = traces.model_span(backend.name, chat.model) if traces.tracer is not None else None
        return _Call(backend, chat.model, line, span, time.perf_counter())

    @staticmethod
    def _end(call: _Call, outcome: str, usage: Usage | None) -> None:
        metrics.running -= 1
        if call.line is not None:
            call.line.leave()
        if call.span is not None:
            traces.model_done(call.span, outcome, usage)
        metrics.upstream_call(call.backend.name, call.model, outcome, time.perf_counter() - call.started,
                              usage.input_tokens if usage else 0, usage.output_tokens if usage else 0)

    async def complete(self, plan: Plan, chat: ChatRequest) -> ChatResult:
        call = await self._start(plan, chat)
        outcome, usage = "cancelled", None
        try:
            result = await call.backend.complete(chat)
            outcome, usage = "ok", result.usage
            return result
        except BackendError as e:
            outcome = e.code
            self._failed(plan, call.backend, e)
            raise
        finally:
            self._end(call, outcome, usage)

    async def stream(self, plan: Plan) -> AsyncIterator[ChatDelta]:
        """The backend's stream of `plan.chat`; its time (waiting in line included) is added
        to `plan.upstream_s`."""
        started = time.perf_counter()
        call = await self._start(plan, plan.chat)
        outcome, usage = "cancelled", None
        try:
            async for delta in call.backend.stream(plan.chat):
                if delta.usage is not None:
                    usage = delta.usage
                yield delta
            outcome = "ok"
        except BackendError as e:
            outcome = e.code
            self._failed(plan, call.backend, e)
            raise
        finally:
            plan.upstream_s += time.perf_counter() - started
            self._end(call, outcome, usage)
