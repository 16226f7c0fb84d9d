"""The upstream's HTTP client: pooled keep-alive HTTP/1.1 connections on asyncio transports, each
reply parsed by httptools (the llhttp parser uvicorn uses for the server side).

Why not aiohttp, which this replaced: on the bench machine an aiohttp POST to the mock cost
108-135 us of CPU per call, this 25-27 us (`bench` section "client check" shows the same for
the load client, which is built the same way). At ~2,000 stored responses/s on one core that
was a sixth of branchwise's own CPU. httpx cost more still (see docs/performance.md).

What it does, and all it does: POST a body of known length to one origin (http or https, the
system's CA store and hostname check for https, as aiohttp and httpx do by default), and read
a reply framed by Content-Length, chunked encoding or the end of the connection, whole or
chunk by chunk. A connection goes back to the pool once its reply is complete and the server
keeps it alive; one idle longer than `KEEPALIVE_S` is closed rather than used. No redirects,
cookies, proxies or compression: no Accept-Encoding is sent, so a reply comes as it is. The
caller bounds each call with `asyncio.timeout_at`; a call that is cancelled or times out
closes its connection, so the upstream sees the client leave.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from urllib.parse import urlsplit

import httptools

KEEPALIVE_S = 30.0
"""An idle connection older than this is closed instead of reused (a silent middlebox may have
dropped it; servers close theirs after 5-75 s)."""
MAX_IDLE = 256


class HTTPError(Exception):
    """A call that did not get a complete reply."""


class ConnectError(HTTPError):
    """No connection could be made: nothing was sent."""


class Disconnected(HTTPError):
    """The connection ended before the reply was complete."""


class BadReply(HTTPError):
    """What came back is not HTTP/1.1."""


class _Conn(asyncio.Protocol):
    """One connection; one request at a time. httptools calls the `on_*` methods while
    `data_received` feeds it."""

    def __init__(self, pool: Pool, loop: asyncio.AbstractEventLoop) -> None:
        self.pool = pool
        self.loop = loop  # (its transport's: each `get_running_loop` is a getpid system call on 3.11)
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.idle_since = 0.0
        self.reset()

    def reset(self) -> None:
        self.status = 0
        self.reason = b""
        self.framed = False  # Content-Length or chunked: the end is known without a close
        self.headers_done = False
        self.complete = False
        self.keep_alive = False
        self.chunks: list[bytes] = []
        self.error: HTTPError | None = None
        self.release_when_complete = False
        self._waiter: asyncio.Future | None = None

    @property
    def usable(self) -> bool:
        return self.transport is not None and not self.transport.is_closing()

    # -- asyncio.Protocol

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            self.error = BadReply(f"the upstream's reply is not valid HTTP/1.1: {e}")
            self.close()
        self._wake()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.transport = None
        if not self.complete and self.error is None:
            if self.headers_done and not self.framed:
                self.complete = True  # a body that ends with the connection
            else:
                why = f": {exc}" if exc else ""
                self.error = Disconnected(f"the connection closed before the reply was complete{why}")
        self._wake()

    # -- httptools

    def on_status(self, reason: bytes) -> None:
        self.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name == b"content-length" or (name == b"transfer-encoding" and b"chunked" in value.lower()):
            self.framed = True

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.headers_done = True

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)

    def on_message_complete(self) -> None:
        self.complete = True
        self.keep_alive = self.parser.should_keep_alive()
        if self.release_when_complete:
            self.pool.put(self)

    # -- waiting

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def wait(self) -> None:
        """Until something more arrives (or the connection ends); raises what went wrong."""
        if self.error is not None:
            raise self.error
        self._waiter = self.loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class Reply:
    """A reply whose status and headers are in; read its body with `read` or `read_chunk`,
    then `release` it (back to the pool) or `close` it (drop the connection)."""

    __slots__ = ("_conn", "status", "reason")

    def __init__(self, conn: _Conn) -> None:
        self._conn = conn
        self.status = conn.status
        self.reason = conn.reason.decode("latin-1")

    async def read(self) -> bytes:
        conn = self._conn
        while not conn.complete:
            await conn.wait()
        body = b"".join(conn.chunks)
        conn.chunks.clear()
        return body

    async def read_chunk(self) -> bytes:
        """What has arrived since the last call, waiting for something; b"" at the end."""
        conn = self._conn
        while not conn.chunks and not conn.complete:
            await conn.wait()
        if not conn.chunks:
            return b""
        data = b"".join(conn.chunks)
        conn.chunks.clear()
        return data

    def release(self) -> None:
        """Done with the reply: the connection goes back to the pool once the reply is complete
        (now, or when its last bytes come)."""
        conn = self._conn
        if conn.complete:
            conn.pool.put(conn)
        elif conn.usable and conn.error is None:
            conn.release_when_complete = True
        else:
            conn.close()

    def close(self) -> None:
        self._conn.close()


class Pool:
    """Keep-alive connections to the origin of `base_url`, with `headers` sent on every request."""

    def __init__(self, base_url: str, headers: dict[str, str]) -> None:
        u = urlsplit(base_url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        self.host = u.hostname
        self.port = u.port or (443 if u.scheme == "https" else 80)
        self._ssl = ssl.create_default_context() if u.scheme == "https" else None
        default_port = self.port == (443 if u.scheme == "https" else 80)
        host = (f"[{self.host}]" if ":" in self.host else self.host) + ("" if default_port else f":{self.port}")
        self._host_line = f"host: {host}\r\n".encode("latin-1")
        self._headers = "".join(f"{k}: {v}\r\n" for k, v in headers.items()).encode("latin-1")
        self._idle: list[_Conn] = []

    async def connection(self) -> _Conn:
        """An idle connection, or a new one (ConnectError if none can be made)."""
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()
            if conn.usable and now - conn.idle_since < KEEPALIVE_S:
                return conn
            conn.close()
        loop = asyncio.get_running_loop()
        try:
            _, conn = await loop.create_connection(lambda: _Conn(self, loop), self.host, self.port, ssl=self._ssl)
        except (OSError, ssl.SSLError) as e:
            raise ConnectError(str(e) or type(e).__name__) from e
        return conn

    async def post(self, conn: _Conn, path: str, body: bytes) -> Reply:
        """Send the request on `conn`; returns once the status and headers are in. On any
        failure or cancellation the connection is closed."""
        conn.reset()
        try:
            if conn.transport is None:
                raise Disconnected("the connection closed before the request was sent")
            conn.transport.write(b"".join((
                b"POST ", path.encode("latin-1"), b" HTTP/1.1\r\n", self._host_line, self._headers,
                b"content-length: ", str(len(body)).encode(), b"\r\n\r\n", body)))
            while not conn.headers_done:
                await conn.wait()
        except BaseException:
            conn.close()
            raise
        return Reply(conn)

    def put(self, conn: _Conn) -> None:
        conn.release_when_complete = False
        if conn.keep_alive and conn.usable and conn.error is None and len(self._idle) < MAX_IDLE:
            conn.idle_since = time.monotonic()
            self._idle.append(conn)
        else:
            conn.close()

    def close(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
