"""Shared HTTP helpers: parsing bodies into validated models, JSON replies, paging params."""

from __future__ import annotations

from typing import Any, TypeVar

import orjson
from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import Response

from branchwise.core.errors import InvalidRequest
from branchwise.wire.errors import from_validation

M = TypeVar("M", bound=BaseModel)


class JSONReply(Response):
    """A JSON body that is already bytes: Starlette's `Response` without its header building
    (`raw_headers` is made directly; `headers` still works on it), sent as two ASGI messages."""

    media_type = "application/json"

    def __init__(self, body: bytes, status_code: int = 200):
        self.body = body
        self.status_code = status_code
        self.background = None
        self.raw_headers = [(b"content-length", b"%d" % len(body)), (b"content-type", b"application/json")]

    async def __call__(self, scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        await send({"type": "http.response.body", "body": self.body})


def json_response(obj: Any, status: int = 200) -> Response:
    return JSONReply(obj if isinstance(obj, bytes) else orjson.dumps(obj), status)


async def parse_body(request: Request, model: type[M]) -> M:
    """The request body as `model`, or an OpenAI-shaped 400."""
    raw = await request.body()
    ctype = request.headers.get("content-type", "")
    if raw and ctype and "json" not in ctype.split(";")[0].lower():
        raise InvalidRequest(
            f"Unsupported content type: '{ctype}'. This API only accepts 'application/json' requests.",
            code="unsupported_content_type",
        )
    try:
        data = orjson.loads(raw) if raw.strip() else {}
    except orjson.JSONDecodeError:
        raise InvalidRequest(
            "We could not parse the JSON body of your request. (HINT: This likely means you aren't using your "
            "HTTP library correctly. The OpenAI API expects a JSON payload, but what was sent was not valid JSON.)",
            code="invalid_json",
        ) from None
    if not isinstance(data, dict):
        raise InvalidRequest("The request body must be a JSON object.", code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise from_validation(e) from None


def paging(request: Request, *, max_limit: int = 100, default_limit: int = 20,
           default_order: str = "desc") -> tuple[int, str, str | None]:
    q = request.query_params
    raw_limit = q.get("limit")
    try:
        limit = default_limit if raw_limit is None else int(raw_limit)
    except ValueError:
        raise InvalidRequest(f"Invalid value for 'limit': expected an integer, got '{raw_limit}'.",
                             param="limit", code="invalid_value") from None
    if not 1 <= limit <= max_limit:
        raise InvalidRequest(f"Invalid value for 'limit': must be between 1 and {max_limit}.",
                             param="limit", code="invalid_value")
    order = q.get("order", default_order)
    if order not in ("asc", "desc"):
        raise InvalidRequest("Invalid value for 'order': must be 'asc' or 'desc'.", param="order",
                             code="invalid_value")
    after = q.get("after") or None
    if after is not None and "\x00" in after:  # no id holds a NUL, and PostgreSQL refuses one in text
        raise InvalidRequest("Invalid value for 'after': an id holds no NUL character.", param="after",
                             code="invalid_value")
    return limit, order, after
