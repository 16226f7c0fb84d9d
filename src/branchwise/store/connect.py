"""Database URLs in, connections out: the SQLAlchemy engine (migrations, leases, runs), SQLite's
connection settings (set here, once, for every connection branchwise opens on the file),
PostgreSQL's settings and raw asyncpg pool, and the migrations applied at start-up."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import weakref
from collections.abc import AsyncIterator
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from branchwise.core.errors import Unavailable
from branchwise.settings import Settings

MIGRATIONS = Path(__file__).parent / "migrations"
log = logging.getLogger("branchwise.store")

# Every query branchwise runs is an index lookup or a short range scan; the recursive path walks
# are index lookups step by step. A plan made while a table was small (prepared statements keep
# theirs) must never turn a walk into a scan per step, so the planner is told to avoid scans and
# hash/merge joins on branchwise's connections. Under those rules a statement's plan does not
# depend on its values, so each prepared statement is planned once per connection (a generic
# plan) instead of five times before PostgreSQL settles on one
# (docs/decisions/0003-postgresql-planner-rules-generic-plans.md).
PG_SETTINGS = {"enable_seqscan": "off", "enable_hashjoin": "off", "enable_mergejoin": "off", "jit": "off",
               "plan_cache_mode": "force_generic_plan"}

# PostgreSQL connections are a budget per process (`db_pool_size`): every connection the process
# opens, the SQLAlchemy engine's and the raw pool's together, so that workers x budget is what a
# deployment needs of PostgreSQL's `max_connections`. The hot path's statements go grouped, one
# in flight per kind (docs/decisions/0012), so the raw pool needs a few connections, not one per
# request; the engine (leases, runs, event logs, migrations) gets a third, the raw pool the rest,
# less one connection that listens for notifications when that leaves it four (`store.signals`).
DEFAULT_POOL_SIZE = 10
DEFAULT_POOL_TIMEOUT = 10.0
RETRY_AFTER_S = 1
_BUDGETS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # sync engine -> (raw pool, timeout, listener)


def pool_split(size: int) -> tuple[int, int]:
    """(the SQLAlchemy engine's connections, the raw pool's) of a budget of `size` (2 at least)."""
    engine = max(1, size // 3)
    return engine, max(1, size - engine)


def listener_split(size: int) -> tuple[int, int]:
    """(the raw pool's connections, the one listening for notifications or none) out of the raw
    pool's share of a budget of `size` (`store.signals`): the listener when that leaves the raw
    pool four connections at least, so a small budget polls instead."""
    raw = pool_split(size)[1]
    return (raw - 1, 1) if raw >= 5 else (raw, 0)


def connections_per_process(settings: Settings) -> int:
    """Connections one server process opens to the database at most: `db_pool_size` on
    PostgreSQL (both pools together), 0 on SQLite (a file, not a server's connections)."""
    if make_url(async_url(settings.database_url)).get_backend_name() != "postgresql":
        return 0
    return sum(pool_split(settings.db_pool_size))


def busy() -> Unavailable:
    return Unavailable("The database is busy: every connection this server may open is in use. "
                       "Retry after a moment.", code="database_busy", retryable=True, retry_after=RETRY_AFTER_S)


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


SQLITE_WAL_LIMIT = 16 << 20
"""Bytes the SQLite WAL file is cut back to each time it starts over (`journal_size_limit`):
without it the file stays as large as the longest stretch between two restarts ever made it
(1.65 GB after a bulk fill), though SQLite reuses it from the start."""


def sqlite_settings(conn: sqlite3.Connection, busy_ms: int, raw: bool) -> None:
    """Every SQLite connection branchwise opens, whichever driver opens it; `raw`: one of the
    repository's own (a few a process, and the only ones that checkpoint)."""
    # A new database file gets 2 KB pages instead of 4 KB (an existing one keeps its own; SQLite
    # ignores this once the file has tables): a stored response dirties ~12 pages, each written
    # whole to the WAL (docs/decisions/0006-sqlite-file-layout.md, 0015).
    conn.execute("PRAGMA page_size=2048")
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute(f"PRAGMA busy_timeout={busy_ms}")
    # (any connection that starts the WAL over cuts the file back: set on every one)
    conn.execute(f"PRAGMA journal_size_limit={SQLITE_WAL_LIMIT}")
    if not raw:
        return
    # Checkpoints are the writer thread's (see `sqlite_writer`): never inside a commit.
    conn.execute("PRAGMA wal_autocheckpoint=0")
    # A page cache larger than SQLite's default: a conversation's history lies on pages written
    # over its whole life, and a small cache reads them back from the OS more and more often as
    # the database grows; a much larger one costs more CPU than it saves (decision 0006).
    conn.execute("PRAGMA cache_size=-16384")


def sqlite_connect(path: str, busy_ms: int) -> sqlite3.Connection:
    """A raw connection on the file: statements in autocommit unless one says BEGIN."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, cached_statements=64)
    sqlite_settings(conn, busy_ms, raw=True)
    return conn


def _sqlite_events(sync: Engine) -> None:
    @event.listens_for(sync, "connect")
    def _on_connect(dbapi_connection, _record):  # pragma: no cover - trivial
        # Let SQLAlchemy's "begin" event emit BEGIN itself (pysqlite's own is deferred and
        # fragile under concurrent writers).
        dbapi_connection.isolation_level = None
        sqlite_settings(dbapi_connection, 30000, raw=False)

    @event.listens_for(sync, "begin")
    def _on_begin(conn):  # pragma: no cover - trivial
        # Writers take the write lock up front: no read-then-upgrade deadlocks. Readers in
        # autocommit run each statement on its own (a statement is a consistent snapshot).
        opts = conn.get_execution_options()
        if opts.get("isolation_level") == "AUTOCOMMIT":
            return
        conn.exec_driver_sql("BEGIN IMMEDIATE" if opts.get("sqlite_immediate", False) else "BEGIN")


def create_engine(url: str, pool_size: int = DEFAULT_POOL_SIZE,
                  pool_timeout: float = DEFAULT_POOL_TIMEOUT) -> AsyncEngine:
    """The engine of `url`; on PostgreSQL it and the raw pool (`open_pg_pool`) open `pool_size`
    connections at most, and a call waits `pool_timeout` seconds for one, then gets `busy()`."""
    url = async_url(url)
    if url.startswith("sqlite"):
        # Every transaction ends explicitly (engine.begin()) and reads run in autocommit, so a
        # connection going back to the pool has nothing to roll back: skip that round trip.
        engine = create_async_engine(url, pool_size=8, max_overflow=8, pool_reset_on_return=None,
                                     connect_args={"timeout": 30})
        _sqlite_events(engine.sync_engine)
        return engine
    # A fixed pool: connections opened and closed under load cost PostgreSQL more than they save.
    # (The repository has a raw pool of its own: see `open_pg_pool`.)
    mine, _ = pool_split(pool_size)
    raw, listener = listener_split(pool_size)
    engine = create_async_engine(url, pool_size=mine, max_overflow=0, pool_timeout=pool_timeout,
                                 pool_pre_ping=False, pool_reset_on_return=None,
                                 connect_args={"server_settings": dict(PG_SETTINGS)})
    _BUDGETS[engine.sync_engine] = (raw, pool_timeout, listener)
    return engine


def sqlite_path(engine: AsyncEngine) -> str:
    path = engine.url.database
    if not path or path == ":memory:":
        raise ValueError("branchwise needs a SQLite file, not an in-memory database")
    return path


async def _reset(conn) -> None:
    """What a connection needs on its way back to the pool. asyncpg's default reset is a round
    trip per use (UNLISTEN, RESET ALL ...) for session state these statements never set."""
    if conn.is_in_transaction():
        await conn.execute("ROLLBACK")


def _budget(engine: AsyncEngine) -> tuple[int, float, int]:
    """(raw pool size, pool timeout, listener) of `engine`'s process."""
    budget = _BUDGETS.get(engine.sync_engine)
    if budget is None:
        raw, listener = listener_split(DEFAULT_POOL_SIZE)
        return raw, DEFAULT_POOL_TIMEOUT, listener
    return budget


def pg_pool_timeout(engine: AsyncEngine) -> float:
    return _budget(engine)[1]


def pg_pool_size(engine: AsyncEngine) -> int:
    """The raw pool's size for `engine` (its share of the budget)."""
    return _budget(engine)[0]


def listener_share(engine: AsyncEngine) -> int:
    """Connections `engine`'s process may keep listening for notifications (0 or 1)."""
    return _budget(engine)[2]


async def pg_connect(engine: AsyncEngine):
    """One connection of its own on `engine`'s database (the notification listener's)."""
    import asyncpg

    url = engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
    return await asyncpg.connect(url)


async def open_pg_pool(engine: AsyncEngine):
    import asyncpg

    size = pg_pool_size(engine)
    url = engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
    return await asyncpg.create_pool(url, min_size=1, max_size=size, reset=_reset, server_settings=PG_SETTINGS)


_WRITE_LOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def write_lock(engine: AsyncEngine) -> asyncio.Lock:
    """This process's queue for the SQLite database's write lock (one per engine)."""
    key = engine.sync_engine
    lock = _WRITE_LOCKS.get(key)
    if lock is None:
        lock = _WRITE_LOCKS[key] = asyncio.Lock()
    return lock


class Writer:
    """Opens SQLAlchemy write transactions (leases, runs, migrations). On SQLite they take the
    database's write lock up front (BEGIN IMMEDIATE), and one process's writers queue on an
    asyncio lock instead of busy-waiting in SQLite's retry loop (which sleeps up to 100 ms a
    try and collapses under concurrency)."""

    def __init__(self, engine: AsyncEngine):
        self.sqlite = is_sqlite(engine)
        self._base = engine
        self.engine = engine.execution_options(sqlite_immediate=True) if self.sqlite else engine

    def lock(self) -> asyncio.Lock:
        return write_lock(self._base)

    @contextlib.asynccontextmanager
    async def begin(self) -> AsyncIterator[AsyncConnection]:
        if not self.sqlite:
            try:
                async with self.engine.begin() as conn:
                    yield conn
            except PoolTimeout as e:  # (only waiting for a connection raises it)
                raise busy() from e
            return
        async with self.lock(), self.engine.begin() as conn:
            yield conn


def writer(engine: AsyncEngine) -> Writer:
    return Writer(engine)


class Reader:
    """Reads on the engine: autocommit, so a read is one statement and no BEGIN/ROLLBACK."""

    def __init__(self, engine: AsyncEngine):
        self.engine = engine.execution_options(isolation_level="AUTOCOMMIT")

    @contextlib.asynccontextmanager
    async def connect(self) -> AsyncIterator[AsyncConnection]:
        try:
            async with self.engine.connect() as conn:
                yield conn
        except PoolTimeout as e:  # (only waiting for a connection raises it)
            raise busy() from e


def reader(engine: AsyncEngine) -> Reader:
    return Reader(engine)


def _alembic_config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    return cfg


async def migrate(engine: AsyncEngine) -> None:
    """Bring the schema to the newest revision. Safe to run from several processes at once."""
    cfg = _alembic_config()

    def _upgrade(sync_conn) -> tuple[str | None, str | None]:
        from alembic.migration import MigrationContext

        before = MigrationContext.configure(sync_conn).get_current_revision()
        cfg.attributes["connection"] = sync_conn
        command.upgrade(cfg, "head")
        return before, MigrationContext.configure(sync_conn).get_current_revision()

    async with writer(engine).begin() as conn:
        if engine.dialect.name == "postgresql":
            await conn.exec_driver_sql("SELECT pg_advisory_xact_lock(7351001)")
        before, after = await conn.run_sync(_upgrade)
    if before != after:
        log.info("database schema migrated from %s to %s", before or "empty", after)
    else:
        log.info("database schema is current (%s)", after)
