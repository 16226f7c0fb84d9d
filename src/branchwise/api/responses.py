"""/v1/responses routes. Thin: parse, call a service, reply."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import orjson
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from branchwise.api.common import json_response, paging, parse_body
from branchwise.api.idempotency import Found, claim_of, idempotent
from branchwise.api.middleware import PLAN
from branchwise.core.errors import InvalidRequest, NotFound, not_found
from branchwise.services.compact import compact
from branchwise.services.concurrency import ClientGone
from branchwise.services.responses import Responses
from branchwise.services.stored import StoredResponses
from branchwise.services.streams import Streams
from branchwise.services.tokens import count_input_tokens
from branchwise.wire.ids import check_id
from branchwise.wire.models import CompactRequest, CountInputTokens, CreateResponse
from branchwise.wire.objects import item_list

MAX_SEQUENCE = 2**31 - 1
SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


def _responses(request: Request) -> Responses:
    return request.app.state.responses


def _streams(request: Request) -> Streams:
    return request.app.state.streams


def _stored(request: Request) -> StoredResponses:
    return request.app.state.stored


def _timed(response: Response, started: float, upstream_s: float = 0.0) -> Response:
    """`Server-Timing`: the time branchwise itself spent on the request (and, apart, the model's)."""
    own = (time.perf_counter() - started - upstream_s) * 1000
    value = f"branchwise;dur={own:.2f}"
    if upstream_s:
        value += f", upstream;dur={upstream_s * 1000:.2f}"
    response.raw_headers.append((b"server-timing", value.encode()))
    return response


async def _replay_stream(request: Request, response_id: str) -> Response:
    """A stored response's whole stream, from its event log (an idempotent retry's reply)."""
    return _sse(await _primed(_streams(request).replay(response_id, -1)))


async def _made_response(request: Request, response_id: str, body: bytes) -> Found:
    """The response a request whose process died made, if it stored it (`api.idempotency`)."""
    try:
        row = await _stored(request).get(response_id)
    except NotFound:
        return None
    try:  # (the retry's body is the first request's)
        stream = orjson.loads(body).get("stream") is True
    except (orjson.JSONDecodeError, AttributeError):
        stream = False
    if stream:
        return ("stream", response_id)
    return ("json", 200, bytes(row.body))


@idempotent("resp", _made_response, _replay_stream)
async def create_response(request: Request) -> Response:
    started = time.perf_counter()
    req = await parse_body(request, CreateResponse)
    responses = _responses(request)
    claim = claim_of(request)
    first_id = None
    if claim is not None:
        if req.stream and req.store is False:
            raise InvalidRequest("'Idempotency-Key' cannot be used with a stream that is not stored "
                                 "('store': false): there would be nothing to replay.", param="Idempotency-Key",
                                 code="invalid_idempotency_key")
        first_id = claim.resource_id
    if req.background:
        streams = _streams(request)
        plan = await responses.validate(req, first_id=first_id)
        run = await streams.start_background(plan)
        request.scope[PLAN] = plan
        if req.stream:
            return _timed(_sse(run.follow()), started)
        return _timed(json_response(await streams.stored_body(run)), started)
    try:
        plan = await responses.prepare(req, request.is_disconnected, first_id=first_id)
    except ClientGone:
        return Response(status_code=499)
    request.scope[PLAN] = plan
    if not req.stream:
        body = await responses.complete(plan)
        return _timed(json_response(plan.body or body), started, plan.upstream_s)
    streams = _streams(request)
    if req.store is False:
        return _timed(_sse(streams.stream(plan)), started)
    # (under an Idempotency-Key its row is written first, so that a replay finds it)
    return _timed(_sse((await streams.start_stream(plan, row_first=claim is not None)).follow()), started)


def _sse(frames) -> StreamingResponse:
    return StreamingResponse(frames, media_type="text/event-stream", headers=SSE_HEADERS)


async def _primed(frames: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """`frames` once its first frame is in: a replay that cannot read the event log (a busy
    database) is then an error reply, not an empty 200 stream whose headers went out first."""
    try:
        first = await anext(frames)
    except StopAsyncIteration:
        first = None

    async def rest() -> AsyncIterator[bytes]:
        if first is not None:
            yield first
            async for frame in frames:
                yield frame
    return rest()


async def retrieve_response(request: Request, response_id: str) -> Response:
    check_id(response_id, "response", "response_id")
    q = request.query_params
    stream = q.get("stream", "false").lower()
    if stream not in ("true", "false", "1", "0"):
        raise InvalidRequest("Invalid value for 'stream': expected a boolean.", param="stream", code="invalid_value")
    after = -1
    if q.get("starting_after") is not None:
        try:
            after = int(q["starting_after"])
        except ValueError:
            after = -2
        if not 0 <= after <= MAX_SEQUENCE:  # (a database integer: anything larger could not be compared)
            raise InvalidRequest(f"Invalid value for 'starting_after': expected an integer from 0 to {MAX_SEQUENCE}.",
                                 param="starting_after", code="invalid_value")
    row = await _stored(request).get(response_id)
    if stream in ("true", "1"):
        return _sse(await _primed(_streams(request).replay(response_id, after)))
    return json_response(row.body)


async def delete_response(request: Request, response_id: str) -> Response:
    check_id(response_id, "response", "response_id")
    await _stored(request).delete(response_id)
    return json_response({"id": response_id, "object": "response", "deleted": True})


async def cancel_response(request: Request, response_id: str) -> Response:
    check_id(response_id, "response", "response_id")
    body = await _streams(request).cancel(response_id)
    if body is None:
        raise not_found("Response", response_id)
    return json_response(body)


async def input_items(request: Request, response_id: str) -> Response:
    check_id(response_id, "response", "response_id")
    limit, order, after = paging(request)
    page, has_more = await _stored(request).input_items(response_id, limit=limit, order=order, after=after)
    return json_response(item_list([r.data for r in page], page[0].item_id if page else None,
                                   page[-1].item_id if page else None, has_more))


async def input_tokens(request: Request) -> Response:
    body = await parse_body(request, CountInputTokens)
    return json_response(await count_input_tokens(_responses(request), body))


async def compact_response(request: Request) -> Response:
    body = await parse_body(request, CompactRequest)
    return json_response(await compact(_responses(request), body))


ROUTES = [
    ("POST", "/v1/responses/input_tokens", input_tokens),
    ("POST", "/v1/responses/compact", compact_response),
    ("GET", "/v1/responses/{response_id}", retrieve_response),
    ("DELETE", "/v1/responses/{response_id}", delete_response),
    ("POST", "/v1/responses/{response_id}/cancel", cancel_response),
    ("GET", "/v1/responses/{response_id}/input_items", input_items),
]
