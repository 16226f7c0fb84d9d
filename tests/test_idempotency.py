"""`Idempotency-Key` on the routes that create or move something: a retry replays the first
reply and stores nothing new; another body under the key is 422; a retry while the first runs
is 409 with Retry-After; a failed request gives the key back; a claim whose process died is
taken over, and what it made is found."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from sqlalchemy import text

from branchwise.app import create_app
from branchwise.settings import Settings
from branchwise.store.connect import create_engine
from branchwise.testing.mock_upstream import MockUpstream

from .conftest import run_async
from .helpers import MODEL, check_error, serving, sse_events
from .teams import make_key, raw_client


@pytest.fixture
def db_engine_sync(db_url):
    """One value of a query on the test's database, from sync code."""
    def value(sql: str):
        async def go():
            engine = create_engine(db_url)
            try:
                async with engine.connect() as conn:
                    return (await conn.execute(text(sql))).scalar()
            finally:
                await engine.dispose()
        return run_async(go())
    return value


def _key(k: str) -> dict:
    return {"idempotency-key": k}


async def _count(db_engine, table: str) -> int:
    async with db_engine.connect() as conn:
        return (await conn.execute(text(f"SELECT count(*) FROM {table}"))).scalar()


async def test_a_retry_replays_the_response_and_stores_nothing(raw, mock, db_engine):
    body = {"model": MODEL, "input": "hello"}
    first = await raw.post("/v1/responses", json=body, headers=_key("k-1"))
    assert first.status_code == 200 and "idempotent-replayed" not in first.headers
    rows = (await _count(db_engine, "responses"), await _count(db_engine, "items"))
    again = await raw.post("/v1/responses", json=body, headers=_key("k-1"))
    assert again.status_code == 200 and again.content == first.content
    assert again.headers["idempotent-replayed"] == "true"
    assert len(mock.requests) == 1  # the model answered once
    assert (await _count(db_engine, "responses"), await _count(db_engine, "items")) == rows
    # the quoted form of the draft (a structured-field string) names the same key
    quoted = await raw.post("/v1/responses", json=body, headers=_key('"k-1"'))
    assert quoted.content == first.content and len(mock.requests) == 1


async def test_the_key_with_another_request_is_422(raw, mock):
    assert (await raw.post("/v1/responses", json={"model": MODEL, "input": "a"}, headers=_key("k-2"))).status_code == 200
    check_error(await raw.post("/v1/responses", json={"model": MODEL, "input": "b"}, headers=_key("k-2")), 422,
                param="Idempotency-Key", code="idempotency_key_reused")
    check_error(await raw.post("/v1/conversations", json={}, headers=_key("k-2")), 422,  # another route
                code="idempotency_key_reused")
    assert len(mock.requests) == 1


async def test_a_retry_while_the_first_runs_is_409_then_replays(raw, mock):
    body = {"model": MODEL, "input": "[[delay=0.5]] slow"}
    first = asyncio.create_task(raw.post("/v1/responses", json=body, headers=_key("k-3")))
    while not mock.requests:  # (bounded by the test's timeout) the first is at the model
        await asyncio.sleep(0.01)
    busy = await raw.post("/v1/responses", json=body, headers=_key("k-3"))
    check_error(busy, 409, param="Idempotency-Key", code="idempotency_key_in_use")
    assert busy.headers["retry-after"] == "1"
    done = await first
    again = await raw.post("/v1/responses", json=body, headers=_key("k-3"))
    assert done.status_code == 200 and again.content == done.content and len(mock.requests) == 1


async def test_a_stream_replays_the_same_events(raw, mock, db_engine):
    body = {"model": MODEL, "input": "one two three", "stream": True}
    first = await raw.post("/v1/responses", json=body, headers=_key("k-4"))
    again = await raw.post("/v1/responses", json=body, headers=_key("k-4"))
    assert first.status_code == again.status_code == 200
    assert again.headers["content-type"].startswith("text/event-stream")
    assert sse_events(again.text) == sse_events(first.text)
    assert len(mock.requests) == 1 and await _count(db_engine, "responses") == 1
    # nothing to replay for a stream that is not stored: refused, and the key given back
    check_error(await raw.post("/v1/responses", json={**body, "store": False}, headers=_key("k-5")), 400,
                code="invalid_idempotency_key")
    assert (await raw.post("/v1/responses", json={"model": MODEL, "input": "x"}, headers=_key("k-5"))).status_code == 200


