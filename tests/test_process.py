"""The process model with real processes and sockets: workers that outlive their master, a
SIGTERM that drains, slow clients cut off, and the PostgreSQL connection warning at start-up.
Every wait is bounded."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from pathlib import Path

import httpx
import openai
import pytest

from branchwise.cli.serve import (
    DRAIN_MARGIN_S,
    _pg_limits,
    pg_connections_per_process,
    warn_if_too_many_connections,
)
from branchwise.services.runs import SHUTDOWN_MESSAGE
from branchwise.settings import Settings

from .conftest import Server
from .helpers import EventReader, new_conversation, until


def _env(db_url, mock, **extra):
    return {"BRANCHWISE_DATABASE_URL": db_url, "BRANCHWISE_UPSTREAM_BASE_URL": mock.url,
            **{f"BRANCHWISE_{k.upper()}": str(v) for k, v in extra.items()}}


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _alive(pid: int) -> bool:
    """Running (a zombie nobody reaped yet counts as gone: it holds no socket)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


# ------------------------------------------------------------------ the master dies


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads process trees from /proc")
async def test_workers_stop_when_their_master_is_killed(serve, tmp_path, mock):
    """Within seconds, busy or not, although `drain_timeout` is long: what runs is failed cleanly."""
    env = _env(f"sqlite:///{tmp_path / 'b.db'}", mock, drain_timeout=60)
    server = serve(env, workers=2)
    workers = await until(lambda: len(_children(server.proc.pid)) >= 2 and _children(server.proc.pid),
                          "the workers to start")
    assert len(workers) >= 2
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as h:
        events: list[dict] = []
        started = asyncio.Event()
        stream = asyncio.create_task(_stream_until_end(
            h, {"input": "[[words=2000]] [[chunk_delay=0.05]] long"}, started, events))
        await asyncio.wait_for(started.wait(), 20)
        os.kill(server.proc.pid, signal.SIGKILL)
        server.proc.wait(5)
        await until(lambda: not any(_alive(p) for p in workers), "every worker to exit", timeout=5)
        await asyncio.wait_for(stream, 5)
    assert events[-1]["type"] == "response.failed", events[-1]
    assert events[-1]["response"]["error"]["message"] == SHUTDOWN_MESSAGE
    # the port is free: a new server binds it and serves
    again = Server(env, port=server.port)
    try:
        again.wait_ready(60)
        assert httpx.get(f"{again.url}/healthz", timeout=5).status_code == 200
    finally:
        again.stop()


# ------------------------------------------------------------------ SIGTERM drains


async def _stream_until_end(h: httpx.AsyncClient, body: dict, started: asyncio.Event, out: list) -> None:
    async with h.stream("POST", "/v1/responses", json={"model": "m", "stream": True, **body}) as r:
        reader = EventReader(r)
        out += await reader.read(3)
        started.set()
        out += await reader.read()


async def test_sigterm_drains_running_responses(serve, db_url, mock):
    drain = 3.0
    env = _env(db_url, mock, drain_timeout=drain)
    server = serve(env)
    client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
    conv = await new_conversation(client, "start")
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as h:
        long_events: list[dict] = []
        short_events: list[dict] = []
        long_started, short_started = asyncio.Event(), asyncio.Event()
        long = asyncio.create_task(_stream_until_end(
            h, {"conversation": conv.id, "input": "[[words=400]] [[chunk_delay=0.05]] long"}, long_started, long_events))
        bg = (await h.post("/v1/responses", json={"model": "m", "conversation": conv.id, "background": True,
                                                   "input": "[[delay=60]] background"})).json()
        await asyncio.wait_for(long_started.wait(), 20)
        # a stream that ends well within the drain
        short = asyncio.create_task(_stream_until_end(
            h, {"input": "[[words=20]] [[chunk_delay=0.05]] short"}, short_started, short_events))
        await asyncio.wait_for(short_started.wait(), 20)
        # responses that live in their requests: an unstored stream and a plain request
        unstored_events: list[dict] = []
        unstored_started = asyncio.Event()
        unstored = asyncio.create_task(_stream_until_end(
            h, {"store": False, "input": "[[words=400]] [[chunk_delay=0.05]] unstored"}, unstored_started,
            unstored_events))
        await asyncio.wait_for(unstored_started.wait(), 20)
        plain = asyncio.create_task(h.post("/v1/responses", json={"model": "m", "input": "[[delay=60]] plain"}))
        await until(lambda: len(mock.requests) >= 5, "the upstream to get all five requests")
        t0 = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(asyncio.gather(long, short, unstored, plain), drain + DRAIN_MARGIN_S + 5)
        code = await asyncio.to_thread(server.proc.wait, drain + DRAIN_MARGIN_S + 5)
        took = time.monotonic() - t0
    assert code in (0, -signal.SIGTERM), server.output()  # (uvicorn re-raises the signal it handled)
    assert drain - 0.5 < took < drain + DRAIN_MARGIN_S, took
    assert long_events[-1]["type"] == "response.failed", long_events[-1]
    assert long_events[-1]["response"]["error"]["message"] == SHUTDOWN_MESSAGE
    assert short_events[-1]["type"] == "response.completed"
    assert unstored_events[-1]["type"] == "response.failed", unstored_events[-1]
    assert unstored_events[-1]["response"]["error"]["message"] == SHUTDOWN_MESSAGE
    plain_reply = plain.result()
    assert plain_reply.status_code == 200, plain_reply.text
    plain_body = plain_reply.json()
    assert plain_body["status"] == "failed" and plain_body["error"]["message"] == SHUTDOWN_MESSAGE
    # a new server on the same database: every response is terminal, the conversation is free
    server2 = serve(env)
    client2 = openai.AsyncOpenAI(base_url=f"{server2.url}/v1", api_key="x", max_retries=0)
    stored = {rid: await client2.responses.retrieve(rid)
              for rid in (long_events[0]["response"]["id"], bg["id"], short_events[0]["response"]["id"],
                          plain_body["id"])}
    statuses = [r.status for r in stored.values()]
    assert statuses == ["failed", "failed", "completed", "failed"], statuses
    assert [r.error and r.error.message for r in stored.values()][:2] == [SHUTDOWN_MESSAGE] * 2, stored
    nxt = await client2.responses.create(model="m", conversation=conv.id, input="again",
                                         extra_body={"concurrency": "reject"})
    assert nxt.status == "completed"


