"""The HTTP application: one route table and one request path.

Every request takes the same path: `Auth` (a pure ASGI middleware: API keys, projects, limits;
a request passes it untouched while no key exists), then `Routing`, which calls the route's plain handler `handler(request, **path_params)`
through `middleware.reply`, the one place where errors become OpenAI-shaped replies. There is
no framework layer in between. A WebSocket connection takes the same `Auth`, then goes to its
path's endpoint in `SOCKETS` (`api.sockets`).

`Routing` finds a route by a dictionary lookup of (method, path) for exact paths and by the
route's compiled pattern for the others, in `ROUTES` order (the hot routes first); what matches
nothing goes to Starlette's `Router`, built from the same table, for its 404, 405 and HEAD
answers and for the lifespan. docs/decisions/0027 has the numbers behind this shape.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from time import perf_counter

from starlette.datastructures import State
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route, Router, compile_path

from branchwise.api import conversations, openapi, prompts, responses, sockets
from branchwise.api.common import json_response
from branchwise.api.middleware import Auth, finished, http_exception_reply, reply
from branchwise.observe import metrics, traces
from branchwise.services.keys import Keys

Handler = Callable[..., Awaitable[Response]]


async def healthz(request: Request) -> Response:
    return json_response({"status": "ok"})


async def serve_metrics(request: Request) -> Response:
    return Response(metrics.render(), media_type=metrics.CONTENT_TYPE)


async def models(request: Request) -> Response:
    """The model names routable: the routes' literal names, and the names the upstreams of
    pattern routes list that match the pattern (`Router.list_models`)."""
    listed = await request.app.state.router.list_models()
    return json_response({"object": "list", "data": [
        {"id": name, "object": "model", "created": 0, "owned_by": owner} for name, owner in listed]})


ROUTES: list[tuple[str, str, Handler]] = [
    # the hot routes first: patterns are tried in this order
    ("POST", "/v1/responses", responses.create_response),
    ("POST", "/v1/conversations/{conversation_id}/head", conversations.move_head),
    ("GET", "/healthz", healthz),
    ("GET", "/v1/models", models),
    *responses.ROUTES,
    *conversations.ROUTES,
    *prompts.ROUTES,
    ("GET", "/openapi.json", openapi.serve),
]
openapi.publish(ROUTES)  # the document of the table above, built once at start-up
SOCKETS = {"/v1/responses": sockets.responses_socket}  # WebSocket endpoints: path -> ASGI app


class Endpoint:
    """A route's handler as an ASGI app, for Starlette's router (HEAD requests)."""

    __slots__ = ("handler",)

    def __init__(self, handler: Handler):
        self.handler = handler

    async def __call__(self, scope, receive, send) -> None:
        await reply(self.handler(Request(scope, receive), **scope["path_params"]), scope, receive, send)


class Routing:
    def __init__(self, lifespan, pages: Sequence[BaseRoute] = (), metrics: bool = True):
        self.exact: dict[tuple[str, str], Handler] = {}
        self.patterns: list[tuple[str, Callable, Handler, str]] = []
        by_path: dict[str, list[str]] = {}
        for method, path, handler in ROUTES:
            by_path.setdefault(path, []).append(method)
            if "{" in path:
                self.patterns.append((method, compile_path(path)[0].match, handler, path))
            else:
                self.exact[(method, path)] = handler
        if metrics:  # (operations, not the API: outside the table and the OpenAPI document)
            self.exact[("GET", "/metrics")] = serve_metrics
        # Starlette's router answers what the table does not: 404, 405 with `Allow`, HEAD; and
        # serves `pages`, the routes outside the API (the explorer), which are not on the hot path
        self.router = Router(routes=[*(Route(path, Endpoint(_by_method(path)), methods=methods)
                                       for path, methods in by_path.items()), *pages],
                             lifespan=lifespan, redirect_slashes=False)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            started = perf_counter()
            method, path = scope["method"], scope["path"]
            handler = self.exact.get((method, path))
            if handler is not None:
                status = await reply(handler(Request(scope, receive)), scope, receive, send)
                finished(scope, method, path, status, started)
                return
            for wanted, match, handler, route in self.patterns:
                if wanted == method and (found := match(path)) is not None:
                    scope["path_params"] = params = found.groupdict()
                    status = await reply(handler(Request(scope, receive), **params), scope, receive, send)
                    finished(scope, method, route, status, started)
                    return
            await self._unrouted(scope, receive, send, started)
            return
        if scope["type"] == "websocket" and (socket := SOCKETS.get(scope["path"])) is not None:
            await socket(scope, receive, send)
            return
        await self.router(scope, receive, send)  # (the lifespan; an unknown socket path is refused, 403)

    async def _unrouted(self, scope, receive, send, started: float) -> None:
        """What the table does not route (404, 405, HEAD), by Starlette's router; its metrics
        and log line under the route `other` (a path nobody routes is no label value)."""
        status = 500

        async def watch(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.router(scope, receive, watch)
        except HTTPException as exc:
            await http_exception_reply(exc)(scope, receive, watch)
        finished(scope, scope["method"], "other", status, started)


def _by_method(path: str) -> Handler:
    table = {method: handler for method, p, handler in ROUTES if p == path}

    async def handler(request: Request, **params) -> Response:
        return await table["GET" if request.method == "HEAD" else request.method](request, **params)
    return handler


class API:
    """The ASGI application. `state` holds the services the lifespan made; handlers reach them
    as `request.app.state`. `pages` are routes outside the API (the explorer's), reached through
    Starlette's router after the API's table."""

    def __init__(self, lifespan, keys: Keys, pages: Sequence[BaseRoute] = (), metrics: bool = True):
        self.state = State()
        routing = Routing(lifespan, pages, metrics)
        self.router = routing.router  # (its `lifespan_context` runs the lifespan in tests)
        self._keys = keys
        self._routing = routing
        self._auth = Auth(routing, keys)

    async def __call__(self, scope, receive, send) -> None:
        scope["app"] = self  # (also makes Starlette's router raise 404/405 for `Routing` to shape)
        # without any API key, a request goes straight to routing (no layer to pass through)
        app = self._auth if self._keys.locked else self._routing
        if traces.tracer is not None and scope["type"] == "http":
            with traces.request_span(scope["method"], scope["path"]):
                await app(scope, receive, send)
            return
        await app(scope, receive, send)
