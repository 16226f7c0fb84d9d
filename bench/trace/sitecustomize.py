"""`python -m bench.phase --trace`: loaded by the server under test (this folder goes first on its
PYTHONPATH) when BRANCHWISE_BENCH_TRACE names a folder. It times each stored response's steps
(validation, the conversation read, the model call, the commit, the reply), each grouped
statement (PostgreSQL's reads, commits and head moves; SQLite's group transactions and
checkpoints) and each collection of the garbage collector, and writes them as JSON to
<folder>/trace-<pid>.json when the server is stopped (SIGTERM). `bench/trace_report.py` reads
it. A measuring aid for this repository's benchmark only: it wraps branchwise's internals by
name and costs a few microseconds a response."""

from __future__ import annotations

import os

if os.environ.get("BRANCHWISE_BENCH_TRACE"):
    import asyncio
    import gc
    import json
    import signal
    import time

    from branchwise.services import responses
    from branchwise.store import pg_groups, repository, sqlite_writer

    _OUT = os.environ["BRANCHWISE_BENCH_TRACE"]
    _now = time.perf_counter
    _open: dict[int, dict] = {}  # the request task's id -> its step times
    _done: list[dict] = []
    _groups: list[tuple] = []  # (kind, start, end, size)
    _gcs: list[tuple] = []  # (generation, start, end)
    _gc_started: list[float] = [0.0]

    def _gc(phase: str, info: dict) -> None:
        if phase == "start":
            _gc_started[0] = _now()
        else:
            _gcs.append((info["generation"], _gc_started[0], _now()))

    gc.callbacks.append(_gc)

    def _step(cls, name: str, key: str) -> None:
        inner = getattr(cls, name)

        async def timed(*a, **k):
            task = id(asyncio.current_task())
            times = _open.setdefault(task, {})
            times.setdefault(key + "0", _now())
            try:
                return await inner(*a, **k)
            finally:
                times[key + "1"] = _now()
                if key == "reply":
                    _done.append(_open.pop(task))

        setattr(cls, name, timed)

    _step(responses.Responses, "validate", "start")
    _step(responses.Responses, "complete", "reply")
    _step(repository.Repository, "conversation_with_history", "read")
    _step(responses.Responses, "generate", "model")
    _step(repository.Repository, "commit_response", "commit")

    def _group(cls, name: str, kind: str, is_async: bool = True) -> None:
        inner = getattr(cls, name)
        if is_async:
            async def timed(self, entries):
                t = _now()
                try:
                    return await inner(self, entries)
                finally:
                    _groups.append((kind, t, _now(), len(entries)))
        else:
            def timed(self, *a):
                t = _now()
                try:
                    return inner(self, *a)
                finally:
                    _groups.append((kind, t, _now(), len(a[0]) if kind == "sqlite write" else 0))
        setattr(cls, name, timed)

    _group(pg_groups.PgGroups, "reads", "pg read")
    _group(pg_groups.PgGroups, "commits", "pg commit")
    _group(pg_groups.PgGroups, "moves", "pg head move")
    _group(sqlite_writer.SqliteWriter, "_write_inline", "sqlite write", is_async=False)
    _group(sqlite_writer.SqliteWriter, "_checkpoint", "sqlite checkpoint", is_async=False)

    def _write(*_) -> None:
        with open(os.path.join(_OUT, f"trace-{os.getpid()}.json"), "w") as fh:
            json.dump({"requests": _done, "groups": _groups, "gc": _gcs}, fh)
        raise SystemExit(0)

    # (uvicorn restores this handler when it stops, then raises the signal again)
    signal.signal(signal.SIGTERM, _write)
