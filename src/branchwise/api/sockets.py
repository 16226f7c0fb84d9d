"""WebSocket mode on /v1/responses: a connection's messages in, each turn's events out.

The handshake passes the API key check (`middleware.Auth`) first. Every message must then be a
`response.create` event: the body of a POST /v1/responses plus its `type`, parsed and validated
as that body is. A turn's events go out one message each: the JSON object of each SSE event the
same response would stream (`services.sockets`). A refused turn gets the Open Responses `error`
envelope instead, and the connection stays open.

Messages are read while a turn runs: those that arrive meanwhile wait their turn, in order (at
most `PENDING`; past that the connection is not read until one is taken, and TCP holds the client
back), and a client that goes away stops its turn at once (a stored response runs to its end
anyway, as over HTTP). The protocol itself (handshake, frames, pings, size limit) is uvicorn's,
through the `websockets` package; docs/websocket.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketDisconnected

from branchwise.api.common import OFF_LOOP_BYTES, load_object, validate
from branchwise.core import projects
from branchwise.core.errors import BranchwiseError, InvalidRequest, LimitReached
from branchwise.core.ids import new_id
from branchwise.services.keys import Keys
from branchwise.services.sockets import Socket
from branchwise.wire.errors import RequestTooLarge, socket_error, socket_error_body
from branchwise.wire.models import CreateResponse
from branchwise.wire.objects import sse_data

log = logging.getLogger("branchwise.api")

PENDING = 16
TRY_AGAIN_LATER = 1013  # the close code for a connection refused at the limit (RFC 6455)


async def responses_socket(scope, receive, send) -> None:
    """The ASGI app of `ws://HOST/v1/responses`."""
    ws = WebSocket(scope, receive, send)
    sockets = scope["app"].state.sockets
    try:
        socket = sockets.connect()
    except LimitReached as exc:
        await ws.accept()
        await ws.send_text(socket_error(exc).decode())
        await ws.close(TRY_AGAIN_LATER)
        return
    try:
        await ws.accept()
        await Connection(ws, socket, scope["app"].state.settings, scope["app"].state.keys).serve()
    finally:
        sockets.disconnected()


def parse_event(raw: bytes, settings) -> CreateResponse:
    """A client message as the `response.create` it must be, or an OpenAI-shaped 4xx."""
    if len(raw) > settings.max_body_bytes:
        raise RequestTooLarge(settings.max_body_bytes)
    data = load_object(raw, settings)
    kind = data.pop("type", None)
    if kind is None:
        raise InvalidRequest("Missing required parameter: 'type'.", param="type", code="missing_required_parameter")
    if kind != "response.create":
        raise InvalidRequest(f"Invalid value: '{kind}'. Supported values are: 'response.create'.", param="type",
                             code="invalid_value")
    return validate(data, raw, CreateResponse, settings)


class Connection:
    def __init__(self, ws: WebSocket, socket: Socket, settings, keys: Keys | None = None):
        self.ws = ws
        self.keys = keys
        self.socket = socket
        self.settings = settings
        self.inbox: asyncio.Queue[str | bytes | None] = asyncio.Queue(PENDING)
        self.gone = False
        self.turn: asyncio.Task | None = None

    async def serve(self) -> None:
        """Turns, one at a time, until the client goes away or the connection's time is up."""
        reader = asyncio.create_task(self._read())
        try:
            while True:
                try:
                    message = await asyncio.wait_for(self.inbox.get(), max(self.socket.time_left(), 0))
                except TimeoutError:  # idle when its time was up
                    expired = True
                else:
                    if message is None or self.gone:
                        return
                    expired = self.socket.time_left() <= 0  # (a turn that ran past it has finished)
                if expired:
                    await self._send(socket_error(self.socket.expired()))
                    with contextlib.suppress(WebSocketDisconnect, WebSocketDisconnected, OSError):
                        await self.ws.close()
                    return
                self.turn = asyncio.create_task(self._run(message))
                await asyncio.wait([self.turn])
        finally:
            if self.turn is not None:
                self.turn.cancel()
            reader.cancel()

    async def _read(self) -> None:
        try:
            while True:
                message = await self.ws.receive()
                if message["type"] == "websocket.disconnect":
                    return
                text = message.get("text")
                await self.inbox.put(text if text is not None else message.get("bytes") or b"")
        except Exception:  # (the server's side of the connection broke: the client is as good as gone)
            log.debug("WebSocket read failed", exc_info=True)
        finally:
            self.gone = True
            if self.turn is not None:
                self.turn.cancel()
            if self.inbox.empty():
                self.inbox.put_nowait(None)

    async def _disconnected(self) -> bool:
        return self.gone

    async def _run(self, message: str | bytes) -> None:
        """One turn: its events, or the error that refused or ended it."""
        try:
            raw = message.encode() if isinstance(message, str) else message
            if len(raw) > OFF_LOOP_BYTES:  # (as an HTTP body: see `common.OFF_LOOP_BYTES`)
                req = await asyncio.to_thread(parse_event, raw, self.settings)
            else:
                req = parse_event(raw, self.settings)
            key = projects.current_caller().key  # (the handshake's: each turn counts as a request)
            if key is not None and key.rpm is not None and self.keys is not None:
                await self.keys.count_request(key)
            turn = self.socket.turn(req, self._disconnected)
            async with contextlib.aclosing(turn):  # (a send that fails ends the stream now, not at GC)
                async for frame in turn:
                    await self.ws.send_text(sse_data(frame).decode())
        except (WebSocketDisconnect, WebSocketDisconnected, OSError):
            self.gone = True
        except BranchwiseError as exc:
            await self._send(socket_error(exc))
        except Exception:
            error_id = new_id("err")
            log.exception("unhandled error %s on a WebSocket turn", error_id)
            await self._send(socket_error_body(
                500, "server_error", f"The server had an error while processing your request (error id {error_id})."))

    async def _send(self, message: bytes) -> None:
        try:
            await self.ws.send_text(message.decode())
        except (WebSocketDisconnect, WebSocketDisconnected, OSError):  # gone: nothing to tell it
            self.gone = True
