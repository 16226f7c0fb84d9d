"""The raw ASGI app: routing, the request log, and sending a planned reply over HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import orjson

from .chat import completion_body, stream_events
from .replies import Reply, RequestError, build_reply

Scope = MutableMapping[str, Any]
ASGIMessage = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[ASGIMessage]]
Send = Callable[[ASGIMessage], Awaitable[None]]
Headers = list[tuple[bytes, bytes]]

MODEL_IDS = ("mock", "mock-reasoning", "mock-tools")

CHAT_PATHS = frozenset({"/v1/chat/completions", "/chat/completions"})
MODEL_PATHS = frozenset({"/v1/models", "/models"})

_JSON_HEADERS: Headers = [(b"content-type", b"application/json")]
_SSE_HEADERS: Headers = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]


def _models_body(ids: tuple[str, ...]) -> bytes:
    return orjson.dumps({"object": "list", "data": [
        {"id": m, "object": "model", "created": 0, "owned_by": "branchwise-mock"} for m in ids]})

_HEALTH_BODY = b'{"status":"ok"}'
_DONE_EVENT = b"data: [DONE]\n\n"
_MALFORMED_EVENT = b"data: {not json\n\n"


class MockAbort(Exception):
    """Raised inside the app to make the server drop the connection mid-response."""


def _not_mock_abort(record: logging.LogRecord) -> bool:
    """Logging filter: hide uvicorn's traceback for the deliberate ``[[cut]]`` aborts."""
    exc = record.exc_info
    return not (exc and exc[0] is not None and issubclass(exc[0], MockAbort))


_uvicorn_error_logger = logging.getLogger("uvicorn.error")
if _not_mock_abort not in _uvicorn_error_logger.filters:
    _uvicorn_error_logger.addFilter(_not_mock_abort)


def _error_body(message: str, type_: str, code: str | None) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": type_, "param": None, "code": code}})


