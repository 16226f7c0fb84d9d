"""Summaries of py-spy's collapsed stacks (`py-spy record --format raw`): where the samples are,
by library ("area" of the innermost frame that belongs to one) and by function."""

from __future__ import annotations

import collections
from pathlib import Path

AREAS = (
    ("sqlite3/aiosqlite", ("aiosqlite/", "sqlite3/")),
    ("asyncpg", ("asyncpg/",)),
    ("sqlalchemy", ("sqlalchemy/",)),
    ("httpx/httpcore (upstream client)", ("httpx/", "httpcore/", "h11/", "anyio/")),
    ("pydantic", ("pydantic/", "pydantic_core/")),
    ("starlette", ("starlette/",)),
    ("uvicorn/httptools", ("uvicorn/", "httptools/")),
    ("branchwise", ("branchwise/",)),
    ("asyncio/uvloop", ("asyncio/", "uvloop/")),
)

# inclusive time of these, whatever the library at the leaf
SPANS = (
    ("upstream call (httpx)", ("ChatCompletionsBackend.",)),
    ("Store.commit_response", ("Store.commit_response",)),
    ("Store.conversation", ("Store.conversation ",)),
    ("Store.path_chat", ("Store.path_chat",)),
    ("conversation head route (the bench's resets)", ("set_head", "api/conversations.py")),
    ("request body parse (pydantic)", ("parse_body",)),
    ("asyncpg connect/close (pool churn)", ("connect_utils", "Connection.close (asyncpg")),
)


def summarise(raw: Path, top: int = 15) -> dict:
    total = 0
    area: collections.Counter = collections.Counter()
    spans: collections.Counter = collections.Counter()
    selfc: collections.Counter = collections.Counter()
    for line in raw.read_text().splitlines():
        if not line.strip():
            continue
        stack, n = line.rsplit(" ", 1)
        n = int(n)
        total += n
        frames = stack.split(";")
        leaf = frames[-1]
        selfc["(native code, no Python frame)" if leaf.startswith("process ") else leaf] += n
        hit = "other"
        for f in reversed(frames):
            hit = next((name for name, keys in AREAS if any(k in f for k in keys)), None) or hit
            if hit != "other":
                break
        area[hit] += n
        for name, keys in SPANS:
            if any(k in stack for k in keys):
                spans[name] += n
    pc = (lambda v: round(100 * v / total, 1)) if total else (lambda v: 0.0)
    return {"samples": total,
            "by_library_pct": {k: pc(v) for k, v in area.most_common()},
            "spans_pct": {k: pc(v) for k, v in spans.most_common()},
            "top_self_pct": {k: pc(v) for k, v in selfc.most_common(top)}}
