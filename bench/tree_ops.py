"""Fork, context build and items listing against conversation length (10 .. 10,000 items).

Fork and listing go through the HTTP API in-process (ASGI, no socket), so they include routing,
validation, queries and encoding. Context build is the engine's own step: the recursive path
query plus the byte splice of stored Chat Completions messages, with the history cache off (a
turn on a branch the process already knows skips the walk).
"""

from __future__ import annotations

import statistics
import time

import httpx
import orjson

from branchwise.app import create_app
from branchwise.settings import Settings
from branchwise.wire import items as witems
from branchwise.wire import models as m

SIZES = (10, 100, 1000, 10000)


def _chain(n: int) -> list[witems.NewItem]:
    out = []
    for i in range(n):
        role = "user" if i % 2 == 0 else "assistant"
        out.append(witems.from_input(m.Message(role=role, content=f"message number {i} " + "lorem ipsum " * 8)))
    return out


async def _seed(store, conv_id: str, n: int) -> None:
    """A conversation of n items, written in bulk (the API caps a create at 20 items)."""
    await store.create_conversation(conv_id, conv_id, {}, _chain(n))


async def _interleaved(fns: dict[int, object], repeat: dict[int, int]) -> dict[int, list[float]]:
    """Time one operation at every size in turn, round after round, so that whatever else the
    machine does meanwhile (a checkpoint, writeback after a seed) falls on all sizes alike."""
    for fn in fns.values():
        for _ in range(3):
            await fn()
    out: dict[int, list[float]] = {n: [] for n in fns}
    for r in range(max(repeat.values())):
        for n, fn in fns.items():
            if r < repeat[n]:
                t = time.perf_counter()
                await fn()
                out[n].append((time.perf_counter() - t) * 1000)
    return out


async def run(db_url: str, repeat: int = 30) -> dict:
    # The history cache off: "context build" is the walk up the tree in the database, what a
    # path not yet in memory costs (a process's first turn on a branch it has not seen).
    app = create_app(Settings(database_url=db_url, upstream_base_url="http://127.0.0.1:9/v1", path_cache_mb=0))
    results: dict = {"db": db_url.split(":")[0], "sizes": {n: {} for n in SIZES}}
    async with app.router.lifespan_context(app):
        store, engine = app.state.store, app.state.responses
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://b") as http:
            ops: dict[str, dict[int, object]] = {"fork": {}, "context": {}, "list_desc_100": {}, "list_asc_100": {}}
            for n in SIZES:
                conv_id = f"conv_bench_{n}_{time.time_ns()}"
                await _seed(store, conv_id, n)
                conv = await store.conversation(conv_id)

                async def fork(conv_id=conv_id):
                    r = await http.post(f"/v1/conversations/{conv_id}/fork", json={})
                    assert r.status_code == 200

                async def context(conv=conv):
                    return b"[" + await store.path_chat(conv.head) + b"]"

                assert len(orjson.loads(await context())) == n  # checked once, outside the timing

                async def list_desc(conv_id=conv_id):
                    r = await http.get(f"/v1/conversations/{conv_id}/items", params={"limit": 100})
                    assert r.status_code == 200

                async def list_asc(conv_id=conv_id):
                    r = await http.get(f"/v1/conversations/{conv_id}/items", params={"limit": 100, "order": "asc"})
                    assert r.status_code == 200

                for name, fn in (("fork", fork), ("context", context), ("list_desc_100", list_desc),
                                 ("list_asc_100", list_asc)):
                    ops[name][n] = fn
            for name, fns in ops.items():
                times = await _interleaved(fns, {n: repeat if n < 10000 or name == "fork" else max(10, repeat // 3)
                                                 for n in fns})
                for n, ms in times.items():
                    results["sizes"][n][name] = {"p50_ms": statistics.median(ms), "min_ms": min(ms)}
        del engine
    return results


def budget(res: dict) -> list[tuple[str, bool, str]]:
    s = res["sizes"]
    ratio = s[10000]["fork"]["p50_ms"] / s[10]["fork"]["p50_ms"]
    ctx = s[10000]["context"]["p50_ms"]
    return [
        ("fork 10,000 items <= 1.5x fork 10 items", ratio <= 1.5, f"{ratio:.2f}x"),
        ("context of a 10,000-item path <= 10 ms", ctx <= 10, f"{ctx:.1f} ms"),
    ]


def table(res: dict) -> str:
    lines = [f"### Tree operations ({res['db']}), p50 ms", "",
             "| items | fork | context build | list desc (100) | list asc (100) |", "|---:|---:|---:|---:|---:|"]
    for n, row in res["sizes"].items():
        lines.append(f"| {n:,} | {row['fork']['p50_ms']:.2f} | {row['context']['p50_ms']:.2f} | "
                     f"{row['list_desc_100']['p50_ms']:.2f} | {row['list_asc_100']['p50_ms']:.2f} |")
    return "\n".join(lines)
