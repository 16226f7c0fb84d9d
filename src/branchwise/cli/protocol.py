"""uvicorn's httptools protocol with deadlines for slow clients: a request's headers must
arrive within `header_timeout` seconds, its body within `body_timeout` seconds after them.

uvicorn bounds only the idle time between two requests (`timeout_keep_alive`): a client that
opens a connection and sends nothing, or sends headers or a body a byte at a time, holds the
connection (and, for a body, the request's task) for ever. Here one timer per request watches
both phases (docs/decisions/0035-process-model.md); at its deadline the client gets a 408 when
no reply has begun, and the connection is closed.
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


class SlowClientProtocol(_Base):
    header_timeout = 10.0
    body_timeout = 30.0
    """Set per process (`configure`) before the server starts: uvicorn makes one protocol per
    connection from the class alone."""

    _timer = None
    _phase = _HEADERS
    _body_deadline = 0.0

    @classmethod
    def configure(cls, header_timeout: float, body_timeout: float) -> None:
        cls.header_timeout, cls.body_timeout = header_timeout, body_timeout

    def _arm(self, delay: float) -> None:
        self._timer = self.loop.call_later(delay, self._expired)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # A connection's first request is timed from the connection's opening (a client that
    # connects and sends nothing is as slow as one that sends a byte at a time); a later one
    # from its first byte: until then the connection is idle, which `timeout_keep_alive` bounds.
    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._phase = _HEADERS
        self._arm(self.header_timeout)

    # (The base class's methods are called directly: these run for every request.)
    def on_message_begin(self) -> None:
        _Base.on_message_begin(self)
        if self._timer is None:
            self._phase = _HEADERS
            self._arm(self.header_timeout)

    def on_headers_complete(self) -> None:
        # The same timer goes on watching the body: one timer a request, not two.
        self._phase = _BODY
        self._body_deadline = self.loop.time() + self.body_timeout
        _Base.on_headers_complete(self)

    def on_message_complete(self) -> None:
        self._disarm()
        _Base.on_message_complete(self)

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def handle_websocket_upgrade(self) -> None:
        self._disarm()
        super().handle_websocket_upgrade()

    def _expired(self) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        if self._phase == _BODY:
            left = self._body_deadline - self.loop.time()
            if left > 0:
                self._arm(left)
                return
            if self.flow.read_paused:
                # The application is not reading (its buffer is full): the client is not the slow
                # one, and gets a new period.
                self._body_deadline = self.loop.time() + self.body_timeout
                self._arm(self.body_timeout)
                return
        cycle = self.cycle  # in the body phase: this request's; in the headers phase: the one before
        if cycle is None or cycle.response_complete or (self._phase == _BODY and not cycle.response_started):
            self.transport.write(_408)
        if cycle is not None and not cycle.response_complete:
            # The request's task sees the client gone (`http.disconnect`); what it sends is dropped.
            cycle.disconnected = True
            cycle.message_event.set()
        self.transport.close()
