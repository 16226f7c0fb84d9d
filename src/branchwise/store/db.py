"""Database engines: plain URLs in, async engines out, migrations applied at start-up."""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, Engine, event
from sqlalchemy import create_engine as sa_create_engine
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

MIGRATIONS = Path(__file__).parent / "migrations"


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
    # Every query branchwise runs is an index lookup or a short range scan; the recursive path
    # walks are index lookups step by step. A plan made while a table was small (prepared
    # statements keep theirs) must never turn a walk into a scan per step, so the planner is told
    # to avoid scans and hash/merge joins on these connections.
    server_settings = {"enable_seqscan": "off", "enable_hashjoin": "off", "enable_mergejoin": "off",
                       "jit": "off"}
    # A fixed pool: connections opened and closed under load cost PostgreSQL more than they save.
    return create_async_engine(url, pool_size=32, max_overflow=0, pool_timeout=60, pool_pre_ping=False,
                               pool_reset_on_return=None, connect_args={"server_settings": server_settings})


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


T = TypeVar("T")


class Database:
    """Runs a function of a (sync) SQLAlchemy `Connection` in as few hops as the driver allows:
    the hot path's queries are written this way.

    - PostgreSQL: on the async engine, through `run_sync` (asyncpg under a greenlet; no thread).
    - SQLite: aiosqlite hands every cursor call to its thread and back (several hops a
      statement, most of the CPU a response cost), so here the whole function runs in one hop on
      a thread, on a plain pysqlite engine over the same file. Writers still queue on the same
      in-process lock as `Writer`.
    """

    def __init__(self, engine: AsyncEngine):
        self.engine = engine
        self.sqlite = is_sqlite(engine)
        self._writer = Writer(engine)
        self._reader = reader(engine)
        if self.sqlite:
            sync_url = engine.url.set(drivername="sqlite")
            self._sync = sa_create_engine(sync_url, pool_size=8, max_overflow=8, pool_reset_on_return=None,
                                          connect_args={"timeout": 30, "check_same_thread": False})
            _sqlite_events(self._sync)
            self._sync_reader = self._sync.execution_options(isolation_level="AUTOCOMMIT")
            self._sync_writer = self._sync.execution_options(sqlite_immediate=True)
            self._reads = ThreadPoolExecutor(4, thread_name_prefix="branchwise-sqlite-read")
            self._writes = ThreadPoolExecutor(1, thread_name_prefix="branchwise-sqlite-write")

    async def read(self, fn: Callable[[Connection], T]) -> T:
        if self.sqlite:
            return await asyncio.get_running_loop().run_in_executor(self._reads, self._read_now, fn)
        async with self._reader.connect() as conn:
            return await conn.run_sync(fn)

    async def write(self, fn: Callable[[Connection], T]) -> T:
        """`fn` in one transaction."""
        if self.sqlite:
            async with self._writer.lock():
                return await asyncio.get_running_loop().run_in_executor(self._writes, self._write_now, fn)
        async with self.engine.begin() as conn:
            return await conn.run_sync(fn)

    def _read_now(self, fn: Callable[[Connection], T]) -> T:
        with self._sync_reader.connect() as conn:
            return fn(conn)

    def _write_now(self, fn: Callable[[Connection], T]) -> T:
        with self._sync_writer.begin() as conn:
            return fn(conn)

    def close(self) -> None:
        if self.sqlite:
            self._reads.shutdown(wait=True)
            self._writes.shutdown(wait=True)
            self._sync.dispose()


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
