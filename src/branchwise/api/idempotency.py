"""`Idempotency-Key` on the routes that create or move something: the wrapper that claims the
key before the handler runs, keeps its reply, and replays a kept reply
(`services.idempotency` has the rules). A request without the header pays one scan of its
header list."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import Response

from branchwise.api.common import JSONReply, read_body
from branchwise.services.idempotency import Claim, Idempotency, Record, Stale, fingerprint, parse_key

log = logging.getLogger("branchwise.idempotency")

CLAIM = "branchwise.idempotency"
"""Where the request's `Claim` is kept in its scope, for the handler (`claim_of`)."""
REPLAYED = (b"idempotent-replayed", b"true")

# What the first request made, found again after its process died: ("json", status, body) or
# ("stream", response id); None when it made nothing.
Found = tuple | None
Recover = Callable[[Request, str, bytes], Awaitable[Found]]
StreamReplay = Callable[[Request, str], Awaitable[Response]]


def claim_of(request: Request) -> Claim | None:
    return request.scope.get(CLAIM)


def _header(scope) -> bytes | None:
    for name, value in scope["headers"]:
        if name == b"idempotency-key":
            return value
    return None


def idempotent(prefix: str | None, recover: Recover | None = None, stream: StreamReplay | None = None):
    """Make a handler honour `Idempotency-Key`. `prefix`: the kind of id the handler makes (taken
    from `claim_of(request).resource_id`); `recover`: finds what a request whose process died
    made; `stream`: replays a response's events."""
    def wrap(handler):
        @functools.wraps(handler)
        def wrapped(request: Request, **params) -> Awaitable[Response]:
            # (not a coroutine of its own: without the header, the handler's is awaited as it is)
            raw = _header(request.scope)
            if raw is None:
                return handler(request, **params)
            return _run(handler, request, params, raw, prefix, recover, stream)
        return wrapped
    return wrap


def _replayed(response: Response) -> Response:
    response.raw_headers.append(REPLAYED)
    return response


async def _replay(request: Request, record: Record, stream: StreamReplay | None) -> Response:
    if record.stream and stream is not None:
        return _replayed(await stream(request, record.resource_id))
    return _replayed(JSONReply(record.body or b"", record.status or 200))


async def _run(handler, request: Request, params: dict, raw: bytes, prefix: str | None, recover: Recover | None,
               stream: StreamReplay | None) -> Response:
    key = parse_key(raw)
    service: Idempotency = request.app.state.idempotency
    body = await read_body(request, request.app.state.settings.max_body_bytes)
    got = await service.claim(key, fingerprint(request.method, request.url.path, body), prefix)
    if isinstance(got, Record):
        return await _replay(request, got, stream)
    if isinstance(got, Stale):
        made = got.record.resource_id
        found = await recover(request, made, body) if recover is not None and made else None
        claim = await service.take_over(got, prefix, made if found is not None else None)
        if found is not None:
            record = Record("", "done", None, None, made, 200, None, True) if found[0] == "stream" else \
                Record("", "done", None, None, made, found[1], found[2], False)
            await _keep(service, claim, record.status, record.body, record.stream)
            return await _replay(request, record, stream)
    else:
        claim = got
    request.scope[CLAIM] = claim
    try:
        response = await handler(request, **params)
    except BaseException:
        await asyncio.shield(service.release(claim))
        raise
    if 200 <= response.status_code < 300:
        if isinstance(response, JSONReply):
            await _keep(service, claim, response.status_code, response.body, False)
        else:  # a stream: its events are the response's event log
            await _keep(service, claim, response.status_code, None, True)
    else:
        await asyncio.shield(service.release(claim))
    return response


async def _keep(service: Idempotency, claim: Claim, status: int, body: bytes | None, stream: bool) -> None:
    """Keep the reply; should that fail, the request's work stands (its reply still goes out)
    and the claim goes stale: a retry finds what it made (`recover`)."""
    try:
        await asyncio.shield(service.finish(claim, status, body, stream))
    except Exception:
        service.finished(claim)
        log.warning("could not keep the reply of Idempotency-Key %r", claim.key, exc_info=True)
