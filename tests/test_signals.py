"""A stream resumed on another instance (two apps on one database, each behind its own server):
on PostgreSQL the reader is woken by the writes of the events (LISTEN/NOTIFY, `store.signals`)
and the running instance is asked to write them as they come; on SQLite, and while the
listening connection is lost, the reader polls."""

from __future__ import annotations

import asyncio

import asyncpg
import httpx
import pytest

from branchwise.services.runs import Runs
from branchwise.settings import Settings
from branchwise.store import signals

from .helpers import read_events, served, until

LONG = "[[words=60]] [[chunk_delay=0.02]] tell me"
NEVER_S = 600.0  # a poll or recheck this long never happens within a test's deadline


async def _start(url: str) -> str:
    """A background streamed response on the instance at `url`: its id."""
    async with httpx.AsyncClient(base_url=url, timeout=30) as h, h.stream(
            "POST", "/v1/responses", json={"model": "m", "input": LONG, "background": True, "stream": True}) as r:
        assert r.status_code == 200
        return (await read_events(r, limit=1))[0]["response"]["id"]


async def _tail(url: str, rid: str) -> list[dict]:
    async with httpx.AsyncClient(base_url=url, timeout=30) as h, h.stream(
            "GET", f"/v1/responses/{rid}", params={"stream": "true"}) as r:
        assert r.status_code == 200
        return await read_events(r)


def _whole(events: list[dict]) -> None:
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert events[-1]["type"] == "response.completed"
    text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert text.endswith("w60")


async def test_resumed_stream_on_another_instance_is_woken_by_the_writes(db_url, mock, monkeypatch):
    pg = not db_url.startswith("sqlite")
    followed: list[str] = []
    real = Runs._followed

    def spy(self, response_id: str) -> None:  # (private: the request to write at once shows nowhere else)
        followed.append(response_id)
        real(self, response_id)

    monkeypatch.setattr(Runs, "_followed", spy)
    # On PostgreSQL nothing but a notification can wake the reader in time: its polls and its
    # rechecks are ten minutes apart. On SQLite there are no notifications: it polls.
    monkeypatch.setattr(signals, "RECHECK_S", NEVER_S)
    a = Settings(database_url=db_url, upstream_base_url=mock.url)
    b = Settings(database_url=db_url, upstream_base_url=mock.url, event_poll_interval=NEVER_S if pg else 0.05)
    async with served(a) as (_app_a, url_a), served(b) as (app_b, url_b):
        if pg:
            await until(lambda: app_b.state.runs.store.signals.listening, "instance B to listen")
        else:
            assert not app_b.state.runs.store.signals.listening
        rid = await _start(url_a)
        events = await asyncio.wait_for(_tail(url_b, rid), 30)
    _whole(events)
    assert (rid in followed) is pg


async def test_a_lost_listening_connection_falls_back_to_polling_and_comes_back(pg_empty, mock, monkeypatch):
    monkeypatch.setattr(signals, "RECHECK_S", NEVER_S)
    a = Settings(database_url=pg_empty, upstream_base_url=mock.url)
    b = Settings(database_url=pg_empty, upstream_base_url=mock.url, event_poll_interval=0.05)
    async with served(a) as (_app_a, url_a), served(b) as (app_b, url_b):
        sig = app_b.state.runs.store.signals
        await until(lambda: sig.listening, "instance B to listen")
        pid = sig._conn.get_server_pid()  # (private: which backend listens shows nowhere else)
        admin = await asyncpg.connect(pg_empty.replace("postgresql+asyncpg://", "postgresql://"))
        try:
            assert await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
        finally:
            await admin.close()
        await until(lambda: not sig.listening, "the listener to notice", timeout=10)
        rid = await _start(url_a)
        tail = asyncio.ensure_future(_tail(url_b, rid))
        events = await asyncio.wait_for(tail, 30)  # by polling, or woken again once it is back
        _whole(events)
        await until(lambda: sig.listening, "the listener to come back", timeout=15)
        rid = await _start(url_a)
        _whole(await asyncio.wait_for(_tail(url_b, rid), 30))


@pytest.mark.parametrize("size, listens", [(2, 0), (6, 0), (7, 1), (10, 1)])
def test_the_listener_is_one_of_the_budget_when_the_raw_pool_keeps_four(size, listens):
    from branchwise.store.connect import listener_split, pool_split

    raw, listener = listener_split(size)
    assert listener == listens and pool_split(size)[0] + raw + listener == size
