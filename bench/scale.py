"""`python -m bench.scale [--sizes 10k,100k,1m] [--only sqlite|postgresql] [--time-budget S]
[--results DIR] [--data DIR]` (`make bench-scale`): cost as the stored data grows.

Per database, one database is filled with realistic branched conversations (bench/scale_fill.py:
what the API would store, through the bulk import path) to each size in turn, counted in stored
responses, and at each size a fresh `branchwise serve` is measured:

- added latency c=1 (p50, p99): stored responses on a new conversation (the make bench (a)
  workload), minus the same chat calls straight to the mock measured just before;
- throughput at c=32 (closed loop, new conversations; two phases) and branchwise's CPU per
  response;
- the same load phases, alternating with the main database's, on a second database filled to the
  smallest size: the goals compare the two, side by side (the machine's speed moves by the minute,
  0001);
- old conversations: turns on conversations of the fill picked at random (each once), their
  histories not in the server's cache: branchwise's own time (`Server-Timing`), p50 / p99;
- a cold 10,000-item context: turns on forks of a 10,000-item conversation, each fork's head a
  node the server has not seen: branchwise's own time (`Server-Timing`);
- bytes per stored response: what the database grew by during the fill, per response filled;
- SQLite: the WAL file's size after the load; PostgreSQL: dead rows and HOT updates of the
  conversations table (the one the workload updates).

Bounded: before each size it estimates the fill from the rate so far and skips the sizes that
would not fit in `--time-budget` (600 s by default, for both databases together); skipped sizes
are reported as such. Goals (issue 20): at the largest size measured against the smallest beside
it, added p50 and c=32 throughput within 1.2x, on both databases; exit status 1 when one is
missed.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import json
import math
import os
import random
import sqlite3
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import orjson

from bench import load, loadgen
from bench.__main__ import PG_URL, RESULTS, RUN_ID, _machine, _pg_admin, _pg_fresh, _settle
from bench.loadgen import Conn, pct
from bench.scale_fill import Maker

LONG_ITEMS = 10_000
COLD_TURNS = 10  # forks of the long conversation, one turn each
OLD_TURNS = 200  # turns on old conversations per size
WARMUP, DURATION = 1.0, 4.0
C32_ROUNDS = 2
IDLE_WAIT_S = 2.5  # SQLite: after the last turn, before the WAL is looked at again (it empties after 1 s)
MEASURE_S = 45.0  # what one size's measurements take, about (servers' start included)
GOAL_RATIO = 1.2
TABLES = ("items", "responses", "conversations", "conversation_metadata", "history_blocks", "events")


def parse_size(text: str) -> int:
    text = text.strip().lower()
    mult = {"k": 1_000, "m": 1_000_000}.get(text[-1:], 1)
    return int(float(text[:-1] if text[-1:] in "km" else text) * mult)


def _label(n: int) -> str:
    return f"{n // 1_000_000}M" if n >= 1_000_000 and n % 1_000_000 == 0 else f"{n // 1000}k" if n % 1000 == 0 else str(n)


# --------------------------------------------------------------------------- the database


class Target:
    """One database of the run: made, filled in process, sized, dropped at exit."""

    def __init__(self, kind: str, data_dir: Path, role: str):
        self.kind = kind
        name = f"branchwise_bench_scale_{role}_{RUN_ID}"
        if kind == "sqlite":
            self.path = data_dir / f"{name}.db"
            self.url = f"sqlite:///{self.path}"
        else:
            self.url = asyncio.run(_pg_fresh(PG_URL, name))
        atexit.register(self.drop)

    def drop(self) -> None:
        if self.kind == "sqlite":
            for suffix in ("", "-wal", "-shm", ".branchwise-lock"):
                Path(str(self.path) + suffix).unlink(missing_ok=True)
        else:
            try:
                asyncio.run(_pg_admin(PG_URL, f"DROP DATABASE IF EXISTS {self.url.rsplit('/', 1)[1]} WITH (FORCE)"))
            except Exception as e:
                print(f"could not drop {self.url}: {e}", file=sys.stderr)

    def wal_bytes(self) -> int:
        wal = Path(str(self.path) + "-wal")
        return wal.stat().st_size if wal.exists() else 0

    async def size_bytes(self) -> int:
        """The data's size: SQLite's pages in use (the WAL's included), PostgreSQL's tables with
        their indexes and TOAST."""
        if self.kind == "sqlite":
            conn = sqlite3.connect(self.path)
            try:
                page = conn.execute("PRAGMA page_size").fetchall()[0][0]
                used = conn.execute("PRAGMA page_count").fetchall()[0][0] - conn.execute(
                    "PRAGMA freelist_count").fetchall()[0][0]
            finally:
                conn.close()
            return page * used
        import asyncpg

        conn = await asyncpg.connect(self.url)
        try:
            return int(await conn.fetchval("SELECT sum(pg_total_relation_size(c.oid)) FROM pg_class c"
                                           " WHERE c.relname = ANY($1::text[]) AND c.relkind = 'r'", list(TABLES)))
        finally:
            await conn.close()

    async def table_stats(self) -> dict:
        """PostgreSQL: the conversations table after the load (updated once per stored response)."""
        import asyncpg

        conn = await asyncpg.connect(self.url)
        try:
            row = await conn.fetchrow(
                "SELECT n_live_tup, n_dead_tup, n_tup_upd, n_tup_hot_upd, autovacuum_count,"
                " pg_total_relation_size(relid) AS bytes FROM pg_stat_user_tables WHERE relname = 'conversations'")
            return dict(row) if row else {}
        finally:
            await conn.close()


class Filler:
    """The fill, in the benchmark's own process: batches made on a thread while the previous one
    is stored (`Repository.import_conversations`, one transaction per batch)."""

    def __init__(self, target: Target, seed: int = 20):
        self.target = target
        self.maker = Maker(seed)
        self.stored = 0  # responses
        self.old: list[str] = []  # conversations whose head is not a pending function call
        self.used: set[str] = set()  # old conversations a turn was made on already
        self.long: tuple[str, list[str]] | None = None
        self.seconds = 0.0

    async def _run(self, work) -> None:
        from branchwise.store.connect import create_engine, migrate
        from branchwise.store.repository import Repository

        engine = create_engine(self.target.url)
        await migrate(engine)
        store = Repository(engine, 0)
        try:
            await work(store)
        finally:
            await store.close()
            await engine.dispose()

    def long_line(self) -> None:
        async def work(store) -> None:
            conv, ids = self.maker.long_line(LONG_ITEMS)
            await store.import_conversations([conv])
            self.long = (conv.conv_id, ids)

        asyncio.run(self._run(work))

    def fill_to(self, responses: int) -> float:
        """Store conversations until `responses` responses are stored: the seconds it took."""
        started = time.perf_counter()

        async def work(store) -> None:
            batches = self.maker.batches(responses - self.stored)
            loop = asyncio.get_running_loop()
            with ThreadPoolExecutor(1) as pool:
                nxt = loop.run_in_executor(pool, next, batches, None)
                while (batch := await nxt) is not None:
                    nxt = loop.run_in_executor(pool, next, batches, None)
                    await store.import_conversations(batch)
                    self.stored += sum(len(c.responses) for c in batch)
                    self.old += [c.conv_id for c in batch if c.items[c.head].type != "function_call"]

        asyncio.run(self._run(work))
        took = time.perf_counter() - started
        self.seconds += took
        return took


# --------------------------------------------------------------------------- the measurements


class TimedConn(Conn):
    """A connection that also keeps each reply's `Server-Timing` (branchwise's own time)."""

    timing = ""

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"server-timing":
            self.timing = value.decode()

    def branchwise_ms(self) -> float:
        for part in self.timing.split(","):
            name, _, dur = part.strip().partition(";dur=")
            if name == "branchwise":
                return float(dur)
        return math.nan


async def _turns_timed(port: int, bodies: list[bytes]) -> list[float]:
    """One turn per body, one at a time: branchwise's own time of each (Server-Timing), ms."""
    conn = await TimedConn.open(load.HOST, port)
    out = []
    try:
        for body in bodies:
            r = await conn.request("POST", "/v1/responses", body)
            if r.status != 200 or b'"status":"completed"' not in r.body:
                raise RuntimeError(f"turn: {r.status} {r.body[:300]!r}")
            out.append(conn.branchwise_ms())
    finally:
        conn.close()
    return out


