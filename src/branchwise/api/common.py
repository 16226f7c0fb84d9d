"""Shared HTTP helpers: parsing bodies into validated models, JSON replies, paging params."""

from __future__ import annotations

import asyncio
import re
from typing import Any, TypeVar

import ijson
import orjson
from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import Response

from branchwise.core.errors import InvalidRequest
from branchwise.wire.errors import RequestTooLarge, from_validation
from branchwise.wire.ids import check_id

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


_INVALID_JSON = ("We could not parse the JSON body of your request. (HINT: This likely means you aren't using your "
                 "HTTP library correctly. The OpenAI API expects a JSON payload, but what was sent was not valid "
                 "JSON.)")
OFF_LOOP_BYTES = 256 << 10
"""Bodies longer than this are parsed in a worker thread, a chunk at a time (`decode_big`)."""
CHUNK_BYTES = 32 << 10
"""What `decode_big` parses in one call that holds the GIL (well under a millisecond)."""


def _header(request: Request, name: bytes) -> bytes | None:
    """One request header, from the raw list (Starlette's `Headers` decodes them all first)."""
    for k, v in request.scope["headers"]:
        if k == name:
            return v
    return None


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with a 413 as soon as it passes `limit` bytes: a declared
    `Content-Length` over it is refused before a byte is read, and a body without one (chunked)
    is never buffered past the limit."""
    length = _header(request, b"content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise RequestTooLarge(limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestTooLarge(limit)
        chunks.append(chunk)
    request._body = body = chunks[0] if len(chunks) == 1 else b"".join(chunks)  # (as `Request.body()` keeps it)
    return body


async def parse_body(request: Request, model: type[M]) -> M:
    """The request body as `model`, or an OpenAI-shaped 4xx; the limits (`Settings.max_*`) are
    checked before the body is validated, so a refused request costs little and stores nothing."""
    settings = request.app.state.settings
    raw = await read_body(request, settings.max_body_bytes)
    ctype = _header(request, b"content-type")
    if raw and ctype and b"json" not in ctype.split(b";")[0].lower():
        ctype = ctype.decode("latin-1")
        raise InvalidRequest(
            f"Unsupported content type: '{ctype}'. This API only accepts 'application/json' requests.",
            code="unsupported_content_type",
        )
    if len(raw) > OFF_LOOP_BYTES:
        return await asyncio.to_thread(decode_big, raw, model, settings)
    return decode(raw, model, settings)


def decode(raw: bytes, model: type[M], settings) -> M:
    """Parse, check the limits, validate."""
    return validate(load_object(raw, settings), raw, model, settings)


def load_object(raw: bytes, settings) -> dict:
    """`raw` parsed: a JSON object (nothing: an empty one), or an OpenAI-shaped 400."""
    try:
        data = orjson.loads(raw) if raw.strip() else {}
    except orjson.JSONDecodeError as e:
        if "recursion" in str(e).lower():  # orjson's own limit, 255 levels
            raise _too_deep(None, settings.max_json_depth) from None
        raise InvalidRequest(_INVALID_JSON, code="invalid_json") from None
    return _object(data)


def _object(data: Any) -> dict:
    if not isinstance(data, dict):
        raise InvalidRequest("The request body must be a JSON object.", code="invalid_json")
    return data


def validate(data: dict, raw: bytes, model: type[M], settings) -> M:
    """`data` (parsed from `raw`) as `model`, once the limits are checked."""
    check_limits(data, raw, settings)
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise from_validation(e) from None


def decode_big(raw: bytes, model: type[M], settings) -> M:
    """`decode` for a big body, in a worker thread. orjson would parse it in one call that holds
    the GIL, and so stops the event loop, for as long as the whole body takes (hundreds of
    milliseconds for 16 MiB of small values); ijson's C parser is fed a chunk at a time, so the
    loop gets the GIL back within the switch interval. An `input`/`items` array over the limit
    is refused as soon as its item past the limit is parsed, before the rest is built
    (docs/decisions/0050-big-bodies-parsed-in-chunks.md)."""
    docs = ijson.sendable_list()
    whole = ijson.items_coro(docs, "", use_float=True)
    key = "input" if "input" in model.model_fields else "items" if "items" in model.model_fields else None
    counted = ijson.sendable_list()
    counter = ijson.items_coro(counted, f"{key}.item", use_float=True) if key else None
    limit, seen = settings.max_input_items, 0
    view = memoryview(raw)
    try:
        for start in range(0, len(raw), CHUNK_BYTES):
            chunk = view[start:start + CHUNK_BYTES]
            whole.send(chunk)
            if counter is not None:
                counter.send(chunk)
                seen += len(counted)
                del counted[:]
                if seen > limit:
                    raise InvalidRequest(
                        f"Invalid '{key}': array too long. Expected an array with maximum length {limit}, "
                        f"but got an array with more than {limit} items instead.",
                        param=key, code="array_above_max_length")
        whole.close()
    except ijson.JSONError:
        raise InvalidRequest(_INVALID_JSON, code="invalid_json") from None
    if not docs:
        raise InvalidRequest(_INVALID_JSON, code="invalid_json")
    return validate(_object(docs[0]), raw, model, settings)


def check_limits(data: dict, raw: bytes, settings) -> None:
    """Item counts, then depth and string lengths. The walk over the whole body runs only when
    the raw bytes could hold a violation (more brackets than levels allowed, more bytes than
    characters allowed), which a typical body cannot."""
    max_items = settings.max_input_items
    for key in ("input", "items"):
        value = data.get(key)
        if type(value) is list and len(value) > max_items:
            raise InvalidRequest(f"Invalid '{key}': array too long. Expected an array with maximum length "
                                 f"{max_items}, but got an array with length {len(value)} instead.",
                                 param=key, code="array_above_max_length")
    max_depth, max_text = settings.max_json_depth, settings.max_text_chars
    deep = raw.count(b"[") + raw.count(b"{") > max_depth
    long = len(raw) > max_text
    if deep or long:
        found = _first_violation(data, (), 1, max_depth if deep else 1 << 30, max_text if long else 1 << 62)
        if found is not None:
            what, path, size = found
            param = _path(path)
            if what == "depth":
                raise _too_deep(param, max_depth)
            raise InvalidRequest(f"Invalid '{param}': string too long. Expected a string with maximum length "
                                 f"{max_text}, but got a string with length {size} instead.", param=param,
                                 code="string_above_max_length")


def _first_violation(value, path: tuple, depth: int, max_depth: int, max_text: int):
    """("depth" | "text", path, length) for the first container nested past `max_depth` or string
    longer than `max_text` (dictionary keys included), else None. Recursion is bounded: the
    depth check stops it at `max_depth`, itself under orjson's 255."""
    if depth > max_depth:
        return "depth", path, depth
    items = value.items() if type(value) is dict else enumerate(value)
    for key, x in items:
        if type(key) is str and len(key) > max_text:
            return "text", path, len(key)
        t = type(x)
        if t is str:
            if len(x) > max_text:
                return "text", (*path, key), len(x)
        elif t is dict or t is list:
            found = _first_violation(x, (*path, key), depth + 1, max_depth, max_text)
            if found is not None:
                return found
    return None