async def test_conversation_routes_are_idempotent(raw, db_engine):
    conv = await raw.post("/v1/conversations", json={"items": [{"role": "user", "content": "hi"}]},
                          headers=_key("c-1"))
    again = await raw.post("/v1/conversations", json={"items": [{"role": "user", "content": "hi"}]},
                           headers=_key("c-1"))
    assert conv.status_code == 200 and again.content == conv.content
    assert await _count(db_engine, "conversations") == 1
    cid = conv.json()["id"]
    add = {"items": [{"role": "user", "content": "more"}, {"role": "assistant", "content": "ok"}]}
    first = await raw.post(f"/v1/conversations/{cid}/items", json=add, headers=_key("c-2"))
    assert (await raw.post(f"/v1/conversations/{cid}/items", json=add, headers=_key("c-2"))).content == first.content
    items = (await raw.get(f"/v1/conversations/{cid}/items")).json()["data"]
    assert [i["content"][0]["text"] for i in reversed(items)] == ["hi", "more", "ok"]  # appended once
    fork = await raw.post(f"/v1/conversations/{cid}/fork", json={"item_id": items[-1]["id"]}, headers=_key("c-3"))
    assert (await raw.post(f"/v1/conversations/{cid}/fork", json={"item_id": items[-1]["id"]},
                           headers=_key("c-3"))).content == fork.content
    assert await _count(db_engine, "conversations") == 2
    head = await raw.post(f"/v1/conversations/{cid}/head", json={"item_id": items[-1]["id"]}, headers=_key("c-4"))
    assert (await raw.post(f"/v1/conversations/{cid}/head", json={"item_id": items[-1]["id"]},
                           headers=_key("c-4"))).content == head.content


async def test_a_failed_request_gives_the_key_back(raw, mock, db_engine):
    bad = {"model": MODEL, "input": "hi", "conversation": "conv_" + "0" * 48}
    assert (await raw.post("/v1/responses", json=bad, headers=_key("f-1"))).status_code == 404
    assert await _count(db_engine, "idempotency") == 0  # nothing kept, nothing half-stored
    good = await raw.post("/v1/responses", json={"model": MODEL, "input": "hi"}, headers=_key("f-1"))
    assert good.status_code == 200  # the same key, now with a request that works


@pytest.mark.parametrize("value", [b"", b"   ", b"x" * 256, b'"unterminated', b'in"side', b"back\\slash",
                                   "caf\u00e9".encode(), b"tab\there", b'""'])
async def test_a_malformed_or_oversized_key_is_400(raw, mock, db_engine, value):
    resp = await raw.post("/v1/responses", json={"model": MODEL, "input": "hi"},
                          headers=[(b"idempotency-key", value)])
    check_error(resp, 400, param="Idempotency-Key", code="invalid_idempotency_key")
    assert mock.requests == [] and await _count(db_engine, "responses") == 0


async def test_the_longest_key_is_taken(raw):
    assert (await raw.post("/v1/conversations", json={}, headers=_key("x" * 255))).status_code == 200


async def test_keys_are_per_project_and_expire(db_url, mock):
    _, a = make_key(db_url, "team-a")
    _, b = make_key(db_url, "team-b")
    app = create_app(Settings(database_url=db_url, upstream_base_url=mock.url, idempotency_ttl=1))
    async with app.router.lifespan_context(app):
        async with raw_client(app, a) as ca, raw_client(app, b) as cb:
            ra = await ca.post("/v1/conversations", json={"metadata": {"p": "a"}}, headers=_key("shared"))
            rb = await cb.post("/v1/conversations", json={"metadata": {"p": "b"}}, headers=_key("shared"))
            assert ra.status_code == rb.status_code == 200 and ra.json()["id"] != rb.json()["id"]
            await asyncio.sleep(1.2)  # (idempotency_ttl: 1 s) the key is free again
            rc = await ca.post("/v1/conversations", json={"metadata": {"p": "c"}}, headers=_key("shared"))
            assert rc.status_code == 200 and rc.json()["metadata"] == {"p": "c"}


