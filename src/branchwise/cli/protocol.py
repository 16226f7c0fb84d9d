"""uvicorn's httptools protocol with deadlines for slow clients: a request's headers must
arrive within `header_timeout` seconds, its body within `body_timeout` seconds after them.

uvicorn bounds only the idle time between two requests (`timeout_keep_alive`): a client that
opens a connection and sends nothing, or sends headers or a body a byte at a time, holds the
connection (and, for a body, the request's task) for ever. Here each request has a deadline
for both phases, which a sweep checks every `SWEEP_S` (docs/decisions/0035-process-model.md); at
its deadline the client gets a 408 when no reply has begun, and the connection is closed.
"""

from __future__ import annotations

import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as _Base

_HEADERS, _BODY = 0, 1
_REPLY = orjson.dumps({"error": {
    "message": "The request was not received in time: the client sent it too slowly.",
    "type": "invalid_request_error", "param": None, "code": "request_timeout"}})
_408 = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
        b"connection: close\r\n\r\n%s" % (len(_REPLY), _REPLY))


SWEEP_S = 0.25
"""How often each process looks for requests past their deadline (the deadlines' precision)."""
_NONE = float("inf")
_watched: dict = {}  # event loop -> its open connections; a sweep runs while there are some


def _sweep(loop, conns: set) -> None:
    if not conns:  # stopped; the next connection starts it again
        if _watched.get(loop) is conns:
            del _watched[loop]
        return
    now = loop.time()
    for conn in [c for c in conns if c._deadline <= now]:
        conn._expired(now)
    loop.call_later(SWEEP_S, _sweep, loop, conns)


class SlowClientProtocol(_Base):
    header_timeout = 10.0
    body_timeout = 30.0
    """Set per process (`configure`) before the server starts: uvicorn makes one protocol per
    connection from the class alone."""

    # Each request sets a deadline and a periodic sweep (one a process) compares them: a timer
    # per request (made, then cancelled) cost more on the hot path than two attribute writes.
    _deadline = _NONE
    _phase = _HEADERS

    @classmethod
    def configure(cls, header_timeout: float, body_timeout: float) -> None:
        cls.header_timeout, cls.body_timeout = header_timeout, body_timeout

    # A connection's first request is timed from the connection's opening (a client that
    # connects and sends nothing is as slow as one that sends a byte at a time); a later one
    # from its first byte: until then the connection is idle, which `timeout_keep_alive` bounds.
    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._phase = _HEADERS
        self._deadline = self.loop.time() + self.header_timeout
        conns = _watched.get(self.loop)
        if conns is None:
            conns = _watched[self.loop] = set()
            self.loop.call_later(SWEEP_S, _sweep, self.loop, conns)
        conns.add(self)

    # (The base class's methods are called directly: these run for every request.)
    def on_message_begin(self) -> None:
        _Base.on_message_begin(self)
        if self._deadline == _NONE:
            self._phase = _HEADERS
            self._deadline = self.loop.time() + self.header_timeout

    def on_headers_complete(self) -> None:
        self._phase = _BODY
        self._deadline = self.loop.time() + self.body_timeout
        _Base.on_headers_complete(self)

    def on_message_complete(self) -> None:
        self._deadline = _NONE
        _Base.on_message_complete(self)

    def connection_lost(self, exc) -> None:
        self._deadline = _NONE
        conns = _watched.get(self.loop)
        if conns is not None:
            conns.discard(self)
        super().connection_lost(exc)

    def handle_websocket_upgrade(self) -> None:
        self._deadline = _NONE
        super().handle_websocket_upgrade()

    def _expired(self, now: float) -> None:
        self._deadline = _NONE
        if self.transport.is_closing():
            return
        if self._phase == _BODY and self.flow.read_paused:
            # The application is not reading (its buffer is full): the client is not the slow
            # one, and gets a new period.
            self._deadline = now + self.body_timeout
            return
        cycle = self.cycle  # in the body phase: this request's; in the headers phase: the one before
        if cycle is None or cycle.response_complete or (self._phase == _BODY and not cycle.response_started):
            self.transport.write(_408)
        if cycle is not None and not cycle.response_complete:
            # The request's task sees the client gone (`http.disconnect`); what it sends is dropped.
            cycle.disconnected = True
            cycle.message_event.set()
        self.transport.close()
