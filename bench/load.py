"""Load benchmarks over real sockets: branchwise and the mock upstream each in their own process,
this process the load client (see `bench.loadgen`).

(a) added latency and (b) throughput: a closed-loop sweep of stored, non-streaming
    `POST /v1/responses` on a 20-item conversation, one conversation per connection; every
    `RESET_EVERY` turns the worker moves its conversation's head back to the seed (an untimed
    `POST /v1/conversations/{id}/head`, not counted), so the history stays 20..26 items. The same
    chat calls (same messages) are made straight to the mock at the same concurrencies, each
    right before the branchwise phase it is the baseline of (the machine's speed drifts by the
    minute, so a baseline taken minutes earlier once made "added" swing by 20 ms either way).
(c) streaming: time to first SSE event, and the gaps between `output_text.delta` events, against
    the mock's own stream (a chunk every 20 ms) read directly, again right before.
(e) 16 parallel `branch` responses on one conversation against 16 on separate conversations.
(f) branchwise's RSS: idle, peak while loaded, after the load.
(g) WebSocket mode against SSE at concurrency 1 (bench/websocket.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import orjson

from bench import websocket
from bench.loadgen import (
    CLOCK_NANOSLEEP,
    Conn,
    CpuMeter,
    Server,
    close_all,
    median,
    open_conns,
    pct,
    perf,
    rss_kib,
    threads_in_syscall,
)

HOST = "127.0.0.1"
SEED_ITEMS = 20
RESET_EVERY = 4
SWEEP = (1, 2, 4, 8, 16, 32, 64)
RATES = (400, 600, 800, 1000, 1200)  # offered responses/s in the fixed-rate phases
RATE_CONNECTIONS = 32
DIRECT = (1, 16, 32, 64)
ADDED_AT = (1, 16, 64)
P99_LIMIT_MS = 50.0
STREAM_WORDS = 40
STREAM_CHUNK_DELAY = 0.02
STREAM_CONCURRENCY = 4
BRANCH_N = 16
BRANCH_DELAY = 0.2
REQUEST_GRACE_S = 30.0  # how long past a phase's end a request may still take before it counts as failed


def seed_messages() -> list[dict]:
    return [{"role": "user" if i % 2 == 0 else "assistant",
             "content": f"message number {i} " + "lorem ipsum " * 8} for i in range(SEED_ITEMS)]


def turn_text(k: int) -> str:
    return f"turn {k}: what comes next?"


def direct_messages(k: int, extra: str = "") -> list[dict]:
    """What branchwise sends upstream at turn k of a seeded conversation (k earlier turns)."""
    msgs = seed_messages()
    for j in range(k):
        msgs.append({"role": "user", "content": turn_text(j)})
        msgs.append({"role": "assistant", "content": f"[{len(msgs)} messages] Echo: {turn_text(j)}"})
    msgs.append({"role": "user", "content": extra + turn_text(k)})
    return msgs


def dumps(obj) -> bytes:
    return orjson.dumps(obj)


async def create_conversations(conn: Conn, n: int, items: list[dict] | None = None) -> list[tuple[str, str]]:
    """n conversations seeded with `items` (default: the 20 seed messages): [(id, head item)]."""
    body = dumps({"items": seed_messages() if items is None else items})
    out = []
    for _ in range(n):
        r = await conn.request("POST", "/v1/conversations", body)
        if r.status != 200:
            raise RuntimeError(f"creating a conversation: {r.status} {r.body[:300]!r}")
        obj = orjson.loads(r.body)
        out.append((obj["id"], obj["head"]))
    return out


async def reset_head(conn: Conn, conv: tuple[str, str]) -> None:
    r = await conn.request("POST", f"/v1/conversations/{conv[0]}/head", dumps({"item_id": conv[1]}))
    if r.status != 200:
        raise RuntimeError(f"resetting a head: {r.status} {r.body[:300]!r}")


# --------------------------------------------------------------------------- closed loop


class _BranchwiseWorker:
    """Turns on one conversation, its head moved back to the seed every RESET_EVERY turns."""

    def __init__(self, conv: tuple[str, str]):
        self.conv = conv
        self.k = 0
        self.resets: list[tuple[float, float]] = []  # (sent, done) of each untimed head reset
        self.bodies = [dumps({"model": "mock", "conversation": conv[0], "input": turn_text(k)})
                       for k in range(RESET_EVERY)]

    async def step(self, conn: Conn):
        if self.k == RESET_EVERY:
            t = perf()
            await reset_head(conn, self.conv)
            self.resets.append((t, perf()))
            self.k = 0
        r = await conn.request("POST", "/v1/responses", self.bodies[self.k])
        self.k += 1
        ok = r.status == 200 and b'"status":"completed"' in r.body
        return r, ok


class _DirectWorker:
    """The same chat calls straight to the mock, in the same turn cycle."""

    bodies = None

    def __init__(self):
        if _DirectWorker.bodies is None:
            _DirectWorker.bodies = [dumps({"model": "mock", "messages": direct_messages(k)})
                                    for k in range(RESET_EVERY)]
        self.k = 0

    async def step(self, conn: Conn):
        r = await conn.request("POST", "/v1/chat/completions", self.bodies[self.k % RESET_EVERY])
        self.k += 1
        return r, r.status == 200


class _CannedWorker:
    body = dumps({"model": "mock", "messages": direct_messages(0)})

    async def step(self, conn: Conn):
        r = await conn.request("POST", "/v1/chat/completions", self.body)
        return r, r.status == 200


async def closed_loop(port: int, workers: list, warmup: float, duration: float, meter: CpuMeter,
                      server_pids=None) -> dict:
    """len(workers) connections, each running its worker's requests back to back for
    warmup + duration seconds; requests sent after the warm-up and done before the end count.
    With `server_pids` (a function), the server's RSS is sampled every 0.25 s and its threads
    asleep in clock_nanosleep (SQLite's busy handler waiting for the write lock) every 20 ms; the
    client CPU this sampling costs is not counted as the client's."""
    conns = await open_conns(HOST, port, len(workers))
    t0 = perf()
    t_measure, t_end = t0 + warmup, t0 + warmup + duration
    lat: list[float] = []
    errors = 0
    rss_peak = 0
    sleeping = samples = 0
    sampler_cpu = 0.0

    async def run(w, conn: Conn):
        nonlocal errors
        try:
            while perf() < t_end:
                try:
                    r, ok = await w.step(conn)
                except (ConnectionError, OSError):
                    errors += 1
                    conn.close()
                    conn = await Conn.open(HOST, port)
                    continue
                if r.t_sent >= t_measure and r.t_done <= t_end:
                    if ok:
                        lat.append(r.ms)
                    else:
                        errors += 1
        finally:
            conn.close()

    tasks = [asyncio.ensure_future(run(w, c)) for w, c in zip(workers, conns, strict=True)]
    try:
        await asyncio.sleep(max(0.0, t_measure - perf()))
        meter.start()
        pids = server_pids() if server_pids is not None else []
        next_rss = 0.0
        while (now := perf()) < t_end:
            if pids:
                c0 = time.process_time()
                if now >= next_rss:
                    rss_peak = max(rss_peak, rss_kib(pids))
                    next_rss = now + 0.25
                sleeping += threads_in_syscall(pids, CLOCK_NANOSLEEP)
                samples += 1
                sampler_cpu += time.process_time() - c0
            await asyncio.sleep(min(0.02 if pids else 0.25, max(0.0, t_end - perf())))
        cpu = meter.stop()
        cpu["client"] -= sampler_cpu
        _, pending = await asyncio.wait(tasks, timeout=REQUEST_GRACE_S)
        errors += len(pending)  # requests still not answered long after the end: failed
    finally:
        for t in tasks:
            t.cancel()
        close_all(conns)
    n = len(lat)
    resets = [(d - s) * 1000 for w in workers for s, d in getattr(w, "resets", ()) if s >= t_measure and d <= t_end]
    res = {
        "concurrency": len(workers), "requests": n, "errors": errors, "duration_s": duration,
        "rps": n / duration, "p50_ms": pct(lat, 50), "p90_ms": pct(lat, 90), "p99_ms": pct(lat, 99),
        "max_ms": max(lat) if lat else math.nan,
        "resets": len(resets), "reset_p50_ms": pct(resets, 50) if resets else math.nan,
        "cpu_s": {k: v for k, v in cpu.items() if k != "machine_total"},
    }
    per = {k: (1000 * v / n if n else math.nan) for k, v in cpu.items()
           if k not in ("wall", "machine_total", "machine_busy")}
    # whatever else ran on the machine meanwhile (kernel threads, other people's test runs)
    own = sum(v for k, v in cpu.items() if k not in ("wall", "machine_total", "machine_busy")
              and not k.endswith(("_main_thread", "_other_threads")))
    per["other"] = (1000 * (cpu["machine_busy"] - own) / n) if n else math.nan
    res["cpu_ms_per_req"] = per
    res["client_cpu_pct"] = 100 * cpu["client"] / cpu["wall"]
    res["machine_busy_pct"] = 100 * cpu["machine_busy"] / cpu["machine_total"]
    if server_pids is not None:
        res["rss_peak_kib"] = rss_peak
        res["threads_in_busy_sleep"] = sleeping / samples if samples else math.nan
    return res


async def fixed_rate(port: int, workers: list, rate: float, warmup: float, duration: float,
                     meter: CpuMeter) -> dict:
    """Open loop: a request falls due every 1/rate s, whatever the server is doing, and goes out
    on the next free one of len(workers) connections. Its latency runs from when it fell due (so
    the wait for a free connection counts: no coordinated omission). A worker's untimed head
    reset happens on its connection after every RESET_EVERY turns, so it holds a connection
    too. Requests due after the warm-up and done before the end (plus grace) count."""
    conns = await open_conns(HOST, port, len(workers))
    free: asyncio.Queue = asyncio.Queue()
    for pair in zip(workers, conns, strict=True):
        free.put_nowait(pair)
    t0 = perf()
    t_measure, t_end = t0 + warmup, t0 + warmup + duration
    lat: list[float] = []
    sent_late: list[float] = []  # how long after falling due each request went out
    errors = late = 0
    tasks: set[asyncio.Task] = set()

    async def one(due: float, w, conn: Conn) -> None:
        nonlocal errors
        try:
            r, ok = await w.step(conn)
        except (ConnectionError, OSError):
            errors += due >= t_measure
            conn.close()
            conn = await Conn.open(HOST, port)
        else:
            if due >= t_measure:
                if ok:
                    lat.append((r.t_done - due) * 1000)
                    sent_late.append((r.t_sent - due) * 1000)
                else:
                    errors += 1
        free.put_nowait((w, conn))

    try:
        k = 0
        started_meter = False
        while (due := t0 + k / rate) < t_end:
            if not started_meter and due >= t_measure:
                meter.start()
                started_meter = True
            delay = due - perf()
            if delay > 0:
                await asyncio.sleep(delay)
            w, conn = await free.get()
            task = asyncio.ensure_future(one(due, w, conn))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            k += 1
        _, pending = await asyncio.wait(tasks, timeout=REQUEST_GRACE_S) if tasks else (set(), set())
        late = len(pending)
        cpu = meter.stop()
    finally:
        for t in list(tasks):
            t.cancel()
        close_all(conns)
        while not free.empty():
            free.get_nowait()[1].close()
    n = len(lat)
    wall = cpu["wall"]
    return {
        "offered_rps": rate, "connections": len(workers), "requests": n, "errors": errors + late,
        "rps": n / duration, "p50_ms": pct(lat, 50), "p90_ms": pct(lat, 90), "p99_ms": pct(lat, 99),
        "max_ms": max(lat) if lat else math.nan,
        "sent_late_p50_ms": pct(sent_late, 50), "sent_late_p99_ms": pct(sent_late, 99),
        "branchwise_cpu_pct": 100 * cpu["branchwise"] / wall, "machine_busy_pct":
            100 * cpu["machine_busy"] / cpu["machine_total"],
        "cpu_ms_per_req": {k: (1000 * v / n if n else math.nan) for k, v in cpu.items()
                           if k not in ("wall", "machine_total")},
    }


# --------------------------------------------------------------------------- streaming


def _sse_events(chunks: list[tuple[float, bytes]]) -> list[tuple[float, bytes]]:
    """(time the read that completed it arrived, event bytes) for each SSE event."""
    out, buf = [], b""
    for t, data in chunks:
        buf += data
        *events, buf = buf.split(b"\n\n")
        out.extend((t, e) for e in events if e.strip())
    return out


def _bw_stream(r) -> tuple[float, float, list[float]]:
    events = _sse_events(r.chunks)
    first = events[0][0]
    deltas = [t for t, e in events if e.startswith(b"event: response.output_text.delta\n")]
    if not deltas or not events[-1][1].startswith(b"event: response.completed\n"):
        raise RuntimeError(f"unexpected branchwise stream: {events[-1][1][:300]!r}")
    return first - r.t_sent, deltas[0] - r.t_sent, [b - a for a, b in zip(deltas, deltas[1:], strict=False)]


def _direct_stream(r) -> tuple[float, float, list[float]]:
    events = _sse_events(r.chunks)
    first = events[0][0]
    content = []
    for t, e in events:
        data = e.split(b"data: ", 1)[1]
        if data == b"[DONE]":
            continue
        choices = orjson.loads(data).get("choices") or []
        if choices and choices[0].get("delta", {}).get("content"):
            content.append(t)
    return first - r.t_sent, content[0] - r.t_sent, [b - a for a, b in zip(content, content[1:], strict=False)]


async def streams(port: int, n_streams: int, convs: list[tuple[str, str]] | None) -> dict:
    """n_streams streams, STREAM_CONCURRENCY at a time; through branchwise when `convs` (one per
    worker; the head is moved back after each stream, untimed), else straight to the mock."""
    directives = f"[[chunk_delay={STREAM_CHUNK_DELAY}]] [[words={STREAM_WORDS}]] "
    conns = await open_conns(HOST, port, STREAM_CONCURRENCY)
    ttfe, ttfd, gaps = [], [], []
    per = max(1, n_streams // STREAM_CONCURRENCY)

    async def run(i: int, conn: Conn):
        for k in range(per + 1):  # the first one warms up
            if convs is not None:
                body = dumps({"model": "mock", "conversation": convs[i][0], "input": directives + turn_text(0),
                              "stream": True})
                r = await conn.request("POST", "/v1/responses", body, record_chunks=True)
                if r.status != 200:
                    raise RuntimeError(f"stream: {r.status} {r.body[:300]!r}")
                a, b, g = _bw_stream(r)
                await reset_head(conn, convs[i])
            else:
                body = dumps({"model": "mock", "messages": direct_messages(0, directives), "stream": True,
                              "stream_options": {"include_usage": True}})
                r = await conn.request("POST", "/v1/chat/completions", body, record_chunks=True)
                if r.status != 200:
                    raise RuntimeError(f"mock stream: {r.status} {r.body[:300]!r}")
                a, b, g = _direct_stream(r)
            if k:
                ttfe.append(a * 1000)
                ttfd.append(b * 1000)
                gaps.extend(x * 1000 for x in g)

    try:
        await asyncio.wait_for(asyncio.gather(*(run(i, c) for i, c in enumerate(conns))),
                               REQUEST_GRACE_S + 2 * per * STREAM_WORDS * STREAM_CHUNK_DELAY)
    finally:
        close_all(conns)
    return {"streams": per * STREAM_CONCURRENCY, "gaps": len(gaps),
            "first_event_p50_ms": pct(ttfe, 50), "first_event_p99_ms": pct(ttfe, 99),
            "first_delta_p50_ms": pct(ttfd, 50), "first_delta_p99_ms": pct(ttfd, 99),
            "gap_p50_ms": pct(gaps, 50), "gap_p99_ms": pct(gaps, 99), "gap_max_ms": max(gaps)}


# --------------------------------------------------------------------------- branch


async def branch_batches(port: int, repeat: int) -> dict:
    """Wall time of 16 parallel `branch` responses on one conversation vs on 16 conversations,
    alternating, `repeat` times each; the mock waits BRANCH_DELAY before answering each."""
    conns = await open_conns(HOST, port, BRANCH_N)
    seed = [{"role": "user", "content": "branch benchmark"}, {"role": "assistant", "content": "ok"}]
    try:
        one = (await create_conversations(conns[0], 1, seed))[0]
        many = await create_conversations(conns[0], BRANCH_N, seed)

        async def batch(targets: list[str]) -> float:
            bodies = [dumps({"model": "mock", "conversation": cid, "concurrency": "branch",
                             "input": f"[[delay={BRANCH_DELAY}]] question {i}"}) for i, cid in enumerate(targets)]
            rs = await asyncio.wait_for(asyncio.gather(*(c.request("POST", "/v1/responses", b)
                                                         for c, b in zip(conns, bodies, strict=True))),
                                        REQUEST_GRACE_S)
            bad = [r for r in rs if r.status != 200 or b'"status":"completed"' not in r.body]
            if bad:
                raise RuntimeError(f"branch batch: {bad[0].status} {bad[0].body[:300]!r}")
            return (max(r.t_done for r in rs) - min(r.t_sent for r in rs)) * 1000

        await batch([one[0]] * BRANCH_N)  # warm-up
        await batch([c[0] for c in many])
        one_ms, many_ms = [], []
        for _ in range(repeat):
            one_ms.append(await batch([one[0]] * BRANCH_N))
            many_ms.append(await batch([c[0] for c in many]))
    finally:
        close_all(conns)
    m1, m2 = median(one_ms), median(many_ms)
    return {"repeat": repeat, "one_conversation_ms": one_ms, "separate_ms": many_ms,
            "one_conversation_median_ms": m1, "separate_median_ms": m2, "ratio": m1 / m2,
            "mock_delay_ms": BRANCH_DELAY * 1000}


# --------------------------------------------------------------------------- the runs


def _meter(servers: dict[str, Server]) -> CpuMeter:
    from bench.loadgen import pids_named

    groups = {name: s.pids for name, s in servers.items()}
    groups["postgres"] = lambda: pids_named("postgres")
    return CpuMeter(groups, threads_of="branchwise" if "branchwise" in servers else None)


async def client_check(canned: Server, warmup: float, duration: float) -> dict:
    """The client against a canned-reply server: its own latency floor and request rate."""
    meter = CpuMeter({"canned": canned.pids})
    out = {}
    for c in (1, 64):
        out[c] = await closed_loop(canned.port, [_CannedWorker() for _ in range(c)], warmup, duration, meter)
    return out


async def direct_sweep(mock: Server, warmup: float, duration: float) -> dict:
    meter = _meter({"mock": mock})
    return {c: await closed_loop(mock.port, [_DirectWorker() for _ in range(c)], warmup, duration, meter)
            for c in DIRECT}


async def branchwise_load(bw: Server, mock: Server, warmup: float, duration: float, n_streams: int,
                          branch_repeat: int, profile: Path | None = None) -> dict:
    meter = _meter({"branchwise": bw, "mock": mock})
    out: dict = {"rss_kib": {"idle": rss_kib(bw.pids())}}
    setup = await Conn.open(HOST, bw.port)
    try:
        convs = await create_conversations(setup, max(SWEEP))
        stream_convs = await create_conversations(setup, STREAM_CONCURRENCY)
    finally:
        setup.close()
    sweep, direct = {}, {}
    mock_meter = _meter({"mock": mock})
    for c in SWEEP:
        if c in ADDED_AT:  # the baseline, just before: both phases under the machine's speed of the moment
            direct[c] = await closed_loop(mock.port, [_DirectWorker() for _ in range(c)], warmup, duration, mock_meter)
        sweep[c] = await closed_loop(bw.port, [_BranchwiseWorker(conv) for conv in convs[:c]], warmup, duration,
                                     meter, server_pids=bw.pids)
    out["sweep"], out["direct"] = sweep, direct
    rates = {}
    for rate in RATES:
        rates[rate] = r = await fixed_rate(bw.port, [_BranchwiseWorker(conv) for conv in convs[:RATE_CONNECTIONS]],
                                           rate, warmup, duration, meter)
        if r["p99_ms"] > 4 * P99_LIMIT_MS or r["errors"]:
            break  # far past what it sustains: higher rates only pile up a backlog
    out["rate"] = rates
    if profile is not None:
        out["profile"] = await _profile(bw, convs, warmup, duration, meter, profile)
    out["direct_streaming"] = await streams(mock.port, n_streams, None)
    out["streaming"] = await streams(bw.port, n_streams, stream_convs)
    out["branch"] = await branch_batches(bw.port, branch_repeat)
    out["websocket"] = await websocket.compare(bw.port)
    out["rss_kib"]["peak"] = max(r.get("rss_peak_kib", 0) for r in sweep.values())
    out["rss_kib"]["end"] = rss_kib(bw.pids())
    return out


async def _profile(bw: Server, convs, warmup: float, duration: float, meter: CpuMeter, path: Path) -> dict:
    """An extra concurrency-32 phase with py-spy attached (not counted in the results). `--gil`:
    only samples of the thread holding the GIL, i.e. Python CPU time, not SQLite's C code."""
    from bench.profile import summarise

    exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(exe).exists():
        return {"error": "py-spy is not installed (.venv/bin/pip install py-spy)"}
    secs = max(2, int(duration + warmup))
    files = {"flamegraph": path.with_suffix(".svg"), "raw": path.with_suffix(".txt")}
    procs = [subprocess.Popen([exe, "record", "--pid", str(bw.pid), "--duration", str(secs), "--rate", "250", "--gil",
                               "--nonblocking", "--subprocesses", "--format", fmt, "-o", str(f)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for fmt, f in files.items()]
    try:
        await asyncio.sleep(0.5)
        res = await closed_loop(bw.port, [_BranchwiseWorker(conv) for conv in convs[:32]], 0.2, secs - 0.7, meter)
    finally:
        for p in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(secs + 15)
            if p.poll() is None:
                p.kill()
    out = {"files": {k: str(v) for k, v in files.items()}, "rps_while_profiled": res["rps"]}
    if files["raw"].exists():
        out["summary"] = summarise(files["raw"])
    return out


async def log_cost(on: Server, off: Server, warmup: float, duration: float, repeat: int) -> dict:
    """What the request log costs a stored response at concurrency 1: the same workload on two
    servers alike but for the log level, `on` at the default (`info`: a line per request) and
    `off` at `--log-level warning`, their phases alternated so that both see the machine's speed
    of the moment. Added p50 = median of `on`'s p50s - median of `off`'s."""
    convs = {}
    for name, srv in (("on", on), ("off", off)):
        setup = await Conn.open(HOST, srv.port)
        try:
            convs[name] = (await create_conversations(setup, 1))[0]
        finally:
            setup.close()
    p50s: dict[str, list[float]] = {"on": [], "off": []}
    for _ in range(repeat):
        for name, srv in (("on", on), ("off", off)):
            r = await closed_loop(srv.port, [_BranchwiseWorker(convs[name])], warmup, duration,
                                  _meter({"branchwise": srv}))
            p50s[name].append(r["p50_ms"])
    on_p50, off_p50 = median(p50s["on"]), median(p50s["off"])
    return {"on_p50_ms": on_p50, "off_p50_ms": off_p50, "added_p50_ms": on_p50 - off_p50, "p50s_ms": p50s,
            "repeat": repeat}
