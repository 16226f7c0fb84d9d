"""The stored data for the commands that read or write it (`import`, `export`, `tree`): the
database `serve` uses (`BRANCHWISE_DATABASE_URL`), reached through the same repository, so they
may run while a server runs. On SQLite their writes take the file lock the server's writer
takes (`store.sqlite_writer`); on PostgreSQL they are plain transactions. They act for one
project (`--project`, `default` unless said: docs/security.md), as a key of it would."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Coroutine
from typing import Any, NoReturn

import typer

from branchwise.core import projects
from branchwise.settings import Settings
from branchwise.store.connect import create_engine, migrate
from branchwise.store.repository import Repository

POOL_SIZE = 3
"""PostgreSQL connections a command opens at most (both pools together)."""
PROJECT = typer.Option(projects.DEFAULT_PROJECT, "--project",
                       help="The project whose conversations the command reads or writes (docs/security.md).")


class CliError(Exception):
    """What went wrong, in one line for the person at the terminal."""


def fail(message: str, code: int = 1) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run a command's coroutine; a `CliError` becomes its one-line message and exit status 1."""
    try:
        return asyncio.run(coro)
    except CliError as e:
        fail(str(e))


@contextlib.asynccontextmanager
async def repository(settings: Settings | None = None,
                     project: str = projects.DEFAULT_PROJECT) -> AsyncIterator[Repository]:
    """The repository on the configured database, its schema brought up to date first (as a
    server does when it starts), acting for `project`."""
    settings = settings or Settings()
    projects.enter(projects.Caller(project))  # (for the rest of this command's task)
    engine = create_engine(settings.database_url, POOL_SIZE, settings.db_pool_timeout)
    try:
        try:
            await migrate(engine)
        except Exception as e:  # unreachable, refused, not a database ...
            raise CliError(f"cannot open the database {_shown(settings.database_url)}: "
                           f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        repo = Repository(engine, history_cache_bytes=0)
        try:
            yield repo
        finally:
            await repo.close()
    finally:
        await engine.dispose()


def _shown(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)
