"""(g) WebSocket mode against SSE, one client (concurrency 1): what a turn costs over each.

The same turns both ways: stored responses, each continuing the one before by
`previous_response_id` (an agent's tool loop has this shape), a new chain every `CHAIN` turns so
that the history stays short. Over SSE a turn is a POST /v1/responses with `stream: true` on one
keep-alive connection (bench.loadgen's client), read to the end of its stream; over WebSocket it
is a `response.create` on one connection (the `websockets` client, without compression, as the
OpenAI SDK connects), read to its `response.completed`. Rounds of each alternate, so that the
machine's drift hits both alike. Added = the WebSocket percentile minus the SSE one. The client's
own CPU per turn is reported beside it: the WebSocket client reads its frames in Python, the
HTTP one in C (httptools), and that difference is in the turn times too.
"""

from __future__ import annotations

import time

import orjson
from websockets.asyncio.client import ClientConnection, connect

from bench.loadgen import Conn, pct, perf

HOST = "127.0.0.1"
CHAIN = 4
ROUNDS = 10
TURNS = 20  # per round and transport
WARMUP_TURNS = 8
_COMPLETED = b"event: response.completed\ndata: "


def _body(k: int, previous: str | None, sse: bool) -> dict:
    body = {"model": "mock", "input": f"turn {k}: what comes next?"}
    if previous is not None:
        body["previous_response_id"] = previous
    if sse:
        body["stream"] = True
    else:
        body["type"] = "response.create"
    return body


async def _sse_round(conn: Conn, turns: int) -> list[float]:
    out, previous = [], None
    for k in range(turns):
        body = orjson.dumps(_body(k, None if k % CHAIN == 0 else previous, sse=True))
        t0 = perf()
        r = await conn.request("POST", "/v1/responses", body)
        t1 = perf()
        at = r.body.rfind(_COMPLETED)
        if r.status != 200 or at < 0:
            raise RuntimeError(f"SSE turn: {r.status} {r.body[-300:]!r}")
        previous = orjson.loads(r.body[at + len(_COMPLETED):])["response"]["id"]
        out.append((t1 - t0) * 1000)
    return out


async def _ws_round(ws: ClientConnection, turns: int) -> list[float]:
    out, previous = [], None
    for k in range(turns):
        message = orjson.dumps(_body(k, None if k % CHAIN == 0 else previous, sse=False)).decode()
        t0 = perf()
        await ws.send(message)
        while True:  # (every event's JSON begins with its type)
            got = await ws.recv()
            if got.startswith('{"type":"response.completed"'):
                break
            if got.startswith(('{"type":"error"', '{"type":"response.failed"', '{"type":"response.incomplete"')):
                raise RuntimeError(f"WebSocket turn: {got[:300]}")
        t1 = perf()
        previous = orjson.loads(got)["response"]["id"]
        out.append((t1 - t0) * 1000)
    return out


def _stats(ms: list[float]) -> dict:
    return {"p50_ms": pct(ms, 50), "p90_ms": pct(ms, 90), "p99_ms": pct(ms, 99)}


async def compare(port: int, rounds: int | None = None, turns: int | None = None) -> dict:
    rounds, turns = rounds or ROUNDS, turns or TURNS
    conn = await Conn.open(HOST, port)
    ws = await connect(f"ws://{HOST}:{port}/v1/responses", compression=None, max_size=None)
    sse_ms: list[float] = []
    ws_ms: list[float] = []
    cpu = {"sse": 0.0, "websocket": 0.0}
    try:
        await _sse_round(conn, WARMUP_TURNS)
        await _ws_round(ws, WARMUP_TURNS)
        for _ in range(rounds):
            c0 = time.process_time()
            sse_ms += await _sse_round(conn, turns)
            c1 = time.process_time()
            ws_ms += await _ws_round(ws, turns)
            c2 = time.process_time()
            cpu["sse"] += c1 - c0
            cpu["websocket"] += c2 - c1
    finally:
        conn.close()
        await ws.close()
    sse, wss = _stats(sse_ms), _stats(ws_ms)
    return {"turns": len(ws_ms), "sse": sse, "websocket": wss,
            "added_p50_ms": wss["p50_ms"] - sse["p50_ms"], "added_p90_ms": wss["p90_ms"] - sse["p90_ms"],
            "client_cpu_ms_per_turn": {k: 1000 * v / len(ws_ms) for k, v in cpu.items()}}
