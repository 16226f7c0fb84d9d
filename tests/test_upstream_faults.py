"""Upstream faults: HTTP 5xx / 4xx, connection refused, a timeout, a stream cut mid-way, a
malformed reply. Each ends the response `failed` (a stream ends with `response.failed`) with
`error.code` from OpenAI's list (`server_error`; `rate_limit_exceeded` for a 429) and a message
that names the fault; the response is retrievable as failed; the conversation is unchanged
(same items, same head, no partial item) and its next turn works without the failed one.
Connection errors before anything reached the upstream are retried with backoff; nothing is
ever sent twice. Every test runs on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import httpx2
import openai
import pytest
from openai.types.responses import Response
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from branchwise.settings import Settings
from branchwise.store.tables import items as items_table
from branchwise.testing.mock_upstream import MockUpstream

from .conftest import free_port
from .helpers import MODEL, new_conversation, post_sse, serving, validate_event

HANG_GUARD = 10  # seconds: a fault must never hang a request (this is a guard, not a timing)


# ---------------------------------------------------------------- helpers


async def snapshot(client: openai.AsyncOpenAI, conv_id: str) -> dict[str, Any]:
    listed = [it async for it in client.conversations.items.list(conv_id, order="asc")]
    head = (await client.conversations.retrieve(conv_id)).model_extra["head"]
    return {"ids": [it.id for it in listed], "head": head, "items": [it.model_dump() for it in listed]}


def item_texts(item: dict[str, Any]) -> list[str]:
    return [p.get("text") or "" for p in item.get("content") or [] if isinstance(p, dict)]


async def sse(raw: httpx2.AsyncClient, body: dict[str, Any]) -> list:
    """POST a streaming response; every event validated as the SDK's ResponseStreamEvent."""
    events = [validate_event(name, data) for name, data in await post_sse(raw, body)]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    return events


async def fail_turn(client: openai.AsyncOpenAI, raw: httpx2.AsyncClient, conv_id: str, text: str,
                    stream: bool, *, code: str = "server_error", partial: bool = False) -> Response:
    """One turn that the upstream fault makes fail; returns the failed Response."""
    if stream:
        events = await asyncio.wait_for(sse(raw, {"input": text, "conversation": conv_id}), HANG_GUARD)
        types = [e.type for e in events]
        assert types[:2] == ["response.created", "response.in_progress"]
        assert types[-1] == "response.failed"
        assert types.count("response.failed") == 1
        assert "response.completed" not in types and "response.incomplete" not in types
        if partial:  # the fault came mid-stream, after some text went out
            assert "response.output_text.delta" in types
        failed = events[-1].response
    else:
        failed = await asyncio.wait_for(
            client.responses.create(model=MODEL, input=text, conversation=conv_id), HANG_GUARD)
    assert failed.status == "failed"
    assert failed.error is not None
    assert failed.error.code == code
    assert failed.output == []
    assert failed.usage is None
    assert failed.conversation is not None and failed.conversation.id == conv_id
    return failed


async def check_failed(db: AsyncEngine, client: openai.AsyncOpenAI, conv_id: str, before: dict[str, Any],
                       failed: Response, *needles: str) -> None:
    """The message names the fault, the response is stored failed, the conversation is unchanged."""
    message = failed.error.message.lower()
    assert all(n.lower() in message for n in needles), failed.error.message

    got = await client.responses.retrieve(failed.id)
    assert got.status == "failed"
    assert got.error is not None and got.error.model_dump() == failed.error.model_dump()
    assert got.output == []

    after = await snapshot(client, conv_id)
    assert after["head"] == before["head"]
    assert after["ids"] == before["ids"]
    assert after["items"] == before["items"]
    for item in after["items"]:
        assert item.get("status") not in ("in_progress", "incomplete")
        assert item.get("role") != "assistant"  # the only item is the user's "hello"

    # in the store: the failed response kept its input, and not a single output item (read from
    # the database itself: no API lists the rows of a response that has no output)
    async with db.connect() as conn:
        rows = (await conn.execute(
            select(items_table.c.role, items_table.c.status).where(items_table.c.response_id == failed.id)
        )).all()
    assert all(role == "user" for role, _ in rows), rows
    assert all(status not in ("in_progress", "incomplete") for _, status in rows), rows


async def check_next_turn(client: openai.AsyncOpenAI, upstream: MockUpstream, conv_id: str,
                          before: dict[str, Any]) -> None:
    """A normal turn after the failure works, and its history does not hold the failed turn."""
    upstream.clear()
    ok = await asyncio.wait_for(
        client.responses.create(model=MODEL, input="after", conversation=conv_id), HANG_GUARD)
    assert ok.status == "completed" and ok.error is None
    assert ok.output_text == "[2 messages] Echo: after"
    assert len(upstream.requests) == 1
    assert [m["content"] for m in upstream.requests[0]["messages"]] == ["hello", "after"]
    now = await snapshot(client, conv_id)
    assert now["head"] == ok.output[0].id
    assert now["ids"][: len(before["ids"])] == before["ids"] and len(now["ids"]) == len(before["ids"]) + 2


