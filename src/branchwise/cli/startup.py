"""What `branchwise serve` checks before it serves, and start-up failures as one short message
that names the cause and the fix (no traceback, unless `--log-level debug`).

The checks run in the command's own process, before uvicorn starts: the settings (environment
and config file), the database (reached, and its schema migrated), the embedded model's file,
the listening socket. Each failure becomes a `StartupError`; `explain` turns the exceptions that
libraries raise for them into one.
"""

from __future__ import annotations

import asyncio
import errno
import os
import re
import socket
import sqlite3
from collections.abc import Iterator
from pathlib import Path

from pydantic import ValidationError

from branchwise.settings import ConfigError, Settings, config_file

DB_CHECK_TIMEOUT_S = 30.0


class StartupError(Exception):
    """A reason the server cannot start, worded for the operator."""


# ------------------------------------------------------------------ settings


def load_settings() -> Settings:
    try:
        return Settings()
    except ConfigError as e:
        raise StartupError(str(e)) from None
    except ValidationError as e:
        raise StartupError(settings_message(e)) from None


def _key_line(path: Path, loc: tuple) -> int | None:
    """The line of `loc` (a field, or `upstreams`, index, field) in the TOML file, found by
    reading it: pydantic does not know where a value came from."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return None
    start = 0
    if len(loc) >= 2 and isinstance(loc[1], int):  # an entry of an array of tables: its header first
        headers = [i for i, line in enumerate(lines) if re.match(rf"\s*\[\[\s*{re.escape(str(loc[0]))}\s*\]\]", line)]
        if loc[1] < len(headers):
            start = headers[loc[1]]
            if len(loc) == 2:
                return start + 1
        loc = loc[2:]
    if not loc:
        return None
    key = re.compile(rf"\s*{re.escape(str(loc[0]))}\s*=")
    for i in range(start, len(lines)):
        if key.match(lines[i]):
            return i + 1
    return start + 1 if start else None


def settings_message(e: ValidationError) -> str:
    """A settings error, by where the value came from: its `BRANCHWISE_*` variable, or the config
    file (with the line)."""
    path = config_file()
    out = []
    for err in e.errors():
        loc = tuple(err["loc"])
        field = str(loc[0]) if loc else "?"
        env = f"BRANCHWISE_{field.upper()}"
        value = err.get("input")
        what = err["msg"].removeprefix("Value error, ")
        if env in os.environ:
            out.append(f"invalid setting {env}={os.environ[env]!r}: {what}")
        elif path is not None:
            dotted = ".".join(f"[{p}]" if isinstance(p, int) else str(p) for p in loc).replace(".[", "[")
            line = _key_line(path, loc)
            where = f"{path}, line {line}" if line else str(path)
            shown = f" = {value!r}" if not isinstance(value, dict | list) else ""
            out.append(f"invalid setting in {where}: {dotted}{shown}: {what}")
        else:
            out.append(f"invalid setting {field}: {what}")
    return "; ".join(out)


# ------------------------------------------------------------------ the database


def _chain(e: BaseException) -> Iterator[BaseException]:
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        nxt = getattr(e, "orig", None)
        e = nxt if isinstance(nxt, BaseException) else (e.__cause__ or e.__context__)


def database_message(url: str, e: BaseException) -> str | None:
    """The operator's message for an error met while opening `url`, or None when unknown."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    if isinstance(e, ArgumentError | ValueError) and "sqlite" not in url:
        return (f"the database URL {url!r} (BRANCHWISE_DATABASE_URL or database_url in the config file) is not "
                f"one branchwise can use: sqlite:///path/file.db or postgresql://user@host:port/database")
    try:
        u = make_url(url)
    except Exception:
        return None
    if u.get_backend_name() == "sqlite":
        path = u.database or ""
        for x in _chain(e):
            if isinstance(x, sqlite3.Error | OSError):
                folder = os.path.dirname(os.path.abspath(path))
                why = ("its folder does not exist" if not os.path.isdir(folder)
                       else "the folder or the file is not writable by this user" if not os.access(folder, os.W_OK)
                       else str(x))
                return (f"cannot open the SQLite database {path}: {why} (create the folder, or point "
                        f"BRANCHWISE_DATABASE_URL at another file: sqlite:///path/file.db)")
        return None
    where = f"{u.host or 'localhost'}:{u.port or 5432}"
    user, name = u.username or os.environ.get("USER", "postgres"), u.database or ""
    shown = u.render_as_string(hide_password=True)
    for x in _chain(e):
        kind = type(x).__name__
        if kind == "InvalidCatalogNameError":
            return (f'PostgreSQL database "{name}" does not exist on {where}: create it with '
                    f"`createdb -h {u.host or 'localhost'} -p {u.port or 5432} -U {user} {name}` "
                    f"(branchwise creates its tables itself), or point BRANCHWISE_DATABASE_URL at another database")
        if kind in ("InvalidPasswordError", "InvalidAuthorizationSpecificationError"):
            return (f"PostgreSQL at {where} refused user {user!r}: {x} (check the user and password in "
                    f"BRANCHWISE_DATABASE_URL, and pg_hba.conf)")
        if kind == "TooManyConnectionsError":
            return (f"PostgreSQL at {where} has no connection left for branchwise: {x} (raise max_connections, "
                    f"or lower BRANCHWISE_DB_POOL_SIZE or --workers)")
        if isinstance(x, socket.gaierror):
            return f"cannot find the PostgreSQL host {u.host!r} ({x.strerror}): check BRANCHWISE_DATABASE_URL ({shown})"
        if isinstance(x, ConnectionRefusedError) or (isinstance(x, OSError) and x.errno == errno.ECONNREFUSED):
            return (f"cannot connect to PostgreSQL at {where}: connection refused. Is PostgreSQL running and "
                    f"listening there? Check BRANCHWISE_DATABASE_URL ({shown})")
        if isinstance(x, TimeoutError):
            return (f"PostgreSQL at {where} did not answer within {DB_CHECK_TIMEOUT_S:g} s: check the host, the port "
                    f"and any firewall (BRANCHWISE_DATABASE_URL: {shown})")
        if isinstance(x, OSError) and x.strerror:
            return f"cannot connect to PostgreSQL at {where}: {x.strerror} (BRANCHWISE_DATABASE_URL: {shown})"
    return None


