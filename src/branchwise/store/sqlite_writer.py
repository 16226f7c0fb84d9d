"""SQLite: the repository's reads and writes on raw sqlite3 connections. Reads run on the
event loop's own connection; the writes of one pass of the loop are committed together in one
transaction (group commit); processes sharing the file take turns on an `flock`; a writer
thread waits when the loop must not, and runs the checkpoints that keep the WAL short
(docs/decisions/0007-sqlite-checkpoints.md, 0011-sqlite-group-commit.md)."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import os
import sqlite3
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from branchwise.store.connect import sqlite_connect, sqlite_path, write_lock
from branchwise.store.statements import SQL, Step, Tx

# One write: what it does on the connection, inside the group's transaction; its result.
Write = Callable[[sqlite3.Connection], Any]


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


def _run_now(coro) -> Any:
    """Run a coroutine that never suspends (a transaction on sqlite3) to its end, here."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    coro.close()
    raise RuntimeError("a SQLite transaction must not wait for anything")


class SqliteTx(Tx):
    """A transaction's statements on a sqlite3 connection: each runs as it is called."""

    __slots__ = ("conn",)

    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn

    async def one(self, sql: SQL, params: dict) -> tuple | None:
        return self.conn.execute(sql.text, params).fetchone()

    async def all(self, sql: SQL, params: dict) -> list[tuple]:
        return self.conn.execute(sql.text, params).fetchall()

    async def execute(self, sql: SQL, params: dict | list[dict]) -> int:
        if isinstance(params, list):
            return self.conn.executemany(sql.text, params).rowcount if params else 0
        return self.conn.execute(sql.text, params).rowcount


class _Group:
    """SQLite: the writes made in one pass of the event loop, committed together."""

    __slots__ = ("writes", "results", "_done", "heavy")

    def __init__(self) -> None:
        self.heavy = False  # a write of the group is big: commit it on the writer thread
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


def _is_busy(e: sqlite3.OperationalError) -> bool:
    return "locked" in str(e) or "busy" in str(e)


class _Busy(Exception):
    """The write lock is held by a writer that does not queue on the flock."""


class _Held(Exception):
    """Another process's hot-path writer holds the flock."""


