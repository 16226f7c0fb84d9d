"""The upstream's HTTP client (`backends.http1`) against a scripted HTTP/1.1 server over real
sockets: every way a reply can be framed, read whole and chunk by chunk; keep-alive reuse and
when a connection must not be reused; cancellation and broken replies close the connection.
(The mock upstream drives it through the whole app in the other tests.)"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import pytest

from branchwise.backends import http1
from branchwise.backends.http1 import BadReply, ConnectError, Disconnected, Pool
from tests.conftest import free_port


class Scripted:
    """A server that reads each request whole and answers with `script(n)` (n-th request on
    any connection): a list of byte strings written with a short pause between them, then
    "close" to close the connection or "hang" to go silent."""

    def __init__(self, script: Callable[[int], list]) -> None:
        self.script = script
        self.connections = 0
        self.requests: list[tuple[int, bytes, bytes]] = []  # (connection, head, body)
        self.eof_seen = asyncio.Event()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        conn = self.connections
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    self.eof_seen.set()
                    return
                length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length:"))
                body = await reader.readexactly(length)
                self.requests.append((conn, head, body))
                for part in self.script(len(self.requests) - 1):
                    if part == "close":
                        writer.close()
                        return
                    if part == "hang":
                        if not await reader.read(1):
                            self.eof_seen.set()
                        return
                    writer.write(part)
                    await writer.drain()
                    await asyncio.sleep(0.01)
        finally:
            writer.close()


@asynccontextmanager
async def scripted(script: Callable[[int], list]) -> AsyncIterator[tuple[Scripted, Pool]]:
    s = Scripted(script)
    port = free_port()
    server = await asyncio.start_server(s.handle, "127.0.0.1", port)
    pool = Pool(f"http://127.0.0.1:{port}/v1", {"content-type": "application/json", "authorization": "Bearer k"})
    try:
        yield s, pool
    finally:
        pool.close()
        server.close()


def sized(body: bytes, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n%s\r\n%s" % (
        len(body), extra, body)


CHUNKED_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


async def call(pool: Pool, body: bytes = b"{}", whole: bool = True) -> tuple[int, list[bytes]]:
    conn = await pool.connection()
    reply = await pool.post(conn, "/v1/chat/completions", body)
    if whole:
        parts = [await reply.read()]
    else:
        parts = []
        while data := await reply.read_chunk():
            parts.append(data)
    reply.release()
    return reply.status, parts


async def test_request_on_the_wire():
    async with scripted(lambda n: [sized(b"{}")]) as (server, pool):
        await call(pool, b'{"model":"m"}')
    _, head, body = server.requests[0]
    lines = head.split(b"\r\n")
    assert lines[0] == b"POST /v1/chat/completions HTTP/1.1"
    assert b"host: 127.0.0.1:" in head and b"authorization: Bearer k" in head
    assert b"content-length: 13" in head and body == b'{"model":"m"}'
    assert b"accept-encoding" not in head.lower()  # replies come uncompressed


@pytest.mark.parametrize("whole", [True, False], ids=["read", "read_chunk"])
async def test_every_framing_reads_the_same_body(whole):
    body = b'{"choices":[]}' * 50
    replies = [
        [sized(body)],
        [sized(body)[:-300], sized(body)[-300:]],  # the body in two writes
        [CHUNKED_HEAD, chunk(body[:100]), chunk(body[100:]), b"0\r\n\r\n"],
        [b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\r\n", body[:10], body[10:], "close"],
    ]
    async with scripted(lambda n: replies[n]) as (_, pool):
        for _ in replies:
            status, parts = await call(pool, whole=whole)
            assert status == 200 and b"".join(parts) == body
            if not whole:
                assert len(parts) >= 1


async def test_status_and_reason_of_an_error_reply():
    async with scripted(lambda n: [b"HTTP/1.1 429 Too Many Requests\r\ncontent-length: 2\r\n\r\n{}"]) as (_, pool):
        conn = await pool.connection()
        reply = await pool.post(conn, "/v1/chat/completions", b"{}")
        assert (reply.status, reply.reason, await reply.read()) == (429, "Too Many Requests", b"{}")


async def test_keep_alive_reuses_one_connection():
    async with scripted(lambda n: [sized(b"%d" % n)]) as (server, pool):
        for n in range(5):
            assert (await call(pool))[1] == [b"%d" % n]
    assert server.connections == 1
    assert [c for c, _, _ in server.requests] == [1] * 5


async def test_calls_at_once_get_a_connection_each_then_share_them():
    async with scripted(lambda n: [sized(b"x")]) as (server, pool):
        await asyncio.gather(*(call(pool) for _ in range(4)))
        assert server.connections == 4
        for _ in range(3):
            await asyncio.gather(*(call(pool) for _ in range(4)))
        assert server.connections == 4


async def test_connections_not_reused_when_they_must_not_be(monkeypatch):
    replies = [
        [sized(b"a", b"connection: close\r\n"), "close"],  # the server says it closes
        [sized(b"b")],
        [sized(b"c"), "close"],  # the server closes an idle connection
        [sized(b"d")],
    ]
    async with scripted(lambda n: replies[n]) as (server, pool):
        assert (await call(pool))[1] == [b"a"]
        assert (await call(pool))[1] == [b"b"]
        assert server.connections == 2
        assert (await call(pool))[1] == [b"c"]
        await asyncio.sleep(0.05)  # the close reaches the client
        assert (await call(pool))[1] == [b"d"]
        assert server.connections == 3
    monkeypatch.setattr(http1, "KEEPALIVE_S", 0.0)  # idle too long: closed, not reused
    async with scripted(lambda n: [sized(b"e")]) as (server, pool):
        await call(pool)
        await call(pool)
        assert server.connections == 2


async def test_released_mid_reply_goes_back_once_complete():
    """A stream released after its last event but before the chunked end (the [DONE] case):
    the connection returns to the pool when the end arrives."""
    script = [[CHUNKED_HEAD, chunk(b"data: [DONE]\n\n"), b"0\r\n\r\n"], [sized(b"next")]]
    async with scripted(lambda n: script[n]) as (server, pool):
        conn = await pool.connection()
        reply = await pool.post(conn, "/v1/chat/completions", b"{}")
        assert await reply.read_chunk() == b"data: [DONE]\n\n"
        reply.release()
        await asyncio.sleep(0.05)
        assert (await call(pool))[1] == [b"next"]
        assert server.connections == 1


async def test_cancelled_call_closes_its_connection():
    async with scripted(lambda n: [CHUNKED_HEAD, chunk(b"data: 1\n\n"), "hang"]) as (server, pool):
        conn = await pool.connection()
        reply = await pool.post(conn, "/v1/chat/completions", b"{}")
        assert await reply.read_chunk() == b"data: 1\n\n"
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05):
                await reply.read_chunk()
        reply.close()
        await asyncio.wait_for(server.eof_seen.wait(), 5)  # the server saw the client leave


async def test_cancelled_before_the_headers_closes_the_connection():
    async with scripted(lambda n: ["hang"]) as (server, pool):
        conn = await pool.connection()
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05):
                await pool.post(conn, "/v1/chat/completions", b"{}")
        await asyncio.wait_for(server.eof_seen.wait(), 5)
        assert not conn.usable


async def test_cut_and_garbage_replies_raise():
    script = [
        [b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n{\"partial", "close"],
        [CHUNKED_HEAD, chunk(b"data: 1\n\n"), "close"],
        [b"this is not http\r\n\r\n", "hang"],
        ["close"],
    ]
    async with scripted(lambda n: script[n]) as (_, pool):
        with pytest.raises(Disconnected):
            await call(pool)
        with pytest.raises(Disconnected):
            await call(pool, whole=False)
        with pytest.raises(BadReply):
            await call(pool)
        with pytest.raises(Disconnected):
            await call(pool)


async def test_nothing_listening_is_a_connect_error():
    pool = Pool(f"http://127.0.0.1:{free_port()}/v1", {})
    with pytest.raises(ConnectError):
        await pool.connection()


def test_only_http_urls():
    with pytest.raises(ValueError):
        Pool("ftp://example.com/v1", {})
    # private: the Host line for an https host or a bracketed IPv6 one is not reachable from a test
    assert Pool("https://api.example.com/v1", {})._host_line == b"host: api.example.com\r\n"
    assert Pool("http://[::1]:8080/v1", {})._host_line == b"host: [::1]:8080\r\n"
