"""The benchmark (`make bench`) runs: `python -m bench --smoke` goes through every section on
both databases in phases too short to time anything, and writes the markdown tables and the
JSON with every budget's figure. Whether a budget is met is the full run's business, on an idle
machine (docs/performance.md); here only that each one is measured, and that no request of the
load failed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import PG_ADMIN_URL, require_pg

ROOT = Path(__file__).resolve().parent.parent
BUDGETS = [
    "added latency c=1 p50 <= 2 ms", "added latency c=1 p99 <= 8 ms",
    ">= 600 responses/s over 32 connections with p99 < 50 ms", "added latency c=64 p99 <= 30 ms",
    "streaming: added time to first event p50 <= 5 ms", "streaming: added inter-chunk gap p99 <= 2 ms",
    "16 branches on one conversation <= 1.2x 16 on separate", "WebSocket turn p50 <= SSE turn p50 + 1 ms (c=1)",
    "fork 10,000 items <= 1.5x fork 10 items", "context of a 10,000-item path <= 10 ms",
    "API key: added p50 at c=1 < 1 ms", "API key: throughput at c=32 within 10% of no key",
]


@pytest.mark.timeout(660)  # the subprocess's own limit is 600 s
def test_the_benchmark_measures_every_budget_on_both_databases(tmp_path):
    env = dict(os.environ)
    env.setdefault("BENCH_PG_URL", PG_ADMIN_URL)
    require_pg(env["BENCH_PG_URL"])  # the smoke pass covers both databases
    done = subprocess.run([sys.executable, "-m", "bench", "--smoke", "--results", str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    # 1: a budget missed, which phases this short may well do; anything else is a failure
    assert done.returncode in (0, 1), done.stderr[-3000:]
    out = json.loads((tmp_path / "latest.json").read_text())
    assert out["errors"] == [], out["errors"]
    assert out["config"]["smoke"] is True

    runs = {run["db"]: run for run in out["load"]}
    assert set(runs) == {"sqlite", "postgresql"}
    for db, run in runs.items():
        res = run["load"]
        for c in ("1", "16", "32", "64"):
            phase = res["sweep"][c]
            assert phase["requests"] > 0 and phase["errors"] == 0, (db, c, phase)
        for c in ("1", "16", "64"):
            assert set(run["added"][c]) == {"p50_ms", "p99_ms"}
        rate = res["rate"]["600"]
        assert rate["requests"] > 0 and rate["errors"] == 0, (db, rate)
        assert res["streaming"]["gaps"] > 0 and res["direct_streaming"]["gaps"] > 0
        assert res["branch"]["ratio"] > 0
        assert res["websocket"]["turns"] > 0 and res["websocket"]["sse"]["p50_ms"] > 0
        assert res["rss_kib"]["peak"] >= res["rss_kib"]["idle"] > 0
    emb = out["embedded"]  # (g): every figure, for fewer loads and tokens than the real run
    for kind, sizes in (("concurrent", ("1", "2")), ("n", ("2",))):
        for s in sizes:
            e = emb[kind][s]
            assert e["raw"] > 0 and e["tokens"] > 0 and e["ratio"] > 0, (kind, s, e)
    assert len(emb["concurrent"]["2"]["first_s"]) == 2
    assert emb["prefix"]["warm_cached_tokens"] > 0 and emb["prefix"]["ratio"] > 0
    trees = {t["db"]: t["sizes"] for t in out["tree_ops"]}
    assert set(trees) == {"sqlite", "postgresql"}
    for sizes in trees.values():
        for n in ("10", "10000"):
            assert {"fork", "context", "list_desc_100", "list_asc_100"} <= set(sizes[n])

    names = [b["budget"] for b in out["budgets"]]
    for budget in BUDGETS:
        assert f"[sqlite] {budget}" in names
    for budget in BUDGETS[3:]:  # (the first three budgets are SQLite's alone)
        assert f"[postgresql] {budget}" in names
    assert sum(name.startswith("[embedded] ") for name in names) == 5
    # (k) two more instances on PostgreSQL's database: a stream resumed on each
    assert "[postgresql] resumed stream on another instance: added delay per event p50 <= 5 ms" in names
    resumed = runs["postgresql"]["load"]["resume"]
    assert resumed["deltas"] > 0 and resumed["listening"]["p50_ms"] >= 0 and resumed["polling"]["p50_ms"] >= 0
    assert all(b["result"] and b["met"] in (True, False) for b in out["budgets"])
    assert done.returncode == (0 if all(b["met"] for b in out["budgets"]) else 1)

    md = (tmp_path / "latest.md").read_text()
    for title in ("Load client check", "(a) Added latency", "(b) Throughput", "(b) Fixed rate", "(c) Streaming",
                  "Tree operations (sqlite)", "Tree operations (postgresql)", "(e) Parallel branches",
                  "(f) branchwise memory", "(g) WebSocket mode against SSE", "(h) The embedded model",
                  "(j) API keys, limits and Idempotency-Key",
                  "(k) Stream resumed on another instance (postgresql), added delay per event, ms", "Budgets"):
        assert f"### {title}" in md, title


@pytest.mark.timeout(360)  # the subprocess's own limit is 300 s
def test_a_traced_phase_reports_each_step_of_a_stored_response():
    """`python -m bench.phase --trace` (the A/B tool): the server times its steps and grouped
    statements, and the phase prints them after its own line."""
    done = subprocess.run([sys.executable, "-m", "bench.phase", "--db", "sqlite", "-c", "4", "--repeat", "1",
                           "--warmup", "0.2", "--duration", "0.5", "--trace"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    phase, _, trace = done.stdout.partition("[trace of server process")
    assert "[sqlite c=4 #1]" in phase and "errors 0" in phase
    assert "stored responses traced" in trace
    for step in ("conversation read", "model call", "commit", "in all (validation to reply)"):
        line = next(x for x in trace.splitlines() if x.startswith(step))
        assert len(line.split()) >= 5, line
    assert "sqlite write:" in trace


@pytest.mark.timeout(420)  # the subprocess's own limit is 360 s
def test_the_scale_benchmark_measures_every_figure_at_each_size(tmp_path):
    """`python -m bench.scale --smoke` (make bench-scale): each size filled and measured on both
    databases, every figure of its table produced, the goals checked."""
    env = dict(os.environ)
    env.setdefault("BENCH_PG_URL", PG_ADMIN_URL)
    require_pg(env["BENCH_PG_URL"])
    done = subprocess.run([sys.executable, "-m", "bench.scale", "--smoke", "--sizes", "300,600", "--results",
                           str(tmp_path), "--data", str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=360)
    assert done.returncode in (0, 1), done.stderr[-3000:]
    out = json.loads((tmp_path / "scale.json").read_text())
    assert out["errors"] == [], out["errors"]
    assert {run["db"] for run in out["runs"]} == {"sqlite", "postgresql"}
    for run in out["runs"]:
        assert set(run["sizes"]) == {"300", "600"} and run["skipped"] == {}
        for row in run["sizes"].values():
            assert row["c1"]["errors"] == 0 and row["c1"]["p50_ms"] > 0 and row["c32"]["rps"] > 0
            assert row["old"]["turns"] > 0 and row["cold_context"]["turns"] > 0 and row["cold_context"]["p50_ms"] > 0
            assert row["bytes_per_response"] > 0
        assert "ref" not in run["sizes"]["300"] and run["sizes"]["600"]["ref"]["c32"]["rps"] > 0
    assert len(out["goals"]) == 4 and all(g["met"] in (True, False) for g in out["goals"])
    assert "| sqlite | 600 |" in (tmp_path / "scale.md").read_text()
