"""API keys: made, listed and revoked with `branchwise keys`; once one exists every /v1 route
needs one; BRANCHWISE_API_KEY is a key of the `default` project; revocation reaches every
process within seconds; secrets are never stored nor logged."""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
import sys
import time

import httpx
import openai
import orjson
import pytest
from sqlalchemy import text

from branchwise.app import create_app
from branchwise.settings import Settings

from .conftest import ROOT
from .helpers import MODEL, check_error, serving
from .teams import keys_cli, make_key, raw_client, sdk


async def _rows(db_engine, sql: str) -> list[tuple]:
    async with db_engine.connect() as conn:
        return [tuple(r) for r in (await conn.execute(text(sql))).all()]


async def test_keys_create_list_revoke(db_url, db_engine):
    result = keys_cli(db_url, "create", "--project", "team-a", "--name", "ci runner", "--rpm", "100",
                      "--max-concurrent", "4")
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    secret = lines[-1]
    assert secret.startswith("sk-bw-") and len(secret) >= 40 and " " not in secret  # alone on its line
    key_id = lines[0].split()[1]
    assert key_id.startswith("key_")
    # only a hash is kept: the secret is nowhere in the table
    stored = await _rows(db_engine, "SELECT * FROM api_keys")
    assert len(stored) == 1 and not any(secret in str(v) for v in stored[0])
    assert (await _rows(db_engine, "SELECT secret_hash FROM api_keys"))[0][0] == \
        hashlib.sha256(secret.encode()).hexdigest()

    listed = keys_cli(db_url, "list")
    assert listed.exit_code == 0 and key_id in listed.output and "team-a" in listed.output
    assert secret not in listed.output and secret[-4:] in listed.output  # a hint, never the secret
    [row] = orjson.loads(keys_cli(db_url, "list", "--json").output)
    assert row["id"] == key_id and row["project"] == "team-a" and row["name"] == "ci runner"
    assert row["rpm"] == 100 and row["max_concurrent"] == 4 and row["created_at"] > 0
    assert row["last_used_at"] is None and row["revoked_at"] is None

    assert keys_cli(db_url, "revoke", key_id).exit_code == 0
    assert keys_cli(db_url, "revoke", key_id).exit_code == 1  # revoked already
    assert orjson.loads(keys_cli(db_url, "list", "--json").output)[0]["revoked_at"] is not None


@pytest.mark.parametrize("args", [
    ["create", "--project", "two words"], ["create", "--project", ""], ["create", "--project", "x" * 65],
    ["create", "--project", "a", "--name", "n" * 129], ["create", "--project", "a", "--name", "tab\there"],
    ["create", "--project", "a", "--rpm", "0"], ["create", "--project", "a", "--max-concurrent", "-1"],
    ["revoke", "not-a-key"],
])
def test_keys_cli_refuses_bad_input(tmp_path, args):
    db_url = f"sqlite:///{tmp_path / 'k.db'}"
    result = keys_cli(db_url, *args)
    assert result.exit_code == 2, result.output
    assert orjson.loads(keys_cli(db_url, "list", "--json").output) == []  # nothing half-made


async def test_once_a_key_exists_every_v1_route_needs_one(db_url, mock):
    settings = Settings(database_url=db_url, upstream_base_url=mock.url)
    async with serving(settings) as (app, client, raw):  # no key yet: open, as today
        assert (await raw.post("/v1/conversations", json={})).status_code == 200
    _, secret = make_key(db_url, "team-a")
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        async with raw_client(app) as anon:
            for method, path in [("POST", "/v1/responses"), ("GET", "/v1/models"), ("POST", "/v1/conversations"),
                                 ("GET", "/v1/conversations/conv_x"), ("GET", "/v1/responses/resp_x")]:
                check_error(await anon.request(method, path, json={}), 401, code="invalid_api_key", case=path)
            for auth in ("Bearer wrong", f"Basic {secret}", "Bearer", f"Token {secret}", f"Bearer  {secret}x"):
                resp = await anon.get("/v1/models", headers={"authorization": auth})
                check_error(resp, 401, code="invalid_api_key", case=auth)
                assert resp.headers["www-authenticate"].startswith("Bearer")
                assert secret not in resp.text
            for scheme in ("Bearer", "bearer", "BEARER", "bEaReR"):  # the scheme in any case
                assert (await anon.get("/v1/models", headers={"authorization": f"{scheme} {secret}"})).status_code == 200
            assert (await anon.get("/healthz")).status_code == 200  # outside /v1: no key needed
        with pytest.raises(openai.AuthenticationError):
            await sdk(app, "sk-bw-not-a-key").responses.create(model=MODEL, input="hi")
        r = await sdk(app, secret).responses.create(model=MODEL, input="hi")
        assert r.output_text == "[1 messages] Echo: hi"
    assert mock.requests and len(mock.requests) == 1  # refused requests never reached the model


async def test_env_api_key_is_the_default_project(db_url, mock):
    """BRANCHWISE_API_KEY keeps working beside keys, as a key of `default`: what a server without
    keys stored is `default`'s, seen with it and not with another project's key."""
    open_settings = Settings(database_url=db_url, upstream_base_url=mock.url)
    async with serving(open_settings) as (_, client, _raw):
        conv = await client.conversations.create()
    _, team = make_key(db_url, "team-b")
    app = create_app(Settings(database_url=db_url, upstream_base_url=mock.url, api_key="env-secret"))
    async with app.router.lifespan_context(app):
        assert (await sdk(app, "env-secret").conversations.retrieve(conv.id)).id == conv.id
        with pytest.raises(openai.NotFoundError):
            await sdk(app, team).conversations.retrieve(conv.id)
        with pytest.raises(openai.AuthenticationError):
            await sdk(app, "env-secret-not").conversations.retrieve(conv.id)


