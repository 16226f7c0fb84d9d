"""OpenAI-shaped errors: `{"error": {"message", "type", "param", "code"}}`, and the one mapping
from domain errors (`core.errors`) to HTTP status codes."""

from __future__ import annotations

import orjson
from pydantic import ValidationError

from branchwise.core.errors import (
    BranchwiseError,
    Conflict,
    InvalidRequest,
    LimitReached,
    ModelFailed,
    NotFound,
    RateLimited,
    ServerFault,
    Unavailable,
    Unprocessable,
)


class RequestTooLarge(InvalidRequest):
    """A body past `max_body_bytes`. An HTTP matter, not a domain one, so it lives here: the
    reply closes the connection, since the rest of the body may still be on its way."""

    def __init__(self, limit: int):
        super().__init__(f"The request body is larger than the {limit} bytes this server accepts.",
                         code="request_too_large")


_STATUS: dict[type[BranchwiseError], tuple[int, str]] = {
    RequestTooLarge: (413, "invalid_request_error"),
    InvalidRequest: (400, "invalid_request_error"),
    NotFound: (404, "invalid_request_error"),
    Conflict: (409, "invalid_request_error"),
    Unprocessable: (422, "invalid_request_error"),
    RateLimited: (429, "requests"),  # (OpenAI's type for a requests-per-minute limit)
    LimitReached: (429, "rate_limit_error"),
    ModelFailed: (502, "server_error"),
    ServerFault: (500, "server_error"),
    Unavailable: (503, "server_error"),
}


def status_of(exc: BranchwiseError) -> tuple[int, str]:
    """HTTP status and OpenAI error `type` for a domain error."""
    for cls in type(exc).__mro__:
        found = _STATUS.get(cls)
        if found is not None:
            return found
    return 400, "invalid_request_error"


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def http_error(exc: BranchwiseError) -> tuple[int, dict, dict[str, str]]:
    """(status, body, extra headers) for a domain error."""
    status, kind = status_of(exc)
    headers = {} if exc.retryable is None else {"x-should-retry": "true" if exc.retryable else "false"}
    if status == 413:
        headers["connection"] = "close"
    retry_after = getattr(exc, "retry_after", None)
    if retry_after is not None:
        headers["retry-after"] = str(retry_after)
    return status, error_body(exc.message, kind, exc.param, exc.code), headers


def socket_error(exc: BranchwiseError) -> bytes:
    """A domain error as a WebSocket message: the Open Responses `error` envelope, the HTTP
    status beside OpenAI's error object. The envelope's `code` is required: an error without
    one carries its type there."""
    status, kind = status_of(exc)
    return socket_error_body(status, kind, exc.message, exc.param, exc.code)


def socket_error_body(status: int, type: str, message: str, param: str | None = None,
                      code: str | None = None) -> bytes:
    return orjson.dumps({"type": "error", "status": status,
                         "error": {"type": type, "code": code or type, "message": message, "param": param}})


_UNION_LABELS = ("str", "int", "float", "bool", "none", "list", "dict")


def _is_label(part: str) -> bool:
    """pydantic puts union branch names into `loc`; they are not part of the client's path."""
    return (part.startswith("~") or "[" in part or part in _UNION_LABELS or part.startswith("function-")
            or part[:1].isupper())  # a model class name: OpenAI's field names are lower case


def _param(loc: tuple) -> str | None:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _is_label(part):
            continue
        else:
            out += f".{part}" if out else part
    return out or None


def _depth(loc: tuple) -> int:
    return sum(1 for part in loc if isinstance(part, int) or not _is_label(part))


def from_validation(exc: ValidationError) -> InvalidRequest:
    """The most specific pydantic error, phrased the way OpenAI phrases parameter errors.

    A value that fails a union (`input: str | list[item]`) gets one error per branch; the one
    that reached deepest into the client's value is the one that says what is wrong with it
    (`input[0].role`), not the first branch's "should be a valid string"."""
    errors = exc.errors(include_url=False)
    err = max(errors, key=lambda e: _depth(e["loc"]))  # max keeps the first of equals
    param = _param(err["loc"])
    if err["type"] == "union_tag_invalid":
        param = f"{param}.type" if param else "type"
        tag = str(err.get("ctx", {}).get("tag", "")).lstrip("~")
        expected = str(err.get("ctx", {}).get("expected_tags", "")).replace("~", "")
        return InvalidRequest(f"Invalid value: '{tag}'. Supported values are: {expected}.", param=param,
                              code="invalid_value")
    if err["type"] == "invalid_id":
        ctx = err.get("ctx", {})
        return InvalidRequest(f"Invalid '{param}': '{ctx.get('shown')}'. {ctx.get('problem')}", param=param,
                              code="invalid_value")
    if err["type"] == "extra_forbidden":
        return InvalidRequest(f"Unknown parameter: '{param}'.", param=param, code="unknown_parameter")
    if err["type"] == "missing":
        return InvalidRequest(f"Missing required parameter: '{param}'.", param=param,
                              code="missing_required_parameter")
    msg = err["msg"]
    return InvalidRequest(f"Invalid value for '{param}': {msg}.", param=param, code="invalid_value")
