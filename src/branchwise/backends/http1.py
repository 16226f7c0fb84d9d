"""The upstream's HTTP client: pooled keep-alive HTTP/1.1 connections on asyncio transports, each
reply parsed by httptools (the llhttp parser uvicorn uses for the server side).

Why our own client and not aiohttp or httpx: see docs/decisions/0010 and 0022 (a fraction of
their CPU per call, on the path every stored response takes).

What it does, and all it does: POST a body of known length to one origin (http or https; for
https the given SSL context, by default the system's CA store and hostname check, as aiohttp
and httpx do), and read a reply framed by Content-Length, chunked encoding or the end of the
connection, whole or chunk by chunk. A connection goes back to the pool once its reply is
complete and the server keeps it alive; one idle longer than `KEEPALIVE_S` is closed rather
than used. At most `max_connections` are open at once (idle or busy); a caller beyond that waits
for one to come back or close. Through an HTTP proxy: an http origin is asked in absolute form
(`POST http://host:port/path`) on a kept-alive connection to the proxy; an https origin through
a `CONNECT` tunnel, with TLS to the origin inside it. No redirects, cookies or compression: no
Accept-Encoding is sent, so a reply comes as it is. The caller bounds each call with
`asyncio.timeout_at`; a call that is cancelled or times out closes its connection, so the
upstream sees the client leave.
"""

from __future__ import annotations

import asyncio
import base64
import ssl
import time
from collections import deque
from urllib.parse import unquote, urlsplit

import httptools

KEEPALIVE_S = 30.0
"""An idle connection older than this is closed instead of reused (a silent middlebox may have
dropped it; servers close theirs after 5-75 s)."""
MAX_IDLE = 256
MAX_CONNECT_HEAD = 16384
"""Bytes a proxy's answer to CONNECT may take before it is refused as not HTTP."""


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
        self.counted = True  # holds one of the pool's `max_connections` until it is lost
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
        self.pool.lost(self)

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


