"""Streaming and background responses: the SSE of a response as it is generated, stored
streams that run to the end whatever their client does, background responses run by a bounded
pool of workers, and cancel."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import orjson

from branchwise.backends.base import BackendError
from branchwise.core.chat import Usage
from branchwise.core.errors import BranchwiseError, InvalidRequest
from branchwise.core.projects import hold_slot
from branchwise.observe import metrics
from branchwise.services.responses import Plan, Responses
from branchwise.services.runs import SHUTDOWN_MESSAGE, TERMINAL, Run, Runs
from branchwise.wire import items as witems
from branchwise.wire.events import INCOMPLETE, Emitter, Terminal, choice_deltas, terminals
from branchwise.wire.objects import response_object

log = logging.getLogger("branchwise.streams")


class Streams:
    def __init__(self, responses: Responses, runs: Runs):
        self.responses = responses
        self.runs = runs

    async def stream(self, plan: Plan) -> AsyncIterator[bytes]:
        """SSE for an unstored response, tied to its request: a client that goes away cancels
        the upstream call."""
        try:
            async for _, frames in self._stream(plan, tied=True):
                for frame in frames:
                    yield frame
        finally:
            await self.responses.release(plan)

    async def start_stream(self, plan: Plan, row_first: bool = False) -> Run:
        """A stored streaming response: it runs to the end whatever its client does, and its
        events can be replayed (`GET /v1/responses/{id}?stream=true`). Its row is written while
        the first events are already on their way (see `_produce`), or with `row_first` before
        this returns."""
        run = plan.run = self.runs.new(plan.ids)
        if row_first:
            try:
                await self.runs.store.insert_rows(self._running_rows(plan, "in_progress"))
            except BaseException:
                self.runs.forget(run)
                run.finish()
                await self.responses.release(plan)
                raise
        plan.slot = hold_slot()  # (the caller's concurrent-response slot, until the run ends)
        run.task = asyncio.get_running_loop().create_task(self._produce(plan, background=False,
                                                                        row_written=row_first))
        return run

    async def start_background(self, plan: Plan) -> Run:
        """`background: true`: stored as `queued` at once; a bounded worker runs it later."""
        run = plan.run = self.runs.new(plan.ids)
        rows = self._running_rows(plan, "queued")
        try:
            await self.runs.store.insert_rows(rows)
        except BaseException:
            self.runs.forget(run)
            run.finish()
            raise
        ems = [Emitter(plan, i) for i in range(plan.n)]
        for em in ems:
            run.append(em.alt, em.event("response.created", response=em.snapshot("queued")))
        for em in ems:
            run.append(em.alt, em.event("response.queued", response=em.snapshot("queued")))
        plan.slot = hold_slot()
        run.task = asyncio.get_running_loop().create_task(self._produce(plan, background=True))
        return run

    def _running_rows(self, plan: Plan, status: str) -> list[dict]:
        req = plan.req
        return [{
            "id": rid, "status": status, "created_at": plan.created_at,
            "conversation_id": req.conversation_id, "previous_response_id": req.previous_response_id,
            "tree": plan.tree, "base_node": plan.base, "input_node": None, "input_count": 0, "last_node": None,
            "body": orjson.dumps(response_object(req, id=rid, created_at=plan.created_at, status=status, output=[])),
            "background": bool(req.background), "owner": self.runs.owner, "heartbeat_at": time.time(),
        } for rid in plan.ids]

    async def _produce(self, plan: Plan, background: bool, row_written: bool = False) -> None:
        run = plan.run
        try:
            if background:
                waiting = self.runs.workers.locked()
                if waiting:  # every background worker busy: it waits, `queued`, visibly
                    metrics.queued("background").inc()
                try:
                    await self.runs.workers.acquire()
                finally:
                    if waiting:
                        metrics.queued("background").dec()
                try:
                    try:
                        await self.responses.enter(plan)
                    except BranchwiseError as e:  # e.g. the queue's wait timed out, the conversation is gone
                        await self.responses.fail(plan, e.code or "server_error", e.message,
                                         terminal=self._terminal_failed(plan))
                        self._emit_terminal(plan)
                        return
                    await self.runs.store.set_status(plan.ids, "in_progress", [
                        orjson.dumps(response_object(plan.req, id=rid, created_at=plan.created_at,
                                                     status="in_progress", output=[])) for rid in plan.ids])
                    async for alt, frames in self._stream(plan, created=False):
                        run.extend(alt, frames)
                finally:
                    self.runs.workers.release()
            else:
                rows = self._running_rows(plan, "in_progress")
                write = None if row_written else (lambda: self.runs.store.insert_rows(rows))
                async for alt, frames in self._stream(plan, before_model=write):
                    run.extend(alt, frames)
        except asyncio.CancelledError:
            status = "cancelled" if run.cancel_reason == "cancel" else "failed"
            message = SHUTDOWN_MESSAGE if status == "failed" else None
            try:
                await self.responses.fail(plan, "server_error", message, status=status, terminal=self._terminal_failed(plan))
                self._emit_terminal(plan)
            except Exception:
                log.exception("could not store cancelled response %s", plan.ids[0])
        except Exception as e:
            log.exception("response %s failed", plan.ids[0])
            with contextlib.suppress(Exception):
                await self.responses.fail(plan, "server_error", f"The server had an error: {type(e).__name__}",
                                 terminal=self._terminal_failed(plan))
                self._emit_terminal(plan)
        finally:
            await self.responses.release(plan)
            self.runs.forget(run)
            run.finish()
            if plan.slot is not None:
                with contextlib.suppress(Exception):
                    await plan.slot.drop()

    @staticmethod
    def _terminal_failed(plan: Plan) -> Terminal:
        """The terminal events of a response that ends without its builders (cancel, crash of
        the producer, a queue that timed out): new builders on the plan's sequence."""
        return terminals([Emitter(plan, i) for i in range(plan.n)])

    @staticmethod
    def _emit_terminal(plan: Plan) -> None:
        for alt, frame in enumerate(plan.terminal_frames):  # one per alternative, in order
            plan.run.append(alt, frame)

    async def stored_body(self, run: Run) -> bytes:
        """The stored Response of a run as it is now (a background response just queued)."""
        return (await self.runs.store.state(run.key))[1]

    def replay(self, response_id: str, after: int) -> AsyncIterator[bytes]:
        """A stored response's events after `after` (see `Runs.replay`)."""
        return self.runs.replay(response_id, after)

    async def cancel(self, response_id: str) -> bytes | None:
        """Cancel a background response (idempotent). Returns its stored body, or None when there
        is no such response. Raises when it is not a background response."""
        state = await self.runs.store.state(response_id)
        if state is None:
            return None
        status, body, background, _ = state
        if not background:
            raise InvalidRequest("Only responses created with background=true can be cancelled.",
                                 param="response_id", code="not_background")
        if status in TERMINAL:
            return body
        run = self.runs.active.get(response_id)
        if run is not None:
            if run.cancel_reason is None and run.task is not None:
                run.cancel_reason = "cancel"
                run.task.cancel()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(run.finished.wait()), 5)
        else:  # another process runs it: ask it through the database and wait for the answer
            await self.runs.store.request_cancel(response_id)
            for _ in range(50):
                await asyncio.sleep(0.1)
                state = await self.runs.store.state(response_id)
                if state is None or state[0] in TERMINAL:
                    break
        state = await self.runs.store.state(response_id)
        return None if state is None else state[1]

    async def _tied(self, deltas: AsyncIterator) -> AsyncIterator:
        tie = self.runs.tie
        while True:
            try:
                d = await tie(anext(deltas))
            except StopAsyncIteration:
                return
            yield d

    async def _stream(self, plan: Plan, created: bool = True,
                      before_model: Callable[[], Awaitable[None]] | None = None, tied: bool = False,
                      ) -> AsyncIterator[tuple[int, list[bytes]]]:
        """OpenAI's SSE for the plan's response(s): the frames of each step (a delta), with
        their alternative's index.
        With n > 1 every alternative's events are interleaved in one stream; each event names
        its `response_id` and carries `alternative`. Layout in docs/branching.md.
        `tied`: the response lives in its request's task (an unstored stream), so the end of a
        drain stops its model steps (`Runs.tie`)."""
        ems = [Emitter(plan, i) for i in range(plan.n)]
        if created:
            for em in ems:
                yield em.alt, [em.event("response.created", response=em.snapshot("in_progress"))]
        for em in ems:
            yield em.alt, [em.event("response.in_progress", response=em.snapshot("in_progress"))]
        if before_model is not None:
            await before_model()
        usage = Usage()
        finish: dict[int, str | None] = {}
        max_calls = plan.req.max_tool_calls
        try:
            if plan.n == 1 or plan.backend.supports_n:
                deltas = self.responses.upstream.stream(plan)
                async for d in (self._tied(deltas) if tied else deltas):
                    if d.usage is not None:
                        usage = d.usage
                        continue
                    if d.finish_reason:
                        finish[d.index] = d.finish_reason
                    if d.tool_index is not None and max_calls is not None and d.tool_index >= max_calls:
                        continue  # `max_tool_calls`: later calls are dropped
                    if 0 <= d.index < plan.n:
                        yield d.index, ems[d.index].feed(d)
            else:
                pending = self.responses.generate(plan)
                result = await (self.runs.tie(pending) if tied else pending)
                usage = result.usage
                for c in result.choices:
                    if max_calls is not None:
                        del c.tool_calls[max_calls:]
                    finish[c.index] = c.finish_reason
                    for d in choice_deltas(c):
                        yield c.index, ems[c.index].feed(d)
        except BackendError as e:
            for em in ems:
                em.close_all(aborted=True)
            await self.responses.fail(plan, e.code, e.message, terminal=terminals(ems))
            for alt, frame in enumerate(plan.terminal_frames):
                yield alt, [frame]
            return
        for i, em in enumerate(ems):
            yield i, em.close_all(incomplete=finish.get(i) in INCOMPLETE)
        for em in ems:
            witems.merge_tool_calls(em.items)
        await self.responses.commit(plan, [em.choice(finish.get(i)) for i, em in enumerate(ems)],
                           [em.items for em in ems], usage, terminals(ems))
        for alt, frame in enumerate(plan.terminal_frames):
            yield alt, [frame]
