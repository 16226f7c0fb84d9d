"""Fixtures: both real databases, the mock upstream over real HTTP, and the official SDK.

Every test that takes `db_url` (directly or through `app` / `client`) runs twice: once on a
SQLite file, once on PostgreSQL (a database made for this session on the server that
`BRANCHWISE_TEST_PG` names, 127.0.0.1:5432 by default).

What the suite needs from outside the checkout, PostgreSQL and the forum's `../shared`
directory (`BRANCHWISE_TEST_SHARED` names another), is checked once: a test that needs one that
is missing is skipped with the reason, except under `CI=true`, where it fails instead.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import httpx2
import openai
import pytest
from sqlalchemy import make_url, text

from branchwise.app import create_app
from branchwise.settings import Settings
from branchwise.store.connect import create_engine
from branchwise.testing.mock_upstream import MockUpstream
from tests import open_responses_spec

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("BRANCHWISE_TEST_SHARED") or ROOT.parent / "shared")
PG_ADMIN_URL = os.environ.get("BRANCHWISE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
# unique per run: two runs at once (two checkouts, two engineers) must not share a database
PG_DB = f"branchwise_test_{os.getpid()}_{secrets.token_hex(3)}"
IN_CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")
PG_CONNECT_TIMEOUT_S = 3


def unavailable(reason: str) -> None:
    """Skip the current test for a missing outside resource; under CI=true, fail it instead
    (a CI run that silently skipped the PostgreSQL half would pass for the wrong reason)."""
    if IN_CI:
        pytest.fail(f"{reason} [CI=true: required, not skipped]", pytrace=False)
    pytest.skip(reason)


_pg_problems: dict[str, str | None] = {}


def pg_problem(url: str = PG_ADMIN_URL) -> str | None:
    """Why PostgreSQL at `url` cannot be used (None when it can); asked once per session."""
    if url not in _pg_problems:
        import asyncpg

        async def probe() -> None:
            conn = await asyncpg.connect(make_url(url).set(drivername="postgresql").render_as_string(False),
                                         timeout=PG_CONNECT_TIMEOUT_S)
            await conn.close()

        shown = make_url(url).render_as_string(hide_password=True)
        try:
            run_async(asyncio.wait_for(probe(), PG_CONNECT_TIMEOUT_S + 1))
            _pg_problems[url] = None
        except Exception as e:  # refused, timed out, unknown database, authentication ...
            why = f"{type(e).__name__}: {e}".splitlines()[0][:160]
            _pg_problems[url] = f"PostgreSQL not reachable at {shown} (set BRANCHWISE_TEST_PG) - {why}"
    return _pg_problems[url]


def require_pg(url: str = PG_ADMIN_URL) -> None:
    if (problem := pg_problem(url)) is not None:
        unavailable(problem)


def require_shared(relative: str = "") -> Path:
    """A path under the forum's shared directory; skips (fails under CI) when it is missing."""
    path = SHARED / relative
    if not path.exists():
        unavailable(f"{path} not found (the forum's ../shared; set BRANCHWISE_TEST_SHARED)")
    return path


# ---------------------------------------------------------------- Open Responses conformance

_recorder = open_responses_spec.Recorder()


