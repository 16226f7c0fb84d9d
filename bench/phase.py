"""`python -m bench.phase [--db sqlite|postgresql] [-c 64] [--repeat 3] [--duration 5]`: one
closed-loop load phase, repeated, against a fresh branchwise and the mock, with the mock measured
directly at the same concurrency before each repetition. For A/B comparisons of one figure
(the full `python -m bench` takes minutes); prints one line per repetition:
responses/s, branchwise p50/p99, mock p99, added p99 and CPU per response of each process.
`--log-cost` runs section (i) of `python -m bench` alone (the request log's cost at c=1).
`--workers N` and `--env K=V` go to `branchwise serve`; `--src DIR` serves the package in another
checkout's `src/` (e.g. a `git worktree` of the commit to compare against). `--trace` times each
response's steps and each grouped statement inside the server (`bench/trace/`) and prints what
`bench/trace_report.py` makes of it once the server stops. `--websocket` runs the WebSocket
against SSE turns of `bench/websocket.py` instead.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from bench import load, loadgen, trace_report, websocket
from bench.__main__ import RESULTS, _fresh, _settle


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.phase")
    ap.add_argument("--db", choices=["sqlite", "postgresql"], default="sqlite")
    ap.add_argument("-c", "--concurrency", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--rate", type=float, default=None,
                    help="a fixed-rate (open-loop) phase at this many responses/s over -c connections instead")
    ap.add_argument("--streams", type=int, default=0,
                    help="a streaming phase of this many stored streams (4 at a time) instead, and the mock's own")
    ap.add_argument("--websocket", action="store_true",
                    help="the WebSocket-against-SSE turns at concurrency 1 instead (bench/websocket.py)")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--env", action="append", default=[], help="K=V for branchwise serve")
    ap.add_argument("--src", default=None,
                    help="serve the branchwise package found in this directory (another checkout's src/)")
    ap.add_argument("--trace", action="store_true",
                    help="time each response's steps and each grouped statement in the server; report at the end")
    ap.add_argument("--log-cost", action="store_true",
                    help="section (i) alone: added p50 at c=1 of the request log (two SQLite servers, "
                         "--log-level info vs warning, --repeat phases each)")
    args = ap.parse_args()
    RESULTS.mkdir(exist_ok=True)
    if args.log_cost:
        return _log_cost_only(args)
    logs = Path(tempfile.mkdtemp(prefix="branchwise-phase-"))
    mock_port = loadgen.free_port()
    mock = loadgen.Server("mock", [sys.executable, "-m", "branchwise.testing.mock_upstream", "--host", "127.0.0.1",
                                   "--port", str(mock_port), "--no-request-log"], mock_port, logs, cwd=str(logs))
    url = _fresh(args.db, "branchwise_bench_phase")
    _settle(1.0)
    port = loadgen.free_port()
    venv_bin = Path(sys.executable).parent
    (logs / "none.toml").write_text("")
    env = {"BRANCHWISE_DATABASE_URL": url, "BRANCHWISE_UPSTREAM_BASE_URL": f"http://127.0.0.1:{mock_port}/v1",
           "BRANCHWISE_CONFIG": str(logs / "none.toml")}
    env.update(kv.split("=", 1) for kv in args.env)
    if args.src:
        env["PYTHONPATH"] = str(Path(args.src).resolve())
    traces = logs / "traces"
    if args.trace:
        traces.mkdir()
        env["BRANCHWISE_BENCH_TRACE"] = str(traces)
        # (in front of --src's, or else the caller's: the server must run the same package)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(Path(__file__).parent / "trace"),
                                                        env.get("PYTHONPATH", os.environ.get("PYTHONPATH"))) if p)
    bw = loadgen.Server("branchwise", [str(venv_bin / "branchwise"), "serve", "--host", "127.0.0.1", "--port",
                                       str(port), "--workers", str(args.workers)], port, logs, cwd=str(logs), env=env)
    c = args.concurrency
    try:
        mock.start()
        bw.start()

        async def go() -> None:
            setup = await loadgen.Conn.open(load.HOST, port)
            try:
                convs = await load.create_conversations(setup, c)
            finally:
                setup.close()
            meter = load._meter({"branchwise": bw, "mock": mock})
            for i in range(args.repeat):
                if args.websocket:
                    w = await websocket.compare(port)
                    print(f"[{args.db} websocket #{i + 1}] {w['turns']} turns each | SSE p50 {w['sse']['p50_ms']:.2f} "
                          f"p90 {w['sse']['p90_ms']:.2f} | WebSocket p50 {w['websocket']['p50_ms']:.2f} p90 "
                          f"{w['websocket']['p90_ms']:.2f} | added p50 {w['added_p50_ms']:.2f} p90 "
                          f"{w['added_p90_ms']:.2f} | client cpu ms/turn SSE {w['client_cpu_ms_per_turn']['sse']:.3f} "
                          f"WebSocket {w['client_cpu_ms_per_turn']['websocket']:.3f}", flush=True)
                    continue
                if args.streams:
                    d = await load.streams(mock_port, args.streams, None)
                    b = await load.streams(port, args.streams, convs[:load.STREAM_CONCURRENCY])
                    print(f"[{args.db} {args.streams} streams #{i + 1}] first event p50 {b['first_event_p50_ms']:.2f} "
                          f"(mock {d['first_event_p50_ms']:.2f}) gap p50 {b['gap_p50_ms']:.2f} p99 {b['gap_p99_ms']:.2f} "
                          f"max {b['gap_max_ms']:.2f} (mock p99 {d['gap_p99_ms']:.2f} max {d['gap_max_ms']:.2f}) | added "
                          f"first event {b['first_event_p50_ms'] - d['first_event_p50_ms']:.2f} gap p99 "
                          f"{b['gap_p99_ms'] - d['gap_p99_ms']:.2f}", flush=True)
                    continue
                if args.rate:
                    r = await load.fixed_rate(port, [load._BranchwiseWorker(conv) for conv in convs], args.rate,
                                              args.warmup, args.duration, meter)
                    print(f"[{args.db} {args.rate:g}/s over {c} #{i + 1}] {r['rps']:,.0f}/s p50 {r['p50_ms']:.2f} "
                          f"p90 {r['p90_ms']:.2f} p99 {r['p99_ms']:.2f} max {r['max_ms']:.1f} | branchwise CPU "
                          f"{r['branchwise_cpu_pct']:.0f}% busy {r['machine_busy_pct']:.0f}% errors {r['errors']} | cpu ms/resp "
                          + " ".join(f"{k} {v:.3f}" for k, v in r["cpu_ms_per_req"].items() if "thread" not in k),
                          flush=True)
                    continue
                d = await load.closed_loop(mock_port, [load._DirectWorker() for _ in range(c)], 0.5,
                                           min(args.duration, 2.0), load._meter({"mock": mock}))
                r = await load.closed_loop(port, [load._BranchwiseWorker(conv) for conv in convs], args.warmup,
                                           args.duration, meter, server_pids=bw.pids)
                cpu = r["cpu_ms_per_req"]
                print(f"[{args.db} c={c} #{i + 1}] {r['rps']:,.0f}/s p50 {r['p50_ms']:.2f} p99 {r['p99_ms']:.2f} "
                      f"max {r['max_ms']:.1f} | mock p50 {d['p50_ms']:.2f} p99 {d['p99_ms']:.2f} | added p99 "
                      f"{r['p99_ms'] - d['p99_ms']:.2f} | cpu ms/resp bw {cpu['branchwise']:.3f} mock "
                      f"{cpu['mock']:.3f} pg {cpu.get('postgres', 0):.3f} client {cpu['client']:.3f} "
                      f"other {cpu['other']:.3f} | busy {r['machine_busy_pct']:.0f}% errors {r['errors']}",
                      flush=True)

        loadgen.run(go())
    finally:
        bw.stop()
        mock.stop()
    for path in sorted(traces.glob("trace-*.json")) if args.trace else ():
        print(f"\n[trace of server process {path.stem.split('-')[1]}]\n{trace_report.report(str(path))}")
    return 0


def _log_cost_only(args) -> int:
    from bench.__main__ import _log_cost, md_log_cost

    logs = Path(tempfile.mkdtemp(prefix="branchwise-phase-"))
    mock_port = loadgen.free_port()
    mock = loadgen.Server("mock", [sys.executable, "-m", "branchwise.testing.mock_upstream", "--host", "127.0.0.1",
                                   "--port", str(mock_port), "--no-request-log"], mock_port, logs, cwd=str(logs))
    out: dict = {}
    servers: list = []
    try:
        mock.start()
        _log_cost(args.workers, out, servers, logs, mock, args.warmup, args.duration, args.repeat)
    finally:
        for s in servers:
            s.stop()
        mock.stop()
    print(md_log_cost(out["log_cost"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
