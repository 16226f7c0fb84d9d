"""Responses that outlive their request: stored streams and background responses.

A `Run` is one such response being generated in this process (all its alternatives when `n` > 1).
Its SSE frames are kept in memory, each with its alternative's index, for live readers here,
and written to the `events` table in small batches (every `event_flush_interval`) for everyone
else, each alternative's under its own response id: a stream can be resumed from any sequence
number, by any process, while the response runs or after it finished. The final batch and the
terminal events are written in the same transaction that commits the response, so a reader that
sees a finished response also sees its whole log.

`Runs` keeps this process's runs: it renews their heartbeats, picks up cancel requests made
through other processes, and reaps responses whose process died (their heartbeat went stale):
those are marked `failed`, and their conversations' heads never moved, since a head only moves
when a response commits. A stopping process drains: its runs get `drain_timeout` to finish, then
the rest are stored `failed` with their streams ended (`drain`, `stop`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

import orjson

from branchwise.backends.base import BackendError
from branchwise.settings import Settings
from branchwise.store.runs import RunStore
from branchwise.wire.events import TERMINAL_EVENTS, Builder, Seq, synthesize, tags

log = logging.getLogger("branchwise.runs")
T = TypeVar("T")


class Shutdown(BackendError):
    """A generation tied to its request was stopped by the end of a drain (`Runs.tie`): failed
    as one whose upstream broke."""

    def __init__(self) -> None:
        super().__init__(SHUTDOWN_MESSAGE, code="server_error")

TERMINAL = {"completed", "failed", "incomplete", "cancelled"}
SHUTDOWN_MESSAGE = "The server shut down before this response finished."
REAPED_MESSAGE = ("The server running this response stopped before it finished (crash or restart); "
                  "the response was not completed and its conversation was left unchanged.")


class Run:
    def __init__(self, ids: list[str], store: RunStore, flush_interval: float):
        self.ids = ids
        self.key = ids[0]  # names the run in logs
        self.store = store
        self.frames: list[bytes] = []  # a frame's index is its sequence_number
        self.alts = bytearray()  # index for index, the alternative each frame belongs to (n <= 8)
        self.written = 0  # frames before this one are in the database (or in the commit's rows)
        self.done = False
        self.closing = False
        self.finished = asyncio.Event()
        self.task: asyncio.Task | None = None
        self.cancel_reason: str | None = None
        self.eager = False  # a reader in another process tails it: write each event as it comes
        self._changed = asyncio.Event()
        self._wake = asyncio.Event()
        self._interval = flush_interval
        self._flusher = asyncio.get_running_loop().create_task(self._flush_forever())

    # -- producing

    def extend(self, alternative: int, frames: list[bytes]) -> None:
        """Frames of one alternative, in order. Frames added after `drain` are not written here:
        the commit wrote them."""
        if frames:
            self.frames += frames
            for _ in frames:
                self.alts.append(alternative)
            self._notify()
            if self.eager:
                self._wake.set()

    def append(self, alternative: int, frame: bytes) -> None:
        self.extend(alternative, [frame])

    def _notify(self) -> None:
        ev, self._changed = self._changed, asyncio.Event()
        ev.set()

    def _rows(self, start: int, end: int) -> list[dict]:
        ids, alts, frames = self.ids, self.alts, self.frames
        return [{"response_id": ids[alts[s]], "alternative": alts[s], "seq": s, "frame": frames[s]}
                for s in range(start, end)]

    def write_eagerly(self) -> None:
        """From now on, write events as they come (one write in flight, the events that arrive
        meanwhile in the next) instead of every `event_flush_interval`: a reader in another
        process follows this run, and each event's delay to it is its wait for this write."""
        self.eager = True
        self._wake.set()

    async def _flush_forever(self) -> None:
        while not self.closing:
            if not (self.eager and len(self.frames) > self.written):
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self._interval)
            if not self.closing:
                self._wake.clear()
            end = len(self.frames)
            if end > self.written and not self.closing:
                try:
                    await self.store.append_events(self._rows(self.written, end))
                    self.written = end
                except Exception:  # keep them for the final transaction
                    log.exception("could not write events of %s", self.key)
                    await asyncio.sleep(self._interval)  # (not at once again, eager or not)

    async def drain(self, terminal: list[bytes]) -> list[dict]:
        """Stop the flusher and hand over what is left to write, plus the terminal frames (one
        per alternative, in order) that will be appended next: the rows for the commit
        transaction."""
        self.closing = True
        self._wake.set()
        with contextlib.suppress(Exception):
            await asyncio.shield(self._flusher)
        start = len(self.frames)
        rows = self._rows(self.written, start)
        rows += [{"response_id": self.ids[k], "alternative": k, "seq": start + k, "frame": f}
                 for k, f in enumerate(terminal)]
        self.written = start + len(terminal)
        return rows

    def finish(self) -> None:
        self.done = True
        self.closing = True
        self._wake.set()
        self._notify()
        self.finished.set()

    # -- reading

    async def follow(self, after: int = -1, alternative: int | None = None) -> AsyncIterator[bytes]:
        """Frames with sequence_number > `after`, of one alternative or (None) of all, live
        until the run is done."""
        i = after + 1
        frames, alts = self.frames, self.alts
        while True:
            if alternative is None:
                while i < len(frames):
                    frame = frames[i]
                    i += 1
                    yield frame
            else:
                while i < len(frames):
                    i += 1
                    if alts[i - 1] == alternative:
                        yield frames[i - 1]
            if self.done:
                return
            await self._changed.wait()


