"""`branchwise serve`: the API under uvicorn, one process or several behind one port.

How a server stops (docs/decisions/0035-process-model.md): on SIGTERM or SIGINT it stops
accepting, lets running responses finish for `drain_timeout` seconds and fails the rest cleanly
(the lifespan, `app.py`); uvicorn waits a little longer than that for the connections. With
`--workers`, each worker also stops as soon as its master dies, whatever killed it, with a drain
of at most `MASTER_GONE_DRAIN_S`: workers left serving on the port with no supervisor would keep a
restarted server from binding it. Slow clients are cut off by the protocol in `cli/protocol.py`.
"""

from __future__ import annotations

import asyncio
import logging.config
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

import typer

import branchwise
from branchwise.cli.startup import StartupError
from branchwise.observe import logs
from branchwise.settings import Settings

DRAIN_MARGIN_S = 5.0
"""uvicorn's own deadline for open connections is this much past `drain_timeout`: time for the
responses failed at the drain's end to be stored and their last events sent."""
MASTER_ENV = "BRANCHWISE_SERVE_MASTER_PID"
PR_SET_PDEATHSIG = 1
MASTER_GONE_SIGNAL = signal.SIGUSR2
MASTER_GONE_DRAIN_S = 1.0
"""A worker whose master died drains this long at most (not `drain_timeout`): the port must be
free for a restart within seconds, and what is cut off is failed cleanly, as in any drain."""


def serve(
    host: str = typer.Option(None, help="Interface to bind (default: BRANCHWISE_HOST or 127.0.0.1)."),
    port: int = typer.Option(None, help="Port (default: BRANCHWISE_PORT or 8000)."),
    workers: int = typer.Option(1, min=1, help="Worker processes sharing the port."),
    log_level: str = typer.Option(None, help="critical | error | warning | info | debug (default: "
                                  "BRANCHWISE_LOG_LEVEL or info: a line per request)."),
    log_format: str = typer.Option(None, help="text | json (default: BRANCHWISE_LOG_FORMAT or text)."),
) -> None:
    """Serve the API."""
    debug = (log_level or os.environ.get("BRANCHWISE_LOG_LEVEL", "")).lower() == "debug"
    try:
        _serve(host, port, workers, log_level, log_format)
    except StartupError as e:
        if debug:
            traceback.print_exc()
        typer.echo(f"branchwise: cannot start: {e}", err=True)
        raise typer.Exit(1) from None


def _serve(host: str | None, port: int | None, workers: int, log_level: str | None, log_format: str | None) -> None:
    from branchwise.cli.startup import StartupError, bind, check_database, check_models, load_settings

    settings = load_settings()
    level = (log_level or settings.log_level).lower()
    fmt = (log_format or settings.log_format).lower()
    if level not in logs.LEVELS:
        raise StartupError(f"--log-level {level!r}: use one of {', '.join(logs.LEVELS)}")
    if fmt not in logs.FORMATS:
        raise StartupError(f"--log-format {fmt!r}: use one of {', '.join(logs.FORMATS)}")
    host = host or settings.host
    port = settings.port if port is None else port
    logging.config.dictConfig(logs.log_config(level, fmt))  # (this process's; uvicorn sets each worker's)
    check_models(settings)
    sock = bind(host, port)
    check_database(settings)
    _serve_on(sock, settings, host, workers, level, fmt)


def _serve_on(sock, settings: Settings, host: str, workers: int, level: str, fmt: str) -> None:
    import uvicorn

    port = sock.getsockname()[1]
    # uvicorn's access log is off (server_options): branchwise writes its own request lines.
    kwargs = dict(host=host, port=port, log_config=logs.log_config(level, fmt), log_level=logs.uvicorn_level(level),
                  workers=workers, **server_options(settings))
    try:
        import uvloop  # noqa: F401

        kwargs["loop"] = "uvloop"
    except ImportError:
        pass
    shown = "0.0.0.0" if host in ("", "0.0.0.0") else host
    banner = (f"branchwise {branchwise.__version__} serving on http://{shown}:{port} "
              f"({workers} worker{'s' if workers > 1 else ''}, database {logs.masked_url(settings.database_url)})")
    warn_if_too_many_connections(settings, workers)
    if workers > 1:
        metrics_dir = _metrics_dir()
        os.environ.setdefault("BRANCHWISE_DATABASE_URL", settings.database_url)
        os.environ[MASTER_ENV] = str(os.getpid())
        from uvicorn.supervisors import Multiprocess

        config = uvicorn.Config("branchwise.cli.serve:worker_app", factory=True, **kwargs)
        typer.echo(banner)
        try:
            Multiprocess(config, sockets=[sock]).run()
        finally:
            if metrics_dir is not None:
                shutil.rmtree(metrics_dir, ignore_errors=True)
        return
    from branchwise.app import create_app

    prepare_process(settings)
    server = _announcing_server()(uvicorn.Config(create_app(settings), **kwargs))
    server.banner = banner
    server.run(sockets=[sock])
    if not server.started:
        raise typer.Exit(3)


