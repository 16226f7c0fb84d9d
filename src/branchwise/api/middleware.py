"""The two layers every request passes through, as plain ASGI middleware: the API key check
and the mapping of errors to OpenAI-shaped replies. Plain ASGI (no `BaseHTTPMiddleware`)
because they sit on the hot path: each costs a function call per request, not a task."""

from __future__ import annotations

import hmac
import logging

import orjson
from starlette.exceptions import HTTPException

from branchwise.api.common import json_response
from branchwise.core.errors import BranchwiseError
from branchwise.core.ids import new_id
from branchwise.wire.errors import error_body, http_error

log = logging.getLogger("branchwise.api")

_UNAUTHORIZED = orjson.dumps(error_body("Incorrect API key provided.", param=None, code="invalid_api_key"))
_STATUS_TYPES = {429: "rate_limit_error"}


class Auth:
    """With an API key configured, every `/v1/` request must carry it as its bearer token."""

    def __init__(self, app, api_key: str | None):
        self.app = app
        self.expected = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope, receive, send) -> None:
        if self.expected is not None and scope["type"] != "lifespan" and scope["path"].startswith("/v1/"):
            auth = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
            if not hmac.compare_digest(auth, self.expected):
                if scope["type"] == "websocket":
                    await send({"type": "websocket.close", "code": 1008})
                    return
                await json_response(_UNAUTHORIZED, 401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class Errors:
    """Whatever a route raises becomes an OpenAI-shaped error: domain errors by
    `wire.errors.http_error`, routing errors (404, 405) by their status, anything else a 500
    whose message carries an id that is also in the log. Once a reply has started (a stream)
    nothing can be sent any more, and the error goes on to the server, which closes the
    connection."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_started(message) -> None:
            nonlocal started
            started = True
            await send(message)

        try:
            await self.app(scope, receive, send_started)
        except BranchwiseError as exc:
            if started:
                raise
            status, body, headers = http_error(exc)
            reply = json_response(body, status)
            for k, v in headers.items():
                reply.raw_headers.append((k.encode(), v.encode()))
            await reply(scope, receive, send)
        except HTTPException as exc:
            if started:
                raise
            message = "Not found." if exc.status_code == 404 else str(exc.detail)
            reply = json_response(error_body(message, _STATUS_TYPES.get(exc.status_code, "invalid_request_error")),
                                  exc.status_code)
            for k, v in (exc.headers or {}).items():
                reply.raw_headers.append((k.lower().encode(), v.encode()))
            await reply(scope, receive, send)
        except Exception:
            error_id = new_id("err")
            log.exception("unhandled error %s on %s %s", error_id, scope["method"], scope["path"])
            if started:
                raise
            reply = json_response(error_body(
                f"The server had an error while processing your request (error id {error_id}).", "server_error"), 500)
            await reply(scope, receive, send)
