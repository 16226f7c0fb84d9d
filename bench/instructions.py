"""`python -m bench.instructions [--requests N] [--only sqlite|postgresql]`: CPU instructions
branchwise executes per stored response, counted by valgrind's callgrind.

Timings on a shared 2-core machine swing by 2x from one minute to the next; an instruction
count does not (the same count to 0.3% run after run), so this is the number to compare two
versions of the hot path by. It counts branchwise's own process only, in user space: not the
kernel's work for its syscalls, not PostgreSQL, not the mock. The workload is the load
benchmark's: stored, non-streaming responses on 20-item conversations, 4 connections, the head
moved back to the seed every 4 turns. The server runs under callgrind with instrumentation off
until the warm-up is done, then counts `--requests` responses.
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import load, loadgen
from bench.loadgen import Conn

CONNECTIONS = 4
WARMUP = 200


async def _drive(port: int, convs: list[tuple[str, str]], n: int) -> None:
    async def one(conv):
        conn = await Conn.open(load.HOST, port)
        worker = load._BranchwiseWorker(conv)
        try:
            for _ in range(n // len(convs)):
                r, ok = await worker.step(conn)
                if not ok:
                    raise RuntimeError(f"a response failed: {r.status} {r.body[:300]!r}")
        finally:
            conn.close()

    await asyncio.gather(*(one(c) for c in convs))


def _total_ir(files: list[str]) -> int:
    total = 0
    for name in files:
        with open(name) as f:
            for line in f:
                if line.startswith(("summary:", "totals:")):
                    total = max(total, int(line.split()[1]))
    return total


def measure(kind: str, url: str, mock_port: int, logs: Path, requests: int, log_level: str = "info") -> dict:
    (logs / "none.toml").write_text("")
    port = loadgen.free_port()
    # the venv's own python (not the file it links to), so that the venv's packages load
    python = str(Path(sys.executable).parent / "python3")
    argv = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={logs}/callgrind.{kind}.%p",
            python, "-m", "branchwise", "serve", "--host", load.HOST, "--port", str(port), "--log-level", log_level]
    server = loadgen.Server(f"branchwise-{kind}-callgrind", argv, port, logs, cwd=str(logs), env={
        "BRANCHWISE_DATABASE_URL": url, "BRANCHWISE_UPSTREAM_BASE_URL": f"http://127.0.0.1:{mock_port}/v1",
        "BRANCHWISE_CONFIG": str(logs / "none.toml")})
    server.start(timeout=600)
    try:
        async def run() -> float:
            setup = await Conn.open(load.HOST, port)
            try:
                convs = await load.create_conversations(setup, CONNECTIONS)
            finally:
                setup.close()
            await _drive(port, convs, WARMUP)
            subprocess.run(["callgrind_control", "--instr=on", str(server.pid)], check=True, capture_output=True)
            t0 = time.monotonic()
            await _drive(port, convs, requests)
            took = time.monotonic() - t0
            subprocess.run(["callgrind_control", "--dump", str(server.pid)], check=True, capture_output=True)
            return took

        took = loadgen.run(run())
    finally:
        server.stop()
    files = sorted(glob.glob(f"{logs}/callgrind.{kind}.*"))
    total = _total_ir(files)
    n = requests // CONNECTIONS * CONNECTIONS
    return {"db": kind, "responses": n, "instructions": total, "per_response_M": total / n / 1e6,
            "seconds_under_callgrind": round(took, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=800)
    ap.add_argument("--only", choices=["sqlite", "postgresql"])
    ap.add_argument("--log-level", default="info", help="the server's (info, the default: a line per request)")
    args = ap.parse_args()
    for tool in ("valgrind", "callgrind_control"):
        if shutil.which(tool) is None:
            print(f"{tool} is not installed (Debian: apt-get install valgrind)", file=sys.stderr)
            return 2
    from bench.__main__ import _fresh

    logs = Path(tempfile.mkdtemp(prefix="branchwise-instr-"))
    mock_port = loadgen.free_port()
    mock = loadgen.Server("mock", [sys.executable, "-m", "branchwise.testing.mock_upstream", "--host", load.HOST,
                                   "--port", str(mock_port), "--no-request-log"], mock_port, logs, cwd=str(logs))
    mock.start()
    rows = []
    try:
        for kind in ("sqlite", "postgresql"):
            if args.only in (None, kind):
                rows.append(measure(kind, _fresh(kind, "branchwise_bench_instr"), mock_port, logs, args.requests,
                                    args.log_level))
    finally:
        mock.stop()
    print("| db | responses counted | instructions per stored response |\n|---|---:|---:|")
    for r in rows:
        print(f"| {r['db']} | {r['responses']:,} | {r['per_response_M']:.3f} M |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