# ---------------------------------------------------------------- faults the mock plays


MOCK_FAULTS = [
    # (directive, error.code on the wire, words the message must hold, text went out before the fault)
    pytest.param("[[fail=500]]", "server_error", ("500", "mock failure 500"), False, id="http-500"),
    pytest.param("[[fail=503]]", "server_error", ("503", "mock failure 503"), False, id="http-503"),
    pytest.param("[[fail=400]]", "server_error", ("400", "mock failure 400"), False, id="http-400"),
    pytest.param("[[fail=429]]", "rate_limit_exceeded", ("429",), False, id="http-429"),
    pytest.param("[[words=20]] [[cut]]", "server_error", ("ended before",), True, id="cut"),
    pytest.param("[[words=20]] [[malformed]]", "server_error", ("malformed",), True, id="malformed"),
]


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
@pytest.mark.parametrize(("directive", "code", "needles", "partial"), MOCK_FAULTS)
async def test_upstream_fault(db_engine, client, raw, mock, stream, directive, code, needles, partial):
    conv_id = (await new_conversation(client, "hello")).id
    before = await snapshot(client, conv_id)

    failed = await fail_turn(client, raw, conv_id, f"boom {directive}", stream, code=code,
                             partial=partial and stream)
    # the request reached the upstream, so it was sent exactly once: never retried
    assert len(mock.requests) == 1
    await check_failed(db_engine, client, conv_id, before, failed, *needles)
    await check_next_turn(client, mock, conv_id, before)


# ---------------------------------------------------------------- timeout


TIMEOUTS = [
    # (upstream_timeout, directive, stream, text went out before the fault)
    # (the mock goes on sleeping and sending after the client left: short delays keep it brief)
    pytest.param(0.5, "[[delay=2]]", False, False, id="json-no-reply"),
    pytest.param(0.5, "[[delay=2]]", True, False, id="sse-before-first-byte"),
    # mid-stream: the first chunk (the role delta, no text yet) comes, the next one does not
    pytest.param(0.5, "[[chunk_delay=1.5]]", True, False, id="sse-between-chunks"),
    # every gap is well under the timeout, but the whole stream is not: the deadline stops it
    pytest.param(0.6, "[[words=20]] [[chunk_delay=0.2]]", True, True, id="sse-whole-request"),
]


@pytest.mark.parametrize(("timeout", "directive", "stream", "partial"), TIMEOUTS)
async def test_upstream_timeout(db_url, db_engine, mock, timeout, directive, stream, partial):
    settings = Settings(database_url=db_url, upstream_base_url=mock.url, upstream_timeout=timeout)
    async with serving(settings) as (_, client, raw):
        conv_id = (await new_conversation(client, "hello")).id
        before = await snapshot(client, conv_id)
        failed = await fail_turn(client, raw, conv_id, f"slow {directive}", stream, partial=partial)
        assert len(mock.requests) == 1
        await check_failed(db_engine, client, conv_id, before, failed, "timed out")
        await check_next_turn(client, mock, conv_id, before)


# ---------------------------------------------------------------- nothing listening


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
async def test_connection_refused(db_url, db_engine, stream):
    port = free_port()  # nothing listens there
    settings = Settings(database_url=db_url, upstream_base_url=f"http://127.0.0.1:{port}/v1")
    async with serving(settings) as (_, client, raw):
        conv_id = (await new_conversation(client, "hello")).id
        before = await snapshot(client, conv_id)
        failed = await fail_turn(client, raw, conv_id, "anyone there?", stream)
        await check_failed(db_engine, client, conv_id, before, failed, "connect")
        # once the upstream is up, the conversation goes on from where it was
        with MockUpstream(port=port) as upstream:
            await check_next_turn(client, upstream, conv_id, before)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
async def test_connect_retried_with_backoff(db_url, stream):
    """The upstream starts listening while the first connects are refused: a retry gets through."""
    port = free_port()
    upstream = MockUpstream(port=port)
    settings = Settings(database_url=db_url, upstream_base_url=f"http://127.0.0.1:{port}/v1")
    timer = threading.Timer(0.25, upstream.start)
    try:
        async with serving(settings) as (_, client, raw):
            conv_id = (await new_conversation(client, "hello")).id
            timer.start()
            if stream:
                events = await asyncio.wait_for(sse(raw, {"input": "knock", "conversation": conv_id}),
                                                HANG_GUARD)
                assert events[-1].type == "response.completed"
                done = events[-1].response
            else:
                done = await asyncio.wait_for(
                    client.responses.create(model=MODEL, input="knock", conversation=conv_id), HANG_GUARD)
            assert done.status == "completed" and done.error is None
            assert done.output_text == "[2 messages] Echo: knock"
            assert len(upstream.requests) == 1  # refused connects sent nothing; the one that got in, once
            assert (await client.conversations.retrieve(conv_id)).model_extra["head"] == done.output[0].id
    finally:
        timer.cancel()
        timer.join()
        upstream.stop()
