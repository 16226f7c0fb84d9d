"""`branchwise keys`: make, list and revoke API keys, on the database that `serve` uses
(`BRANCHWISE_DATABASE_URL`), while the server runs or not. A server sees a new or revoked key
within `key_refresh_interval` seconds (docs/security.md)."""

from __future__ import annotations

import asyncio
import datetime
import re

import orjson
import typer

from branchwise.settings import Settings
from branchwise.store.connect import create_engine, migrate
from branchwise.store.keys import KeyRow, KeyStore

app = typer.Typer(help="API keys: each key belongs to one project and sees only that project's objects.",
                  no_args_is_help=True, add_completion=False)

PROJECT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
MAX_NAME_CHARS = 128
_KEY_ID = re.compile(r"key_[0-9a-f]{48}")


async def _with_store(work):
    settings = Settings()
    engine = create_engine(settings.database_url, pool_size=2)
    try:
        await migrate(engine)
        return await work(KeyStore(engine))
    finally:
        await engine.dispose()


def _project(value: str) -> str:
    if not PROJECT.fullmatch(value):
        raise typer.BadParameter("1 to 64 characters: letters, digits, '.', '_' or '-', starting with a letter "
                                 "or digit.")
    return value


def _name(value: str | None) -> str | None:
    if value is not None and (not value.strip() or len(value) > MAX_NAME_CHARS or not value.isprintable()):
        raise typer.BadParameter(f"1 to {MAX_NAME_CHARS} printable characters.")
    return value


@app.command()
def create(
    project: str = typer.Option(..., callback=_project, help="The project the key acts for."),
    name: str | None = typer.Option(None, callback=_name, help="A label, to tell keys apart in `keys list`."),
    rpm: int | None = typer.Option(None, min=1, help="Requests per minute the key may make (all /v1 routes)."),
    max_concurrent: int | None = typer.Option(None, min=1,
                                              help="Responses the key may have running at once."),
) -> None:
    """Make a key. Its secret is printed once, alone on the last line; only a hash is kept."""
    row, secret = asyncio.run(_with_store(lambda store: store.create(project, name, rpm, max_concurrent)))
    typer.echo(f"Created {row.id} for project '{row.project}'"
               + (f" ({row.name})" if row.name else "") + ". Its secret, shown only now:", err=False)
    typer.echo(secret)


def _when(t: int | None) -> str:
    return "-" if t is None else datetime.datetime.fromtimestamp(t, datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")


def _as_dict(row: KeyRow) -> dict:
    return {"id": row.id, "project": row.project, "name": row.name, "secret_hint": f"...{row.hint}",
            "rpm": row.rpm, "max_concurrent": row.max_concurrent, "created_at": row.created_at,
            "last_used_at": row.last_used_at, "revoked_at": row.revoked_at}


@app.command("list")
def list_keys(as_json: bool = typer.Option(False, "--json", help="One JSON array, for scripts.")) -> None:
    """Every key: id, project, name, limits, created, last used (never the secret)."""
    rows = asyncio.run(_with_store(lambda store: store.all()))
    if as_json:
        typer.echo(orjson.dumps([_as_dict(r) for r in rows]).decode())
        return
    head = ["id", "project", "name", "secret", "rpm", "concurrent", "created", "last used", "revoked"]
    table = [[r.id, r.project, r.name or "-", f"...{r.hint}", str(r.rpm or "-"), str(r.max_concurrent or "-"),
              _when(r.created_at), _when(r.last_used_at), _when(r.revoked_at)] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *table, strict=True)]
    for line in [head, *table]:
        typer.echo("  ".join(x.ljust(w) for x, w in zip(line, widths, strict=True)).rstrip())


@app.command()
def revoke(key_id: str = typer.Argument(..., help="The key's id (`keys list`).")) -> None:
    """Revoke a key: every server process refuses it within a second or two."""
    if not _KEY_ID.fullmatch(key_id):
        raise typer.BadParameter("expected a key id such as key_0123... (see `branchwise keys list`)",
                                 param_hint="KEY_ID")
    if not asyncio.run(_with_store(lambda store: store.revoke(key_id))):
        typer.echo(f"No key {key_id} that is not revoked already.", err=True)
        raise typer.Exit(1)
    typer.echo(f"Revoked {key_id}.")