def check_database(settings: Settings) -> None:
    """Open the database and bring its schema up to date (what every server process does as it
    starts, here once, where a failure can be explained)."""
    from branchwise.store.connect import create_engine, migrate

    async def run() -> None:
        engine = create_engine(settings.database_url, settings.db_pool_size, settings.db_pool_timeout)
        try:
            await asyncio.wait_for(migrate(engine), DB_CHECK_TIMEOUT_S)
        finally:
            await engine.dispose()

    try:
        asyncio.run(run())
    except Exception as e:
        message = database_message(settings.database_url, e)
        if message is None:
            raise
        raise StartupError(message) from e


# ------------------------------------------------------------------ the rest


def check_models(settings: Settings) -> None:
    """The backends the routes name exist, and the embedded model's file is there when it is used."""
    from branchwise.backends import registry

    routes = settings.routes()
    for cfg in routes:
        if cfg.kind not in registry.kinds():
            raise StartupError(f"upstream {cfg.name!r} has kind {cfg.kind!r}, which branchwise does not know "
                               f"(known: {', '.join(registry.kinds())})")
    if not routes or any(cfg.kind == "local" for cfg in routes):
        from branchwise.backends.local import LocalModelMissingError, default_model_path

        try:
            default_model_path(settings.local_model_path)
        except LocalModelMissingError as e:
            raise StartupError(str(e)) from None
    if settings.otlp_endpoint:
        try:
            import opentelemetry.exporter.otlp.proto.http.trace_exporter  # noqa: F401
            import opentelemetry.sdk.trace  # noqa: F401
        except ImportError:
            raise StartupError("BRANCHWISE_OTLP_ENDPOINT is set, but OpenTelemetry is not installed: "
                               "pip install 'branchwise[otel]' (or unset it)") from None


def bind(host: str, port: int) -> socket.socket:
    """The listening socket (bound here, so that a port in use is said at once, and before
    anything says the server is up)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        change = "choose another with --port or BRANCHWISE_PORT"
        if e.errno == errno.EADDRINUSE:
            why = f"port {port} is already in use on {host} (another branchwise, or another server?): stop it, or {change}"
        elif e.errno == errno.EACCES:
            why = f"this user may not listen on port {port} (ports below 1024 need privileges): {change}"
        elif e.errno == errno.EADDRNOTAVAIL or isinstance(e, socket.gaierror):
            why = (f"{host!r} is not an address of this machine: use 127.0.0.1, 0.0.0.0 (every interface) or "
                   f"one of its addresses, with --host or BRANCHWISE_HOST")
        else:
            why = f"{e.strerror or e}"
        raise StartupError(f"cannot listen on {host}:{port}: {why}") from None
    sock.set_inheritable(True)
    return sock

