"""(k) A stream resumed on another instance (PostgreSQL): two branchwise processes on one database.
A background streaming response runs on instance A; the client reads its events live from A
(from A's memory) and, at the same time, from B (which tails A's event log in the database).
Each `output_text.delta`'s delay is the time B delivered it minus the time A did. B is woken by
the writes of A's events (LISTEN/NOTIFY) and asks A to write them as they come; a third
instance, C, has a connection budget too small to keep a listening connection, so it polls every
`event_poll_interval` (what every instance did before), measured side by side.
"""

from __future__ import annotations

import asyncio

import orjson

from bench.loadgen import Conn, Server, pct

HOST = "127.0.0.1"
WORDS = 40
CHUNK_DELAY = 0.02
POLLING_POOL_SIZE = 6  # `db_pool_size` below which a process keeps no listening connection


def _deltas(r) -> dict[int, float]:
    """sequence_number -> time read, of each output_text.delta event of a recorded stream."""
    out, buf = {}, b""
    for t, data in r.chunks:
        buf += data
        *events, buf = buf.split(b"\n\n")
        for e in events:
            if e.startswith(b"event: response.output_text.delta\n"):
                out[orjson.loads(e.split(b"data: ", 1)[1])["sequence_number"]] = t
    return out


async def _one(a: Conn, remotes: list[Conn]) -> list[list[float]]:
    body = orjson.dumps({"model": "mock", "input": f"[[chunk_delay={CHUNK_DELAY}]] [[words={WORDS}]] resume me",
                         "background": True, "stream": False})
    r = await a.request("POST", "/v1/responses", body)
    if r.status != 200:
        raise RuntimeError(f"background response: {r.status} {r.body[:300]!r}")
    rid = orjson.loads(r.body)["id"]
    path = f"/v1/responses/{rid}?stream=true"
    local, *tails = await asyncio.gather(a.request("GET", path, record_chunks=True),
                                         *(c.request("GET", path, record_chunks=True) for c in remotes))
    here = _deltas(local)
    if len(here) < WORDS // 2:
        raise RuntimeError(f"too few deltas from A: {len(here)}")
    out = []
    for tail in tails:
        there = _deltas(tail)
        if set(there) != set(here):
            raise RuntimeError(f"the resumed stream's deltas differ: {len(there)} against {len(here)}")
        out.append([(there[s] - here[s]) * 1000 for s in here])
    return out


async def compare(a: Server, listening: Server, polling: Server, rounds: int) -> dict:
    conns = [await Conn.open(HOST, s.port) for s in (a, listening, polling)]
    delays: list[list[float]] = [[], []]
    try:
        await _one(conns[0], conns[1:])  # warm-up
        for _ in range(rounds):
            for k, d in enumerate(await asyncio.wait_for(_one(conns[0], conns[1:]), 60)):
                delays[k] += d
    finally:
        for c in conns:
            c.close()
    return {"rounds": rounds, "deltas": len(delays[0]),
            **{name: {"p50_ms": pct(d, 50), "p90_ms": pct(d, 90), "p99_ms": pct(d, 99), "mean_ms": sum(d) / len(d)}
               for name, d in zip(("listening", "polling"), delays, strict=True)}}


def table(res: dict) -> str:
    lines = ["### (k) Stream resumed on another instance (postgresql), added delay per event, ms", "",
             f"A background stream on instance A ({WORDS} words, a chunk every {int(CHUNK_DELAY * 1000)} ms), read "
             "live from A and at once from B (woken by notifications) and C (polling, as before); "
             f"{res['rounds']} streams, {res['deltas']} deltas each. Delay: when B (C) delivered a delta minus "
             "when A did.", "", "| reader | p50 | p90 | p99 | mean |", "|---|---:|---:|---:|---:|"]
    for name, label in (("listening", "B: notified"), ("polling", "C: polling")):
        r = res[name]
        lines.append(f"| {label} | {r['p50_ms']:.2f} | {r['p90_ms']:.2f} | {r['p99_ms']:.2f} | {r['mean_ms']:.2f} |")
    return "\n".join(lines)


def budget(res: dict) -> tuple[str, bool, str]:
    p50 = res["listening"]["p50_ms"]
    return ("resumed stream on another instance: added delay per event p50 <= 5 ms", p50 <= 5, f"{p50:.2f} ms")
