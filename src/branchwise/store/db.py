"""Database engines: plain URLs in, async engines out, migrations applied at start-up."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import re
import sqlite3
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

MIGRATIONS = Path(__file__).parent / "migrations"

# Every query branchwise runs is an index lookup or a short range scan; the recursive path walks
# are index lookups step by step. A plan made while a table was small (prepared statements keep
# theirs) must never turn a walk into a scan per step, so the planner is told to avoid scans and
# hash/merge joins on branchwise's connections. Under those rules a statement's plan does not
# depend on its values, so each prepared statement is planned once per connection (a generic
# plan) instead of five times before PostgreSQL settles on one: the group commit's statements
# have a text per shape, and re-planning them cost postgres ~15% of its CPU per response at c=64.
PG_SETTINGS = {"enable_seqscan": "off", "enable_hashjoin": "off", "enable_mergejoin": "off", "jit": "off",
               "plan_cache_mode": "force_generic_plan"}


def async_url(url: str) -> str:
    """`sqlite:///x.db` -> `sqlite+aiosqlite:///x.db`; `postgresql://...` -> `postgresql+asyncpg://...`."""
    u = make_url(url)
    if u.drivername in ("sqlite", "sqlite+pysqlite"):
        u = u.set(drivername="sqlite+aiosqlite")
    elif u.drivername in ("postgresql", "postgres", "postgresql+psycopg", "postgresql+psycopg2"):
        u = u.set(drivername="postgresql+asyncpg")
    return u.render_as_string(hide_password=False)


def is_sqlite(engine: AsyncEngine) -> bool:
    return engine.dialect.name == "sqlite"


def _sqlite_events(sync: Engine) -> None:
    @event.listens_for(sync, "connect")
    def _on_connect(dbapi_connection, _record):  # pragma: no cover - trivial
        # Let SQLAlchemy's "begin" event emit BEGIN itself (pysqlite's own is deferred and
        # fragile under concurrent writers).
        dbapi_connection.isolation_level = None
        cur = dbapi_connection.cursor()
        # A new database file gets 2 KB pages instead of 4 KB (an existing one keeps its own;
        # SQLite ignores this once the file has tables): a stored response dirties ~12 pages
        # (rows, and index leaves of items, responses and conversations), each written whole to
        # the WAL, so smaller pages halve what a commit writes and checksums: 49 -> 31 kB per
        # response, commit CPU -20%.
        cur.execute("PRAGMA page_size=2048")
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.close()

    @event.listens_for(sync, "begin")
    def _on_begin(conn):  # pragma: no cover - trivial
        # Writers take the write lock up front: no read-then-upgrade deadlocks. Readers in
        # autocommit run each statement on its own (a statement is a consistent snapshot).
        opts = conn.get_execution_options()
        if opts.get("isolation_level") == "AUTOCOMMIT":
            return
        conn.exec_driver_sql("BEGIN IMMEDIATE" if opts.get("sqlite_immediate", False) else "BEGIN")


def create_engine(url: str) -> AsyncEngine:
    url = async_url(url)
    if url.startswith("sqlite"):
        # Every transaction ends explicitly (engine.begin()) and reads run in autocommit, so a
        # connection going back to the pool has nothing to roll back: skip that round trip.
        engine = create_async_engine(url, pool_size=8, max_overflow=8, pool_reset_on_return=None,
                                     connect_args={"timeout": 30})
        _sqlite_events(engine.sync_engine)
        return engine
    # A fixed pool: connections opened and closed under load cost PostgreSQL more than they save.
    # (The hot path has a pool of its own: see `Database`.)
    return create_async_engine(url, pool_size=12, max_overflow=0, pool_timeout=60, pool_pre_ping=False,
                               pool_reset_on_return=None, connect_args={"server_settings": dict(PG_SETTINGS)})


_WRITE_LOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class Writer:
    """Opens write transactions. On SQLite they take the database's write lock up front
    (BEGIN IMMEDIATE), and one process's writers queue on an asyncio lock instead of busy-waiting
    in SQLite's retry loop (which sleeps up to 100 ms a try and collapses under concurrency)."""

    def __init__(self, engine: AsyncEngine):
        self.sqlite = is_sqlite(engine)
        self.engine = engine.execution_options(sqlite_immediate=True) if self.sqlite else engine
        self._key = engine.sync_engine

    def lock(self) -> asyncio.Lock:
        """This process's queue for the SQLite database's write lock."""
        lock = _WRITE_LOCKS.get(self._key)
        if lock is None:
            lock = _WRITE_LOCKS[self._key] = asyncio.Lock()
        return lock

    @contextlib.asynccontextmanager
    async def begin(self) -> AsyncIterator[AsyncConnection]:
        if not self.sqlite:
            async with self.engine.begin() as conn:
                yield conn
            return
        async with self.lock(), self.engine.begin() as conn:
            yield conn