class SqliteWriter:
    """The repository's statements on SQLite, on raw sqlite3 connections: reads and writes run on the event loop's own connection (a point lookup, one
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
    """

    # Checkpoints are scheduled by rows written (inserted, updated or deleted), not by commits: a
    # stored response changes ~4 rows, an import batch thousands, and the WAL grows with what
    # is written, not with how many transactions wrote it.
    CHECKPOINT_EVERY = 800  # rows between two checkpoints that run beside the writes (~200 responses)
    RESTART_EVERY = 4000  # rows between two that hold the writes back, so the WAL starts over
    SLOW_CHECKPOINT_S = 0.05
    WAL_PAST_LIMIT = 4  # a WAL this many times `journal_size_limit` starts over at the next checkpoint
    IDLE_S = 1.0  # writes that stop this long are followed by a checkpoint that empties the WAL file
    POLL_S = 0.0005  # first wait when another process holds the flock, doubled up to 4 ms
    POLL_FOR_S = 0.05  # then the writer thread waits for it instead

    def __init__(self, engine: AsyncEngine):
        self._lock = write_lock(engine)  # held by this process's SQLAlchemy `Writer` transactions
        self._path = sqlite_path(engine)
        self._lockfile = os.open(self._path + ".branchwise-lock", os.O_RDWR | os.O_CREAT, 0o644)
        self._loop_conn = sqlite_connect(self._path, busy_ms=0)
        self._thread_conn: sqlite3.Connection | None = None
        self._writes = ThreadPoolExecutor(1, thread_name_prefix="branchwise-sqlite-write")
        self._rows = 0  # rows this process's writes changed (what schedules the checkpoints)
        self._next_checkpoint = self.CHECKPOINT_EVERY
        self._next_restart = self.RESTART_EVERY
        self._restarted = 0
        self._frame_bytes = 0  # a WAL frame: a page and its 24-byte header
        self._wal_limit = 0  # the connections' journal_size_limit
        self._checkpoint_task: asyncio.Task | None = None
        self._idle_timer: asyncio.TimerHandle | None = None
        self._emptied_at = 0  # `_rows` when the WAL file was last emptied
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
            self._thread_conn = sqlite_connect(self._path, busy_ms=30000)
        cur = self._thread_conn.execute(sql.text, params)
        return cur.fetchall() if many else cur.fetchone()

    async def one(self, sql: SQL, params: dict) -> tuple | None:
        return await self._sqlite_read(sql, params, False)

    async def all(self, sql: SQL, params: dict) -> list[tuple]:
        return await self._sqlite_read(sql, params, True)

    async def value(self, sql: SQL, params: dict) -> Any:
        row = await self.one(sql, params)
        return None if row is None else row[0]

    # ------------------------------------------------------------------ writes

    async def write(self, steps: Sequence[Step], heavy: bool = False) -> int:
        """`steps` in one transaction; returns the row count of the last one. `heavy`: they
        write megabytes, which would hold the event loop for tens of milliseconds: their group
        commits on the writer thread instead."""
        return await self._sqlite_write(functools.partial(_steps, steps=steps, fetch=False), heavy)

    async def write_returning(self, sql: SQL, params: dict) -> list[tuple]:
        """One data-modifying statement with RETURNING, in its own transaction: its rows."""
        return await self._sqlite_write(functools.partial(_steps, steps=[(sql, params)], fetch=True))

    async def transaction(self, fn: Callable[[Tx], Awaitable[Any]]) -> Any:
        """`fn(tx)` in one write transaction, its reads seeing its writes; in the group of its
        pass of the loop like any other write. On SQLite every statement of `tx` is a plain call
        that returns at once, so `fn` runs to its end without suspending: it runs inside the
        group's transaction (on the loop or on the writer thread), and again alone should
        another write of its group fail."""
        return await self._sqlite_write(lambda conn: _run_now(fn(SqliteTx(conn))))

    async def _sqlite_write(self, write: Write, heavy: bool = False):
        """Group commit: the writes that reach this point in one pass of the event loop are
        committed together, in one transaction, by `_flush`, which the first of them schedules
        and which runs before any of them goes on (each yields once, after the flush's turn).
        Under load a stored response then shares its transaction's pages, locks and WAL frames
        with the others of its pass (the right-hand leaves of every index, the conversations'
        pages): SQLite writes each page once per transaction. Alone, a write costs one extra
        turn of the loop. Each write's statements still run in its own order, so the
        compare-and-swap of one sees the ones before it, exactly as in separate transactions."""
        if self._rows >= self._next_checkpoint and (self._checkpoint_task is None or self._checkpoint_task.done()):
            self._next_checkpoint = self._rows + self.CHECKPOINT_EVERY
            restart = self._rows >= self._next_restart
            if restart:
                self._next_restart = self._rows + self.RESTART_EVERY
            self._checkpoint_task = asyncio.get_running_loop().create_task(self._checkpoint_soon(restart))
        if self._idle_timer is None:
            self._idle_timer = asyncio.get_running_loop().call_later(self.IDLE_S, self._when_idle, self._rows)
        group = self._group
        if group is None:
            group = self._group = _Group()
            asyncio.get_running_loop().call_soon(self._flush, group)
        k = len(group.writes)
        group.writes.append(write)
        group.heavy |= heavy
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
        busy = group.heavy  # (straight to the writer thread)
        if not busy and not self._lock.locked():
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
        loop iteration, so many waiters behind one hold waited many times its length; the writer
        thread was worse, each write waiting for the GIL in turn); while another process's hot-path
        write holds the flock, try again after 0.5, 1, 2, 4 ms. After `POLL_FOR_S`, or when a
        writer outside the flock holds SQLite's lock, the writer thread waits its turn."""
        lock = self._lock
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

    @classmethod
    def _run(cls, conn: sqlite3.Connection, writes: Sequence[Write], begun: bool = False) -> list:
        """`writes` in one transaction: each one's result. Should one of them fail, all are
        rolled back and run again, each in a transaction of its own, so that the others land
        and the failure is that write's alone (its result is the exception)."""
        if not begun:
            conn.execute("BEGIN IMMEDIATE")
        try:
            results = [write(conn) for write in writes]
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
        for write in writes:
            conn.execute("BEGIN IMMEDIATE")
            try:
                results.append(write(conn))
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
        conn = self._loop_conn
        before = conn.total_changes
        try:
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as e:  # a writer that does not take the flock
                if _is_busy(e):
                    raise _Busy from None
                raise
            results = self._run(conn, writes, begun=True)
        finally:
            fcntl.flock(self._lockfile, fcntl.LOCK_UN)
        self._rows += conn.total_changes - before
        return results

    def _write_waiting(self, writes: Sequence[Write]) -> list:
        """On the writer thread: wait for the other processes' writers, then write."""
        if self._thread_conn is None:
            self._thread_conn = sqlite_connect(self._path, busy_ms=30000)
        conn = self._thread_conn
        before = conn.total_changes
        fcntl.flock(self._lockfile, fcntl.LOCK_EX)
        try:
            results = self._run(conn, writes)
        finally:
            fcntl.flock(self._lockfile, fcntl.LOCK_UN)
        self._rows += conn.total_changes - before
        return results

    async def _checkpoint_soon(self, restart: bool) -> None:
        """Every `CHECKPOINT_EVERY` rows: copy the WAL back into the database file, on the
        writer thread, while the writes go on (see `_checkpoint`)."""
        loop = asyncio.get_running_loop()
        overdue = self._rows - self._restarted >= 5 * self.RESTART_EVERY
        if await loop.run_in_executor(self._writes, self._checkpoint, restart, overdue):
            self._restarted = self._rows
        elif restart:
            self._next_restart = self._rows + self.CHECKPOINT_EVERY  # try again soon

    def _checkpoint(self, restart: bool, overdue: bool) -> bool:
        """A passive checkpoint. It races the writes and never catches up, though, so the WAL
        never starts over: it grows by every page of every write, slowing every read with it. So
        with `restart` (every `RESTART_EVERY` rows) a second, short pass (what landed during
        the first) follows at once, holding the flock: the writes poll for it as for another
        process's write, and the next one starts the WAL over from its beginning (and cuts the
        file back to `journal_size_limit`, `connect.SQLITE_WAL_LIMIT`). That holds the
        writes back only for the second pass, its copy and its two fsyncs; the loop runs on.
        Neither behind this process's asyncio write lock (the thread's GIL waits and the loop's
        iteration made the 99th percentile) nor on the loop itself (it blocked everything), nor
        holding the writes back for the whole copy: decision 0007 has the numbers. A slow first pass (over
        `SLOW_CHECKPOINT_S`) means a busy disk, and the second pass's fsyncs would hold the
        writes back as long: skip it, up to five times in a row (`overdue`). A WAL that has
        grown past `WAL_PAST_LIMIT` times the limit anyway (writes this process does not count:
        another process's, SQLAlchemy's) starts over at once, slow disk or not. True when the
        second pass ran."""
        conn = self._thread_conn
        if conn is None:
            conn = self._thread_conn = sqlite_connect(self._path, busy_ms=30000)
        started = time.perf_counter()
        frames = 0
        # (fetchall: a statement not stepped to its end keeps its read open, and a WAL that a
        # reader uses never starts over)
        with contextlib.suppress(sqlite3.Error):
            frames = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()[0][1]
        if self._frame_bytes == 0:
            self._frame_bytes = conn.execute("PRAGMA page_size").fetchall()[0][0] + 24
            self._wal_limit = max(1, conn.execute("PRAGMA journal_size_limit").fetchall()[0][0])
        too_big = frames * self._frame_bytes > self.WAL_PAST_LIMIT * self._wal_limit
        slow = time.perf_counter() - started > self.SLOW_CHECKPOINT_S
        if not too_big and (not restart or (slow and not overdue)):
            return False
        fcntl.flock(self._lockfile, fcntl.LOCK_EX)
        try:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
        finally:
            fcntl.flock(self._lockfile, fcntl.LOCK_UN)
        return True

    def _when_idle(self, rows: int) -> None:
        """`IDLE_S` after a write: while writes go on, look again later; once they stopped, empty
        the WAL file (a burst leaves it as large as its last stretch between two restarts, up to
        `WAL_PAST_LIMIT` times the limit, until the next write cuts it back)."""
        loop = asyncio.get_running_loop()
        if self._rows != rows:
            self._idle_timer = loop.call_later(self.IDLE_S, self._when_idle, self._rows)
            return
        self._idle_timer = None
        if self._rows == self._emptied_at or not (self._checkpoint_task is None or self._checkpoint_task.done()):
            return
        self._emptied_at = self._rows
        self._checkpoint_task = loop.create_task(self._empty_soon())

    async def _empty_soon(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._writes, self._empty)

    def _empty(self) -> None:
        """A checkpoint that copies the whole WAL back and truncates the file to nothing, under
        the flock (no write of any process runs meanwhile; they wait for it as for a write). A
        reader in the WAL would make it wait: it waits 100 ms at most, then leaves the file."""
        conn = self._thread_conn
        if conn is None:
            conn = self._thread_conn = sqlite_connect(self._path, busy_ms=30000)
        fcntl.flock(self._lockfile, fcntl.LOCK_EX)
        try:
            conn.execute("PRAGMA busy_timeout=100")
            with contextlib.suppress(sqlite3.Error):
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        finally:
            conn.execute("PRAGMA busy_timeout=30000")
            fcntl.flock(self._lockfile, fcntl.LOCK_UN)

    async def close(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        for task in [self._checkpoint_task, *self._slow_flushes]:
            if task is not None:
                with contextlib.suppress(BaseException):
                    await task
        self._writes.shutdown(wait=True)
        for conn in (self._loop_conn, self._thread_conn):
            if conn is not None:
                conn.close()
        os.close(self._lockfile)