class _Handshake(asyncio.Protocol):
    """The proxy's answer to CONNECT: `done` gets its status line and headers."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.head = b""
        self.done: asyncio.Future[bytes] = loop.create_future()

    def data_received(self, data: bytes) -> None:
        if self.done.done():
            return
        self.head += data
        end = self.head.find(b"\r\n\r\n")
        if end >= 0:
            self.done.set_result(self.head[:end])
        elif len(self.head) > MAX_CONNECT_HEAD:
            self.done.set_exception(BadReply("the proxy's answer to CONNECT is not HTTP"))

    def connection_lost(self, exc: BaseException | None) -> None:
        if not self.done.done():
            self.done.set_exception(ConnectionError(f"the proxy closed the connection during CONNECT ({exc})"))


def _authority(host: str, port: int) -> str:
    return (f"[{host}]" if ":" in host else host) + f":{port}"


class Pool:
    """Keep-alive connections to the origin of `base_url`, with `headers` sent on every request;
    through `proxy` (an http:// URL, credentials allowed) when given; at most `max_connections`
    open at once."""

    def __init__(self, base_url: str, headers: dict[str, str], *, proxy: str | None = None,
                 ssl_context: ssl.SSLContext | None = None, max_connections: int | None = None) -> None:
        u = urlsplit(base_url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        self.host = u.hostname
        self.port = u.port or (443 if u.scheme == "https" else 80)
        self._ssl = (ssl_context or ssl.create_default_context()) if u.scheme == "https" else None
        default_port = self.port == (443 if u.scheme == "https" else 80)
        host = (f"[{self.host}]" if ":" in self.host else self.host) + ("" if default_port else f":{self.port}")
        self._host_line = f"host: {host}\r\n".encode("latin-1")
        self._headers = "".join(f"{k}: {v}\r\n" for k, v in headers.items()).encode("latin-1")
        self._request_line = b"POST "  # + path: origin form
        self.max_connections = max_connections or 1 << 30
        self._open = 0  # connections made or being made, not yet lost
        self._waiters: deque[asyncio.Future[_Conn | None]] = deque()
        self._idle: list[_Conn] = []
        # where to connect: the origin, or the proxy
        self.proxy = proxy
        self._connect_to = (self.host, self.port)
        self._tunnel: bytes | None = None  # the CONNECT request, when https goes through a proxy
        if proxy:
            p = urlsplit(proxy)
            if p.scheme != "http" or not p.hostname:
                raise ValueError(f"only http:// proxies are supported, not {proxy!r}")
            self._connect_to = (p.hostname, p.port or 80)
            auth = ""
            if p.username is not None:
                creds = f"{unquote(p.username)}:{unquote(p.password or '')}".encode()
                auth = f"proxy-authorization: Basic {base64.b64encode(creds).decode()}\r\n"
            if self._ssl is None:  # absolute form, the proxy's credentials on every request
                self._request_line = f"POST http://{_authority(self.host, self.port)}".encode("latin-1")
                self._headers += auth.encode("latin-1")
            else:
                target = _authority(self.host, self.port)
                self._tunnel = f"CONNECT {target} HTTP/1.1\r\nhost: {target}\r\n{auth}\r\n".encode("latin-1")

    async def connection(self) -> _Conn:
        """An idle connection, or a new one (ConnectError if none can be made); waits while
        `max_connections` are open."""
        while True:
            now = time.monotonic()
            while self._idle:
                conn = self._idle.pop()
                if conn.usable and now - conn.idle_since < KEEPALIVE_S:
                    return conn
                conn.close()
            if self._open < self.max_connections:
                break
            conn = await self._wait()
            if conn is not None:
                return conn
        loop = asyncio.get_running_loop()
        self._open += 1
        made: list[_Conn] = []

        def protocol() -> _Conn:
            made.append(_Conn(self, loop))
            return made[-1]

        try:
            if self._tunnel is None:
                _, conn = await loop.create_connection(protocol, *self._connect_to, ssl=self._ssl)
            else:
                conn = await self._through_tunnel(loop, protocol)
        except BaseException as e:
            if made:
                self.lost(made[0])
            else:
                self._open -= 1
                self._wake()
            if isinstance(e, (OSError, ssl.SSLError)):
                raise ConnectError(str(e) or type(e).__name__) from e
            raise
        return conn

    async def _through_tunnel(self, loop: asyncio.AbstractEventLoop, protocol) -> _Conn:
        raw, handshake = await loop.create_connection(lambda: _Handshake(loop), *self._connect_to)
        try:
            raw.write(self._tunnel)
            head = await handshake.done
            status_line = head.split(b"\r\n", 1)[0]
            parts = status_line.split(None, 2)
            if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
                raise BadReply(f"the proxy's answer to CONNECT is not HTTP: {status_line[:100]!r}")
            if not 200 <= int(parts[1]) < 300:
                raise ConnectError(f"the proxy refused the tunnel: {status_line.decode('latin-1')}")
            conn = protocol()
            tls = await loop.start_tls(raw, conn, self._ssl, server_hostname=self.host)
        except BaseException:
            raw.close()
            raise
        conn.connection_made(tls)
        return conn

    async def _wait(self) -> _Conn | None:
        """Until a connection comes back (it is handed over) or one is lost (None: make one)."""
        waiter: asyncio.Future[_Conn | None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():  # handed something just as it gave up
                conn = waiter.result()
                if conn is not None:
                    self.put(conn)
                else:
                    self._wake()
            raise
        finally:
            if waiter.cancelled() and waiter in self._waiters:  # still in line: leave it
                self._waiters.remove(waiter)

    def _wake(self) -> None:
        """A connection's place is free: the first caller waiting may make one."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def get(self, conn: _Conn, path: str) -> Reply:
        """A GET of `path` on `conn`, as `post` sends a POST."""
        return await self.post(conn, path, b"", b"GET " + self._request_line[len(b"POST "):])

    async def post(self, conn: _Conn, path: str, body: bytes, request_line: bytes | None = None) -> Reply:
        """Send the request on `conn`; returns once the status and headers are in. On any
        failure or cancellation the connection is closed. (`request_line`: another method's.)"""
        conn.reset()
        try:
            if conn.transport is None:
                raise Disconnected("the connection closed before the request was sent")
            conn.transport.write(b"".join((
                request_line or self._request_line, path.encode("latin-1"), b" HTTP/1.1\r\n", self._host_line, self._headers,
                b"content-length: ", str(len(body)).encode(), b"\r\n\r\n", body)))
            while not conn.headers_done:
                await conn.wait()
        except BaseException:
            conn.close()
            raise
        return Reply(conn)

    def put(self, conn: _Conn) -> None:
        conn.release_when_complete = False
        if conn.keep_alive and conn.usable and conn.error is None:
            while self._waiters:  # someone is waiting for a connection: this one
                waiter = self._waiters.popleft()
                if not waiter.done():
                    waiter.set_result(conn)
                    return
            if len(self._idle) < MAX_IDLE:
                conn.idle_since = time.monotonic()
                self._idle.append(conn)
                return
        conn.close()

    def lost(self, conn: _Conn) -> None:
        """`conn` is closed: its place is free."""
        if conn.counted:
            conn.counted = False
            self._open -= 1
            self._wake()

    def close(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
