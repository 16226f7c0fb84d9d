"""`branchwise serve`: the API under uvicorn, one process or several behind one port."""

from __future__ import annotations

import os

import typer


def serve(
    host: str = typer.Option(None, help="Interface to bind (default: BRANCHWISE_HOST or 127.0.0.1)."),
    port: int = typer.Option(None, help="Port (default: BRANCHWISE_PORT or 8000)."),
    workers: int = typer.Option(1, help="Worker processes sharing the port."),
    log_level: str = typer.Option("warning", help="uvicorn log level."),
) -> None:
    """Serve the API."""
    import uvicorn

    from branchwise.settings import Settings

    settings = Settings()
    host = host or settings.host
    port = port or settings.port
    # No proxy-header rewriting: branchwise never reads the client's address, and the layer costs
    # CPU on every request.
    kwargs = dict(host=host, port=port, log_level=log_level, access_log=False, lifespan="on", proxy_headers=False)
    try:
        import uvloop  # noqa: F401

        kwargs["loop"] = "uvloop"
    except ImportError:
        pass
    try:
        import httptools  # noqa: F401

        kwargs["http"] = "httptools"
    except ImportError:
        pass
    typer.echo(f"branchwise serving on http://{host}:{port} (database: {settings.database_url})")
    if workers > 1:
        os.environ.setdefault("BRANCHWISE_DATABASE_URL", settings.database_url)
        uvicorn.run("branchwise.app:create_app", factory=True, workers=workers, **kwargs)
    else:
        from branchwise.app import create_app

        uvicorn.run(create_app(settings), **kwargs)
