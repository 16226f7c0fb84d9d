"""Wake-ups between processes sharing one PostgreSQL database, over LISTEN/NOTIFY: a reader
tailing a response that another process runs learns of its new events when they are written,
instead of polling the event log (docs/decisions/0060).

Two channels. `branchwise_events` (payload: a response id) is notified by the transactions that
write a response's events, and by the reaper when it fails one; it reaches the listeners when
the transaction commits, so a woken reader finds the rows. `branchwise_follow` (payload: a
response id) is a reader asking the process that runs the response to write its events as they
come rather than every `event_flush_interval`.

Each process keeps one connection listening, out of its `db_pool_size` (`connect.listener_share`).
Polling stays the fallback: on SQLite, while the listening connection is down (it is opened again
after a pause), and for a wait armed before it came up. A lost notification costs at most
`RECHECK_S`, after which the reader looks again."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterator

from sqlalchemy.ext.asyncio import AsyncEngine

from branchwise.store.connect import listener_share, pg_connect
from branchwise.store.statements import EVENTS_CHANNEL as EVENTS
from branchwise.store.statements import FOLLOW_CHANNEL as FOLLOW

log = logging.getLogger("branchwise.signals")

RECHECK_S = 2.0
"""While listening, how long a reader waits for a wake-up before it looks again anyway."""
RECONNECT_S = (0.5, 1.0, 2.0, 5.0)


class Watch:
    """One reader's wake-up: `arm()` before it reads, `wait()` when it found nothing new."""

    __slots__ = ("_signals", "event", "armed")

    def __init__(self, signals: Signals):
        self._signals = signals
        self.event = asyncio.Event()
        self.armed = False

    def arm(self) -> None:
        """Called right before reading: a notification from now on wakes the next `wait`. A
        read armed while nothing listens is followed by a poll-length wait, whatever happens."""
        self.event.clear()
        self.armed = self._signals.listening

    async def wait(self, poll: float) -> None:
        """Until a notification for this response (or a change of the listener), or `poll`
        seconds when not listening (`RECHECK_S` when listening)."""
        timeout = RECHECK_S if self.armed and self._signals.listening else poll
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.event.wait(), timeout)


class Signals:
    def __init__(self, engine: AsyncEngine):
        self.enabled = engine.dialect.name == "postgresql" and listener_share(engine) > 0
        self._engine = engine
        self._conn = None
        self._watches: dict[str, set[Watch]] = {}
        self._task: asyncio.Task | None = None
        self._closed = False
        self.on_follow: Callable[[str], None] | None = None
        """Called with a response id that a reader elsewhere follows (set by the run keeper)."""

    @property
    def listening(self) -> bool:
        return self._conn is not None and not self._conn.is_closed()

    async def start(self) -> None:
        """Begin listening (PostgreSQL); should the database refuse now, keep trying in the
        background: readers poll meanwhile."""
        if self.enabled and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._keep_listening())

    async def close(self) -> None:
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
        await self._drop()

    @contextlib.contextmanager
    def watch(self, response_id: str) -> Iterator[Watch]:
        w = Watch(self)
        self._watches.setdefault(response_id, set()).add(w)
        try:
            yield w
        finally:
            ws = self._watches.get(response_id)
            if ws is not None:
                ws.discard(w)
                if not ws:
                    del self._watches[response_id]

    async def follow(self, response_id: str) -> None:
        """Ask the process running `response_id` to write its events as they come (a reader here
        tails it), over the listening connection; nothing when not listening."""
        conn = self._conn
        if conn is not None and not conn.is_closed():
            with contextlib.suppress(Exception):  # (a lost connection is the listener's business)
                await conn.execute("SELECT pg_notify($1, $2)", FOLLOW, response_id)

    # ------------------------------------------------------------------ the listening connection

    def _wake_all(self) -> None:
        """The listener came up or went down: every reader looks again (and re-arms)."""
        for ws in self._watches.values():
            for w in ws:
                w.event.set()

    def _received(self, _conn, _pid, channel: str, payload: str) -> None:
        if channel == EVENTS:
            for w in self._watches.get(payload, ()):
                w.event.set()
        elif channel == FOLLOW and self.on_follow is not None:
            self.on_follow(payload)

    async def _keep_listening(self) -> None:
        attempt = 0
        while not self._closed:
            lost = asyncio.Event()
            conn = None
            try:
                conn = await pg_connect(self._engine)
                conn.add_termination_listener(lambda _c, lost=lost: lost.set())
                await conn.add_listener(EVENTS, self._received)
                await conn.add_listener(FOLLOW, self._received)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                delay = RECONNECT_S[min(attempt, len(RECONNECT_S) - 1)]
                attempt += 1
                log.warning("could not listen for event notifications (%s: %s); polling, trying again in %.1f s",
                            type(e).__name__, e, delay)
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await conn.close()
                await asyncio.sleep(delay)
                continue
            attempt = 0
            self._conn = conn
            self._wake_all()
            await lost.wait()
            self._conn = None
            self._wake_all()
            if not self._closed:
                log.warning("the connection listening for event notifications was lost; polling until it is back")
                await asyncio.sleep(RECONNECT_S[0])

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.close()
