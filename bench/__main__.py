"""`python -m bench [--quick]`: run the benchmarks, print a markdown table, write JSON and markdown
to bench/results/, and check the budgets (exit status 1 when one is missed)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
from pathlib import Path

from bench import tree_ops

RESULTS = Path(__file__).parent / "results"
PG_URL = os.environ.get("BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")


async def _pg_fresh(url: str) -> str:
    from sqlalchemy import text

    from branchwise.store.db import create_engine

    engine = create_engine(url)
    async with engine.connect() as conn:
        conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
        await conn.execute(text("DROP DATABASE IF EXISTS branchwise_bench WITH (FORCE)"))
        await conn.execute(text("CREATE DATABASE branchwise_bench"))
    await engine.dispose()
    return url.rsplit("/", 1)[0] + "/branchwise_bench"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    ap.add_argument("--only", choices=["sqlite", "postgresql"], default=None)
    args = ap.parse_args()
    RESULTS.mkdir(exist_ok=True)
    repeat = 10 if args.quick else 30
    out: dict = {"machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0],
                             "platform": platform.platform()}, "tree_ops": []}
    md = []
    checks = []
    dbs = []
    if args.only in (None, "sqlite"):
        db = RESULTS / "bench.db"
        for suffix in ("", "-wal", "-shm"):
            Path(str(db) + suffix).unlink(missing_ok=True)
        dbs.append(f"sqlite:///{db}")
    if args.only in (None, "postgresql"):
        dbs.append(asyncio.run(_pg_fresh(PG_URL)))
    for url in dbs:
        res = asyncio.run(tree_ops.run(url, repeat))
        out["tree_ops"].append(res)
        md.append(tree_ops.table(res))
        checks += [(f"[{res['db']}] {name}", ok, got) for name, ok, got in tree_ops.budget(res)]
    md.append("\n".join(["### Budgets", "", "| budget | result | |", "|---|---:|---|"]
                        + [f"| {name} | {got} | {'met' if ok else 'MISSED'} |" for name, ok, got in checks]))
    text = "\n\n".join(md)
    print(text)
    (RESULTS / "latest.md").write_text(text + "\n")
    (RESULTS / "latest.json").write_text(json.dumps(out, indent=2))
    return 0 if all(ok for _, ok, _ in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