async def _forks(port: int, conv_id: str, item_ids: list[str]) -> list[str]:
    conn = await Conn.open(load.HOST, port)
    try:
        out = []
        for item in item_ids:
            r = await conn.request("POST", f"/v1/conversations/{conv_id}/fork", orjson.dumps({"item_id": item}))
            if r.status != 200:
                raise RuntimeError(f"fork: {r.status} {r.body[:300]!r}")
            out.append(orjson.loads(r.body)["id"])
        return out
    finally:
        conn.close()


async def _load(servers: dict[str, loadgen.Server], mock: loadgen.Server) -> dict:
    """The load phases of each server (`main`, and `ref` when there is one), side by side: the
    mock's c=1 baseline, each server's c=1 phase, then `C32_ROUNDS` rounds of each one's c=32
    phase, alternating (the machine's speed of the moment falls on both alike)."""
    convs = {}
    for name, bw in servers.items():
        setup = await Conn.open(load.HOST, bw.port)
        try:
            convs[name] = await load.create_conversations(setup, 33)
        finally:
            setup.close()
    meters = {name: load._meter({"branchwise": bw, "mock": mock}) for name, bw in servers.items()}
    direct = await load.closed_loop(mock.port, [load._DirectWorker()], WARMUP / 2, DURATION * 0.75,
                                    load._meter({"mock": mock}))
    out: dict = {}
    for name, bw in servers.items():
        c1 = await load.closed_loop(bw.port, [load._BranchwiseWorker(convs[name][0])], WARMUP, DURATION, meters[name])
        out[name] = {"c1": {"p50_ms": c1["p50_ms"], "p99_ms": c1["p99_ms"], "mock_p50_ms": direct["p50_ms"],
                            "mock_p99_ms": direct["p99_ms"], "added_p50_ms": c1["p50_ms"] - direct["p50_ms"],
                            "added_p99_ms": c1["p99_ms"] - direct["p99_ms"], "errors": c1["errors"]}, "c32_rounds": []}
    for _ in range(C32_ROUNDS):
        for name, bw in servers.items():
            r = await load.closed_loop(bw.port, [load._BranchwiseWorker(c) for c in convs[name][1:]], WARMUP, DURATION,
                                       meters[name])
            out[name]["c32_rounds"].append({"rps": r["rps"], "p50_ms": r["p50_ms"], "p99_ms": r["p99_ms"],
                                            "errors": r["errors"], "branchwise_cpu_ms": r["cpu_ms_per_req"]["branchwise"]})
    for o in out.values():
        rounds = o["c32_rounds"]
        o["c32"] = {k: sum(r[k] for r in rounds) / len(rounds) for k in ("rps", "p50_ms", "p99_ms", "branchwise_cpu_ms")}
        o["c32"]["errors"] = sum(r["errors"] for r in rounds)
    return out


