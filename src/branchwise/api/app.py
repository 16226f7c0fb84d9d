"""The ASGI application: routers, error mapping, auth, and the start-up that wires the parts."""

from __future__ import annotations

import gc
import logging
import re
from contextlib import asynccontextmanager

import orjson
from fastapi import FastAPI
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from branchwise.api import conversations, responses
from branchwise.api.common import json_response
from branchwise.backends.router import Router
from branchwise.engine.policy import Policies
from branchwise.engine.runner import Engine
from branchwise.engine.runs import Runs
from branchwise.settings import Settings
from branchwise.store.db import create_engine, migrate
from branchwise.store.leases import Leases
from branchwise.store.queries import Store
from branchwise.store.runs import RunStore
from branchwise.wire.errors import APIError

log = logging.getLogger("branchwise")

_STATUS_TYPES = {401: "invalid_request_error", 403: "invalid_request_error", 404: "invalid_request_error",
                 405: "invalid_request_error", 429: "rate_limit_error"}


_UNAUTHORIZED = orjson.dumps({"error": {"message": "Incorrect API key provided.", "type": "invalid_request_error",
                                        "param": None, "code": "invalid_api_key"}})


_HEAD_PATH = re.compile(r"/v1/conversations/([^/]+)/head")


class Gate:
    """The ASGI application uvicorn runs, around the FastAPI one: the API key check when one is
    configured, and the hot paths — POST /v1/responses and POST /v1/conversations/{id}/head (a
    client picking an alternative or going back) go straight to their handlers, past FastAPI's
    middleware stack (error, telemetry and body-limit layers, each wrapping every `send`) and
    routing, which together cost about a fifth of the server's CPU per stored response in the
    benchmark, and most of a head move's. Everything else, lifespan included, is the FastAPI
    app's; its attributes (`state`, `router` ...) are reachable through this object."""

    def __init__(self, app: FastAPI, api_key: str | None = None):
        self.app = app
        self.expected = f"Bearer {api_key}".encode() if api_key else None

    def __getattr__(self, name: str):
        return getattr(self.app, name)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        scope["app"] = self.app
        path = scope["path"]
        if self.expected is not None and path.startswith("/v1/"):
            auth = next((v for k, v in scope["headers"] if k == b"authorization"), None)
            if auth != self.expected:
                await Response(_UNAUTHORIZED, 401, media_type="application/json")(scope, receive, send)
                return
        if scope["method"] == "POST":
            if path == "/v1/responses":
                handler = responses.create_response(Request(scope, receive))
            elif (m := _HEAD_PATH.fullmatch(path)) is not None:
                handler = conversations.move_head(Request(scope, receive), m[1])
            else:
                await self.app(scope, receive, send)
                return
            try:
                response = await handler
            except APIError as exc:
                response = _error_response(exc)
            except Exception:
                log.exception("unhandled error")
                response = json_response({"error": {"message": "The server had an error while processing your request.",
                                                    "type": "server_error", "param": None, "code": None}}, 500)
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


def _error_response(exc: APIError) -> Response:
    resp = json_response(exc.body(), exc.status)
    if exc.headers:
        resp.headers.update(exc.headers)
    return resp


def create_app(settings: Settings | None = None) -> Gate:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        db = create_engine(settings.database_url)
        await migrate(db)
        router = Router(settings)
        store = Store(db, settings.path_cache_mb << 20)
        app.state.settings = settings
        app.state.store = store
        app.state.router = router
        app.state.policies = Policies(Leases(db), settings)
        app.state.runs = runs = Runs(RunStore(db), settings)
        app.state.engine = Engine(store, router, settings, app.state.policies, runs)
        await runs.start()
        # Everything made so far (modules, app, pools) lives as long as the process: keep it out
        # of the collector's full passes, which otherwise walk it all every few thousand requests.
        gc.collect()
        gc.freeze()
        # A collection every 20,000 net allocations instead of 700: 64 requests in flight hold
        # a few thousand young objects, so at 700 the collector ran every ~15 requests to find
        # them alive (~2.5% of the CPU per response at concurrency 64; cycles are rare here).
        gc.set_threshold(20_000)
        try:
            yield
        finally:
            await runs.stop()
            await router.aclose()
            await store.db.close()
            await db.dispose()

    app = FastAPI(title="branchwise", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(APIError)
    async def _api_error(_request: Request, exc: APIError) -> Response:
        return _error_response(exc)

    @app.exception_handler(HTTPException)
    async def _http_error(_request: Request, exc: HTTPException) -> Response:
        message = "Not found." if exc.status_code == 404 else str(exc.detail)
        body = {"error": {"message": message, "type": _STATUS_TYPES.get(exc.status_code, "invalid_request_error"),
                          "param": None, "code": None}}
        return json_response(body, exc.status_code)

    @app.exception_handler(Exception)
    async def _crash(_request: Request, exc: Exception) -> Response:
        log.exception("unhandled error")
        body = {"error": {"message": "The server had an error while processing your request.",
                          "type": "server_error", "param": None, "code": None}}
        return json_response(body, 500)

    @app.get("/healthz")
    async def healthz() -> Response:
        return json_response({"status": "ok"})

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        ids = request.app.state.router.model_ids()
        return json_response({"object": "list", "data": [
            {"id": i, "object": "model", "created": 0, "owned_by": "branchwise"} for i in ids]})

    app.include_router(responses.router, prefix="/v1")
    app.include_router(conversations.router, prefix="/v1")
    return Gate(app, api_key=settings.api_key)
