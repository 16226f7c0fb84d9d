"""The web explorer: static pages served at `/` by the same server as the API.

Nothing here touches the store or the services: the page is plain HTML, CSS and JavaScript
(ES modules, no build step) that calls the public `/v1/` API from the browser, like any other
client (docs/explorer.md). This module only serves the files:

- `/` and `/conversations/{id}`: the same `index.html` (the page routes on the client), with a
  Content-Security-Policy that lets only this origin's scripts run and lets the page connect to
  this origin alone: message text is untrusted, and the sanitizer is not the only wall;
- `/static/...`: the assets. Vendored libraries carry their version in their file names and are
  cached for a year; the explorer's own files are revalidated on every load (ETag), so an
  upgraded server is never paired with a stale script.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

STATIC = Path(__file__).resolve().parent / "static"
VENDOR = STATIC / "vendor"
VENDORED = VENDOR / "VENDORED.json"
"""The vendored libraries: name, version, the npm tarball and its integrity, and each file's
sha256 (tests/test_explorer_assets.py checks the files against it)."""

CSP = "; ".join((
    "default-src 'none'",
    "script-src 'self'",
    "style-src 'self'",
    "img-src 'self' data:",
    "connect-src 'self'",
    "base-uri 'none'",
    "form-action 'none'",
    "frame-ancestors 'none'",
))
_PAGE_HEADERS = {
    "Content-Security-Policy": CSP,
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
_FOREVER = "public, max-age=31536000, immutable"


class Assets(StaticFiles):
    """Starlette's static files (ETag, Last-Modified, 304s, HEAD) with cache headers."""

    def file_response(self, full_path, stat_result, scope: Scope, status_code: int = 200) -> Response:
        response = super().file_response(full_path, stat_result, scope, status_code)
        forever = Path(full_path).parent == VENDOR and not str(full_path).endswith(".json")
        response.headers["Cache-Control"] = _FOREVER if forever else "no-cache"
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response


async def page(request: Request, conversation_id: str | None = None) -> Response:
    return FileResponse(STATIC / "index.html", headers=_PAGE_HEADERS, media_type="text/html")


async def favicon(request: Request) -> Response:
    return FileResponse(STATIC / "favicon.svg", headers={"Cache-Control": "public, max-age=86400"},
                        media_type="image/svg+xml")


def routes() -> list[BaseRoute]:
    """The explorer's routes, for the application's router (`api.app.API(pages=...)`)."""
    return [
        Route("/", page, methods=["GET"]),
        Route("/conversations/{conversation_id}", page, methods=["GET"]),
        Route("/favicon.ico", favicon, methods=["GET"]),
        Mount("/static", Assets(directory=STATIC, follow_symlink=False), name="static"),
    ]


def vendored() -> list[dict]:
    return json.loads(VENDORED.read_text())["packages"]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