async def measure(bw: loadgen.Server, ref: loadgen.Server | None, mock: loadgen.Server, filler: Filler,
                  rng: random.Random, target: Target) -> dict:
    loads = await _load({"main": bw, **({"ref": ref} if ref is not None else {})}, mock)
    out = loads["main"]
    if "ref" in loads:
        out["ref"] = loads["ref"]
    if target.kind == "sqlite":
        out["wal_bytes_after_load"] = target.wal_bytes()
    fresh = [c for c in filler.old if c not in filler.used]
    picked = rng.sample(fresh, min(OLD_TURNS, len(fresh)))
    filler.used.update(picked)
    old = await _turns_timed(bw.port, [orjson.dumps({"model": "mock", "conversation": c, "input": "and then?"})
                                       for c in picked])
    out["old"] = {"turns": len(old), "p50_ms": pct(old, 50), "p99_ms": pct(old, 99)}
    long_id, item_ids = filler.long
    forks = await _forks(bw.port, long_id, item_ids[-COLD_TURNS:])
    cold = await _turns_timed(bw.port, [orjson.dumps({"model": "mock", "conversation": c, "input": "summarise"})
                                        for c in forks])
    out["cold_context"] = {"turns": len(cold), "p50_ms": pct(cold, 50), "max_ms": max(cold)}
    if target.kind == "sqlite":
        await asyncio.sleep(IDLE_WAIT_S)
        out["wal_bytes_idle"] = target.wal_bytes()
    return out