async def test_revoking_stops_a_key_within_seconds_and_never_reopens(db_url, mock):
    key_id, secret = make_key(db_url, "team-a")
    settings = Settings(database_url=db_url, upstream_base_url=mock.url)
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        async with raw_client(app, secret) as c:
            assert (await c.get("/v1/models")).status_code == 200
            assert keys_cli(db_url, "revoke", key_id).exit_code == 0
            revoked_at = time.monotonic()
            deadline = revoked_at + 3 * settings.key_refresh_interval
            while (await c.get("/v1/models")).status_code != 401:
                assert time.monotonic() < deadline, "a revoked key still works"
                await asyncio.sleep(0.05)
        # every key revoked: the server stays locked
        async with raw_client(app) as anon:
            check_error(await anon.get("/v1/models"), 401, code="invalid_api_key")


async def test_a_key_made_while_serving_works_within_a_second(db_url, mock):
    make_key(db_url, "team-a")
    app = create_app(Settings(database_url=db_url, upstream_base_url=mock.url))
    async with app.router.lifespan_context(app):
        _, secret = make_key(db_url, "team-b")
        async with raw_client(app, secret) as c:
            deadline = time.monotonic() + 2
            while (await c.get("/v1/models")).status_code != 200:
                assert time.monotonic() < deadline, "a new key was not seen"
                await asyncio.sleep(0.05)


async def test_websocket_handshake_needs_a_key(db_url, mock):
    """The same check guards a WebSocket handshake on /v1: refused with close code 1008."""
    _, secret = make_key(db_url, "team-a")
    app = create_app(Settings(database_url=db_url, upstream_base_url=mock.url))

    async def handshake(auth: bytes | None) -> list[dict]:
        sent: list[dict] = []
        headers = [(b"authorization", auth)] if auth else []
        scope = {"type": "websocket", "path": "/v1/responses", "raw_path": b"/v1/responses", "headers": headers,
                 "query_string": b"", "scheme": "ws", "server": ("test", 80), "client": ("test", 1),
                 "subprotocols": [], "asgi": {"version": "3.0"}, "root_path": ""}
        incoming = [{"type": "websocket.connect"}]

        async def receive():
            return incoming.pop(0) if incoming else {"type": "websocket.disconnect", "code": 1000}

        async def send(message):
            sent.append(message)
        await app(scope, receive, send)
        return sent

    async with app.router.lifespan_context(app):
        for auth in (None, b"Bearer nope"):
            assert await handshake(auth) == [{"type": "websocket.close", "code": 1008}]
        passed = await handshake(b"Bearer " + secret.encode())
        assert passed and passed[0].get("code") != 1008  # past the key check (whatever the route does)


@pytest.mark.e2e
def test_revocation_reaches_every_worker_and_no_secret_is_logged(db_url, mock, serve):
    """Two worker processes; the key is revoked with the CLI in another process; within seconds
    every worker refuses it. The server's log (debug level) never shows a secret."""
    key_id, secret = make_key(db_url, "team-a")
    os.environ["BRANCHWISE_TEST_SERVE_LOG"] = "debug"
    try:
        server = serve({"BRANCHWISE_DATABASE_URL": db_url, "BRANCHWISE_UPSTREAM_BASE_URL": mock.url}, workers=2)
    finally:
        del os.environ["BRANCHWISE_TEST_SERVE_LOG"]
    auth = {"authorization": f"Bearer {secret}"}
    with httpx.Client(base_url=server.url, timeout=10) as http:
        assert http.post("/v1/responses", json={"model": MODEL, "input": "hi"}, headers=auth).status_code == 200
        assert http.get("/v1/models", headers={"authorization": "Bearer sk-bw-wrong"}).status_code == 401
        env = {k: v for k, v in os.environ.items() if not k.startswith("BRANCHWISE_")}
        env["BRANCHWISE_DATABASE_URL"] = db_url
        subprocess.run([sys.executable, "-m", "branchwise", "keys", "revoke", key_id], env=env, cwd=str(ROOT),
                       check=True, capture_output=True, timeout=60)
        deadline = time.monotonic() + 3
        while True:  # every one of 20 requests (over new connections: both workers) refused
            codes = {httpx.get(f"{server.url}/v1/models", headers=auth, timeout=10).status_code for _ in range(20)}
            if codes == {401}:
                break
            assert time.monotonic() < deadline, f"still answered {codes} 3 s after the revocation"
            time.sleep(0.1)
    log = server.output()
    assert secret not in log and "sk-bw-wrong" not in log


async def test_last_used_is_recorded(db_url, mock):
    key_id, secret = make_key(db_url, "team-a")
    app = create_app(Settings(database_url=db_url, upstream_base_url=mock.url))
    async with app.router.lifespan_context(app):
        async with raw_client(app, secret) as c:
            assert (await c.get("/v1/models")).status_code == 200
    # (kept in memory, written once a minute and when the server stops)
    [row] = orjson.loads(keys_cli(db_url, "list", "--json").output)
    assert row["id"] == key_id and row["last_used_at"] >= row["created_at"]
