"""`python -m bench [--quick | --smoke] [--only sqlite|postgresql] [--server-workers N] [--profile]
[--results DIR]`: run the benchmarks, print markdown tables, write latest.md and latest.json (in
bench/results, or DIR), and check the budgets (exit status 1 when one is missed; everything is
printed either way). `--smoke` is the test suite's check that every section and budget figure
is produced, in phases too short to time anything.

Sections: (a) added latency and (b) throughput of stored responses, (c) streaming, (d) tree
operations (bench/tree_ops.py, in-process), (e) parallel branches, (f) server memory, (g)
WebSocket mode against SSE (bench/websocket.py), (h) the embedded model's batched decoding and
prefix reuse against llama.cpp's own rate (bench/embedded.py; `--skip-embedded` leaves it out),
(i) the request log's cost at concurrency 1, (j) what API keys, their limits and Idempotency-Key
add (bench/teams.py), (k) on PostgreSQL, a stream resumed on other instances of the same
database (bench/resume.py).
The load sections run branchwise and the mock upstream in their own processes on 127.0.0.1
and drive them from this process
(bench/loadgen.py); see bench/load.py for what each one does.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import json
import math
import os
import platform
import secrets
import signal
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

from bench import embedded, load, loadgen, resume, teams, tree_ops, websocket

RESULTS = Path(__file__).parent / "results"
PG_URL = os.environ.get("BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
RUN_TIMEOUT_S = 300  # one database's load sections; a hung server fails that run, not the whole bench
# Databases are named per run (pid and a random suffix): two runs at once, from two checkouts or
# a test suite beside a benchmark, would otherwise drop each other's database mid-run. Each run
# removes its own at exit.
RUN_ID = f"{os.getpid()}_{secrets.token_hex(3)}"
_made: list[tuple[str, str]] = []  # (kind, url) made by this run


async def _pg_admin(url: str, *statements: str) -> None:
    from sqlalchemy import text

    from branchwise.store.connect import create_engine

    engine = create_engine(url)
    try:
        async with engine.connect() as conn:
            conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
            for sql in statements:
                await conn.execute(text(sql))
    finally:
        await engine.dispose()


async def _pg_fresh(url: str, name: str) -> str:
    await _pg_admin(url, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)", f"CREATE DATABASE {name}")
    return url.rsplit("/", 1)[0] + "/" + name


def _sqlite_fresh(name: str) -> str:
    RESULTS.mkdir(parents=True, exist_ok=True)  # (git keeps no bench/results/ in a fresh clone)
    db = RESULTS / name
    for suffix in ("", "-wal", "-shm"):
        Path(str(db) + suffix).unlink(missing_ok=True)
    return f"sqlite:///{db}"


def _fresh(kind: str, name: str) -> str:
    """A new, empty database for `name` (e.g. "branchwise_bench_load"), unique to this run."""
    name = f"{name}_{RUN_ID}"
    url = _sqlite_fresh(name + ".db") if kind == "sqlite" else asyncio.run(_pg_fresh(PG_URL, name))
    if not _made:
        atexit.register(_drop_made)
    _made.append((kind, url))
    return url


def _drop_made() -> None:
    """Removes the databases this run made (its servers are stopped by now)."""
    for kind, url in _made:
        try:
            if kind == "sqlite":
                for suffix in ("", "-wal", "-shm", ".branchwise-lock"):
                    Path(url.removeprefix("sqlite:///") + suffix).unlink(missing_ok=True)
            else:
                asyncio.run(_pg_admin(PG_URL, f"DROP DATABASE IF EXISTS {url.rsplit('/', 1)[1]} WITH (FORCE)"))
        except Exception as e:  # a leftover database is worth a line, not a traceback
            print(f"could not remove {url}: {type(e).__name__}: {e}", file=sys.stderr)
    _made.clear()


def _f(x: float, nd: int = 2) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:,.{nd}f}"


# --------------------------------------------------------------------------- tables


def _table(title: str, head: list[str], rows: list[list[str]], note: str = "") -> str:
    lines = [f"### {title}", ""]
    if note:
        lines += [note, ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _added(load_res: dict, direct: dict) -> dict:
    out = {}
    for c in load.ADDED_AT:
        b, d = load_res["sweep"][c], direct[c]
        out[c] = {"p50_ms": b["p50_ms"] - d["p50_ms"], "p99_ms": b["p99_ms"] - d["p99_ms"]}
    return out


def _best(sweep: dict) -> dict | None:
    ok = [r for r in sweep.values() if r["p99_ms"] < load.P99_LIMIT_MS and not r["errors"]]
    return max(ok, key=lambda r: r["rps"]) if ok else None


def md_client(client: dict, direct: dict, runs: list[dict]) -> str:
    rows = [[f"canned server, c={c}", _f(r["rps"], 0), _f(r["p50_ms"], 3), _f(r["p99_ms"], 3),
             _f(r["cpu_ms_per_req"]["client"], 3), _f(r["client_cpu_pct"], 0)] for c, r in client.items()]
    rows += [[f"mock direct, c={c}", _f(r["rps"], 0), _f(r["p50_ms"], 3), _f(r["p99_ms"], 3),
              _f(r["cpu_ms_per_req"]["client"], 3), _f(r["client_cpu_pct"], 0)] for c, r in direct.items()]
    for run in runs:
        r = run["load"]["sweep"][32]
        rows.append([f"branchwise ({run['db']}), c=32", _f(r["rps"], 0), _f(r["p50_ms"], 3), _f(r["p99_ms"], 3),
                     _f(r["cpu_ms_per_req"]["client"], 3), _f(r["client_cpu_pct"], 0)])
    note = ("The load client (raw asyncio + httptools on uvloop, one keep-alive connection per worker) "
            "against a server that answers canned bytes, against the mock directly, and its own CPU "
            "while it drives branchwise. `client CPU %` is of one core.")
    return _table("Load client check", ["target", "req/s", "p50 ms", "p99 ms", "client CPU ms/req",
                                       "client CPU %"], rows, note)


def md_added(runs: list[dict]) -> str:
    rows = []
    for run in runs:
        for c in load.ADDED_AT:
            b, d, a = run["load"]["sweep"][c], run["load"]["direct"][c], run["added"][c]
            rows.append([run["db"], str(c), _f(b["p50_ms"]), _f(b["p99_ms"]), _f(d["p50_ms"]), _f(d["p99_ms"]),
                         _f(a["p50_ms"]), _f(a["p99_ms"]), str(b["errors"])])
    note = (f"Stored, non-streaming `POST /v1/responses` on a {load.SEED_ITEMS}-item conversation (one per "
            f"connection, head moved back every {load.RESET_EVERY} turns, untimed) vs the same chat call "
            "straight to the mock, measured right before each branchwise phase. Added = branchwise "
            "percentile - direct percentile.")
    return _table("(a) Added latency, ms", ["db", "concurrency", "branchwise p50", "branchwise p99",
                                           "mock p50", "mock p99", "added p50", "added p99", "errors"], rows, note)


def md_sweep(runs: list[dict]) -> str:
    rows, cpu_rows = [], []
    for run in runs:
        for c, r in run["load"]["sweep"].items():
            rows.append([run["db"], str(c), _f(r["rps"], 0), _f(r["p50_ms"]), _f(r["p90_ms"]), _f(r["p99_ms"]),
                         "yes" if r["p99_ms"] < load.P99_LIMIT_MS else "no", str(r["errors"]),
                         _f(r.get("reset_p50_ms", math.nan))])
            cpu = r["cpu_ms_per_req"]
            cpu_rows.append([run["db"], str(c), _f(cpu["branchwise"]), _f(cpu["branchwise_main_thread"]),
                             _f(cpu["branchwise_other_threads"]), _f(cpu["mock"]), _f(cpu["postgres"]),
                             _f(cpu["client"]), _f(cpu["other"]), _f(r["machine_busy_pct"], 0),
                             _f(r["threads_in_busy_sleep"], 1)])
    out = [_table("(b) Throughput: stored responses per second (closed loop)",
                  ["db", "concurrency", "responses/s", "p50 ms", "p90 ms", "p99 ms", "p99 < 50 ms", "errors",
                   "untimed head reset p50 ms"], rows)]
    rows = []
    for run in runs:
        for rate, r in run["load"]["rate"].items():
            rows.append([run["db"], _f(rate, 0), _f(r["rps"], 0), _f(r["p50_ms"]), _f(r["p90_ms"]), _f(r["p99_ms"]),
                         "yes" if r["p99_ms"] < load.P99_LIMIT_MS else "no", str(r["errors"]),
                         _f(r["branchwise_cpu_pct"], 0), _f(r["machine_busy_pct"], 0)])
    out.append(_table(
        f"(b) Fixed rate: stored responses/s offered over {load.RATE_CONNECTIONS} connections (open loop)",
        ["db", "offered/s", "done/s", "p50 ms", "p90 ms", "p99 ms", "p99 < 50 ms", "errors", "branchwise CPU %",
         "machine busy %"], rows,
        "A request falls due every 1/rate s and goes out on the next free connection; latency counts from when "
        "it fell due, so waiting for a connection counts. Phases stop once p99 passes 200 ms."))
    rows = []
    for run in runs:
        best, c32 = run["best"], run["load"]["sweep"][32]
        rows.append([run["db"], _f(best["rps"], 0) if best else "none", str(best["concurrency"]) if best else "-",
                     _f(best["p99_ms"]) if best else "-", _f(c32["rps"], 0), _f(c32["p99_ms"])])
    out.append(_table("(b) Best throughput with p99 < 50 ms",
                      ["db", "best responses/s", "at concurrency", "its p99 ms", "c=32 responses/s", "c=32 p99 ms"],
                      rows))
    out.append(_table(
        "(b) Where the CPU goes, ms per stored response",
        ["db", "concurrency", "branchwise", "its event-loop thread", "its other threads", "mock", "postgres", "client",
         "other", "machine busy %", "server threads in SQLite busy sleep"], cpu_rows,
        "user+system CPU of each process over the measured window, per counted response (the head resets "
        "are in it). Other threads: the SQLite writer thread (checkpoints, contended writes). Other: the machine's busy time outside "
        "these processes (kernel, anything else running). Busy sleep: average number of server threads "
        "inside clock_nanosleep, i.e. SQLite's busy handler waiting for the write lock (sampled every 20 ms)."))
    return "\n\n".join(out)


def md_profile(runs: list[dict]) -> str:
    out = []
    for run in runs:
        p = run["load"].get("profile")
        if not p:
            continue
        if "summary" not in p:
            out.append(f"### Profile ({run['db']})\n\n{p.get('error', 'no profile written')}")
            continue
        s = p["summary"]
        rows = [[k, f"{v:.1f}"] for k, v in s["by_library_pct"].items()]
        rows += [[f"*incl.* {k}", f"{v:.1f}"] for k, v in s["spans_pct"].items()]
        rows += [[f"*self* `{k}`", f"{v:.1f}"] for k, v in list(s["top_self_pct"].items())[:10]]
        out.append(_table(f"Profile ({run['db']}, concurrency 32, py-spy --gil)", ["where", "% of samples"], rows,
                          f"{s['samples']} samples of the thread holding the GIL; flame graph: {p['files']['flamegraph']}; "
                          f"{_f(p['rps_while_profiled'], 0)} responses/s while profiled."))
    return "\n\n".join(out)


def md_streaming(runs: list[dict]) -> str:
    rows = []
    for run in runs:
        d = run["load"]["direct_streaming"]
        rows.append([f"mock direct (before {run['db']})", "-", _f(d["first_event_p50_ms"]), _f(d["first_delta_p50_ms"]),
                     _f(d["gap_p50_ms"]), _f(d["gap_p99_ms"]), _f(d["gap_max_ms"]), "-", "-"])
        s, a = run["load"]["streaming"], run["stream_added"]
        rows.append([f"branchwise ({run['db']})", str(s["streams"]), _f(s["first_event_p50_ms"]),
                     _f(s["first_delta_p50_ms"]), _f(s["gap_p50_ms"]), _f(s["gap_p99_ms"]), _f(s["gap_max_ms"]),
                     _f(a["first_event_p50_ms"]), _f(a["gap_p99_ms"])])
    note = (f"Stored streaming responses, {load.STREAM_CONCURRENCY} at a time, mock chunk every "
            f"{int(load.STREAM_CHUNK_DELAY * 1000)} ms, {load.STREAM_WORDS} words. First event: "
            "branchwise's first SSE event vs the mock's first chunk; first delta: first `output_text.delta` "
            "vs the mock's first content chunk; gaps: between consecutive deltas / content chunks.")
    return _table("(c) Streaming, ms", ["through", "streams", "first event p50", "first delta p50", "gap p50",
                                       "gap p99", "gap max", "added first event p50", "added gap p99"], rows, note)


def md_branch(runs: list[dict]) -> str:
    rows = []
    for run in runs:
        b = run["load"]["branch"]
        rows.append([run["db"], str(b["repeat"]), _f(b["one_conversation_median_ms"], 1),
                     _f(b["separate_median_ms"], 1), f"{b['ratio']:.2f}x"])
    note = (f"{load.BRANCH_N} stored `concurrency: branch` responses sent at once, mock delay "
            f"{int(load.BRANCH_DELAY * 1000)} ms each; wall time of the batch, median of the runs.")
    return _table("(e) Parallel branches", ["db", "runs", "16 on one conversation ms", "16 on separate ms",
                                           "ratio"], rows, note)


def md_websocket(runs: list[dict]) -> str:
    rows = []
    for run in runs:
        w = run["load"]["websocket"]
        cpu = w["client_cpu_ms_per_turn"]
        for name, key in (("SSE", "sse"), ("WebSocket", "websocket")):
            rows.append([run["db"], name, str(w["turns"]), _f(w[key]["p50_ms"]), _f(w[key]["p90_ms"]),
                         _f(w[key]["p99_ms"]), _f(cpu[key], 3)])
        rows.append([run["db"], "WebSocket - SSE", "-", _f(w["added_p50_ms"]), _f(w["added_p90_ms"]), "-", "-"])
    note = (f"Stored responses, each continuing the one before by previous_response_id (a new chain every "
            f"{websocket.CHAIN} turns), one client: POST with `stream: true` on a keep-alive connection, read to the "
            "end of the stream, against `response.create` on one WebSocket, read to `response.completed`; rounds "
            "of each alternate. Client CPU: the load client's own, per turn (its WebSocket frames are read in "
            "Python, its HTTP in C).")
    return _table("(g) WebSocket mode against SSE, concurrency 1, ms per turn",
                  ["db", "transport", "turns", "p50", "p90", "p99", "client CPU ms/turn"], rows, note)


def md_memory(runs: list[dict]) -> str:
    rows = [[run["db"], _f(run["load"]["rss_kib"]["idle"] / 1024, 1), _f(run["load"]["rss_kib"]["peak"] / 1024, 1),
             _f(run["load"]["rss_kib"]["end"] / 1024, 1)] for run in runs]
    return _table("(f) branchwise memory (VmRSS, MiB)", ["db", "idle", "peak under load", "end of load"], rows,
                  "Summed over the server's process tree (supervisor and workers with --server-workers).")


def md_teams(runs: list[dict]) -> str:
    rows = []
    for run in runs:
        for phase, by_c in run["load"]["teams"].items():
            a = run["teams"][phase]
            rows.append([run["db"], phase, _f(by_c[1]["p50_ms"]), _f(a["added_p50_ms"]), _f(by_c[32]["rps"], 0),
                         f"{100 * a['throughput_ratio']:.0f}%", str(by_c[1]["errors"] + by_c[32]["errors"])])
    note = ("The (a)/(b) workload on one server, phase after phase: no key at all; a key (a hash and a lookup "
            "per request, the project in every statement); a key with limits far above the load (a counter "
            "upsert and a concurrency slot per response, in the database); a key and a new Idempotency-Key on "
            "every request (a claim before, the reply kept after). Added: p50 over the no-key phase's.")
    return _table("(j) API keys, limits and Idempotency-Key", ["db", "phase", "c=1 p50 ms", "added p50 ms",
                                                              "c=32 responses/s", "of no key", "errors"], rows, note)


# --------------------------------------------------------------------------- budgets


def budgets(runs: list[dict], tree_runs: list[dict]) -> list[tuple[str, bool, str]]:
    checks = []
    for run in runs:
        db, a = run["db"], run["added"]
        if db == "sqlite":
            checks.append((f"[{db}] added latency c=1 p50 <= 2 ms", a[1]["p50_ms"] <= 2, f"{_f(a[1]['p50_ms'])} ms"))
            checks.append((f"[{db}] added latency c=1 p99 <= 8 ms", a[1]["p99_ms"] <= 8, f"{_f(a[1]['p99_ms'])} ms"))
            r600 = run["load"]["rate"].get(600)
            ok = bool(r600) and r600["rps"] >= 0.98 * 600 and r600["p99_ms"] < 50 and not r600["errors"]
            checks.append((f"[{db}] >= 600 responses/s over 32 connections with p99 < 50 ms", ok,
                           f"{_f(r600['rps'], 0)}/s, p99 {_f(r600['p99_ms'])} ms" if r600 else "not run"))
        checks.append((f"[{db}] added latency c=64 p99 <= 30 ms", a[64]["p99_ms"] <= 30, f"{_f(a[64]['p99_ms'])} ms"))
        s = run["stream_added"]
        checks.append((f"[{db}] streaming: added time to first event p50 <= 5 ms", s["first_event_p50_ms"] <= 5,
                       f"{_f(s['first_event_p50_ms'])} ms"))
        checks.append((f"[{db}] streaming: added inter-chunk gap p99 <= 2 ms", s["gap_p99_ms"] <= 2,
                       f"{_f(s['gap_p99_ms'])} ms"))
        k = run["teams"]["key"]
        checks.append((f"[{db}] API key: added p50 at c=1 < 1 ms", k["added_p50_ms"] < 1,
                       f"{_f(k['added_p50_ms'])} ms"))
        checks.append((f"[{db}] API key: throughput at c=32 within 10% of no key", k["throughput_ratio"] >= 0.9,
                       f"{100 * k['throughput_ratio']:.0f}%"))
        r = run["load"]["branch"]["ratio"]
        checks.append((f"[{db}] 16 branches on one conversation <= 1.2x 16 on separate", r <= 1.2, f"{r:.2f}x"))
        w = run["load"]["websocket"]["added_p50_ms"]
        checks.append((f"[{db}] WebSocket turn p50 <= SSE turn p50 + 1 ms (c=1)", w <= 1, f"{_f(w)} ms"))
        if db == "postgresql":
            name, ok, got = resume.budget(run["load"]["resume"])
            checks.append((f"[{db}] {name}", ok, got))
    for res in tree_runs:
        checks += [(f"[{res['db']}] {name}", ok, got) for name, ok, got in tree_ops.budget(res)]
    return checks


# --------------------------------------------------------------------------- main


def _machine() -> dict:
    return {"cpus": os.cpu_count(), "python": sys.version.split()[0], "platform": platform.platform(),
            "sqlite": sqlite3.sqlite_version}


def _busy_now(seconds: float = 1.0) -> float:
    """How busy the machine is (percent of all CPUs) over `seconds`, before anything starts."""
    b0, t0 = loadgen.machine_ticks()
    time.sleep(seconds)
    b1, t1 = loadgen.machine_ticks()
    return 100 * (b1 - b0) / max(1, t1 - t0)


def _run_db(kind: str, args, out: dict, runs: list, servers: list, logs: Path, mock: loadgen.Server, repeat: int,
            warmup: float, duration: float, n_streams: int, branch_repeat: int, resume_rounds: int) -> None:
    if not args.skip_tree_ops:
        print(f"[{kind}] tree operations ...", file=sys.stderr)
        out["tree_ops"].append(asyncio.run(tree_ops.run(_fresh(kind, "branchwise_bench"), repeat)))
    url = _fresh(kind, "branchwise_bench_load")
    _settle()
    venv_bin = Path(sys.executable).parent
    exe = [str(venv_bin / "branchwise")] if (venv_bin / "branchwise").exists() else [sys.executable, "-m", "branchwise"]
    (logs / "none.toml").write_text("")
    env = {"BRANCHWISE_DATABASE_URL": url, "BRANCHWISE_UPSTREAM_BASE_URL": f"http://127.0.0.1:{mock.port}/v1",
           "BRANCHWISE_CONFIG": str(logs / "none.toml")}

    def server(name: str, workers: int = 1, **extra: str) -> loadgen.Server:
        port = loadgen.free_port()
        s = loadgen.Server(name, [*exe, "serve", "--host", "127.0.0.1", "--port", str(port), "--workers",
                                  str(workers)], port, logs, cwd=str(logs), env={**env, **extra})
        servers.append(s)
        return s

    bw = server(f"branchwise-{kind}", args.server_workers)
    bw.start()
    print(f"[{kind}] load: sweep {load.SWEEP}, streams, branches ...", file=sys.stderr)
    try:
        res = loadgen.run(asyncio.wait_for(load.branchwise_load(
            bw, mock, warmup, duration, n_streams, branch_repeat,
            profile=RESULTS / f"profile-{kind}" if args.profile else None), RUN_TIMEOUT_S))
        if kind == "postgresql":  # (k): two more instances on the same database (before (j) makes keys)
            print(f"[{kind}] streams resumed on other instances ...", file=sys.stderr)
            b = server("branchwise-b").start()
            c = server("branchwise-c", BRANCHWISE_DB_POOL_SIZE=str(resume.POLLING_POOL_SIZE)).start()
            try:
                res["resume"] = loadgen.run(asyncio.wait_for(resume.compare(bw, b, c, resume_rounds), RUN_TIMEOUT_S))
            finally:
                b.stop()
                c.stop()
        print(f"[{kind}] teams: no key, key, key with limits, Idempotency-Key ...", file=sys.stderr)
        res["teams"] = loadgen.run(asyncio.wait_for(teams.teams_load(bw, mock, url, warmup, duration), RUN_TIMEOUT_S))
    except BaseException:
        print(f"branchwise log tail:\n{bw.tail()}", file=sys.stderr)
        raise
    finally:
        bw.stop()
    d, s = res["direct_streaming"], res["streaming"]
    run = {"db": kind, "load": res, "added": _added(res, res["direct"]), "best": _best(res["sweep"]),
           "teams": teams.added(res["teams"]),
           "stream_added": {"first_event_p50_ms": s["first_event_p50_ms"] - d["first_event_p50_ms"],
                            "first_delta_p50_ms": s["first_delta_p50_ms"] - d["first_delta_p50_ms"],
                            "gap_p99_ms": s["gap_p99_ms"] - d["gap_p99_ms"]}}
    runs.append(run)
    out["load"].append(run)


def _log_cost(workers: int, out: dict, servers: list, logs: Path, mock: loadgen.Server, warmup: float,
              duration: float, repeat: int) -> None:
    """(i): two servers on SQLite, alike but for the log level, at concurrency 1."""
    pair = {}
    for name, level in (("on", "info"), ("off", "warning")):
        pair[name] = _server(f"branchwise-log-{name}", _fresh("sqlite", f"branchwise_bench_log_{name}"), mock, logs,
                             workers, "--log-level", level)
        servers.append(pair[name])
        pair[name].start()
    print("[sqlite] request log cost at c=1 ...", file=sys.stderr)
    try:
        out["log_cost"] = loadgen.run(load.log_cost(pair["on"], pair["off"], warmup, duration, repeat))
    finally:
        for s in pair.values():
            s.stop()


def _server(name: str, url: str, mock: loadgen.Server, logs: Path, workers: int, *extra: str) -> loadgen.Server:
    port = loadgen.free_port()
    venv_bin = Path(sys.executable).parent
    exe = [str(venv_bin / "branchwise")] if (venv_bin / "branchwise").exists() else [sys.executable, "-m", "branchwise"]
    (logs / "none.toml").write_text("")
    return loadgen.Server(name, [*exe, "serve", "--host", "127.0.0.1", "--port", str(port), "--workers",
                                 str(workers), *extra], port, logs, cwd=str(logs), env={
        "BRANCHWISE_DATABASE_URL": url, "BRANCHWISE_UPSTREAM_BASE_URL": f"http://127.0.0.1:{mock.port}/v1",
        "BRANCHWISE_CONFIG": str(logs / "none.toml")})


def md_log_cost(res: dict) -> str:
    rows = [[_f(res["on_p50_ms"], 3), _f(res["off_p50_ms"], 3), _f(res["added_p50_ms"], 3), str(res["repeat"])]]
    return _table("(i) The request log's cost, SQLite, concurrency 1, ms",
                  ["p50, log on (info)", "p50, log off (warning)", "added p50", "phases each"], rows,
                  "Stored responses one at a time on two servers alike but for `--log-level`, phases alternated; "
                  "medians of the phases' p50s. Metrics are counted in both. Indicative on a shared machine.")


def _settle(seconds: float = 2.0) -> None:
    """Flush the page cache's dirty pages and pause: the previous section's writes (hundreds of
    MB) otherwise reach the disk during the next one and slow its fsyncs (PostgreSQL's commits,
    SQLite's checkpoints)."""
    os.sync()
    time.sleep(seconds)


def _sigterm(*_):
    raise KeyboardInterrupt("SIGTERM")  # run the finally blocks: every server is stopped


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m bench")
    ap.add_argument("--quick", action="store_true", help="shorter phases, fewer repetitions (about 1-2 min)")
    ap.add_argument("--only", choices=["sqlite", "postgresql"], default=None)
    ap.add_argument("--server-workers", type=int, default=1, help="passed to `branchwise serve --workers N`")
    ap.add_argument("--profile", action="store_true",
                    help="also run one concurrency-32 phase under py-spy (bench/results/profile-<db>.svg/.txt)")
    ap.add_argument("--skip-tree-ops", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--skip-embedded", action="store_true", help="leave out (g), the embedded model (minutes)")
    ap.add_argument("--smoke", action="store_true",
                    help="every section and budget check, in phases too short to mean anything (the test "
                         "suite's check that the benchmark runs; about a minute)")
    ap.add_argument("--results", default=None, help="write latest.md and latest.json here (default bench/results)")
    args = ap.parse_args()
    global RESULTS
    if args.results:
        RESULTS = Path(args.results)
    RESULTS.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    quick = args.quick
    repeat = 10 if quick else 30
    warmup, duration = (0.5, 1.5) if quick else (1.0, 5.0)
    n_streams = 8 if quick else 32
    branch_repeat = 3 if quick else 7
    resume_rounds = 3 if quick else 10
    if args.smoke:  # the concurrencies and sizes the tables and budgets read, each once, briefly
        load.SWEEP, load.DIRECT, load.RATES = (1, 16, 32, 64), (1, 16, 32, 64), (600,)
        tree_ops.SIZES = (10, 10000)
        websocket.ROUNDS, websocket.TURNS = 1, 4
        repeat, warmup, duration, n_streams, branch_repeat, resume_rounds = 3, 0.2, 0.5, 4, 1, 1
    kinds = [k for k in ("sqlite", "postgresql") if args.only in (None, k)]
    out: dict = {"machine": _machine(),
                 "config": {"quick": quick, "smoke": args.smoke, "warmup_s": warmup, "phase_s": duration, "server_workers": args.server_workers,
                            "seed_items": load.SEED_ITEMS, "reset_every": load.RESET_EVERY, "sweep": load.SWEEP,
                            "rates": load.RATES, "rate_connections": load.RATE_CONNECTIONS,
                            "streams": n_streams, "branch_repeat": branch_repeat},
                 "tree_ops": [], "load": [], "errors": []}
    signal.signal(signal.SIGTERM, _sigterm)

    busy = _busy_now()
    out["machine"]["busy_before_pct"] = busy
    if busy > 15:
        print(f"warning: the machine was {busy:.0f}% busy before the benchmark started (of all "
              f"{os.cpu_count()} CPUs); results will be noisy", file=sys.stderr)
    logs = Path(tempfile.mkdtemp(prefix="branchwise-bench-"))
    servers: list[loadgen.Server] = []
    runs: list[dict] = []
    try:
        canned = loadgen.Server("canned", [sys.executable, "-m", "bench.loadgen", "canned", "--port",
                                           str(port := loadgen.free_port())], port, logs,
                                cwd=str(Path(__file__).parent.parent))
        servers.append(canned.start())
        print("client check (canned server) ...", file=sys.stderr)
        out["client"] = loadgen.run(load.client_check(canned, warmup, duration / 2))
        canned.stop()

        mock_port = loadgen.free_port()
        mock = loadgen.Server("mock", [sys.executable, "-m", "branchwise.testing.mock_upstream", "--host", "127.0.0.1",
                                       "--port", str(mock_port), "--no-request-log"], mock_port, logs, cwd=str(logs))
        servers.append(mock.start())
        print("mock direct: sweep ...", file=sys.stderr)
        out["direct"] = loadgen.run(load.direct_sweep(mock, warmup, duration))

        for kind in kinds:
            try:
                _run_db(kind, args, out, runs, servers, logs, mock, repeat, warmup, duration, n_streams, branch_repeat,
                        resume_rounds)
            except Exception as e:  # the other database still runs; the failure is a missed check
                msg = f"{type(e).__name__}: {e}".splitlines()[0][:300]
                print(f"[{kind}] FAILED: {msg}", file=sys.stderr)
                out["errors"].append({"db": kind, "error": msg})
        if "sqlite" in kinds:
            try:
                _log_cost(args.server_workers, out, servers, logs, mock, warmup, duration, 1 if args.smoke else 3)
            except Exception as e:
                msg = f"{type(e).__name__}: {e}".splitlines()[0][:300]
                print(f"[sqlite] log cost FAILED: {msg}", file=sys.stderr)
                out["errors"].append({"db": "sqlite", "error": f"log cost: {msg}"})
        if not args.skip_embedded:
            print("embedded model: raw and delivered rates, prefix reuse ...", file=sys.stderr)
            try:
                out["embedded"] = embedded.run(logs, smoke=args.smoke, repeat=2 if quick else embedded.REPEAT)
            except Exception as e:
                msg = f"{type(e).__name__}: {e}".splitlines()[0][:300]
                print(f"[embedded] FAILED: {msg}", file=sys.stderr)
                out["errors"].append({"db": "embedded", "error": msg})
    finally:
        for s in reversed(servers):
            s.stop()

    flavour = " (--smoke)" if args.smoke else " (--quick)" if quick else ""  # (--smoke sets its own phases)
    md = [f"## branchwise benchmarks{flavour}", "",
          f"{out['machine']['cpus']} CPUs, Python {out['machine']['python']}, SQLite {out['machine']['sqlite']}, "
          f"server workers {args.server_workers}, phases {warmup:g} s warm-up + {duration:g} s measured; "
          f"machine {out['machine']['busy_before_pct']:.0f}% busy before the run."]
    md.append(md_client(out["client"], out["direct"], runs))
    if runs:
        md += [md_added(runs), md_sweep(runs), md_streaming(runs)]
    md += [tree_ops.table(res) for res in out["tree_ops"]]
    if runs:
        md += [md_branch(runs), md_memory(runs), md_websocket(runs), md_teams(runs)]
        md += [resume.table(run["load"]["resume"]) for run in runs if "resume" in run["load"]]
        if args.profile:
            md.append(md_profile(runs))
    if out.get("embedded"):
        md.append(embedded.table(out["embedded"]))
    if out.get("log_cost"):
        md.append(md_log_cost(out["log_cost"]))
    checks = budgets(runs, out["tree_ops"])
    if out.get("embedded"):
        checks += embedded.budget(out["embedded"])
    if out.get("log_cost"):
        added = out["log_cost"]["added_p50_ms"]
        checks.append(("[sqlite] request log: added p50 at c=1 < 1 ms", added < 1, f"{_f(added, 3)} ms"))
    checks += [(f"[{e['db']}] benchmark ran", False, e["error"]) for e in out["errors"]]
    out["budgets"] = [{"budget": n, "met": ok, "result": got} for n, ok, got in checks]
    md.append(_table("Budgets", ["budget", "result", ""], [[n, got, "met" if ok else "MISSED"] for n, ok, got in checks]))
    out["elapsed_s"] = time.monotonic() - started
    text = "\n\n".join(md)
    print(text)
    (RESULTS / "latest.md").write_text(text + "\n")
    (RESULTS / "latest.json").write_text(json.dumps(out, indent=2, default=str))
    print(f"\n(wrote {RESULTS / 'latest.md'} and latest.json in {out['elapsed_s']:.0f} s)", file=sys.stderr)
    return 0 if all(ok for _, ok, _ in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