def _server(name: str, target: Target, logs: Path, mock: loadgen.Server) -> loadgen.Server:
    port = loadgen.free_port()
    exe = Path(sys.executable).parent / "branchwise"
    return loadgen.Server(name, [str(exe), "serve", "--host", "127.0.0.1", "--port", str(port)], port, logs,
                          cwd=str(logs), env={"BRANCHWISE_DATABASE_URL": target.url,
                                              "BRANCHWISE_CONFIG": str(logs / "none.toml"),
                                              "BRANCHWISE_UPSTREAM_BASE_URL": f"http://127.0.0.1:{mock.port}/v1"})


def run_db(kind: str, sizes: list[int], deadline: float, data_dir: Path, logs: Path, mock: loadgen.Server) -> dict:
    """Fill and measure one kind of database at each size. A second database, filled once to the
    smallest size (`ref`), is measured beside each larger one: the goals' ratios come from phases
    run side by side, minutes apart from nothing (the machine's speed moves by the minute)."""
    target, ref_target = Target(kind, data_dir, "main"), Target(kind, data_dir, "ref")
    filler, ref_filler = Filler(target), Filler(ref_target)
    res: dict = {"db": kind, "sizes": {}, "skipped": {}}
    filler.long_line()
    before = asyncio.run(target.size_bytes())
    rng = random.Random(7)
    rate = None  # responses stored per second, from the sizes so far
    for size in sizes:
        need = size - filler.stored
        left = deadline - time.monotonic()
        estimate = (need / rate if rate else 0.0) + MEASURE_S
        if rate is not None and estimate > left:
            res["skipped"][size] = (f"would take ~{estimate:.0f} s (fill at {rate:,.0f} responses/s), "
                                    f"{max(0, left):.0f} s of the time budget left")
            print(f"[{kind}] {_label(size)}: skipped, {res['skipped'][size]}", file=sys.stderr)
            continue
        print(f"[{kind}] filling to {_label(size)} responses ...", file=sys.stderr)
        took = filler.fill_to(size)
        rate = filler.stored / filler.seconds
        after = asyncio.run(target.size_bytes())
        row = {"fill_s": took, "fill_rate": need / took, "db_bytes": after, "bytes_per_response": (after - before) / need,
               "conversations": len(filler.old)}
        if kind == "sqlite":
            row["wal_bytes_after_fill"] = target.wal_bytes()
        if size > sizes[0] and ref_filler.stored == 0:
            ref_filler.fill_to(sizes[0])
        _settle(1.0)
        bw = _server(f"branchwise-scale-{kind}", target, logs, mock).start()
        ref = _server(f"branchwise-scale-ref-{kind}", ref_target, logs, mock).start() if size > sizes[0] else None
        print(f"[{kind}] {_label(size)}: measuring ...", file=sys.stderr)
        try:
            row.update(loadgen.run(asyncio.wait_for(measure(bw, ref, mock, filler, rng, target), 300)))
        except BaseException:
            print(f"branchwise log tail:\n{bw.tail()}", file=sys.stderr)
            raise
        finally:
            bw.stop()
            if ref is not None:
                ref.stop()
        if kind == "postgresql":
            row["conversations_table"] = asyncio.run(target.table_stats())
        res["sizes"][size] = row
        before = asyncio.run(target.size_bytes())  # (the next size's growth is its fill's alone)
    res["ref_size"] = sizes[0]
    target.drop()
    ref_target.drop()
    return res


