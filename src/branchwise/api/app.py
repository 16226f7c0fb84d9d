"""The HTTP application: one route table and one request path.

Every request goes through the same layers, outermost first: `Errors` (OpenAI-shaped errors),
`Auth` (the API key), then Starlette's `Router`, whose routes call plain handlers
`handler(request, **path_params) -> Response`. There is no framework layer in between: the
hot routes (`POST /v1/responses`, `POST /v1/conversations/{id}/head`) come first in the table
and cost a regex match each.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from starlette.datastructures import State
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route, Router

from branchwise.api import conversations, responses
from branchwise.api.common import json_response
from branchwise.api.middleware import Auth, Errors

Handler = Callable[..., Awaitable[Response]]


class Endpoint:
    """A route's ASGI app: the handler's reply to the request."""

    __slots__ = ("handler",)

    def __init__(self, handler: Handler):
        self.handler = handler

    async def __call__(self, scope, receive, send) -> None:
        response = await self.handler(Request(scope, receive), **scope["path_params"])
        await response(scope, receive, send)


async def healthz(request: Request) -> Response:
    return json_response({"status": "ok"})


async def models(request: Request) -> Response:
    ids = request.app.state.router.model_ids()
    return json_response({"object": "list", "data": [
        {"id": i, "object": "model", "created": 0, "owned_by": "branchwise"} for i in ids]})


ROUTES: list[tuple[str, str, Handler]] = [
    # the hot paths first: the router tries routes in order
    ("POST", "/v1/responses", responses.create_response),
    ("POST", "/v1/conversations/{conversation_id}/head", conversations.move_head),
    ("GET", "/healthz", healthz),
    ("GET", "/v1/models", models),
    *responses.ROUTES,
    *conversations.ROUTES,
]


def routes() -> list[Route]:
    by_path: dict[str, dict[str, Handler]] = {}
    for method, path, handler in ROUTES:
        by_path.setdefault(path, {})[method] = handler
    out = []
    for path, methods in by_path.items():
        if len(methods) == 1:
            (method, handler), = methods.items()
            out.append(Route(path, Endpoint(handler), methods=[method]))
        else:  # one path, several methods: one route that picks the handler by method
            out.append(Route(path, Endpoint(_by_method(methods)), methods=list(methods)))
    return out


def _by_method(methods: dict[str, Handler]) -> Handler:
    async def handler(request: Request, **params) -> Response:
        return await methods[request.method](request, **params)
    return handler


class API:
    """The ASGI application. `state` holds the services the lifespan made; handlers reach them
    as `request.app.state`."""

    def __init__(self, lifespan, api_key: str | None = None):
        self.state = State()
        self.router = Router(routes=routes(), lifespan=lifespan, redirect_slashes=False)
        self._stack = Errors(Auth(self.router, api_key))

    async def __call__(self, scope, receive, send) -> None:
        scope["app"] = self  # (also makes the router raise 404/405 for `Errors` to shape)
        await self._stack(scope, receive, send)
