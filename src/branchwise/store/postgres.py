"""PostgreSQL: the repository's statements on a raw asyncpg pool of its own, which prepares and
caches each statement per connection. Every call is one round trip in its own transaction,
except `write` (a few steps) and `transaction` (reads that decide the writes)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from branchwise.store.connect import busy, open_pg_pool, pg_pool_size, pg_pool_timeout
from branchwise.store.statements import SQL, Step, Tx


class PgTx(Tx):
    """A transaction's statements on one asyncpg connection."""

    __slots__ = ("conn",)

    def __init__(self, conn):
        self.conn = conn

    async def one(self, sql: SQL, params: dict) -> tuple | None:
        row = await self.conn.fetchrow(sql.pg, *sql.args(params))
        return None if row is None else tuple(row)

    async def all(self, sql: SQL, params: dict) -> list[tuple]:
        return [tuple(r) for r in await self.conn.fetch(sql.pg, *sql.args(params))]

    async def execute(self, sql: SQL, params: dict | list[dict]) -> int:
        if isinstance(params, list):
            if params:
                await self.conn.executemany(sql.pg, [sql.args(p) for p in params])
            return len(params)
        return int((await self.conn.execute(sql.pg, *sql.args(params))).rsplit(" ", 1)[-1])


class PgDatabase:
    def __init__(self, engine: AsyncEngine):
        self.engine = engine
        self._pool = None
        self._pool_lock = asyncio.Lock()
        self._timeout = pg_pool_timeout(engine)
        self._size = pg_pool_size(engine)
        self._in_use = 0

    async def _acquire(self) -> Any:
        """A connection of the pool; `busy()` when none comes free within the pool timeout (the
        statement then never ran). While fewer than the pool's size are out, one is free (or
        can be opened) and nothing waits: the timer is set only when a wait can happen, since
        the hot path takes a connection for every statement."""
        pool = self._pool or await self._open_pool()
        if self._in_use < self._size:
            self._in_use += 1
            try:
                return await pool.acquire()
            except BaseException:
                self._in_use -= 1
                raise
        try:
            async with asyncio.timeout(self._timeout):
                conn = await pool.acquire()
        except TimeoutError as e:
            raise busy() from e
        self._in_use += 1
        return conn

    async def _release(self, conn: Any) -> None:
        self._in_use -= 1
        await self._pool.release(conn)

    @contextlib.asynccontextmanager
    async def _conn(self) -> AsyncIterator[Any]:
        conn = await self._acquire()
        try:
            yield conn
        finally:
            await self._release(conn)

    async def _open_pool(self):
        async with self._pool_lock:
            if self._pool is None:
                self._pool = await open_pg_pool(self.engine)
        return self._pool

    async def one(self, sql: SQL, params: dict) -> tuple | None:
        conn = await self._acquire()
        try:
            row = await conn.fetchrow(sql.pg, *sql.args(params))
        finally:
            await self._release(conn)
        return None if row is None else tuple(row)

    async def all(self, sql: SQL, params: dict) -> list[tuple]:
        conn = await self._acquire()
        try:
            return [tuple(r) for r in await conn.fetch(sql.pg, *sql.args(params))]
        finally:
            await self._release(conn)

    async def value(self, sql: SQL, params: dict) -> Any:
        row = await self.one(sql, params)
        return None if row is None else row[0]

    async def write(self, steps: Sequence[Step], heavy: bool = False) -> int:
        """`steps` in one transaction; returns the row count of the last one. (`heavy` matters
        on SQLite only: here the statements run on the server.)"""
        async with self._conn() as conn, conn.transaction():
            tx = PgTx(conn)
            count = 0
            for sql, params in steps:
                count = await tx.execute(sql, params)
            return count

    async def fetch_numbered(self, text: str, args: Sequence[Any]) -> list[tuple]:
        """A statement built already numbered `$1 ..` (the commit, `statements.pg_commit`), in its
        own transaction: its rows."""
        conn = await self._acquire()
        try:
            return [tuple(r) for r in await conn.fetch(text, *args)]
        finally:
            await self._release(conn)

    async def write_returning(self, sql: SQL, params: dict) -> list[tuple]:
        """One data-modifying statement with RETURNING, in its own transaction: its rows."""
        return await self.all(sql, params)

    async def transaction(self, fn: Callable[[Tx], Awaitable[Any]]) -> Any:
        """`fn(tx)` in one transaction on one connection."""
        async with self._conn() as conn, conn.transaction():
            return await fn(PgTx(conn))

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None
