"""Running `branchwise` commands in tests: in-process (typer's runner), on the test's database."""

from __future__ import annotations

import asyncio

from click.testing import Result
from sqlalchemy import text
from typer.testing import CliRunner

from branchwise.cli import app

_runner = CliRunner()


def cli(db_url: str, *args: str, input: str | None = None, env: dict[str, str] | None = None) -> Result:
    """`branchwise ARGS` on the database `db_url` (wide columns: lines are not wrapped)."""
    return _runner.invoke(app, list(args), input=input,
                          env={"BRANCHWISE_DATABASE_URL": db_url, "COLUMNS": "200", **(env or {})})


async def acli(db_url: str, *args: str, input: str | None = None) -> Result:
    """`cli` from an async test: the command runs its own event loop, so on a thread."""
    return await asyncio.to_thread(cli, db_url, *args, input=input)


def listed(result: Result) -> list[tuple[str, str, str]]:
    """The (conversation id, new | already imported, title) lines of `import ... --list`."""
    out = []
    for line in result.stdout.splitlines():
        if line.startswith("conv_"):
            conv_id, state, title = (line.split("\t") + [""])[:3]
            out.append((conv_id, state, title))
    return out


async def counts(engine) -> tuple[int, int]:
    """(conversations, items) in the database."""
    async with engine.connect() as conn:
        convs = (await conn.execute(text("SELECT count(*) FROM conversations"))).scalar()
        items = (await conn.execute(text("SELECT count(*) FROM items"))).scalar()
    return convs, items


def stored_counts(db_url: str) -> tuple[int, int]:
    """`counts` from a test without an event loop (the schema made first, for a command that
    never opened the database)."""
    from branchwise.store.connect import create_engine, migrate

    from .conftest import run_async

    async def read() -> tuple[int, int]:
        engine = create_engine(db_url)
        try:
            await migrate(engine)
            return await counts(engine)
        finally:
            await engine.dispose()

    return run_async(read())
