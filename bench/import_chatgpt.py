"""`python -m bench.import_chatgpt [--conversations N] [--messages M] [--db sqlite|postgresql]`: how long
`branchwise import chatgpt` takes for a generated export (branchwise.testing.chatgpt_export),
first into an empty database, then again (everything already there), with the two passes (the
check, the import) timed apart. On PostgreSQL it makes a database of its own on the server
`BENCH_PG_URL` names and drops it at the end. Not part of `python -m bench`: a figure for
docs/decisions/0056-importing-chatgpt-exports.md, measured when the import changes."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from branchwise.testing import chatgpt_export

PG_URL = os.environ.get("BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")


@contextlib.contextmanager
def _database(kind: str, tmp: str):
    if kind == "sqlite":
        yield f"sqlite:///{tmp}/bench.db"
        return
    import asyncpg

    name = f"branchwise_bench_import_{os.getpid()}"

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(PG_URL)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(admin(f"CREATE DATABASE {name}"))
    try:
        yield f"{PG_URL.rsplit('/', 1)[0]}/{name}"
    finally:
        asyncio.run(admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


def _run(db_url: str, path: Path) -> float:
    env = {**os.environ, "BRANCHWISE_DATABASE_URL": db_url}
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "branchwise", "import", "chatgpt", str(path)], env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.import_chatgpt")
    parser.add_argument("--conversations", type=int, default=2000)
    parser.add_argument("--messages", type=int, default=20)
    parser.add_argument("--db", choices=("sqlite", "postgresql"), default="sqlite")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, _database(args.db, tmp) as db_url:
        export = chatgpt_export.export(args.conversations, messages=args.messages)
        items = sum(1 for c in export for n in c["mapping"].values() if n["message"] is not None)
        path = chatgpt_export.write(Path(tmp) / "conversations.json", export)
        size = path.stat().st_size / 1e6
        from branchwise.cli import chatgpt

        started = time.perf_counter()
        for position, raw in chatgpt.Source(path).conversations(lambda _: None):
            chatgpt.check(raw, position)
        check = time.perf_counter() - started
        first = _run(db_url, path)
        again = _run(db_url, path)
    print(f"export: {args.conversations} conversations, {items} items, {size:.1f} MB")
    print(f"the check alone (first pass): {check:.2f} s")
    print(f"import into {db_url.split(':')[0]}: {first:.2f} s ({args.conversations / first:.0f} conversations/s, "
          f"{items / first:.0f} items/s, process start included)")
    print(f"the same again (nothing new): {again:.2f} s")


if __name__ == "__main__":
    main()
