"""The explorer's files and how they are served, without a browser: the vendored libraries are
the published files (their sha256 as recorded), every file a page or module asks for exists and
is packaged, nothing is fetched from another origin, and the headers (Content-Security-Policy,
caching) are what docs/explorer.md says. The page itself is tested in a real browser in
tests/test_explorer_browser.py."""

from __future__ import annotations

import fnmatch
import re
import tomllib
from pathlib import Path

import httpx2
import pytest

from branchwise import explorer
from branchwise.app import create_app
from branchwise.settings import Settings

from .conftest import ROOT

STATIC = explorer.STATIC
OWN = sorted(p for p in STATIC.rglob("*") if p.is_file() and p.parent != explorer.VENDOR)


def test_vendored_files_are_the_published_ones():
    packages = explorer.vendored()
    assert {p["name"] for p in packages} == {"marked", "dompurify"}
    recorded = set()
    for package in packages:
        assert re.fullmatch(r"\d+\.\d+\.\d+", package["version"]) and package["integrity"].startswith("sha512-")
        for f in package["files"]:
            path = explorer.VENDOR / f["to"]
            assert explorer.sha256(path) == f["sha256"], f"{f['to']} is not the file of {package['name']} " \
                                                         f"{package['version']} recorded in VENDORED.json"
            assert package["version"] in f["to"]  # versioned names: cached for a year, safely
            recorded.add(f["to"])
        assert any(f["to"].endswith(".LICENSE") for f in package["files"]), package["name"]
    present = {p.name for p in explorer.VENDOR.iterdir()} - {"VENDORED.json"}
    assert present == recorded, "a vendored file without a record (or a record without its file)"
    # the modules import exactly the recorded versions
    render = (STATIC / "render.js").read_text()
    for package in packages:
        for f in package["files"]:
            if f["to"].endswith(".js"):
                assert f"./vendor/{f['to']}" in render


def _references(path: Path) -> set[str]:
    text = path.read_text()
    if path.suffix == ".html":
        return set(re.findall(r'(?:src|href)="(/static/[^"]+)"', text))
    if path.suffix == ".js":
        return {f"/static/{m}" for m in re.findall(r"""from\s+'\./([^']+)'""", text)}
    return set()


def test_every_referenced_file_exists_and_is_packaged():
    refs = set()
    for path in OWN:
        refs |= _references(path)
    assert "/static/app.js" in refs and "/static/vendor/marked-18.3.0.esm.js" in refs
    for ref in refs:
        assert (STATIC / ref.removeprefix("/static/")).is_file(), ref
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["branchwise"]
    pkg = STATIC.parent.parent
    for path in STATIC.rglob("*"):
        if path.is_file():
            rel = str(path.relative_to(pkg))
            assert any(fnmatch.fnmatch(rel, p) for p in patterns), f"{rel} would not be installed"


def test_no_other_origin_is_named():
    """No CDN, no font service: the explorer's own files name no URL but the SVG namespace."""
    for path in OWN:
        urls = set(re.findall(r"https?://[^\s'\"<>)]+", path.read_text()))
        assert urls <= {"http://www.w3.org/2000/svg"}, (path.name, urls)


@pytest.fixture
async def served(tmp_path):
    async def open_app(**settings):
        app = create_app(Settings(database_url=f"sqlite:///{tmp_path / 'b.db'}", **settings))
        cm = app.router.lifespan_context(app)
        await cm.__aenter__()
        opened.append(cm)
        return httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url="http://test")

    opened: list = []
    yield open_app
    for cm in opened:
        await cm.__aexit__(None, None, None)


async def test_pages_and_their_headers(served):
    c = await served()
    index = (STATIC / "index.html").read_text()
    for path in ("/", "/conversations/conv_123", "/conversations/anything"):
        r = await c.get(path)
        assert r.status_code == 200 and r.text == index, path
        assert r.headers["content-type"].startswith("text/html")
        csp = r.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "connect-src 'self'" in csp and "default-src 'none'" in csp
        assert "img-src 'self' data:" in csp and "frame-ancestors 'none'" in csp
        assert r.headers["cache-control"] == "no-cache" and r.headers["x-content-type-options"] == "nosniff"
    r = await c.get("/static/app.js")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/javascript")
    assert r.headers["cache-control"] == "no-cache"
    again = await c.get("/static/app.js", headers={"if-none-match": r.headers["etag"]})
    assert again.status_code == 304
    r = await c.get("/static/vendor/marked-18.3.0.esm.js")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/javascript")
    assert r.headers["cache-control"] == "public, max-age=31536000, immutable"
    r = await c.get("/favicon.ico")
    assert r.status_code == 200 and r.headers["content-type"] == "image/svg+xml"
    for missing in ("/static/nope.js", "/static/../__init__.py", "/conversations/a/b", "/static"):
        r = await c.get(missing)
        assert r.status_code == 404 and r.json()["error"]["message"] == "Not found.", missing
    r = await c.post("/")
    assert r.status_code == 405
    assert (await c.head("/")).status_code == 200


async def test_pages_need_no_key_but_the_api_does(served):
    """The page holds no data (it asks the API, with the key the user gives it): it is served
    to anyone, while /v1/ still wants the key."""
    c = await served(api_key="sekrit")
    assert (await c.get("/")).status_code == 200
    assert (await c.get("/static/app.js")).status_code == 200
    assert (await c.get("/v1/models")).status_code == 401
    assert (await c.get("/v1/models", headers={"authorization": "Bearer sekrit"})).status_code == 200


async def test_explorer_can_be_switched_off(served):
    c = await served(explorer=False)
    for path in ("/", "/conversations/conv_1", "/static/app.js"):
        assert (await c.get(path)).status_code == 404, path
    assert (await c.get("/healthz")).status_code == 200
