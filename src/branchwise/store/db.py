"""Database engines: plain URLs in, async engines out, migrations applied at start-up."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

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


def create_engine(url: str) -> AsyncEngine:
    url = async_url(url)
    if url.startswith("sqlite"):
        engine = create_async_engine(url, pool_size=8, max_overflow=8, connect_args={"timeout": 30})
        sync = engine.sync_engine

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
            # Writers take the write lock up front: no read-then-upgrade deadlocks.
            immediate = conn.get_execution_options().get("sqlite_immediate", False)
            conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

        return engine
    # Every query branchwise runs is an index lookup or a short range scan; the recursive path
    # walks are index lookups step by step. A plan made while a table was small (prepared
    # statements keep theirs) must never turn a walk into a scan per step, so the planner is told
    # to avoid scans and hash/merge joins on these connections.
    server_settings = {"enable_seqscan": "off", "enable_hashjoin": "off", "enable_mergejoin": "off",
                       "jit": "off"}
    return create_async_engine(url, pool_size=10, max_overflow=20, pool_pre_ping=False,
                               connect_args={"server_settings": server_settings})


def writer(engine: AsyncEngine) -> AsyncEngine:
    """The engine to open write transactions with (BEGIN IMMEDIATE on SQLite)."""
    return engine.execution_options(sqlite_immediate=True) if is_sqlite(engine) else engine


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
