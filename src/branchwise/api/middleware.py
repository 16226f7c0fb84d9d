"""What every request passes through: the API key check, with the key's project and limits (a
pure ASGI middleware, `Auth`), and the one place errors become OpenAI-shaped replies (`reply`,
which every route's handler is called through)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from logging import INFO
from time import perf_counter

import orjson
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response

from branchwise.api.common import JSONReply, json_response
from branchwise.core import projects
from branchwise.core.errors import BranchwiseError
from branchwise.core.ids import new_id
from branchwise.observe import logs, metrics, traces
from branchwise.observe.logs import ACCESS
from branchwise.services.keys import Keys, OverLimit
from branchwise.wire.errors import error_body, http_error

log = logging.getLogger("branchwise.api")

_UNAUTHORIZED = orjson.dumps(error_body("Incorrect API key provided.", code="invalid_api_key"))
_STATUS_TYPES = {429: "rate_limit_error"}


class Auth:
    """Once any API key exists (`services.keys`), every `/v1/` request, HTTP or WebSocket
    handshake, must carry a valid one as its bearer token; the request then acts for the key's
    project (`core.projects`) and within the key's limits. Without keys, requests pass untouched.
    A WebSocket handshake is refused with the same reply as HTTP (when the server can send one:
    else with a close code)."""

    def __init__(self, app, keys: Keys):
        self.app = app
        self.keys = keys

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan" or not scope["path"].startswith("/v1/") or not self.keys.locked:
            await self.app(scope, receive, send)
            return
        started = perf_counter()
        try:
            caller, headers = await admit(self.keys, scope)
        except BranchwiseError as exc:
            status = await refuse(exc, scope, receive, send)
            if scope["type"] == "http":  # (counted and logged as routed requests are, as `refused`)
                finished(scope, scope["method"], "refused", status, started)
            return
        except Exception:
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1011})
            else:
                await crash_reply(scope)(scope, receive, send)
            return
        if headers:
            send = _with_headers(send, headers)
        token = projects.enter(caller)
        try:
            await self.app(scope, receive, send)
        finally:
            projects.leave(token)
            if caller.slot is not None:
                try:
                    await asyncio.shield(caller.slot.drop())
                except Exception:  # (the slot expires unrenewed: `lease_ttl`)
                    log.warning("could not give back a concurrency slot", exc_info=True)


def bearer(scope) -> bytes | None:
    """The token of the `Authorization: Bearer <token>` header (the scheme in any case)."""
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, token = value.strip().partition(b" ")
            return token.strip() if scheme.lower() == b"bearer" and token else None
    return None


# Requests that make a model answer: each holds one of a key's `max_concurrent` slots.
_SLOTTED = frozenset({"/v1/responses", "/v1/responses/compact"})


async def admit(keys: Keys, scope) -> tuple[projects.Caller, list[tuple[bytes, bytes]]]:
    """The caller of an HTTP request or WebSocket handshake, and the rate headers its replies
    carry; raises `InvalidKey` (401) or `RateLimited` (429, `OverLimit` with its headers)."""
    token = bearer(scope)
    key = await keys.find(token) if token else None
    if key is None:
        raise InvalidKey()
    headers: list[tuple[bytes, bytes]] = []
    if key.rpm is not None:
        headers = await keys.count_request(key)
    slot = None
    if key.max_concurrent is not None and (scope["type"] == "websocket" or (
            scope["method"] == "POST" and scope["path"] in _SLOTTED)):
        try:
            slot = await keys.take_slot(key)
        except OverLimit as exc:
            exc.headers = headers + exc.headers
            raise
    return projects.Caller(key.project, key.id, slot, key), headers


class InvalidKey(BranchwiseError):
    def __init__(self) -> None:
        super().__init__("Incorrect API key provided.", code="invalid_api_key")


async def refuse(exc: BranchwiseError, scope, receive, send) -> int:
    """The refusal of a request `admit` refused: a 401 or 429 reply; a WebSocket handshake is
    closed (1008 policy violation for a key, 1013 try again later for a limit)."""
    if isinstance(exc, InvalidKey):
        response = json_response(_UNAUTHORIZED, 401)
        response.raw_headers.append((b"www-authenticate", b'Bearer realm="branchwise"'))
    else:
        response = error_reply(exc)
        response.raw_headers += getattr(exc, "headers", [])
    if scope["type"] == "websocket":
        await refuse_handshake(scope, send, response, 1008 if isinstance(exc, InvalidKey) else 1013)
    else:
        await response(scope, receive, send)
    return response.status_code


def _with_headers(send, headers: list[tuple[bytes, bytes]]):
    async def sending(message) -> None:
        if message["type"] == "http.response.start":
            message["headers"] = [*message.get("headers", ()), *headers]
        await send(message)
    return sending


async def refuse_handshake(scope, send, response: JSONReply, close_code: int) -> None:
    """A WebSocket handshake refused with `response` (its status, headers and body) where the
    server can send one, else closed with `close_code` (which makes it a 403)."""
    if "websocket.http.response" in scope.get("extensions", {}):
        await send({"type": "websocket.http.response.start", "status": response.status_code,
                    "headers": response.raw_headers})
        await send({"type": "websocket.http.response.body", "body": response.body})
    else:
        await send({"type": "websocket.close", "code": close_code})


async def reply(pending: Awaitable[Response], scope, receive, send) -> int:
    """Await a handler's response and send it; whatever the handler raised becomes an
    OpenAI-shaped error reply instead. Errors raised while a reply is being sent (a stream
    that breaks) cannot be answered any more: they go on to the server, which closes the
    connection. Returns the reply's status."""
    try:
        response = await pending
    except BranchwiseError as exc:
        response = error_reply(exc)
    except HTTPException as exc:
        response = http_exception_reply(exc)
    except ClientDisconnect:  # the client left while sending its body: nobody to answer, nothing to log
        response = Response(status_code=499)
    except Exception:
        response = crash_reply(scope)
    await response(scope, receive, send)
    return response.status_code