def _path(path: tuple) -> str | None:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out or None


def _too_deep(param: str | None, max_depth: int) -> InvalidRequest:
    where = f"'{param}'" if param else "the request body"
    return InvalidRequest(f"Invalid value: {where} is nested too deeply. Expected at most {max_depth} levels "
                          "of arrays and objects.", param=param, code="invalid_value")


def paging(request: Request, *, max_limit: int = 100, default_limit: int = 20,
           default_order: str = "desc", cursor: re.Pattern | None = None,
           kind: str | None = "item") -> tuple[int, str, str | None]:
    """(limit, order, after); `after` is an id of `kind`, or matches `cursor` when given (with no
    `kind`, it must)."""
    q = request.query_params
    raw_limit = q.get("limit")
    if raw_limit is not None and not (raw_limit.isascii() and raw_limit.isdigit() and len(raw_limit) <= 9):
        raise InvalidRequest(f"Invalid value for 'limit': expected an integer, got '{raw_limit[:64]}'.",
                             param="limit", code="invalid_value")
    limit = default_limit if raw_limit is None else int(raw_limit)
    if not 1 <= limit <= max_limit:
        raise InvalidRequest(f"Invalid value for 'limit': must be between 1 and {max_limit}.",
                             param="limit", code="invalid_value")
    order = q.get("order", default_order)
    if order not in ("asc", "desc"):
        raise InvalidRequest("Invalid value for 'order': must be 'asc' or 'desc'.", param="order",
                             code="invalid_value")
    after = q.get("after") or None
    if after is None or (cursor is not None and cursor.fullmatch(after)):
        return limit, order, after
    if kind is None:
        raise InvalidRequest(f"Invalid value for 'after': '{after[:64]}' is not a cursor of this list.",
                             param="after", code="invalid_value")
    return limit, order, check_id(after, kind, "after")
