"""Helpers shared by the test modules: Server-Sent Events, OpenAI's error shape, an app of a
test's own, conversations, and waits with a deadline."""

from __future__ import annotations

import asyncio
import inspect
import json
import time
import typing
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx2
import openai
from openai.types.responses import ResponseStreamEvent
from pydantic import TypeAdapter, ValidationError

from branchwise.app import create_app
from branchwise.settings import Settings

MODEL = "mock"
EVENT = TypeAdapter(ResponseStreamEvent)
# the SDK's own class for each event type, for readable errors (the union has ~60 members)
EVENT_CLASSES = {
    cls.model_fields["type"].annotation.__args__[0]: cls
    for cls in typing.get_args(typing.get_args(ResponseStreamEvent)[0])
}


# Open Responses names the raw reasoning events `response.reasoning.delta` / `.done`, OpenAI
# `response.reasoning_text.delta` / `.done`; branchwise sends Open Responses' (docs/api.md). The SDK,
# which has no type for them, passes them through untyped; their fields are those of OpenAI's.
OPEN_RESPONSES_EVENTS = {"response.reasoning.delta": "response.reasoning_text.delta",
                         "response.reasoning.done": "response.reasoning_text.done"}

# ---------------------------------------------------------------- Server-Sent Events


def parse_sse(text: str) -> list[tuple[str, dict]]:
    """An SSE body as (event name, parsed data) pairs, checked for framing: every block is
    exactly an `event:` line and a `data:` line, and the body ends with a blank line."""
    assert text == "" or text.endswith("\n\n"), text[-200:]
    out = []
    for block in text.split("\n\n")[:-1]:
        lines = block.split("\n")
        assert len(lines) == 2, block
        assert lines[0].startswith("event: ") and lines[1].startswith("data: "), block
        out.append((lines[0][len("event: "):], json.loads(lines[1][len("data: "):])))
    return out


def validate_event(name: str, data: dict) -> Any:
    """One event: it names its type in `event:` and validates as the SDK's ResponseStreamEvent
    (the Open Responses reasoning events as their OpenAI twins)."""
    assert name == data["type"], (name, data["type"])
    assert "error" not in data or data["type"] == "error"  # the SDK raises on a top-level `error`
    if data["type"] in OPEN_RESPONSES_EVENTS:
        twin = EVENT_CLASSES[OPEN_RESPONSES_EVENTS[data["type"]]]
        twin.model_validate({**data, "type": OPEN_RESPONSES_EVENTS[data["type"]]})
        return twin.model_construct(**data)
    try:
        return EVENT.validate_python(data)
    except ValidationError:
        assert data["type"] in EVENT_CLASSES, f"unknown event type {data['type']}"
        EVENT_CLASSES[data["type"]].model_validate(data)  # raises the one relevant error
        raise


def sse_events(text: str) -> list[dict]:
    """Every event of an SSE body, framing checked and each validated, as plain dicts."""
    events = parse_sse(text)
    for name, data in events:
        validate_event(name, data)
    return [data for _, data in events]


class EventReader:
    """Reads a streaming HTTP response's events in several goes, each checked as `sse_events`
    does."""

    def __init__(self, response):
        self.chunks = response.aiter_text()
        self.buf = ""

    async def read(self, limit: int | None = None) -> list[dict]:
        """The next events, at most `limit`; without one, up to the end of the stream."""
        events: list[dict] = []
        while True:
            while "\n\n" in self.buf:
                block, self.buf = self.buf.split("\n\n", 1)
                events += sse_events(block + "\n\n")
                if limit is not None and len(events) >= limit:
                    return events
            try:
                self.buf += await anext(self.chunks)
            except StopAsyncIteration:
                return events


async def read_events(response, limit: int | None = None) -> list[dict]:
    """Events from a streaming HTTP response as they come, at most `limit` (then the stream is
    dropped)."""
    return await EventReader(response).read(limit)


async def post_sse(raw: httpx2.AsyncClient, body: dict[str, Any]) -> list[tuple[str, dict]]:
    """POST /v1/responses with `stream: true` (and the test model unless `body` names one);
    every event as (event name, parsed data), framing checked."""
    resp = await raw.post("/v1/responses", json={"model": MODEL, "stream": True, **body})
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("text/event-stream")
    return parse_sse(resp.text)


# ---------------------------------------------------------------- OpenAI's error shape

ANY = object()  # for `param`: not checked


def check_error(resp, status: int, param: Any = ANY, code: str | None = None, case: str = "") -> dict[str, Any]:
    """An OpenAI error reply on the wire: `{"error": {message, type, param, code}}`."""
    assert resp.status_code == status, f"{case}: {resp.status_code} {resp.text}"
    assert resp.headers["content-type"].startswith("application/json"), case
    body = resp.json()
    assert set(body) == {"error"}, f"{case}: {body}"
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, f"{case}: {err}"
    assert isinstance(err["message"], str) and err["message"], f"{case}: {err}"
    assert err["type"] == "invalid_request_error", f"{case}: {err}"
    if param is not ANY:
        assert err["param"] == param, f"{case}: {err}"
    if code is not None:
        assert err["code"] == code, f"{case}: {err}"
    return err


def check_sdk_error(exc: openai.APIStatusError, status: int, param: Any = ANY,
                    code: str | None = None) -> dict[str, Any]:
    """The same error as the SDK raised it: checked on the wire and as the SDK parsed it."""
    assert exc.status_code == status
    err = check_error(exc.response, status, param, code)
    assert exc.body == err  # the SDK unwraps `error`
    assert exc.type == err["type"] and exc.param == err["param"] and exc.code == err["code"]
    return err


# ---------------------------------------------------------------- apps and conversations


@asynccontextmanager
async def serving(settings: Settings) -> AsyncIterator[tuple[Any, openai.AsyncOpenAI, httpx2.AsyncClient]]:
    """An app of a test's own (for settings the shared fixtures don't have), in-process, with
    the SDK and a raw HTTP client on it."""
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        async with (
            httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url="http://test") as raw,
            httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url="http://test") as http,
            openai.AsyncOpenAI(api_key="x", base_url="http://test/v1", http_client=http, max_retries=0) as client,
        ):
            yield app, client, raw


@asynccontextmanager
async def served(settings: Settings) -> AsyncIterator[tuple[Any, str]]:
    """The app behind uvicorn on a real socket, in this test's event loop, with the options
    `branchwise serve` gives it (a WebSocket needs a real server): (app, its http:// base URL)."""
    import socket

    import uvicorn

    from branchwise.cli.serve import server_options

    app = create_app(settings)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", **server_options(settings)))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        await until(lambda: server.started or task.done(), "uvicorn to start")
        if task.done():
            task.result()  # (raises why it stopped)
        yield app, f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 60)
        sock.close()


async def new_conversation(client: openai.AsyncOpenAI, *texts: str):
    """A conversation that starts with one user message per text."""
    return await client.conversations.create(items=[{"type": "message", "role": "user", "content": t}
                                                    for t in texts])


# ---------------------------------------------------------------- waits with a deadline


async def until(check: Callable[[], Any], what: str, timeout: float = 10.0, interval: float = 0.01) -> Any:
    """Polls `check` (sync or async) until it returns something true, and returns that; fails
    with `what` when `timeout` seconds pass first (a hang guard, not a timing)."""
    deadline = time.monotonic() + timeout
    while True:  # bounded: the deadline below
        got = check()
        if inspect.isawaitable(got):
            got = await got
        if got:
            return got
        if time.monotonic() >= deadline:
            break
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