class Runs:
    def __init__(self, store: RunStore, settings: Settings):
        self.store = store
        self.settings = settings
        self.owner = f"proc_{os.getpid()}_{os.urandom(6).hex()}"
        self.active: dict[str, Run] = {}  # every alternative's id -> its run
        self.workers = asyncio.Semaphore(settings.background_workers)
        self._loop_task: asyncio.Task | None = None
        self._drain: asyncio.Task | None = None
        # Generations that live in their request's task (plain requests, unstored streams), not
        # in a run: a drain waits for them too and, at its end, stops them (`tie`).
        self._tied: set[asyncio.Task] = set()
        self._cut: set[asyncio.Task] = set()
        self.stopped = False

    def new(self, ids: list[str]) -> Run:
        run = Run(ids, self.store, self.settings.event_flush_interval)
        for rid in ids:
            self.active[rid] = run
        return run

    def _followed(self, response_id: str) -> None:
        run = self.active.get(response_id)
        if run is not None:
            run.write_eagerly()

    def forget(self, run: Run) -> None:
        for rid in run.ids:
            if self.active.get(rid) is run:
                del self.active[rid]

    async def start(self) -> None:
        self.store.signals.on_follow = self._followed
        await self.store.signals.start()
        await self.reap()
        self._loop_task = asyncio.get_running_loop().create_task(self._maintain())

    def drain(self, grace: float) -> None:
        """Begin stopping: the runs of this process get `grace` seconds to finish (those that
        start meanwhile too), then the rest are stopped as `failed` (`stop`). Idempotent: the
        first call's deadline holds."""
        if self._drain is None:
            self._drain = asyncio.get_running_loop().create_task(self._finish_within(grace))

    async def _finish_within(self, grace: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        if self.active and grace > 0:
            log.warning("stopping: waiting up to %.0f s for %d running responses", grace, len(self._running()))
        # Polled: a drain happens once in a process's life, and runs come and go meanwhile.
        while (self.active or self._tied) and loop.time() < deadline:
            await asyncio.sleep(min(0.05, deadline - loop.time()))
        await self._stop_running()

    def _running(self) -> list[Run]:
        return list({id(r): r for r in self.active.values()}.values())

    async def tie(self, pending: Awaitable[T]) -> T:
        """Await one step of a generation that lives in the current request's task (the whole
        call of a plain request, the next delta of an unstored stream). When a drain ends first,
        the step is stopped and `Shutdown` raised, for the caller to fail the response as it
        fails one whose upstream broke. Only the model's steps are tied: a commit is never cut."""
        task = asyncio.current_task()
        self._tied.add(task)
        try:
            return await pending
        except asyncio.CancelledError:
            if task in self._cut:
                self._cut.discard(task)
                task.uncancel()
                raise Shutdown() from None
            raise
        finally:
            self._tied.discard(task)

    async def _stop_running(self) -> None:
        """Cancel every run still here as a shutdown: each is stored `failed`, its terminal events
        written and sent to its readers, its lease released. Generations tied to their requests
        are stopped too; their requests fail them and reply (`tie`)."""
        self.stopped = True
        for task in self._tied:
            self._cut.add(task)
            task.cancel()
        runs = self._running()
        if not runs:
            return
        log.warning("stopping: failing %d responses still running", len(runs))
        for run in runs:
            if run.cancel_reason is None and run.task is not None:  # (else a cancel is under way)
                run.cancel_reason = "shutdown"
                run.task.cancel()
        waits = [asyncio.ensure_future(run.finished.wait()) for run in runs]
        _, late = await asyncio.wait(waits, timeout=5)
        for w in late:
            w.cancel()

    async def stop(self) -> None:
        """The last step of stopping: after a drain (`drain`), or at once when none was begun."""
        self.drain(0)
        with contextlib.suppress(Exception):
            await self._drain
        await self._stop_running()  # any begun after the drain ended
        if self._loop_task is not None:  # heartbeats went on while the runs finished
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._loop_task
        await self.store.signals.close()

    async def reap(self) -> None:
        reaped = await self.store.reap(self.settings.lease_ttl, REAPED_MESSAGE)
        if reaped:
            log.warning("failed %d responses left running by a stopped server: %s", len(reaped), reaped)

    async def _maintain(self) -> None:
        """Every tick: pick up cancel requests; every third of the TTL: heartbeat; every half: reap."""
        ttl = self.settings.lease_ttl
        tick = min(0.2, ttl / 4)
        since_beat = since_reap = 0.0
        while True:
            await asyncio.sleep(tick)
            since_beat += tick
            since_reap += tick
            try:
                if self.active:
                    for rid in await self.store.cancel_requests(self.owner):
                        run = self.active.get(rid)
                        if run is not None and run.task is not None and run.cancel_reason is None:
                            run.cancel_reason = "cancel"
                            run.task.cancel()
                if since_beat >= ttl / 3:
                    since_beat = 0
                    await self.store.heartbeat(list(self.active))
                if since_reap >= ttl / 2:
                    since_reap = 0
                    await self.reap()
            except Exception:
                log.exception("run maintenance failed")

    def replay(self, response_id: str, after: int) -> AsyncIterator[bytes]:
        """One response's events after `after` (one alternative's, when `n` > 1, with their
        sequence numbers in the whole stream): live from memory when it runs here, else from
        the database."""
        run = self.active.get(response_id)
        if run is not None:
            return run.follow(after, run.ids.index(response_id))
        return self.follow_stored(response_id, after)

    async def follow_stored(self, response_id: str, after: int) -> AsyncIterator[bytes]:
        """Replay a response's event log from the database, live-tailing it while the response
        runs elsewhere. When the log has no terminal event (the process died, or the response was
        never streamed), one is made from the stored response. While it runs elsewhere, the
        writes of its events wake this reader (PostgreSQL's notifications, `store.signals`), and
        its process is asked to write them as they come; without notifications (SQLite, a lost
        listening connection) it looks every `event_poll_interval`."""
        with self.store.signals.watch(response_id) as woken:
            asked = False
            async with contextlib.aclosing(self._tail(response_id, after, woken)) as frames:
                async for frame in frames:
                    if frame is None:  # (nothing new yet: the response runs in another process)
                        if not asked:
                            asked = True
                            await self.store.signals.follow(response_id)
                        await woken.wait(self.settings.event_poll_interval)
                        continue
                    yield frame

    async def _tail(self, response_id: str, after: int, woken) -> AsyncIterator[bytes | None]:
        """`follow_stored`'s frames, and None each time there is nothing new to read."""
        last, frame = after, None
        while True:
            woken.arm()
            batch = await self.store.events_after(response_id, last)
            for seq, frame in batch:
                last = seq
                yield frame
                if frame.startswith(TERMINAL_EVENTS):
                    return
            if batch:
                continue
            state = await self.store.state(response_id)
            if state is None:
                return
            status, body, _, _ = state
            if status in TERMINAL:
                batch = await self.store.events_after(response_id, last)
                if batch:
                    continue
                obj = orjson.loads(body)
                if last == -1:  # no log: the response was never streamed
                    frames = synthesize(obj)
                else:  # a log that stops short: numbered after its last event, named as its events are
                    frames = [Builder(Seq(last + 1), response_id, None if frame is None else tags(frame)).terminal(obj)]
                for frame in frames:
                    yield frame
                return
            local = self.active.get(response_id)
            if local is not None:
                async for frame in local.follow(last, local.ids.index(response_id)):
                    yield frame
                return
            if self.stopped:  # this process is stopping: the reader resumes elsewhere (`starting_after`)
                return
            yield None