async def _stale(db_engine, key: str, resource_id: str | None) -> None:
    """The record of `key` as a process that died mid-request leaves it: running, its lock past."""
    async with db_engine.begin() as conn:
        await conn.execute(text(
            "UPDATE idempotency SET state = 'running', owner = 'idem_dead', locked_until = 1, status = NULL,"
            " body = NULL, resource_id = :r WHERE key = :k"), {"r": resource_id, "k": key})


async def test_a_response_committed_but_never_acknowledged_is_found(db_url, mock, db_engine):
    """The kill -9 case: the response was stored, its process died before the reply was kept. A
    retry (once the claim is stale) gets the stored response; the model is not asked again."""
    settings = Settings(database_url=db_url, upstream_base_url=mock.url, lease_ttl=1)
    async with serving(settings) as (_, _client, raw):
        body = {"model": MODEL, "input": "hello"}
        first = await raw.post("/v1/responses", json=body, headers=_key("s-1"))
        await _stale(db_engine, "s-1", first.json()["id"])
        again = await raw.post("/v1/responses", json=body, headers=_key("s-1"))
        assert again.status_code == 200 and again.json() == first.json()
        assert again.headers["idempotent-replayed"] == "true" and len(mock.requests) == 1
        # a claim whose response was never stored: the retry runs it
        await _stale(db_engine, "s-1", "resp_" + "0" * 48)
        third = await raw.post("/v1/responses", json=body, headers=_key("s-1"))
        assert third.status_code == 200 and third.json()["id"] != first.json()["id"] and len(mock.requests) == 2
        assert await _count(db_engine, "responses") == 2


@pytest.mark.e2e
def test_a_retry_after_the_server_was_killed_runs_once(db_url, mock, serve, db_engine_sync):
    """A real kill -9 while the model answers: nothing was stored. A retry on a new server gets
    409 while the dead claim's lock lasts (lease_ttl), then runs the request once; a retry after
    that replays it."""
    body = {"model": MODEL, "input": "killed"}
    with MockUpstream(delay=30) as slow:  # (the first server's model never answers)
        server = serve({"BRANCHWISE_DATABASE_URL": db_url, "BRANCHWISE_UPSTREAM_BASE_URL": slow.url,
                        "BRANCHWISE_LEASE_TTL": "1"})
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(httpx.post, f"{server.url}/v1/responses", json=body, headers=_key("kill-1"),
                                  timeout=60)
            deadline = time.monotonic() + 10
            while not slow.requests:
                assert time.monotonic() < deadline, "the first request never reached the model"
                time.sleep(0.02)
            os.kill(server.proc.pid, signal.SIGKILL)
            with pytest.raises(httpx.HTTPError):
                pending.result(timeout=30)
    again = serve({"BRANCHWISE_DATABASE_URL": db_url, "BRANCHWISE_UPSTREAM_BASE_URL": mock.url,
                   "BRANCHWISE_LEASE_TTL": "1"})
    deadline = time.monotonic() + 10
    while (retry := httpx.post(f"{again.url}/v1/responses", json=body, headers=_key("kill-1"),
                               timeout=30)).status_code == 409:
        assert time.monotonic() < deadline, "the dead claim was never taken over"
        time.sleep(0.2)
    assert retry.status_code == 200, retry.text
    replay = httpx.post(f"{again.url}/v1/responses", json=body, headers=_key("kill-1"), timeout=30)
    assert replay.content == retry.content and replay.headers["idempotent-replayed"] == "true"
    assert len(mock.requests) == 1 and db_engine_sync("SELECT count(*) FROM responses") == 1
