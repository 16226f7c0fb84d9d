"""Helpers for the tests of API keys, projects, idempotency and limits: keys made with the real
CLI, and SDK clients that use them."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import httpx2
import openai
from typer.testing import CliRunner

from branchwise.cli import app as cli


def keys_cli(db_url: str, *args: str):
    """`branchwise keys ...` on `db_url` (in a thread of its own: the CLI runs its own event
    loop, and a test's loop may be running in this one)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BRANCHWISE_")}
    env["BRANCHWISE_DATABASE_URL"] = db_url

    def invoke():
        return CliRunner().invoke(cli, ["keys", *args], env=env, catch_exceptions=False)

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(invoke).result()


def make_key(db_url: str, project: str, *options: str) -> tuple[str, str]:
    """A new key of `project` (options as on the command line): (its id, its secret)."""
    result = keys_cli(db_url, "create", "--project", project, *options)
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    key_id = lines[0].split()[1]
    return key_id, lines[-1]


def sdk(app, secret: str) -> openai.AsyncOpenAI:
    """The SDK on `app` in-process, with `secret` as its API key."""
    http = httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url="http://test")
    return openai.AsyncOpenAI(api_key=secret, base_url="http://test/v1", http_client=http, max_retries=0)


def raw_client(app, secret: str | None = None) -> httpx2.AsyncClient:
    headers = {"authorization": f"Bearer {secret}"} if secret else {}
    return httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url="http://test", headers=headers)