@pytest.fixture(scope="session", autouse=True)
def _open_responses_spec() -> Iterator[open_responses_spec.Spec | None]:
    """Every in-process app of the session is reached through `httpx2.ASGITransport`; wrapped
    here, so that what any test makes the server send on `/v1/responses` is recorded (see
    tests/open_responses_spec.py). Without ../shared nothing is checked (test_open_responses.py
    says so)."""
    path = SHARED / "reference/open-responses/openapi.json"
    if not path.exists():
        yield None
        return
    transport = httpx2.ASGITransport

    class RecordingTransport(transport):
        def __init__(self, app, *args, **kwargs):
            super().__init__(_recorder.wrap(app), *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(httpx2, "ASGITransport", RecordingTransport)
        yield open_responses_spec.load(path)


@pytest.fixture(autouse=True)
def _open_responses_conformance(_open_responses_spec):
    """Fails a test whose `/v1/responses` replies (objects, events, errors) the Open Responses
    OpenAPI document does not allow, naming each reply, path and value."""
    _recorder.take()
    yield
    replies = _recorder.take()
    if _open_responses_spec is None:
        return
    problems = [p for r in replies for p in open_responses_spec.reply_problems(_open_responses_spec, r)]
    if problems:
        shown = "\n".join(problems[:20]) + (f"\n... and {len(problems) - 20} more" if len(problems) > 20 else "")
        pytest.fail(f"not valid against the Open Responses OpenAPI document:\n{shown}", pytrace=False)


@pytest.fixture(scope="session")
def mock() -> Iterator[MockUpstream]:
    with MockUpstream() as m:
        yield m


def run_async(coro):
    """Run a coroutine to completion from sync code, even while a loop runs in this thread."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this test session (skipped when there is no server)."""
    require_pg()

    async def admin(sql: str) -> None:
        engine = create_engine(PG_ADMIN_URL)
        async with engine.connect() as conn:
            conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
            await conn.execute(text(sql))
        await engine.dispose()

    run_async(admin(f"DROP DATABASE IF EXISTS {PG_DB}"))
    run_async(admin(f"CREATE DATABASE {PG_DB}"))
    base = PG_ADMIN_URL.rsplit("/", 1)[0]
    yield f"{base}/{PG_DB}"
    run_async(admin(f"DROP DATABASE IF EXISTS {PG_DB} WITH (FORCE)"))


async def _truncate(url: str) -> None:
    engine = create_engine(url)
    async with engine.begin() as conn:
        exists = (await conn.execute(text("SELECT to_regclass('items') IS NOT NULL"))).scalar()
        if exists:
            await conn.execute(text("TRUNCATE items, conversations, conversation_metadata, responses, prompts, prompt_versions,"
                                    " history_blocks"))
            if (await conn.execute(text("SELECT to_regclass('api_keys') IS NOT NULL"))).scalar():
                await conn.execute(text("TRUNCATE api_keys, key_slots, rate_windows, idempotency"))
    await engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'branchwise.db'}"
    url = request.getfixturevalue("pg_url")
    run_async(_truncate(url))
    return url


@pytest.fixture
def pg_empty(pg_url) -> str:
    """The session's PostgreSQL database, emptied: for tests on PostgreSQL alone (two servers
    sharing it)."""
    run_async(_truncate(pg_url))
    return pg_url


@pytest.fixture
async def db_engine(db_url):
    """An engine of the test's own on its database: for rows that no API shows (what a refused
    or failed request left in the tables), looked at without reaching into the app."""
    engine = create_engine(db_url)
    yield engine
    await engine.dispose()


@pytest.fixture
def settings(db_url, mock) -> Settings:
    return Settings(database_url=db_url, upstream_base_url=mock.url, upstream_supports_n=True)


@pytest.fixture
async def app(settings):
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        yield app


@pytest.fixture
async def client(app) -> AsyncIterator[openai.AsyncOpenAI]:
    """The official SDK, in-process over httpx2's ASGI transport."""
    http = httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url="http://test")
    async with openai.AsyncOpenAI(api_key="test-key", base_url="http://test/v1", http_client=http,
                                  max_retries=0) as c:
        yield c


@pytest.fixture
async def raw(app) -> AsyncIterator[httpx2.AsyncClient]:
    """A plain HTTP client on the same app, for what the SDK cannot send (bad input)."""
    async with httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url="http://test") as c:
        yield c


@pytest.fixture(autouse=True)
def _clear_mock_log(request):
    if "mock" in request.fixturenames:
        m = request.getfixturevalue("mock")
        m.clear()
        m.app.reset_models()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`branchwise serve` in a subprocess, over a real socket."""

    def __init__(self, env: dict[str, str], port: int | None = None, workers: int = 1,
                 log_level: str | None = None, args: tuple[str, ...] = ()):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("BRANCHWISE_")}
        full_env.update(env)
        # the server's output goes to a file: a pipe nobody reads would fill and freeze the server
        self.log = tempfile.NamedTemporaryFile(prefix="branchwise-serve-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "branchwise", "serve", "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", str(workers), "--log-level",
             log_level or os.environ.get("BRANCHWISE_TEST_SERVE_LOG", "warning"), *args],
            env=full_env, cwd=str(ROOT), stdout=self.log, stderr=subprocess.STDOUT,
        )

    def output(self) -> str:
        return Path(self.log.name).read_text(errors="replace")

    def wait_ready(self, timeout: float = 60) -> Server:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"branchwise serve exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError("branchwise serve did not become ready")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        Path(self.log.name).unlink(missing_ok=True)


@pytest.fixture
def serve():
    servers: list[Server] = []

    def start(env: dict[str, str], workers: int = 1, log_level: str | None = None,
              args: tuple[str, ...] = ()) -> Server:
        s = Server(env, workers=workers, log_level=log_level, args=args)
        servers.append(s)
        return s.wait_ready()

    yield start
    for s in servers:
        s.stop()
