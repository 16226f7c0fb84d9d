"""Limits per API key: requests per minute (`--rpm`) and concurrent responses
(`--max-concurrent`), exact under concurrency, across processes and instances, with OpenAI's
429 and rate headers."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest
from sqlalchemy import text

from branchwise.app import create_app
from branchwise.settings import Settings

from .helpers import MODEL, served, until
from .teams import make_key, raw_client, sdk

CLIENTS = 64
RPM = 100


def _minute() -> int:
    return int(time.time()) // 60


async def _burst(post, n_clients: int, each: int) -> list:
    """`n_clients` clients at once, each sending `each` requests one after the other."""
    async def one_client():
        return [await post() for _ in range(each)]
    return [r for rs in await asyncio.gather(*(one_client() for _ in range(n_clients))) for r in rs]


async def _in_one_minute(db_url: str, run) -> tuple[list, str]:
    """`run(secret)` with a new key of --rpm RPM, again with another key should the burst have
    crossed into the next minute (each minute has its own count)."""
    for _ in range(3):
        _, secret = make_key(db_url, "team-a", "--rpm", str(RPM))
        # every process has loaded it (a probe would count against the limit)
        await asyncio.sleep(2 * Settings().key_refresh_interval)
        start = _minute()
        results = await run(secret)
        if _minute() == start:
            return results, secret
    raise AssertionError("three bursts in a row crossed a minute's end")


async def test_64_clients_on_one_key_get_exactly_rpm_through(db_url, mock):
    make_key(db_url, "other")  # (the server starts locked)
    app = create_app(Settings(database_url=db_url, upstream_base_url=mock.url))
    async with app.router.lifespan_context(app):
        async def run(secret):
            async with raw_client(app, secret) as c:
                return await _burst(lambda: c.post("/v1/responses", json={"model": MODEL, "input": "hi"}),
                                    CLIENTS, 3)

        results, secret = await _in_one_minute(db_url, run)
        ok = [r for r in results if r.status_code == 200]
        refused = [r for r in results if r.status_code == 429]
        assert len(ok) == RPM and len(refused) == CLIENTS * 3 - RPM
        assert len(mock.requests) == RPM  # refused requests never reached the model
        remaining = sorted(int(r.headers["x-ratelimit-remaining-requests"]) for r in ok)
        assert remaining == list(range(RPM))  # each count handed out once
        for r in ok + refused:
            assert r.headers["x-ratelimit-limit-requests"] == str(RPM)
            assert r.headers["x-ratelimit-reset-requests"].endswith("s")
        err = refused[0].json()["error"]
        assert err["code"] == "rate_limit_exceeded" and err["type"] == "requests"
        assert 1 <= int(refused[0].headers["retry-after"]) <= 60
        assert refused[0].headers["x-ratelimit-remaining-requests"] == "0"
        with pytest.raises(openai.RateLimitError) as e:  # as the SDK sees it
            await sdk(app, secret).models.list()
        assert e.value.code == "rate_limit_exceeded"


@pytest.mark.e2e
@pytest.mark.timeout(240)
async def test_the_limit_holds_across_workers_and_instances(db_url, mock, serve):
    """Two instances of two workers each on one database: still exactly RPM through."""
    make_key(db_url, "other")  # (the servers start locked)
    env = {"BRANCHWISE_DATABASE_URL": db_url, "BRANCHWISE_UPSTREAM_BASE_URL": mock.url}
    servers = [serve(env, workers=2), serve(env, workers=2)]

    async def run(secret):
        async with httpx.AsyncClient(timeout=60, headers={"authorization": f"Bearer {secret}"},
                                     limits=httpx.Limits(max_connections=CLIENTS)) as http:
            turn = iter(range(1 << 30))

            def post():
                return http.post(f"{servers[next(turn) % 2].url}/v1/responses", json={"model": MODEL, "input": "hi"})
            return await _burst(post, CLIENTS, 3)

    results, _ = await _in_one_minute(db_url, run)
    codes = [r.status_code for r in results]
    assert codes.count(200) == RPM and codes.count(429) == CLIENTS * 3 - RPM, codes


async def test_concurrent_responses_are_limited_and_given_back(db_url, mock):
    _, secret = make_key(db_url, "team-a", "--max-concurrent", "2")
    app = create_app(Settings(database_url=db_url, upstream_base_url=mock.url))
    async with app.router.lifespan_context(app):
        async with raw_client(app, secret) as c:
            async def slow():
                return await c.post("/v1/responses", json={"model": MODEL, "input": "[[delay=0.5]] slow"})
            first = [asyncio.create_task(slow()) for _ in range(2)]
            await until(lambda: len(mock.requests) == 2, "two responses at the model")
            extra = await asyncio.gather(*(slow() for _ in range(4)))
            assert [r.status_code for r in extra] == [429] * 4
            assert extra[0].json()["error"]["code"] == "rate_limit_exceeded" and extra[0].headers["retry-after"] == "1"
            assert [r.status_code for r in await asyncio.gather(*first)] == [200, 200]
            # other routes take no slot; given back, the slots serve new responses
            assert (await c.get("/v1/models")).status_code == 200
            assert (await c.post("/v1/responses", json={"model": MODEL, "input": "again"})).status_code == 200


async def test_a_background_response_holds_its_slot_until_it_ends(db_url, mock):
    _, secret = make_key(db_url, "team-a", "--max-concurrent", "1")
    app = create_app(Settings(database_url=db_url, upstream_base_url=mock.url))
    async with app.router.lifespan_context(app):
        async with raw_client(app, secret) as c:
            bg = await c.post("/v1/responses", json={"model": MODEL, "input": "[[delay=0.5]] bg", "background": True})
            assert bg.status_code == 200
            assert (await c.post("/v1/responses", json={"model": MODEL, "input": "x"})).status_code == 429

            async def finished():
                return (await c.get(f"/v1/responses/{bg.json()['id']}")).json()["status"] == "completed"
            await until(finished, "the background response")
            await until(lambda: _ok(c), "the slot to be given back")


async def _ok(c) -> bool:
    return (await c.post("/v1/responses", json={"model": MODEL, "input": "y"})).status_code == 200


async def test_slots_of_a_dead_process_expire(db_url, mock, db_engine):
    key_id, secret = make_key(db_url, "team-a", "--max-concurrent", "1")
    async with db_engine.begin() as conn:  # what a process killed while answering leaves behind
        await conn.execute(text("INSERT INTO key_slots (key_id, expires_at) VALUES (:k, :t)"),
                           {"k": key_id, "t": time.time() - 1})
    app = create_app(Settings(database_url=db_url, upstream_base_url=mock.url))
    async with app.router.lifespan_context(app):
        async with raw_client(app, secret) as c:
            assert (await c.post("/v1/responses", json={"model": MODEL, "input": "x"})).status_code == 200


async def test_unlimited_keys_and_open_servers_send_no_rate_headers(db_url, mock):
    _, secret = make_key(db_url, "team-a")
    app = create_app(Settings(database_url=db_url, upstream_base_url=mock.url))
    async with app.router.lifespan_context(app):
        async with raw_client(app, secret) as c:
            r = await c.post("/v1/responses", json={"model": MODEL, "input": "x"})
            assert r.status_code == 200 and "x-ratelimit-limit-requests" not in r.headers


async def test_each_websocket_turn_counts_as_a_request(db_url, mock):
    """A WebSocket connection cannot go past --rpm: its handshake and each turn count."""
    make_key(db_url, "other")  # (the server starts locked)
    async with served(Settings(database_url=db_url, upstream_base_url=mock.url)) as (_, url):
        for _ in range(3):  # (again with a new key, should a minute end in between)
            _, secret = make_key(db_url, "team-a", "--rpm", "3")
            await asyncio.sleep(2 * Settings().key_refresh_interval)
            start = _minute()
            client = openai.AsyncOpenAI(api_key=secret, base_url=f"{url}/v1", max_retries=0)
            kinds = []
            async with client.responses.connect() as conn:  # 1
                for k in range(3):  # 2, 3, then over
                    await conn.send({"type": "response.create", "model": MODEL, "input": f"turn {k}"})
                    while True:
                        event = json.loads(await asyncio.wait_for(conn.recv_bytes(), 30))
                        if event["type"] in ("response.completed", "error"):
                            kinds.append(event)
                            break
            if _minute() == start:
                break
        assert [e["type"] for e in kinds] == ["response.completed", "response.completed", "error"]
        assert kinds[-1]["status"] == 429 and kinds[-1]["error"]["code"] == "rate_limit_exceeded"
