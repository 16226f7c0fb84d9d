"""Database connections as a budget: one process opens `db_pool_size` connections to PostgreSQL
at most (both pools together), and a request that finds them all busy for `db_pool_timeout`
gets a 503 with `Retry-After`, having stored nothing; SQLite is unaffected."""

from __future__ import annotations

import asyncio
import contextlib
import time

import asyncpg
import pytest

from branchwise.core.errors import Unavailable
from branchwise.settings import Settings
from branchwise.store.connect import connections_per_process, pool_split
from branchwise.wire.errors import http_error

from .helpers import serving


def _pool_settings(url: str, mock, size: int = 2, timeout: float = 0.5) -> Settings:
    return Settings(database_url=url, upstream_base_url=mock.url, db_pool_size=size, db_pool_timeout=timeout)


def _plain(url: str) -> str:
    return url.replace("postgresql+asyncpg://", "postgresql://")


@contextlib.asynccontextmanager
async def _table_locked(url: str, table: str):
    """`table` locked against every access by a connection of the test's own, until the block ends:
    the server's statements on it wait, holding their connections."""
    conn = await asyncpg.connect(_plain(url))
    tx = conn.transaction()
    await tx.start()
    await conn.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
    try:
        yield conn
    finally:
        await tx.rollback()
        await conn.close()


async def _until_waiting(conn, n: int = 1) -> None:
    """Until `n` other connections wait for a lock (the held requests are in)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        waiting = await conn.fetchval("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                                      " AND datname = current_database() AND pid <> pg_backend_pid()")
        if waiting >= n:
            return
        await asyncio.sleep(0.02)
    pytest.fail("the held request never reached the database")


def _assert_busy(r) -> None:
    assert r.status_code == 503, r.text
    assert r.headers["retry-after"] == "1"
    err = r.json()["error"]
    assert err["type"] == "server_error" and err["code"] == "database_busy"


def test_budget_per_process():
    assert pool_split(2) == (1, 1) and sum(pool_split(10)) == 10 and sum(pool_split(3)) == 3
    pg = Settings(database_url="postgresql://u@h/db", db_pool_size=7)
    assert connections_per_process(pg) == 7
    assert connections_per_process(Settings(database_url="sqlite:///x.db", db_pool_size=7)) == 0
    assert connections_per_process(Settings(database_url="postgresql://u@h/db")) == 10
    status, body, headers = http_error(Unavailable("busy", code="database_busy", retry_after=3))
    assert status == 503 and headers["retry-after"] == "3" and body["error"]["type"] == "server_error"


async def test_exhausted_pool_is_503_and_stores_nothing(pg_empty, mock):
    async with serving(_pool_settings(pg_empty, mock)) as (_app, client, raw):
        conv = await client.conversations.create(items=[{"type": "message", "role": "user", "content": "a"}])
        before = (await raw.get(f"/v1/conversations/{conv.id}/tree")).json()["data"]
        async with _table_locked(pg_empty, "items") as lock:
            held = asyncio.ensure_future(raw.get(f"/v1/conversations/{conv.id}/tree"))  # the one raw connection
            await _until_waiting(lock)
            started = time.monotonic()
            r = await raw.post("/v1/responses", json={"model": "m", "conversation": conv.id, "input": "b"})
            _assert_busy(r)
            assert time.monotonic() - started < 5  # waited about the pool timeout, not forever
            _assert_busy(await raw.post(f"/v1/conversations/{conv.id}/items",
                                        json={"items": [{"type": "message", "role": "user", "content": "c"}]}))
            _assert_busy(await raw.get(f"/v1/conversations/{conv.id}"))
            assert not held.done()
        assert (await held).status_code == 200
        # nothing half-done: the model was never called, the tree and head are as they were
        assert mock.requests == []
        after = await raw.get(f"/v1/conversations/{conv.id}/tree")
        assert after.json()["data"] == before and after.json()["head"] == before[-1]["id"]
        # and the server serves again once connections are free
        r = await raw.post("/v1/responses", json={"model": "m", "conversation": conv.id, "input": "b"})
        assert r.status_code == 200, r.text


async def test_replay_with_no_connection_is_503_not_an_empty_stream(pg_empty, mock):
    async with serving(_pool_settings(pg_empty, mock)) as (_app, client, raw):
        ids = []
        for text in ("one", "two"):
            stream = await client.responses.create(model="m", input=text, stream=True)
            async for event in stream:
                rid = event.response.id if event.type == "response.completed" else None
                if rid:
                    ids.append(rid)
        async with _table_locked(pg_empty, "events") as lock:
            # the event log is read on the engine's pool: its one connection waits on the lock
            held = asyncio.ensure_future(raw.get(f"/v1/responses/{ids[0]}", params={"stream": "true"}))
            await _until_waiting(lock)
            _assert_busy(await raw.get(f"/v1/responses/{ids[1]}", params={"stream": "true"}))
        r = await held
        assert r.status_code == 200 and "response.completed" in r.text
        r = await raw.get(f"/v1/responses/{ids[1]}", params={"stream": "true"})
        assert r.status_code == 200 and "response.completed" in r.text


async def test_small_budget_serves_many_at_once(pg_empty, mock):
    """64 responses at once on 2 connections: they wait their turn (none is refused), and the
    process never opens more than its budget."""
    async with serving(_pool_settings(pg_empty, mock, size=2, timeout=30)) as (_app, client, raw):
        convs = [await client.conversations.create() for _ in range(8)]
        rs = await asyncio.gather(*(raw.post("/v1/responses", json={"model": "m", "conversation": convs[i % 8].id,
                                                                    "input": str(i)}) for i in range(64)))
        assert [r.status_code for r in rs] == [200] * 64
        conn = await asyncpg.connect(_plain(pg_empty))
        try:
            opened = await conn.fetchval("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                                         " AND pid <> pg_backend_pid()")
        finally:
            await conn.close()
        assert opened <= 2


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
async def test_sqlite_ignores_the_budget(db_url, mock):
    async with serving(_pool_settings(db_url, mock, size=2, timeout=0.1)) as (_app, client, raw):
        convs = [await client.conversations.create() for _ in range(4)]
        rs = await asyncio.gather(*(raw.post("/v1/responses", json={"model": "m", "conversation": convs[i % 4].id,
                                                                    "input": str(i)}) for i in range(32)))
        assert [r.status_code for r in rs] == [200] * 32
