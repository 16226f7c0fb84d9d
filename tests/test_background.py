"""Durable event logs, resumable streams, background mode, cancel, disconnects and crash
recovery, through the official SDK and raw SSE, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import os
import signal

import httpx
import openai
import pytest

from branchwise.store.connect import create_engine
from branchwise.store.leases import Leases

from .helpers import EventReader, new_conversation, read_events, until

SLOW_WORDS = "[[words=40]] [[chunk_delay=0.02]] tell me"


async def wait_status(client, rid: str, statuses=("completed", "failed", "cancelled", "incomplete"),
                      tries: int = 300):
    for _ in range(tries):
        r = await client.responses.retrieve(rid)
        if r.status in statuses:
            return r
        await asyncio.sleep(0.05)
    raise AssertionError(f"{rid} stayed {r.status}")


async def test_background_returns_queued_then_completes(client, mock):
    r = await client.responses.create(model="m", input="[[delay=0.3]] later", background=True)
    assert r.status == "queued" and r.background is True
    done = await wait_status(client, r.id)
    assert done.status == "completed"
    assert done.output_text == "[1 messages] Echo: later"
    assert len(mock.requests) == 1


async def test_background_stream_dropped_and_resumed(app, raw, client):
    body = {"model": "m", "input": SLOW_WORDS, "background": True, "stream": True}
    async with raw.stream("POST", "/v1/responses", json=body) as r:
        assert r.status_code == 200
        first = await read_events(r, limit=5)
    assert [e["sequence_number"] for e in first] == [0, 1, 2, 3, 4]
    assert first[0]["type"] == "response.created" and first[0]["response"]["status"] == "queued"
    assert first[1]["type"] == "response.queued"
    rid = first[0]["response"]["id"]
    async with raw.stream("GET", f"/v1/responses/{rid}", params={"stream": "true", "starting_after": 4}) as r:
        rest = await read_events(r)
    # every remaining event exactly once, in order, ending in response.completed
    assert [e["sequence_number"] for e in rest] == list(range(5, 5 + len(rest)))
    assert rest[-1]["type"] == "response.completed"
    events = first + rest
    deltas = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    stored = await client.responses.retrieve(rid)
    assert deltas == stored.output_text and stored.output_text.endswith("w40")
    # the whole log replays from the start, from the database, after the response finished
    async with raw.stream("GET", f"/v1/responses/{rid}", params={"stream": "true"}) as r:
        again = await read_events(r)
    assert again == events


async def test_sdk_resumes_a_running_stream_by_id(client):
    bg = await client.responses.create(model="m", input=SLOW_WORDS, background=True)
    # the SDK's helper asks for the whole log (no starting_after) and filters on its side
    async with client.responses.stream(response_id=bg.id) as stream:
        text = "".join([e.delta async for e in stream if e.type == "response.output_text.delta"])
        final = await stream.get_final_response()
    assert final.status == "completed" and text == final.output_text
    async with client.responses.stream(response_id=bg.id, starting_after=10) as stream:
        seqs = [e.sequence_number async for e in stream]
    assert seqs[0] == 11 and seqs == list(range(11, 11 + len(seqs)))


async def test_stream_of_a_response_that_was_not_streamed(client):
    r = await client.responses.create(model="m", input="plain")
    async with client.responses.stream(response_id=r.id) as stream:
        kinds = [e.type async for e in stream]
        final = await stream.get_final_response()
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert final.output_text == r.output_text


async def test_cancel_a_hung_background_response(client, mock):
    conv = await new_conversation(client, "start")
    before = [it.id async for it in client.conversations.items.list(conv.id)]
    r = await client.responses.create(model="m", conversation=conv.id, input="[[delay=30]] hang", background=True)
    await until(lambda: mock.requests, "the upstream to get the request")
    cancelled = await asyncio.wait_for(client.responses.cancel(r.id), 5)  # a hang guard, not a timing
    assert cancelled.status == "cancelled"
    again = await client.responses.cancel(r.id)
    assert again.status == "cancelled" and again.id == r.id
    assert (await client.responses.retrieve(r.id)).status == "cancelled"
    # the upstream request was dropped, and the conversation did not change
    for _ in range(100):
        if mock.disconnected:
            break
        await asyncio.sleep(0.02)
    assert len(mock.disconnected) == 1
    assert [it.id async for it in client.conversations.items.list(conv.id)] == before
    # its stream ends with the cancelled response
    async with client.responses.stream(response_id=r.id) as stream:
        events = [e async for e in stream]
    assert events[-1].type == "response.failed" and events[-1].response.status == "cancelled"


async def test_cancel_refuses_foreground_and_unknown(client, raw):
    r = await client.responses.create(model="m", input="x")
    with pytest.raises(openai.BadRequestError):
        await client.responses.cancel(r.id)
    with pytest.raises(openai.NotFoundError):
        await client.responses.cancel("resp_" + "0" * 48)


async def test_background_with_queue_policy_waits_its_turn(client, mock):
    conv = await new_conversation(client, "start")
    a = await client.responses.create(model="m", conversation=conv.id, input="[[delay=0.3]] a", background=True,
                                      extra_body={"concurrency": "queue"})
    b = await client.responses.create(model="m", conversation=conv.id, input="b", background=True,
                                      extra_body={"concurrency": "queue"})
    assert (await wait_status(client, a.id)).status == "completed"
    assert (await wait_status(client, b.id)).status == "completed"
    assert [len(q["messages"]) for q in mock.requests] == [2, 4]


# ------------------------------------------------------------------ over real sockets


def _env(db_url, mock, **extra):
    return {"BRANCHWISE_DATABASE_URL": db_url, "BRANCHWISE_UPSTREAM_BASE_URL": mock.url, **extra}


async def test_stored_stream_outlives_its_client(serve, db_url, mock):
    server = serve(_env(db_url, mock))
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as h:
        async with h.stream("POST", "/v1/responses", json={"model": "m", "input": SLOW_WORDS, "stream": True}) as r:
            first = await read_events(r, limit=4)
        rid = first[0]["response"]["id"]
        client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="x")
        done = await wait_status(client, rid)
    assert done.status == "completed" and done.output_text.endswith("w40")
    assert mock.disconnected == []


TERMINALS = ("response.completed", "response.incomplete", "response.failed")


@pytest.mark.parametrize("background", [False, True], ids=["stream", "background"])
async def test_replay_of_one_alternative_of_n(serve, db_url, mock, background):
    """`GET /v1/responses/{alternative k}?stream=true` of an `n` = 2 response gives exactly
    alternative k's events, with their original sequence numbers: live while it runs, and from
    the log after it finished. (Over sockets: the in-process transport buffers whole bodies.)"""
    server = serve(_env(db_url, mock))
    body = {"model": "m", "input": SLOW_WORDS, "stream": True, "n": 2, "background": background}
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as h:
        async with h.stream("POST", "/v1/responses", json=body) as r:
            post = EventReader(r)
            head = await post.read(5)  # the rows exist once the model's events come
            ids = [e["response"]["id"] for e in head[:2]]
            assert [e["alternative"] for e in head[:2]] == [0, 1] and ids[0] != ids[1]
            assert (await h.get(f"/v1/responses/{ids[1]}")).json()["status"] in ("queued", "in_progress")
            async with h.stream("GET", f"/v1/responses/{ids[1]}", params={"stream": "true"}) as g:
                live = await read_events(g)
            whole = head + await post.read()
        assert [e["sequence_number"] for e in whole] == list(range(len(whole)))
        mine = [e for e in whole if e["alternative"] == 1]
        assert [e for e in live if e["type"] in TERMINALS] == [live[-1]]  # one terminal event: its own
        assert live[-1]["type"] == "response.completed" and live[-1]["response"]["id"] == ids[1]
        assert live == mine
        stored = (await h.get(f"/v1/responses/{ids[1]}")).json()
        text = "".join(e["delta"] for e in live if e["type"] == "response.output_text.delta")
        assert text == stored["output"][0]["content"][0]["text"] and text.endswith("w40")
        # after it finished, from the log: each alternative's events, and a resume within them
        for k, rid in enumerate(ids):
            async with h.stream("GET", f"/v1/responses/{rid}", params={"stream": "true"}) as g:
                again = await read_events(g)
            assert again == [e for e in whole if e["alternative"] == k]
        after = mine[len(mine) // 2]["sequence_number"]
        async with h.stream("GET", f"/v1/responses/{ids[1]}",
                            params={"stream": "true", "starting_after": after}) as g:
            assert await read_events(g) == [e for e in mine if e["sequence_number"] > after]


async def test_unstored_stream_is_cancelled_upstream(serve, db_url, mock):
    server = serve(_env(db_url, mock))
    body = {"model": "m", "input": "[[words=200]] [[chunk_delay=0.05]] go", "stream": True, "store": False}
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as h:
        async with h.stream("POST", "/v1/responses", json=body) as r:
            await read_events(r, limit=4)
    for _ in range(100):  # the upstream sees its client (branchwise) go away
        if mock.disconnected:
            break
        await asyncio.sleep(0.02)
    assert len(mock.disconnected) == 1


async def test_crash_during_background_response(serve, db_url, mock):
    env = _env(db_url, mock, BRANCHWISE_LEASE_TTL="1")
    server = serve(env)
    client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
    conv = await new_conversation(client, "start")
    first = await client.responses.create(model="m", conversation=conv.id, input="one")
    before = [it.id async for it in client.conversations.items.list(conv.id)]
    head = (await client.conversations.retrieve(conv.id)).model_extra["head"]
    bg = await client.responses.create(model="m", conversation=conv.id, input="[[delay=30]] doomed",
                                       background=True, extra_body={"concurrency": "queue"})
    await until(lambda: len(mock.requests) >= 2, "the upstream to get the background request")
    os.kill(server.proc.pid, signal.SIGKILL)
    server.proc.wait()
    server2 = serve(env)
    client2 = openai.AsyncOpenAI(base_url=f"{server2.url}/v1", api_key="x", max_retries=0)
    done = await wait_status(client2, bg.id, tries=400)
    assert done.status == "failed"
    assert "stopped before it finished" in done.error.message
    # the conversation is whole: same items, same head, and it takes new work at once
    assert [it.id async for it in client2.conversations.items.list(conv.id)] == before
    assert (await client2.conversations.retrieve(conv.id)).model_extra["head"] == head == first.output[-1].id
    engine = create_engine(db_url)
    try:
        for _ in range(100):
            if not await Leases(engine).live(conv.id):
                break
            await asyncio.sleep(0.05)
        assert await Leases(engine).live(conv.id) == []
    finally:
        await engine.dispose()
    nxt = await client2.responses.create(model="m", conversation=conv.id, input="again",
                                         extra_body={"concurrency": "queue"})
    assert nxt.status == "completed"
    # the event log of the reaped response ends with response.failed
    async with client2.responses.stream(response_id=bg.id) as stream:
        events = [e async for e in stream]
    assert events[-1].type == "response.failed"


async def test_resume_from_another_process(serve, pg_empty, mock):
    a = serve(_env(pg_empty, mock))
    b = serve(_env(pg_empty, mock))
    ca = openai.AsyncOpenAI(base_url=f"{a.url}/v1", api_key="x")
    cb = openai.AsyncOpenAI(base_url=f"{b.url}/v1", api_key="x")
    bg = await ca.responses.create(model="m", input=SLOW_WORDS, background=True)
    # B tails A's response live from the database
    async with cb.responses.stream(response_id=bg.id) as stream:
        events = [e async for e in stream]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[-1].type == "response.completed"
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == (await ca.responses.retrieve(bg.id)).output_text
    # one alternative of an n = 2 response, tailed from the database: its events only
    body = {"model": "m", "input": SLOW_WORDS, "background": True, "stream": True, "n": 2}
    async with httpx.AsyncClient(base_url=a.url, timeout=30) as ha, httpx.AsyncClient(base_url=b.url, timeout=30) as hb:
        async with ha.stream("POST", "/v1/responses", json=body) as r:
            alt1 = (await read_events(r, limit=2))[1]["response"]["id"]
        async with hb.stream("GET", f"/v1/responses/{alt1}", params={"stream": "true"}) as r:
            tailed = await read_events(r)
        stored = (await ha.get(f"/v1/responses/{alt1}")).json()
    assert {(e["response_id"], e["alternative"]) for e in tailed} == {(alt1, 1)}
    assert [e["type"] for e in tailed if e["type"] in TERMINALS] == ["response.completed"] == [tailed[-1]["type"]]
    seqs = [e["sequence_number"] for e in tailed]
    assert seqs == sorted(set(seqs))
    assert tailed[-1]["response"] == stored and stored["status"] == "completed"
    # and cancels A's work through the database
    hung = await ca.responses.create(model="m", input="[[delay=30]] hang", background=True)
    await until(lambda: len(mock.requests) >= 2, "the upstream to get the hung request")
    cancelled = await asyncio.wait_for(cb.responses.cancel(hung.id), 10)
    assert cancelled.status == "cancelled"
