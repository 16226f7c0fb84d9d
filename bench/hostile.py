"""`python -m bench.hostile [--only sqlite|postgresql]`: what the hostile bodies of the hardening
issue cost a running server: for each, the reply's status and time, the server's peak RSS, and
the longest a `/healthz` polled every 2 ms meanwhile had to wait (the event loop's stall).

Not part of `make bench` (it measures limits, not the hot path); docs/performance.md keeps its
table. Each case runs against one `branchwise serve` with the mock upstream, on a fresh database.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import sys
import tempfile
import time
from pathlib import Path

import httpx
import orjson

from bench import loadgen
from bench.__main__ import _fresh

POLL_S = 0.002


def _tiny(n: int) -> bytes:
    return orjson.dumps({"model": "m", "input": [{"role": "user", "content": "x"}] * n})


def _wide(items: int, chars: int) -> bytes:
    return orjson.dumps({"model": "m", "input": [{"role": "user", "content": "y" * chars}] * items})


CASES: list[tuple[str, str, bytes]] = [
    ("1,000,000 tiny messages (32 MB)", "/v1/responses", _tiny(1_000_000)),
    ("same, /input_tokens", "/v1/responses/input_tokens", _tiny(1_000_000)),
    ("100,000 tiny messages (3.2 MB)", "/v1/responses", _tiny(100_000)),
    ("500,000 tiny messages (16 MB, under the byte limit)", "/v1/responses", _tiny(480_000)),
    ("100 MB of text in one message", "/v1/responses", _wide(1, 100 << 20)),
    ("2,048 messages of 7,900 chars (16 MB, every limit)", "/v1/responses", _wide(2048, 7900)),
    ("one message of 10 MB (the text limit)", "/v1/responses", _wide(1, 10 << 20)),
    ("2,048 messages (limit), /input_tokens", "/v1/responses/input_tokens", _wide(2048, 7900)),
]


def _poll(port: int, stop, out) -> None:
    """In its own process (the client sending the body must not be what is measured): GET
    /healthz every `POLL_S` until `stop` is set; puts the longest wait."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    worst = 0.0
    while not stop.is_set():
        t0 = time.perf_counter()
        conn.request("GET", "/healthz")
        conn.getresponse().read()
        worst = max(worst, time.perf_counter() - t0)
        time.sleep(POLL_S)
    out.put(worst)


async def _send(port: int, path: str, body: bytes) -> tuple[int | str, float]:
    """(status, seconds for the reply). A body refused from its Content-Length is answered while
    the client still sends it: the client may then see its connection closed ("closed") before
    it reads the 413."""
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=300) as h:
        t0 = time.perf_counter()
        try:
            status: int | str = (await h.post(path, content=body, headers={"content-type": "application/json"})
                                 ).status_code
        except httpx.TransportError:
            status = "closed"
        return status, time.perf_counter() - t0


def _case(port: int, path: str, body: bytes) -> tuple[int | str, float, float]:
    """(status, seconds for the reply, longest /healthz wait in seconds)."""
    stop, out = multiprocessing.Event(), multiprocessing.Queue()
    poller = multiprocessing.Process(target=_poll, args=(port, stop, out), daemon=True)
    poller.start()
    time.sleep(0.3)
    status, took = asyncio.run(_send(port, path, body))
    time.sleep(0.2)
    stop.set()
    worst = out.get(timeout=60)
    poller.join(10)
    return status, took, worst


def run(kind: str, logs: Path) -> list[dict]:
    mock_port = loadgen.free_port()
    mock = loadgen.Server("mock", [sys.executable, "-m", "branchwise.testing.mock_upstream", "--host", "127.0.0.1",
                                   "--port", str(mock_port), "--no-request-log"], mock_port, logs, cwd=str(logs))
    mock.start()
    rows = []
    try:
        for name, path, body in CASES:
            url = _fresh(kind, "branchwise_hostile")
            port = loadgen.free_port()
            (logs / "none.toml").write_text("")
            bw = loadgen.Server(f"branchwise-{kind}", [sys.executable, "-m", "branchwise", "serve", "--host",
                                                       "127.0.0.1", "--port", str(port)], port, logs, cwd=str(logs),
                                env={"BRANCHWISE_DATABASE_URL": url, "BRANCHWISE_CONFIG": str(logs / "none.toml"),
                                     "BRANCHWISE_UPSTREAM_BASE_URL": f"http://127.0.0.1:{mock_port}/v1"})
            bw.start()
            try:
                before = loadgen.rss_kib(bw.pids(), "VmHWM")
                status, took, stall = _case(port, path, body)
                peak = loadgen.rss_kib(bw.pids(), "VmHWM")
            finally:
                bw.stop()
            rows.append({"db": kind, "case": name, "status": status, "s": took, "stall_ms": stall * 1000,
                         "rss_mib": peak / 1024, "rss_added_mib": (peak - before) / 1024})
            print(f"| {kind} | {name} | {status} | {took:.2f} s | {stall * 1000:.0f} ms | "
                  f"{peak / 1024:.0f} MiB (+{(peak - before) / 1024:.0f}) |", flush=True)
    finally:
        mock.stop()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", choices=["sqlite", "postgresql"])
    args = ap.parse_args()
    print("| db | body | status | reply | longest /healthz wait | server peak RSS |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("sqlite", "postgresql"):
            if args.only in (None, kind):
                run(kind, Path(tmp))


if __name__ == "__main__":
    main()
