"""The ASGI application: routers, error mapping, auth, and the start-up that wires the parts."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

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


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        db = create_engine(settings.database_url)
        await migrate(db)
        router = Router(settings)
        store = Store(db)
        app.state.settings = settings
        app.state.store = store
        app.state.router = router
        app.state.policies = Policies(Leases(db), settings)
        app.state.runs = runs = Runs(RunStore(db), settings)
        app.state.engine = Engine(store, router, settings, app.state.policies, runs)
        await runs.start()
        try:
            yield
        finally:
            await runs.stop()
            await router.aclose()
            store.db.close()
            await db.dispose()

    app = FastAPI(title="branchwise", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(APIError)
    async def _api_error(_request: Request, exc: APIError) -> Response:
        resp = json_response(exc.body(), exc.status)
        if exc.headers:
            resp.headers.update(exc.headers)
        return resp

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

    if settings.api_key:
        expected = f"Bearer {settings.api_key}"

        @app.middleware("http")
        async def _auth(request: Request, call_next):
            if request.url.path.startswith("/v1/") and request.headers.get("authorization") != expected:
                return json_response({"error": {
                    "message": "Incorrect API key provided.", "type": "invalid_request_error",
                    "param": None, "code": "invalid_api_key"}}, 401)
            return await call_next(request)

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
    return app