async def _send_bytes(send: Send, status: int, body: bytes, headers: Headers = _JSON_HEADERS) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [*headers, (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _read_body(receive: Receive) -> bytes | None:
    """The request body, or ``None`` when the client went away first."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


class MockUpstreamApp:
    """The raw ASGI application. ``requests`` is the in-process log of chat request bodies."""

    def __init__(self, *, log_requests: bool = True, delay: float = 0.0) -> None:
        self.delay = delay
        self.requests: list[Any] = []
        self.disconnected: list[Any] = []  # request bodies whose client went away before the reply ended
        self.log_requests = log_requests
        self._counter = itertools.count(1)
        self.model_ids: tuple[str, ...] = MODEL_IDS  # what GET /v1/models lists
        self.models_status = 200  # another status: GET /v1/models fails with it
        self.models_asked = 0  # GET /v1/models requests received

    def reset_models(self) -> None:
        """GET /v1/models as it starts: the three mock models, answered."""
        self.model_ids, self.models_status, self.models_asked = MODEL_IDS, 200, 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        if len(path) > 1 and path.endswith("/"):
            path = path.rstrip("/")
        method: str = scope["method"]
        if path in CHAT_PATHS:
            if method == "POST":
                await self._chat(receive, send)
                return
            allowed = "POST"
        elif path in MODEL_PATHS:
            if method == "GET":
                self.models_asked += 1
                if self.models_status != 200:
                    body = _error_body(f"mock failure {self.models_status}", "server_error", "mock_failure")
                    await _send_bytes(send, self.models_status, body)
                    return
                await _send_bytes(send, 200, _models_body(self.model_ids))
                return
            allowed = "GET"
        elif path == "/_requests":
            if method == "GET":
                await _send_bytes(send, 200, orjson.dumps(self.requests))
                return
            if method == "DELETE":
                count = len(self.requests)
                self.requests.clear()
                await _send_bytes(send, 200, orjson.dumps({"deleted": count}))
                return
            allowed = "GET, DELETE"
        elif path == "/healthz":
            if method == "GET":
                await _send_bytes(send, 200, _HEALTH_BODY)
                return
            allowed = "GET"
        else:
            body = _error_body(f"no route for {method} {path}", "invalid_request_error", "not_found")
            await _send_bytes(send, 404, body)
            return
        body = _error_body(f"method {method} not allowed", "invalid_request_error", "method_not_allowed")
        await _send_bytes(send, 405, body, [*_JSON_HEADERS, (b"allow", allowed.encode())])

    async def _chat(self, receive: Receive, send: Send) -> None:
        raw = await _read_body(receive)
        if raw is None:
            return
        try:
            req = orjson.loads(raw)
        except orjson.JSONDecodeError:
            body = _error_body("request body is not valid JSON", "invalid_request_error", None)
            await _send_bytes(send, 400, body)
            return
        if self.log_requests:
            self.requests.append(req)
        try:
            if not isinstance(req, dict):
                raise RequestError("request body must be a JSON object")
            reply = build_reply(req, next(self._counter))
        except RequestError as exc:
            await _send_bytes(send, 400, _error_body(str(exc), "invalid_request_error", None))
            return

        mock_header = (b"x-mock-messages", str(reply.n_messages).encode())
        gone = asyncio.Event()

        async def watch() -> None:  # the client closing its connection
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()

        watcher = asyncio.ensure_future(watch())
        try:
            await self._reply(req, reply, send, mock_header, gone)
        finally:
            watcher.cancel()
        if gone.is_set():
            self.disconnected.append(req)

    async def _reply(self, req: Any, reply: Reply, send: Send, mock_header: tuple[bytes, bytes],
                     gone: asyncio.Event) -> None:
        delay = max(reply.delay, self.delay)
        if delay > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(gone.wait(), delay)
            if gone.is_set():
                return
        if reply.fail is not None:
            body = _error_body(f"mock failure {reply.fail}", "server_error", "mock_failure")
            await _send_bytes(send, reply.fail, body, [*_JSON_HEADERS, mock_header])
            return
        if reply.stream:
            await self._stream(reply, send, mock_header, gone)
            return
        if reply.malformed:
            await _send_bytes(send, 200, b"not json", [*_JSON_HEADERS, mock_header])
            return
        body = orjson.dumps(completion_body(reply))
        if reply.cut:
            headers = [*_JSON_HEADERS, mock_header, (b"content-length", str(len(body)).encode())]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": body[: len(body) // 2], "more_body": True})
            raise MockAbort("[[cut]]: dropping the connection")
        await _send_bytes(send, 200, body, [*_JSON_HEADERS, mock_header])

    async def _stream(self, reply: Reply, send: Send, mock_header: tuple[bytes, bytes],
                      gone: asyncio.Event) -> None:
        events = stream_events(reply)
        if reply.cut:
            events = events[: max(1, len(events) // 2)]
        else:
            if reply.malformed:
                events.insert(min(2, len(events)), _MALFORMED_EVENT)
            events.append(_DONE_EVENT)
        await send({"type": "http.response.start", "status": 200, "headers": [*_SSE_HEADERS, mock_header]})
        delay = reply.chunk_delay
        for k, data in enumerate(events):
            if delay > 0 and k:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(gone.wait(), delay)
            if gone.is_set():
                return
            await send({"type": "http.response.body", "body": data, "more_body": True})
        if reply.cut:
            raise MockAbort("[[cut]]: dropping the stream")
        await send({"type": "http.response.body", "body": b""})


def create_app(*, log_requests: bool = True, delay: float = 0.0) -> MockUpstreamApp:
    """A fresh mock app, with its own request log and id counter.

    ``log_requests=False`` keeps ``/_requests`` empty (long benchmark runs); ``delay`` is a
    minimum ``[[delay]]`` for every chat request.
    """
    return MockUpstreamApp(log_requests=log_requests, delay=delay)


app = create_app()
"""Module-level app, for ``uvicorn branchwise.testing.mock_upstream:app``."""
