"""What every request passes through: the API key check (a pure ASGI middleware) and the one
place errors become OpenAI-shaped replies (`reply`, which every route's handler is called
through)."""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable
from logging import INFO
from time import perf_counter

import orjson
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response

from branchwise.api.common import json_response
from branchwise.core.errors import BranchwiseError
from branchwise.core.ids import new_id
from branchwise.observe import logs, metrics, traces
from branchwise.observe.logs import ACCESS
from branchwise.wire.errors import error_body, http_error

log = logging.getLogger("branchwise.api")

_UNAUTHORIZED = orjson.dumps(error_body("Incorrect API key provided.", code="invalid_api_key"))
_STATUS_TYPES = {429: "rate_limit_error"}


class Auth:
    """With an API key configured, every `/v1/` request must carry it as its bearer token; a
    WebSocket handshake too, refused with the same 401 reply as HTTP (when the server can send
    one: else with the close code that makes it a 403)."""

    def __init__(self, app, api_key: str):
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "lifespan" and scope["path"].startswith("/v1/"):
            auth = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
            if not hmac.compare_digest(auth, self.expected):
                if scope["type"] == "websocket":
                    await refuse_handshake(scope, send)
                    return
                await json_response(_UNAUTHORIZED, 401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def refuse_handshake(scope, send) -> None:
    if "websocket.http.response" in scope.get("extensions", {}):
        await send({"type": "websocket.http.response.start", "status": 401, "headers": [
            (b"content-type", b"application/json"), (b"content-length", b"%d" % len(_UNAUTHORIZED))]})
        await send({"type": "websocket.http.response.body", "body": _UNAUTHORIZED})
    else:
        await send({"type": "websocket.close", "code": 1008})


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
