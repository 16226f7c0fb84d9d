"""Responses over a WebSocket (Open Responses' "WebSocket Transport", OpenAI's WebSocket mode):
one connection's turns, each the same response a streamed POST /v1/responses makes, and what
the connection keeps so that its next turn continues the last one without the store.

What a connection keeps is its most recent turn's responses (`Previous`: each alternative's
last node, and the messages the model saw up to and including its output). A turn whose
`previous_response_id` names one of them starts there: nothing is read from the store, and a
`store: false` chain, which the store never saw, goes on. Any other id is looked up in the store
as over HTTP, where an unstored response is not: `previous_response_not_found`. A turn that
fails (an error before its events, or `response.failed`) evicts the response it continued, so
a `store: false` chain cannot go on from it. docs/websocket.md has the whole protocol.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from branchwise.core.errors import InvalidRequest, LimitReached
from branchwise.services.responses import Previous, Responses
from branchwise.services.streams import Streams
from branchwise.settings import Settings
from branchwise.wire import models as m

LIMIT_REACHED = "websocket_connection_limit_reached"
HTTP_ONLY = ("stream", "stream_options", "background")
"""Fields of a POST /v1/responses body that a `response.create` event must not carry: every
response streams its events on the connection, and is the connection's until it ends."""


class Sockets:
    """This process's WebSocket connections: at most `websocket_max_connections` open at once."""

    def __init__(self, responses: Responses, streams: Streams, settings: Settings):
        self.responses = responses
        self.streams = streams
        self.settings = settings
        self.open = 0

    def connect(self) -> Socket:
        """A new connection's state; raises `LimitReached` when this process has its limit open.
        Each one made must be given back (`disconnected`)."""
        limit = self.settings.websocket_max_connections
        if self.open >= limit:
            raise LimitReached(f"This server has its limit of {limit} WebSocket connections open: try again "
                               "later.", code=LIMIT_REACHED)
        self.open += 1
        return Socket(self)

    def disconnected(self) -> None:
        self.open -= 1


class Socket:
    """One connection's responses, one turn at a time, and what its next turn may continue."""

    def __init__(self, sockets: Sockets):
        self.responses = sockets.responses
        self.streams = sockets.streams
        self.duration = sockets.settings.websocket_max_duration
        self.deadline = time.monotonic() + self.duration
        self.previous: dict[str, Previous] = {}  # the most recent turn's responses, by id

    def time_left(self) -> float:
        """Seconds until the connection reaches its age limit (`websocket_max_duration`)."""
        return self.deadline - time.monotonic()

    def expired(self) -> LimitReached:
        minutes = f"{self.duration / 60:g} minutes" if self.duration >= 60 else f"{self.duration:g} seconds"
        return LimitReached(f"This WebSocket connection reached its limit of {minutes}: open a new connection "
                            "(a stored response goes on there by its previous_response_id).", code=LIMIT_REACHED)

    async def turn(self, req: m.CreateResponse,
                   disconnected: Callable[[], Awaitable[bool]] | None = None) -> AsyncIterator[bytes]:
        """The events (SSE frames) of one `response.create`: those a streamed POST /v1/responses
        with the same body sends. Raises before the first one when the request is refused."""
        prev_id = req.previous_response_id
        try:
            for name in HTTP_ONLY:
                if name in req.model_fields_set:
                    raise InvalidRequest(f"Unknown parameter: '{name}'. It belongs to HTTP requests: over a "
                                         "WebSocket, every response streams its events on the connection.",
                                         param=name, code="unknown_parameter")
            plan = await self.responses.prepare(req, disconnected, self.previous.get(prev_id) if prev_id else None)
            plan.keep = True
            if req.store is False:  # tied to the connection: a client that goes away stops it
                frames = self.streams.stream(plan)
            else:  # runs to its end whatever the client does, as a stored stream over HTTP
                frames = (await self.streams.start_stream(plan)).follow()
            async with contextlib.aclosing(frames):
                async for frame in frames:
                    yield frame
        except Exception:
            self._evict(prev_id)
            raise
        if plan.kept:
            self.previous = {p.response_id: p for p in plan.kept}
        else:  # failed: what it continued is not continued again from here
            self._evict(prev_id)

    def _evict(self, response_id: str | None) -> None:
        if response_id is not None:
            self.previous.pop(response_id, None)