_PARAM = re.compile(r"(?<![:\w]):([A-Za-z_]\w*)")


class SQL:
    """One statement for the raw drivers, written once with `:name` parameters: sqlite3 takes
    that text and a dict as they are; asyncpg gets `$n` and the values in order."""

    __slots__ = ("text", "pg", "names")

    def __init__(self, text: str):
        self.text = text
        names: list[str] = []

        def number(m: re.Match) -> str:
            if m.group(1) not in names:
                names.append(m.group(1))
            return f"${names.index(m.group(1)) + 1}"

        self.pg = _PARAM.sub(number, text)
        self.names = tuple(names)

    def args(self, params: dict) -> tuple:
        return tuple(params[n] for n in self.names)


# One write step: a statement and its parameters (a dict, or a list of dicts for many rows).
Step = tuple[SQL, dict | list[dict]]
# One write: its steps, and whether it returns the last one's rows (else its row count).
Write = tuple[Sequence[Step], bool]


class _Group:
    """SQLite: the writes made in one pass of the event loop, committed together."""

    __slots__ = ("writes", "results", "_done")

    def __init__(self) -> None:
        self.writes: list[Write] = []
        self.results: list | None = None  # per write: its result, or the exception it raised
        self._done: asyncio.Future | None = None

    def finish(self, results: list) -> None:
        self.results = results
        if self._done is not None and not self._done.done():
            self._done.set_result(None)

    def fail(self, exc: Exception) -> None:
        self.finish([exc] * len(self.writes))

    async def finished(self) -> None:
        if self._done is None:
            self._done = asyncio.get_running_loop().create_future()
        await asyncio.shield(self._done)


class PassBatch:
    """Group commit for statements that are round trips: calls handed to `flush` (a coroutine
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


def _is_busy(e: sqlite3.OperationalError) -> bool:
    return "locked" in str(e) or "busy" in str(e)


class _Busy(Exception):
    """The write lock is held by a writer that does not queue on the flock."""


class _Held(Exception):
    """Another process's hot-path writer holds the flock."""


async def _reset(conn) -> None:
    """What a connection needs on its way back to the pool. asyncpg's default reset is a round
    trip per use (UNLISTEN, RESET ALL ...) for session state these statements never set."""
    if conn.is_in_transaction():
        await conn.execute("ROLLBACK")


