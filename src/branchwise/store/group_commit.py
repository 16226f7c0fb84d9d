"""Group commit for statements that are round trips (PostgreSQL's reads, commits and head
moves): one statement of a kind in flight at a time, and the calls that arrive meanwhile go
together as the next one, so the groups grow with the database's latency. A statement's fixed
cost (parsing, planning, a round trip, the driver's work) is paid once per group instead of
once per call (docs/decisions/0012-postgresql-grouped-statements.md has the numbers)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from branchwise.core.errors import Unavailable


class OneInFlight:
    """One statement of a kind in flight; the calls that arrive meanwhile go together as the
    next one. Group commit for statements that are round trips: calls handed to `flush` (a coroutine
    function: the items in, one result per item out, an exception for an item that failed). A
    call that finds no flush running goes at once, alone, in its caller's task (no extra task or
    loop pass when the database is idle); while `in_flight` flushes run, the calls made
    meanwhile wait and go together, in a task, as soon as one ends (and that task goes on with
    each group that gathers while it is out), so the groups grow with the database's latency.
    Each waiting caller awaits a future of its own (a caller cancelled
    cancels nothing of the others') and gets its item's result or exception."""

    def __init__(self, flush: Callable[[list], Awaitable[list]], in_flight: int = 1):
        self._flush = flush
        self._in_flight = in_flight
        self._running = 0
        self._waiting: tuple[list, list] | None = None  # items, futures for the next flush
        self._tasks: set[asyncio.Task] = set()
        # The loop of this busy period (from a call that found nothing running until none is):
        # looked up once a period, as each `get_running_loop` is a getpid system call on 3.11.
        self._loop: asyncio.AbstractEventLoop | None = None

    async def submit(self, item: Any) -> Any:
        if self._running < self._in_flight:
            if not self._running:
                self._loop = None  # (a new period, perhaps on another loop)
            self._running += 1
            try:
                result = (await self._flush([item]))[0]
            finally:
                self._done()
        else:
            group = self._waiting
            if group is None:
                group = self._waiting = ([], [])
            loop = self._loop
            if loop is None:
                loop = self._loop = asyncio.get_running_loop()
            fut = loop.create_future()
            group[0].append(item)
            group[1].append(fut)
            result = await fut
        if isinstance(result, BaseException):
            raise result
        return result

    def _done(self) -> None:
        """A flush ended: start the one that has been waiting, if any."""
        self._running -= 1
        group = self._waiting
        if group is not None and self._running < self._in_flight:
            self._waiting = None
            self._running += 1
            task = self._loop.create_task(self._run(*group))  # (set by the waiting calls)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(self, items: list, futures: list[asyncio.Future]) -> None:
        """Flush a group, then whatever group gathered meanwhile, and so on, in this task: the next
        statement goes out in the same turn of the loop as the last one's result came in (a task
        per group would first wait for the loop's next pass, a millisecond or more under load,
        on the stage that limits PostgreSQL's throughput)."""
        try:
            while True:
                try:
                    results = await self._flush(items)
                except BaseException as e:
                    failed = e if isinstance(e, Exception) else RuntimeError("the server is shutting down")
                    for fut in futures:
                        if not fut.done():
                            fut.set_exception(failed)
                    raise
                for fut, result in zip(futures, results, strict=True):
                    if not fut.done():  # (done: its caller was cancelled)
                        fut.set_result(result)
                group = self._waiting
                if group is None:
                    return
                self._waiting = None
                items, futures = group
        finally:
            self._done()


def rounds(keys: Sequence[str | None]) -> list[list[int]]:
    """The positions of `keys` in rounds, in order, each key (None aside) at most once a round."""
    out: list[tuple[set, list[int]]] = []
    for i, key in enumerate(keys):
        fit = next((r for r in out if key is None or key not in r[0]), None)
        if fit is None:
            fit = (set(), [])
            out.append(fit)
        if key is not None:
            fit[0].add(key)
        fit[1].append(i)
    return [members for _, members in out]


async def in_rounds(keys: Sequence[str | None], together: Callable[[list[int]], Awaitable[list]],
                    alone: Callable[[int], Awaitable[Any]]) -> list:
    """PostgreSQL's grouped writes (one per conversation in `keys`): in rounds, each conversation
    at most once a round and the round in conversation order (one lock order for every such
    statement, so two never wait for each other in a cycle); a round of several in one statement
    (`together`: their results in the round's order), else, and should that statement fail, one
    by one (`alone`), so that the others land and a failure is its write's alone. Once no
    connection came free in time, the writes not yet tried fail with that at once (each would
    wait as long again)."""
    out: list = [None] * len(keys)
    unavailable: Unavailable | None = None
    for group in rounds(keys):
        if unavailable is None and len(group) > 1:
            group.sort(key=lambda i: (keys[i] is None, keys[i] or ""))
            try:
                results = await together(group)
            except Unavailable as e:
                unavailable = e
            except Exception:
                pass
            else:
                for i, result in zip(group, results, strict=True):
                    out[i] = result
                continue
        for i in group:
            if unavailable is not None:
                out[i] = unavailable
                continue
            try:
                out[i] = await alone(i)
            except Unavailable as e:
                out[i] = unavailable = e
            except Exception as e:
                out[i] = e
    return out