# ------------------------------------------------------------------ slow clients


def _connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.settimeout(10)
    return s


def _read_all(s: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (bounded by the timeout)."""
    out = b""
    while chunk := s.recv(65536):
        out += chunk
    return out


def _cut_off_after(s: socket.socket, send) -> tuple[bytes, float]:
    t0 = time.monotonic()
    send()
    return _read_all(s), time.monotonic() - t0


@pytest.fixture
def slow_server(serve, tmp_path, mock):
    return serve(_env(f"sqlite:///{tmp_path / 'b.db'}", mock, header_timeout=1, body_timeout=1.5))


def test_slow_headers_are_cut_off(slow_server):
    port = slow_server.port
    # nothing sent at all
    with _connect(port) as s:
        reply, took = _cut_off_after(s, lambda: None)
    assert reply.startswith(b"HTTP/1.1 408") and b"request_timeout" in reply and 0.9 < took < 4
    # headers that stop halfway
    with _connect(port) as s:
        reply, took = _cut_off_after(s, lambda: s.sendall(b"POST /v1/responses HTTP/1.1\r\nhost: x\r\n"))
    assert reply.startswith(b"HTTP/1.1 408") and 0.9 < took < 4
    # headers trickling a byte at a time: activity does not extend the deadline
    with _connect(port) as s:
        t0 = time.monotonic()
        with pytest.raises(OSError):
            for b in b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-padding: " + b"a" * 100:
                s.sendall(bytes([b]))
                time.sleep(0.1)
        assert time.monotonic() - t0 < 4


def test_slow_body_is_cut_off(slow_server):
    with _connect(slow_server.port) as s:
        reply, took = _cut_off_after(s, lambda: s.sendall(
            b"POST /v1/responses HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b"content-length: 100\r\n\r\n{\"model\": "))
    assert reply.startswith(b"HTTP/1.1 408") and b"request_timeout" in reply and 1.4 < took < 5


def test_timeouts_leave_normal_requests_alone(slow_server):
    """A keep-alive connection that waits between requests, and a reply (a stream) that lasts
    longer than both timeouts, are not cut off."""
    with httpx.Client(base_url=slow_server.url, timeout=30) as h:
        assert h.get("/healthz").status_code == 200
        time.sleep(1.2)  # idle between requests: `timeout_keep_alive`'s business, not the header timeout's
        assert h.get("/healthz").status_code == 200
        with h.stream("POST", "/v1/responses", json={
                "model": "m", "stream": True, "store": False,
                "input": "[[words=40]] [[chunk_delay=0.06]] slow reply"}) as r:
            text = "".join(r.iter_text())
        assert r.status_code == 200 and "response.completed" in text
        r = h.post("/v1/responses", json={"model": "m", "input": "hello"})
        assert r.status_code == 200 and r.json()["status"] == "completed"


# ------------------------------------------------------------------ PostgreSQL connections


def test_warns_when_workers_could_exceed_max_connections(pg_url, capsys):
    settings = Settings(database_url=pg_url)
    per = pg_connections_per_process(settings)
    warn_if_too_many_connections(settings, 1)
    assert capsys.readouterr().err == ""
    warn_if_too_many_connections(settings, 1000 // per + 1)
    err = capsys.readouterr().err
    assert "max_connections" in err and f"x {per} PostgreSQL connections" in err


def test_start_up_warns_before_workers_start(pg_url, mock):
    """`branchwise serve` itself warns, before it starts the workers."""
    max_connections, reserved = asyncio.run(_pg_limits(pg_url))
    # a pool just over half the room, so that two workers would exceed it (pools open lazily:
    # the two idle workers hold a connection or two each)
    workers, pool = 2, (max_connections - reserved) // 2 + 1
    assert pg_connections_per_process(Settings(database_url=pg_url, db_pool_size=pool)) * workers \
        > max_connections - reserved
    server = Server({"BRANCHWISE_DATABASE_URL": pg_url, "BRANCHWISE_UPSTREAM_BASE_URL": mock.url,
                     "BRANCHWISE_DB_POOL_SIZE": str(pool)}, workers=workers)
    try:
        deadline = time.monotonic() + 30
        while "raise max_connections" not in server.output() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert f"{workers} worker(s) x" in server.output()
    finally:
        server.stop()


def test_client_leaving_mid_body_is_not_an_error(slow_server):
    """A client that goes away halfway through its body gets nothing (nobody is there) and leaves
    no error in the log; the server goes on serving."""
    for _ in range(3):
        with _connect(slow_server.port) as s:
            s.sendall(b"POST /v1/responses HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                      b"content-length: 100000\r\n\r\n{\"model\": \"m\", \"input\": \"" + b"x" * 5000)
            time.sleep(0.2)
    assert httpx.get(f"{slow_server.url}/healthz", timeout=5).status_code == 200
    time.sleep(0.3)
    out = slow_server.output()
    assert "unhandled error" not in out and "Traceback" not in out, out[-2000:]