class Database:
    """The hot path's statements, on the raw drivers: SQLAlchemy's execution machinery cost
    more CPU per stored response than the rest of the request together (measured: a history read
    took 470 us through it and a thread hop, 37 us as plain sqlite3).

    - SQLite: reads and writes run on the event loop's own connection (a point lookup, one
      recursive walk, a few inserts: tens to a couple of hundred microseconds, less than a
      thread hop). The writes of one pass of the loop are committed together, in one
      transaction (group commit, see `_sqlite_write`). Processes sharing the file take an
      `flock` around each such transaction (held a fraction of a millisecond); one that finds
      it taken tries again after 0.5, 1, 2, 4 ms
      ... without leaving the loop (a thread hop costs more CPU than the write, and the woken
      thread waits for the GIL while it holds the lock). While this process's write lock is
      held (a `Writer` transaction), writes poll until it is free. After
      50 ms of flock waits, or when a writer outside this scheme holds SQLite's lock (another
      process's `Writer`, migrations), the write waits its turn on a writer thread: a blocking
      `flock`, then SQLite's busy timeout. The loop's connection never checkpoints (a
      checkpoint syncs the file); the writer thread does (see `_checkpoint`).
    - PostgreSQL: an asyncpg pool of its own (32 connections); asyncpg prepares and caches each
      statement.
    """

    CHECKPOINT_EVERY = 200  # commits between two checkpoints that run beside the writes
    RESTART_EVERY = 1000  # commits between two that hold the writes back, so the WAL starts over
    SLOW_CHECKPOINT_S = 0.05
    POLL_S = 0.0005  # first wait when another process holds the flock, doubled up to 4 ms
    POLL_FOR_S = 0.05  # then the writer thread waits for it instead

    def __init__(self, engine: AsyncEngine):
        self.engine = engine
        self.sqlite = is_sqlite(engine)
        self._writer = Writer(engine)
        self._pool = None
        self._pool_lock = asyncio.Lock()
        if self.sqlite:
            self._path = engine.url.database
            if not self._path or self._path == ":memory:":
                raise ValueError("branchwise needs a SQLite file, not an in-memory database")
            self._lockfile = os.open(self._path + ".branchwise-lock", os.O_RDWR | os.O_CREAT, 0o644)
            self._loop_conn = self._connect(busy_ms=0)
            self._thread_conn: sqlite3.Connection | None = None
            self._writes = ThreadPoolExecutor(1, thread_name_prefix="branchwise-sqlite-write")
            self._commits = 0
            self._next_checkpoint = self.CHECKPOINT_EVERY
            self._next_restart = self.RESTART_EVERY
            self._restarted = 0
            self._checkpoint_task: asyncio.Task | None = None
            self._group: _Group | None = None  # the writes of this pass of the loop, not yet flushed
            self._slow_flushes: set[asyncio.Task] = set()

    # ------------------------------------------------------------------ reads

    async def _sqlite_read(self, sql: SQL, params: dict, many: bool):
        """A read on the loop's connection (busy timeout 0: it must never block the loop). A
        WAL reader is refused only in rare moments (another connection recovering or resetting
        the WAL index): try again shortly, then wait on the writer thread's connection."""
        for delay in (0.001, 0.004, 0.016):
            try:
                cur = self._loop_conn.execute(sql.text, params)
                return cur.fetchall() if many else cur.fetchone()
            except sqlite3.OperationalError as e:
                if not _is_busy(e):
                    raise
            await asyncio.sleep(delay)
        return await asyncio.get_running_loop().run_in_executor(self._writes, self._read_waiting, sql, params, many)

    def _read_waiting(self, sql: SQL, params: dict, many: bool):
        if self._thread_conn is None:
            self._thread_conn = self._connect(busy_ms=30000)
        cur = self._thread_conn.execute(sql.text, params)
        return cur.fetchall() if many else cur.fetchone()

    async def one(self, sql: SQL, params: dict) -> tuple | None:
        if self.sqlite:
            return await self._sqlite_read(sql, params, False)
        pool = await self._pg()
        row = await pool.fetchrow(sql.pg, *sql.args(params))
        return None if row is None else tuple(row)

    async def all(self, sql: SQL, params: dict) -> list[tuple]:
        if self.sqlite:
            return await self._sqlite_read(sql, params, True)
        pool = await self._pg()
        return [tuple(r) for r in await pool.fetch(sql.pg, *sql.args(params))]

    async def value(self, sql: SQL, params: dict) -> Any:
        row = await self.one(sql, params)
        return None if row is None else row[0]

    # ------------------------------------------------------------------ writes

    async def fetch_pg_positional(self, pg_text: str, args: Sequence[Any]) -> list[tuple]:
        """PostgreSQL: one statement already numbered `$1 ..` (its own transaction): its rows."""
        pool = await self._pg()
        return [tuple(r) for r in await pool.fetch(pg_text, *args)]

    async def write(self, steps: Sequence[Step]) -> int:
        """`steps` in one transaction; returns the row count of the last one."""
        if not self.sqlite:
            pool = await self._pg()
            async with pool.acquire() as conn, conn.transaction():
                count = 0
                for sql, params in steps:
                    if isinstance(params, list):
                        await conn.executemany(sql.pg, [sql.args(p) for p in params])
                        count = len(params)
                    else:
                        count = int((await conn.execute(sql.pg, *sql.args(params))).rsplit(" ", 1)[-1])
                return count
        return await self._sqlite_write(steps, False)

    async def write_returning(self, sql: SQL, params: dict) -> list[tuple]:
        """One data-modifying statement with RETURNING, in its own transaction: its rows."""
        if not self.sqlite:
            return await self.fetch_pg_positional(sql.pg, sql.args(params))
        return await self._sqlite_write([(sql, params)], True)

    async def _sqlite_write(self, steps: Sequence[Step], fetch: bool):
        """Group commit: the writes that reach this point in one pass of the event loop are
        committed together, in one transaction, by `_flush`, which the first of them schedules
        and which runs before any of them goes on (each yields once, after the flush's turn).
        Under load a stored response then shares its transaction's pages, locks and WAL frames
        with the others of its pass (the right-hand leaves of every index, the conversations'
        pages): SQLite writes each page once per transaction. Alone, a write costs one extra
        turn of the loop. Each write's statements still run in its own order, so the
        compare-and-swap of one sees the ones before it, exactly as in separate transactions."""
        if self._commits >= self._next_checkpoint and (self._checkpoint_task is None or self._checkpoint_task.done()):
            self._next_checkpoint = self._commits + self.CHECKPOINT_EVERY
            restart = self._commits >= self._next_restart
            if restart:
                self._next_restart = self._commits + self.RESTART_EVERY
            self._checkpoint_task = asyncio.get_running_loop().create_task(self._checkpoint_soon(restart))
        group = self._group
        if group is None:
            group = self._group = _Group()
            asyncio.get_running_loop().call_soon(self._flush, group)
        k = len(group.writes)
        group.writes.append((steps, fetch))
        await asyncio.sleep(0)  # the flush runs first
        if group.results is None:  # it had to wait for the lock (`_flush_slowly`)
            await group.finished()
        result = group.results[k]
        if isinstance(result, BaseException):
            raise result
        return result

    def _flush(self, group: _Group) -> None:
        """Commit `group` now if the write lock is free; else a task waits for it."""
        if self._group is group:
            self._group = None
        busy = False
        if not self._writer.lock().locked():
            try:
                group.finish(self._write_inline(group.writes))
                return
            except _Held:
                pass
            except _Busy:
                busy = True
            except Exception as e:
                group.fail(e)
                return
        task = asyncio.get_running_loop().create_task(self._flush_slowly(group, busy))
        self._slow_flushes.add(task)
        task.add_done_callback(self._slow_flushes.discard)

    async def _flush_slowly(self, group: _Group, busy: bool) -> None:
        """`group` when the write lock was taken: while a `Writer` transaction of this process
        holds it, poll every millisecond (a queue on the asyncio lock hands it on one waiter per
        loop iteration: 64 waiters behind a 10 ms hold waited up to 400 ms; the writer thread
        was worse, each write waiting for the GIL in turn); while another process's hot-path
        write holds the flock, try again after 0.5, 1, 2, 4 ms. After `POLL_FOR_S`, or when a
        writer outside the flock holds SQLite's lock, the writer thread waits its turn."""
        lock = self._writer.lock()
        delay, waited = self.POLL_S, 0.0
        try:
            while not busy:
                if lock.locked():
                    await asyncio.sleep(0.001)
                    continue
                try:
                    group.finish(self._write_inline(group.writes))
                    return
                except _Held:  # another process is in a write (a fraction of a millisecond, as a rule)
                    if waited >= self.POLL_FOR_S:
                        break
                    await asyncio.sleep(delay)
                    waited += delay
                    delay = min(2 * delay, 0.004)
                except _Busy:
                    break
            async with lock:
                results = await asyncio.get_running_loop().run_in_executor(
                    self._writes, self._write_waiting, group.writes)
            group.finish(results)
        except BaseException as e:
            group.fail(e if isinstance(e, Exception) else RuntimeError("the server is shutting down"))
            raise

    @staticmethod
    def _steps(conn: sqlite3.Connection, steps: Sequence[Step], fetch: bool):
        """One write's statements: the row count of the last, or with `fetch` its rows."""
        result: Any = 0
        for sql, params in steps:
            if isinstance(params, list):
                result = conn.executemany(sql.text, params).rowcount
            elif fetch:
                result = conn.execute(sql.text, params).fetchall()
            else:
                result = conn.execute(sql.text, params).rowcount
        return result

    @classmethod
    def _run(cls, conn: sqlite3.Connection, writes: Sequence[Write], begun: bool = False) -> list:
        """`writes` in one transaction: each one's result. Should one of them fail, all are
        rolled back and run again, each in a transaction of its own, so that the others land
        and the failure is that write's alone (its result is the exception)."""
        if not begun:
            conn.execute("BEGIN IMMEDIATE")
        try:
            results = [cls._steps(conn, steps, fetch) for steps, fetch in writes]
            conn.execute("COMMIT")
            return results
        except Exception as e:
            conn.execute("ROLLBACK")
            if len(writes) == 1:
                return [e]
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        results = []
        for steps, fetch in writes:
            conn.execute("BEGIN IMMEDIATE")
            try:
                results.append(cls._steps(conn, steps, fetch))
                conn.execute("COMMIT")
            except Exception as e:
                conn.execute("ROLLBACK")
                results.append(e)
        return results

    def _write_inline(self, writes: Sequence[Write]) -> list:
        try:
            fcntl.flock(self._lockfile, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _Held from None
        try:
            try:
                self._loop_conn.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as e:  # a writer that does not take the flock
                if _is_busy(e):
                    raise _Busy from None
                raise
            results = self._run(self._loop_conn, writes, begun=True)
        finally:
            fcntl.flock(self._lockfile, fcntl.LOCK_UN)
        self._commits += len(writes)
        return results

    def _write_waiting(self, writes: Sequence[Write]) -> list:
        """On the writer thread: wait for the other processes' writers, then write."""
        if self._thread_conn is None:
            self._thread_conn = self._connect(busy_ms=30000)
        fcntl.flock(self._lockfile, fcntl.LOCK_EX)
        try:
            results = self._run(self._thread_conn, writes)
        finally:
            fcntl.flock(self._lockfile, fcntl.LOCK_UN)
        self._commits += len(writes)
        return results

    async def _checkpoint_soon(self, restart: bool) -> None:
        """Every `CHECKPOINT_EVERY` commits: copy the WAL back into the database file, on the
        writer thread, while the writes go on (see `_checkpoint`)."""
        loop = asyncio.get_running_loop()
        overdue = self._commits - self._restarted >= 5 * self.RESTART_EVERY
        if await loop.run_in_executor(self._writes, self._checkpoint, restart, overdue):
            self._restarted = self._commits
        elif restart:
            self._next_restart = self._commits + self.CHECKPOINT_EVERY  # try again soon

    def _checkpoint(self, restart: bool, overdue: bool) -> bool:
        """A passive checkpoint. It races the writes and never catches up, though, so the WAL
        never starts over: it grew by ~65 kB a response (500 MB in 8 s at 600/s), slowing every
        read with it. So with `restart` (every `RESTART_EVERY` commits) a second, short pass
        (what landed during the first) follows at once, holding the flock: the writes poll for
        it as for another process's write, and the next one starts the WAL over from its
        beginning. That holds the writes back for the second pass, its copy and its two fsyncs
        (~2-5 ms here); the loop runs on. (It used to run behind this process's asyncio write
        lock: the thread waited for the GIL to start and to finish, then the loop took an
        iteration to see it done, ~15-25 ms in all at concurrency 64, and the requests caught
        behind it made up the 99th percentile. On the loop itself the pass blocked everything
        for ~8 ms: what lands during the first pass takes fsyncs of ~1 MB. Holding the writes
        back for the whole copy stalled them ~150 ms.) A slow first pass (over
        `SLOW_CHECKPOINT_S`) means a busy disk, and the second pass's fsyncs would hold the
        writes back as long: skip it, up to five times in a row (`overdue`). True when the
        second pass ran."""
        if self._thread_conn is None:
            self._thread_conn = self._connect(busy_ms=30000)
        started = time.perf_counter()
        with contextlib.suppress(sqlite3.Error):
            self._thread_conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
        if not restart or (time.perf_counter() - started > self.SLOW_CHECKPOINT_S and not overdue):
            return False
        fcntl.flock(self._lockfile, fcntl.LOCK_EX)
        try:
            with contextlib.suppress(sqlite3.Error):
                self._thread_conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
        finally:
            fcntl.flock(self._lockfile, fcntl.LOCK_UN)
        return True

    def _connect(self, busy_ms: int) -> sqlite3.Connection:
        conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False, cached_statements=64)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute(f"PRAGMA busy_timeout={busy_ms}")
        conn.execute("PRAGMA wal_autocheckpoint=0")
        # 16 MB of page cache instead of SQLite's 2 MB: a conversation's history lies on pages
        # written over its whole life, and with 2 MB they were read back from the OS more and
        # more often as the database grew (CPU per response 0.79 -> 1.08 ms over 24,000
        # responses; flat at ~0.85 ms with 16 MB). 64 MB cost more CPU than it saved.
        conn.execute("PRAGMA cache_size=-16384")
        return conn

    async def _pg(self):
        return self._pool or await self._open_pool()

    async def _open_pool(self):
        async with self._pool_lock:
            if self._pool is None:
                import asyncpg

                url = self.engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
                # 32 connections: with 16, 64 concurrent responses queued for them and p99 at
                # c=64 was 130 ms (85 ms with 32). With the engine's 12 that is 44 a process,
                # so two processes stay under PostgreSQL's default of 100.
                self._pool = await asyncpg.create_pool(url, min_size=1, max_size=32, reset=_reset,
                                                       server_settings=PG_SETTINGS)
        return self._pool

    async def close(self) -> None:
        if self.sqlite:
            for task in [self._checkpoint_task, *self._slow_flushes]:
                if task is not None:
                    with contextlib.suppress(BaseException):
                        await task
        if self._pool is not None:
            await self._pool.close()
            self._pool = None
        if self.sqlite:
            self._writes.shutdown(wait=True)
            for conn in (self._loop_conn, self._thread_conn):
                if conn is not None:
                    conn.close()
            os.close(self._lockfile)


def writer(engine: AsyncEngine) -> Writer:
    return Writer(engine)


def reader(engine: AsyncEngine) -> AsyncEngine:
    """The engine to read with: autocommit, so a read is one statement and no BEGIN/ROLLBACK."""
    return engine.execution_options(isolation_level="AUTOCOMMIT")


def _alembic_config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    return cfg


async def migrate(engine: AsyncEngine) -> None:
    """Bring the schema to the newest revision. Safe to run from several processes at once."""
    cfg = _alembic_config()

    def _upgrade(sync_conn) -> None:
        cfg.attributes["connection"] = sync_conn
        command.upgrade(cfg, "head")

    async with writer(engine).begin() as conn:
        if engine.dialect.name == "postgresql":
            await conn.exec_driver_sql("SELECT pg_advisory_xact_lock(7351001)")
        await conn.run_sync(_upgrade)