# --------------------------------------------------------------------------- report


def _f(x, nd: int = 2) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:,.{nd}f}"


def table(runs: list[dict]) -> str:
    head = ["db", "stored responses", "added p50 ms (c=1)", "added p99 ms (c=1)", "responses/s (c=32)",
            "branchwise CPU ms/response (c=32)", "beside the smallest: added p50 ms, responses/s",
            "old conversation p50 / p99 ms", "cold 10,000-item context ms", "bytes per response", "fill responses/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for run in runs:
        for size, r in run["sizes"].items():
            ref = r.get("ref")
            beside = (f"{_f(ref['c1']['added_p50_ms'])}, {_f(ref['c32']['rps'], 0)}" if ref else "-")
            lines.append("| " + " | ".join([
                run["db"], _label(int(size)), _f(r["c1"]["added_p50_ms"]), _f(r["c1"]["added_p99_ms"]),
                _f(r["c32"]["rps"], 0), _f(r["c32"]["branchwise_cpu_ms"], 3), beside,
                f"{_f(r['old']['p50_ms'])} / {_f(r['old']['p99_ms'])}", _f(r["cold_context"]["p50_ms"]),
                _f(r["bytes_per_response"], 0), _f(r["fill_rate"], 0)]) + " |")
        for size, why in run["skipped"].items():
            lines.append(f"| {run['db']} | {_label(int(size))} | not run: {why} |" + " |" * (len(head) - 3))
    return "\n".join(lines)


def extra(runs: list[dict]) -> str:
    lines = []
    for run in runs:
        for size, r in run["sizes"].items():
            if run["db"] == "sqlite":
                lines.append(f"- sqlite {_label(int(size))}: WAL {r['wal_bytes_after_fill'] / 2**20:.1f} MiB after the "
                             f"fill, {r['wal_bytes_after_load'] / 2**20:.1f} MiB after the c=32 phases, "
                             f"{r['wal_bytes_idle'] / 2**20:.1f} MiB {IDLE_WAIT_S:g} s after the last turn; database "
                             f"{r['db_bytes'] / 2**20:,.0f} MiB")
            else:
                t = r.get("conversations_table", {})
                hot = t.get("n_tup_hot_upd", 0) / max(1, t.get("n_tup_upd", 0))
                lines.append(f"- postgresql {_label(int(size))}: database {r['db_bytes'] / 2**20:,.0f} MiB; conversations "
                             f"table {t.get('bytes', 0) / 2**10:,.0f} KiB, {t.get('n_live_tup')} live / "
                             f"{t.get('n_dead_tup')} dead rows, {hot:.0%} of {t.get('n_tup_upd')} updates HOT, "
                             f"autovacuumed {t.get('autovacuum_count')} times")
    return "\n".join(lines)


def goals(runs: list[dict]) -> list[tuple[str, bool | None, str]]:
    """The issue's goals at the largest size measured, against the smallest measured beside it."""
    out = []
    for run in runs:
        done = [int(s) for s in run["sizes"] if run["sizes"][s].get("ref")]
        if not done:
            out.append((f"[{run['db']}] the largest size against the smallest", None, "no larger size measured"))
            continue
        big = max(done)
        r = run["sizes"][big]
        ref = r["ref"]
        span = f"{_label(int(run['ref_size']))} -> {_label(big)}"
        a0, a1 = ref["c1"]["added_p50_ms"], r["c1"]["added_p50_ms"]
        ratio = a1 / a0 if a0 > 0 else math.inf
        out.append((f"[{run['db']}] added p50 {span} within {GOAL_RATIO}x", ratio <= GOAL_RATIO,
                    f"{_f(a0)} -> {_f(a1)} ms ({ratio:.2f}x)"))
        t0, t1 = ref["c32"]["rps"], r["c32"]["rps"]
        ratio = t0 / t1 if t1 > 0 else math.inf
        out.append((f"[{run['db']}] c=32 throughput {span} within {GOAL_RATIO}x", ratio <= GOAL_RATIO,
                    f"{_f(t0, 0)} -> {_f(t1, 0)}/s ({ratio:.2f}x)"))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.scale")
    ap.add_argument("--sizes", default="10k,100k,1m", help="stored responses at which to measure, e.g. 10k,100k,1m")
    ap.add_argument("--only", choices=["sqlite", "postgresql"], default=None)
    ap.add_argument("--time-budget", type=float, default=600.0,
                    help="seconds for the whole run; sizes whose fill would not fit are skipped (default 600)")
    ap.add_argument("--results", default=None, help="write scale.md and scale.json here (default bench/results)")
    ap.add_argument("--data", default=None, help="directory for the SQLite database (default: the system's temp)")
    ap.add_argument("--smoke", action="store_true",
                    help="every figure once, in phases too short to mean anything (the test suite's check)")
    args = ap.parse_args()
    global WARMUP, DURATION, OLD_TURNS, COLD_TURNS, LONG_ITEMS
    if args.smoke:
        WARMUP, DURATION, OLD_TURNS, COLD_TURNS, LONG_ITEMS = 0.2, 0.5, 5, 2, 1000
    sizes = sorted({parse_size(s) for s in args.sizes.split(",") if s.strip()})
    results = Path(args.results) if args.results else RESULTS
    results.mkdir(parents=True, exist_ok=True)
    data_dir = Path(args.data or tempfile.gettempdir())
    kinds = [k for k in ("sqlite", "postgresql") if args.only in (None, k)]
    started = time.monotonic()
    logs = Path(tempfile.mkdtemp(prefix="branchwise-scale-"))
    (logs / "none.toml").write_text("")
    mock_port = loadgen.free_port()
    mock = loadgen.Server("mock", [sys.executable, "-m", "branchwise.testing.mock_upstream", "--host", "127.0.0.1",
                                   "--port", str(mock_port), "--no-request-log"], mock_port, logs, cwd=str(logs))
    runs, errors = [], []
    try:
        mock.start()
        for k, kind in enumerate(kinds):
            # each database gets its share of what is left (the first one's unused time goes to the next)
            share = (args.time_budget - (time.monotonic() - started)) / (len(kinds) - k)
            try:
                runs.append(run_db(kind, sizes, time.monotonic() + share, data_dir, logs, mock))
            except Exception as e:
                msg = f"{type(e).__name__}: {e}".splitlines()[0][:300]
                print(f"[{kind}] FAILED: {msg}", file=sys.stderr)
                errors.append({"db": kind, "error": msg})
    finally:
        mock.stop()
    checks = goals(runs) + [(f"[{e['db']}] benchmark ran", False, e["error"]) for e in errors]
    m = _machine()
    md = ["## branchwise at scale", "",
          f"{m['cpus']} CPUs, Python {m['python']}, SQLite {m['sqlite']}; sizes {args.sizes}, time budget "
          f"{args.time_budget:.0f} s, took {time.monotonic() - started:.0f} s. Phases {WARMUP:g} s warm-up + "
          f"{DURATION:g} s measured; old conversations: {OLD_TURNS} turns; cold context: {COLD_TURNS} turns.",
          "", table(runs), "", extra(runs), "", "| goal | result | |", "|---|---:|---|"]
    md += [f"| {n} | {got} | {'met' if ok else 'not measured' if ok is None else 'MISSED'} |" for n, ok, got in checks]
    text = "\n".join(md)
    print(text)
    (results / "scale.md").write_text(text + "\n")
    (results / "scale.json").write_text(json.dumps({"machine": m, "runs": runs, "errors": errors,
                                                    "goals": [{"goal": n, "met": ok, "result": got}
                                                              for n, ok, got in checks]}, indent=2, default=str))
    return 1 if any(ok is False for _, ok, _ in checks) else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