PLAN = "branchwise.plan"
"""The scope key under which a `POST /v1/responses` handler leaves its plan, for the log line."""


def finished(scope, method: str, route: str, status: int, started: float) -> None:
    """A request is answered: its metrics, and its log line when `info` is on."""
    took = perf_counter() - started
    metrics.request(method, route, status, took)
    if traces.tracer is not None:
        traces.request_done(method, route, status, scope.get(PLAN))
    if ACCESS.isEnabledFor(INFO):
        plan = scope.get(PLAN)
        if plan is None:
            logs.access(method, scope["path"], status, took * 1000)
            return
        usage, req = plan.usage, plan.req
        logs.access(method, scope["path"], status, took * 1000, plan.ids[0], plan.status, req.conversation_id,
                    req.model, usage.input_tokens if usage else None, usage.output_tokens if usage else None,
                    plan.upstream_s * 1000)


def error_reply(exc: BranchwiseError) -> Response:
    status, body, headers = http_error(exc)
    response = json_response(body, status)
    for k, v in headers.items():
        response.raw_headers.append((k.encode(), v.encode()))
    return response


def http_exception_reply(exc: HTTPException) -> Response:
    """Routing's own errors (no such route: 404, wrong method: 405) in OpenAI's shape."""
    message = "Not found." if exc.status_code == 404 else str(exc.detail)
    response = json_response(error_body(message, _STATUS_TYPES.get(exc.status_code, "invalid_request_error")),
                             exc.status_code)
    for k, v in (exc.headers or {}).items():
        response.raw_headers.append((k.lower().encode(), v.encode()))
    return response


def crash_reply(scope) -> Response:
    """A 500 for an unexpected exception (being handled), with an id that is also in the log."""
    error_id = new_id("err")
    log.exception("unhandled error %s on %s %s", error_id, scope.get("method"), scope.get("path"))
    return json_response(error_body(
        f"The server had an error while processing your request (error id {error_id}).", "server_error"), 500)