class _Announcing:
    """uvicorn's server, saying it serves once it does (after the bind and the application's
    start-up), not before."""

    banner = ""

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.started and self.banner:
            typer.echo(self.banner)


def _announcing_server():
    """(Made on first use: importing uvicorn at the module's top would slow every command.)"""
    import uvicorn

    return type("_AnnouncingServer", (_Announcing, uvicorn.Server), {})


def _metrics_dir() -> str | None:
    """Prometheus multiprocess mode for `--workers`: each worker counts into files under
    `PROMETHEUS_MULTIPROC_DIR`, which must be empty when they start. An operator's own
    directory is emptied of its metric files; otherwise a fresh one is made and removed at the
    end (returned)."""
    given = os.environ.get(metrics_env())
    if given:
        for f in Path(given).glob("*.db"):
            f.unlink(missing_ok=True)
        return None
    made = tempfile.mkdtemp(prefix="branchwise-metrics-")
    os.environ[metrics_env()] = made
    return made


def metrics_env() -> str:
    return "PROMETHEUS_MULTIPROC_DIR"  # (read by prometheus-client as it is imported in a worker)


def server_options(settings: Settings) -> dict:
    """uvicorn's options for serving the app (the tests' real servers take them too)."""
    from branchwise.cli.protocol import SlowClientProtocol

    # No proxy-header rewriting: branchwise never reads the client's address, and the layer costs
    # CPU on every request. WebSockets (/v1/responses in WebSocket mode) are uvicorn's, over the
    # `websockets` package; a message may be as long as a request body.
    return dict(access_log=False, lifespan="on", proxy_headers=False,
                timeout_graceful_shutdown=settings.drain_timeout + DRAIN_MARGIN_S, http=SlowClientProtocol,
                ws="websockets-sansio", ws_max_size=settings.max_body_bytes)


def prepare_process(settings: Settings) -> None:
    """What each serving process sets up before its first connection."""
    from branchwise.cli.protocol import SlowClientProtocol

    SlowClientProtocol.configure(settings.header_timeout, settings.body_timeout)


def worker_app():
    """The application of one `--workers` worker (uvicorn calls it in the worker, before serving)."""
    from branchwise.app import create_app

    settings = Settings()
    master = os.environ.get(MASTER_ENV)
    if master:
        stop_with_master(int(master), settings)
    prepare_process(settings)
    return create_app(settings)


def stop_with_master(master: int, settings: Settings) -> None:
    """Stop this process, with a short drain, as soon as `master` dies, by any signal, kill -9
    too.

    On Linux the kernel signals it (`PR_SET_PDEATHSIG`); elsewhere a thread watches the parent
    process id. A master that died before the request was made is caught by the check after it.
    """

    def master_gone(*_) -> None:
        # read by the drain that the SIGTERM below begins (the lifespan's stop-signal callback)
        settings.drain_timeout = min(settings.drain_timeout, MASTER_GONE_DRAIN_S)
        os.kill(os.getpid(), signal.SIGTERM)

    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            signal.signal(MASTER_GONE_SIGNAL, master_gone)
            if libc.prctl(PR_SET_PDEATHSIG, int(MASTER_GONE_SIGNAL), 0, 0, 0) == 0:
                if os.getppid() != master:
                    master_gone()
                return
        except (OSError, AttributeError):
            pass
    threading.Thread(target=_watch_master, args=(master, master_gone), name="master-watch", daemon=True).start()


def _watch_master(master: int, master_gone) -> None:
    while os.getppid() == master:
        time.sleep(0.5)
    master_gone()


# -- PostgreSQL connections

def pg_connections_per_process(settings: Settings) -> int:
    """Connections one server process opens to PostgreSQL at most (`BRANCHWISE_DB_POOL_SIZE`)."""
    from branchwise.store.connect import connections_per_process

    return connections_per_process(settings)


async def _pg_limits(url: str) -> tuple[int, int]:
    import asyncpg
    from sqlalchemy.engine import make_url

    dsn = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    conn = await asyncpg.connect(dsn, timeout=5)
    try:
        row = await conn.fetchrow("SELECT current_setting('max_connections')::int AS max, "
                                  "current_setting('superuser_reserved_connections')::int AS reserved")
        return row["max"], row["reserved"]
    finally:
        await conn.close()


def warn_if_too_many_connections(settings: Settings, workers: int) -> None:
    """On PostgreSQL, warn (stderr) when the server's processes could open more connections than
    the database takes: past that, requests fail on connections refused instead of waiting for
    one."""
    if not settings.database_url.startswith(("postgresql", "postgres")):
        return
    try:
        max_connections, reserved = asyncio.run(asyncio.wait_for(_pg_limits(settings.database_url), 10))
    except Exception:  # unreachable now: the server itself reports it as it starts
        return
    per_process = pg_connections_per_process(settings)
    need, room = workers * per_process, max_connections - reserved
    if need > room:
        typer.echo(
            f"warning: {workers} worker(s) x {per_process} PostgreSQL connections each = {need}, but the "
            f"database takes {room} (max_connections {max_connections} less "
            f"superuser_reserved_connections {reserved}); raise max_connections in postgresql.conf or run "
            f"fewer --workers", err=True)
