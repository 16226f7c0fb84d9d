"""Backends as plugins and the upstream transport on a company network.

- the registry: `[[upstreams]]` kinds, capabilities declared by every backend;
- proxies for real: a tiny HTTP proxy (absolute-form forwarding and CONNECT tunnels) in front of
  the mock upstream and of a TLS server; `NO_PROXY` bypasses it;
- a custom CA bundle, with a CA and a server certificate made here by the `openssl` CLI;
- the pool limit: never more than `max_connections` open to one upstream.
"""

from __future__ import annotations

import asyncio
import base64
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import urlsplit

import httpx2
import orjson
import pytest

from branchwise.app import create_app
from branchwise.backends import registry, transport
from branchwise.backends.base import BackendError, BaseBackend, Capabilities
from branchwise.backends.chat_completions import ChatCompletionsBackend
from branchwise.backends.http1 import ConnectError, Pool
from branchwise.backends.local import LocalBackend
from branchwise.backends.router import Router
from branchwise.core.chat import ChatRequest
from branchwise.settings import Settings, UpstreamConfig
from tests.conftest import free_port

PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "no_proxy",
              "all_proxy")


@pytest.fixture(autouse=True)
def no_proxy_env(monkeypatch):
    for name in PROXY_VARS:
        monkeypatch.delenv(name, raising=False)


# ---------------------------------------------------------------- registry and capabilities


def test_kinds_route_to_their_backends(monkeypatch):
    settings = Settings(_env_file=None, upstreams=[
        UpstreamConfig(name="embedded", kind="local", models=["smol*"], context_window=512),
        UpstreamConfig(name="vllm", base_url="http://127.0.0.1:9/v1", models=["*"], supports_n=False,
                       context_window=8192),
    ])
    router = Router(settings)
    local, remote = router.backend("smollm"), router.backend("qwen")
    assert isinstance(local, LocalBackend) and isinstance(remote, ChatCompletionsBackend)
    assert not router.embedded and router.backend("smollm") is local  # one backend per entry
    assert local.capabilities == Capabilities(supports_n=True, count_tokens=True, context_window=512)
    assert remote.capabilities == Capabilities(supports_n=False, count_tokens=False, context_window=8192)
    assert router.context_window("smollm") == 512 and router.context_window("qwen") == 8192
    assert remote.supports_n is False  # the attribute the engine's older callers read


def test_no_upstream_means_the_embedded_model():
    router = Router(Settings(_env_file=None, local_n_ctx=1024, local_parallel=2))
    assert router.embedded
    backend = router.backend("anything")
    assert isinstance(backend, LocalBackend)
    assert backend.capabilities.count_tokens and backend.capabilities.context_window == 1024
    # its KV cache: `local_parallel` windows (allocated when the model loads)
    assert backend.parallel == 2 and backend.kv_cells == 2048


def test_a_new_kind_is_one_registration(monkeypatch):
    class Echo(BaseBackend):
        capabilities = Capabilities(supports_n=True)

        def __init__(self, name: str) -> None:
            self.name = name

    monkeypatch.setattr(registry, "_kinds", dict(registry._kinds))
    registry.register("echo")(lambda cfg, settings: Echo(cfg.name))
    router = Router(Settings(_env_file=None, upstreams=[UpstreamConfig(name="e", kind="echo")]))
    assert isinstance(router.backend("m"), Echo) and "echo" in registry.kinds()


async def test_default_capabilities_refuse_to_count():
    with pytest.raises(BackendError) as err:
        await BaseBackend().count_tokens(b"[]")
    assert err.value.code == "unsupported"


def test_bad_upstream_entries_are_refused():
    with pytest.raises(ValueError, match="needs a base_url"):
        UpstreamConfig(name="x")
    with pytest.raises(ValueError, match="unknown kind 'nope'"):
        Router(Settings(_env_file=None, upstreams=[UpstreamConfig(name="x", kind="nope")]))


def test_transport_settings_and_their_defaults(monkeypatch, tmp_path):
    monkeypatch.setenv("BRANCHWISE_UPSTREAM_CA_BUNDLE", "/etc/company/ca.pem")
    monkeypatch.setenv("BRANCHWISE_UPSTREAM_MAX_CONNECTIONS", "7")
    config = tmp_path / "branchwise.toml"
    config.write_text(
        'upstream_base_url = "http://127.0.0.1:9/v1"\n'
        '[[upstreams]]\nname = "a"\nbase_url = "https://a.example/v1"\nca_bundle = "/a.pem"\n'
        "max_connections = 2\nbackground_workers = 3\n"  # a key upstreams never used: still accepted
        '[[upstreams]]\nname = "b"\nbase_url = "https://b.example/v1"\n'
    )
    monkeypatch.setenv("BRANCHWISE_CONFIG", str(config))
    routes = {cfg.name: cfg for cfg in Settings().routes()}
    assert [(routes[n].ca_bundle, routes[n].max_connections) for n in ("upstream", "a", "b")] == [
        ("/etc/company/ca.pem", 7), ("/a.pem", 2), ("/etc/company/ca.pem", 7)]
    assert "background_workers" not in UpstreamConfig.model_fields
    assert Settings(_env_file=None).upstream_max_connections >= 1


# ---------------------------------------------------------------- a proxy


class Proxy:
    """An HTTP proxy: absolute-form requests are forwarded (one upstream connection each, the
    reply relayed until the upstream closes); CONNECT opens a tunnel. `seen` keeps every
    request head it was sent."""

    def __init__(self, refuse_connect: bool = False) -> None:
        self.seen: list[bytes] = []
        self.refuse_connect = refuse_connect

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()
            return
        self.seen.append(head)
        method, target, _ = head.split(b"\r\n", 1)[0].split(b" ", 2)
        if method == b"CONNECT":
            if self.refuse_connect:
                writer.write(b"HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\n\r\n")
                writer.close()
                return
            host, port = target.decode().rsplit(":", 1)
            up_reader, up_writer = await asyncio.open_connection(host, int(port))
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
            return
        u = urlsplit(target.decode())
        assert u.scheme == "http", target  # a proxy is only sent absolute-form requests
        lines = head.split(b"\r\n")
        length = next(int(line.split(b":")[1]) for line in lines if line.lower().startswith(b"content-length:"))
        body = await reader.readexactly(length)
        kept = [line for line in lines[1:] if line and not line.lower().startswith(b"proxy-authorization")]
        origin = b"%s %s HTTP/1.1\r\n" % (method, u.path.encode()) + b"\r\n".join(kept) + b"\r\nconnection: close\r\n\r\n"
        up_reader, up_writer = await asyncio.open_connection(u.hostname, u.port or 80)
        up_writer.write(origin + body)
        await self._pipe(up_reader, writer)
        up_writer.close()


@asynccontextmanager
async def proxy_server(**kwargs) -> AsyncIterator[tuple[Proxy, str]]:
    proxy = Proxy(**kwargs)
    port = free_port()
    server = await asyncio.start_server(proxy.handle, "127.0.0.1", port)
    try:
        yield proxy, f"http://127.0.0.1:{port}"
    finally:
        server.close()


async def one_response(settings: Settings) -> dict:
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        async with httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url="http://test") as client:
            resp = await asyncio.wait_for(client.post("/v1/responses", json={"model": "mock", "input": "hi"}), 10)
    assert resp.status_code == 200, resp.text
    return resp.json()


@pytest.mark.parametrize("name", ["HTTP_PROXY", "http_proxy"])
async def test_http_upstream_through_the_proxy(mock, tmp_path, monkeypatch, name):
    async with proxy_server() as (proxy, url):
        monkeypatch.setenv(name, url)
        settings = Settings(database_url=f"sqlite:///{tmp_path / 'b.db'}", upstream_base_url=mock.url)
        assert (await one_response(settings))["status"] == "completed"
        assert await one_response(settings)  # a second call: a new connection to the proxy
    authority = urlsplit(mock.url).netloc.encode()
    assert [h.split(b"\r\n", 1)[0] for h in proxy.seen] == [
        b"POST http://%s/v1/chat/completions HTTP/1.1" % authority] * 2
    assert b"host: %s" % authority in proxy.seen[0]


@pytest.mark.parametrize("no_proxy", ["127.0.0.1", "localhost,127.0.0.1", "*"])
async def test_no_proxy_bypasses_the_proxy(mock, tmp_path, monkeypatch, no_proxy):
    async with proxy_server() as (proxy, url):
        monkeypatch.setenv("HTTP_PROXY", url)
        monkeypatch.setenv("NO_PROXY", no_proxy)
        settings = Settings(database_url=f"sqlite:///{tmp_path / 'b.db'}", upstream_base_url=mock.url)
        assert (await one_response(settings))["status"] == "completed"
    assert proxy.seen == []


def test_which_proxy_applies(monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", "http://corp:3128")
    monkeypatch.setenv("HTTP_PROXY", "http://plain:3128")
    monkeypatch.setenv("NO_PROXY", ".internal.example,10.0.0.5")
    assert transport.proxy_for("https://api.openai.com/v1") == "http://corp:3128"
    assert transport.proxy_for("http://vllm:8001/v1") == "http://plain:3128"
    assert transport.proxy_for("https://llm.internal.example/v1") is None
    assert transport.proxy_for("http://10.0.0.5:8001/v1") is None
    monkeypatch.setenv("https_proxy", "http://lower:3128")  # lowercase wins, as curl
    assert transport.proxy_for("https://api.openai.com/v1") == "http://lower:3128"
    with pytest.raises(ValueError, match="only http:// proxies"):
        Pool("https://api.openai.com/v1", {}, proxy="socks5://corp:1080")


# ---------------------------------------------------------------- TLS with a CA of our own


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> dict[str, Path]:
    """A CA and a certificate for localhost / 127.0.0.1 signed by it, made by the openssl CLI."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed")
    d = tmp_path_factory.mktemp("certs")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=branchwise test CA",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    run("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost")
    (d / "ext.cnf").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n"
                               "keyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.pem", "-days", "2", "-extfile", "ext.cnf")
    return {"ca": d / "ca.pem", "cert": d / "server.pem", "key": d / "server.key"}


REPLY = {"id": "c1", "object": "chat.completion", "model": "m", "usage": {"prompt_tokens": 1, "completion_tokens": 1},
         "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "over TLS"}}]}


@asynccontextmanager
async def tls_upstream(certs) -> AsyncIterator[tuple[list[bytes], int]]:
    """An https Chat Completions upstream that answers every request with REPLY."""
    heads: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                heads.append(head)
                length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length:"))
                await reader.readexactly(length)
                body = orjson.dumps(REPLY)
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                             % (len(body), body))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(certs["cert"], certs["key"])
    port = free_port()
    server = await asyncio.start_server(handle, "127.0.0.1", port, ssl=ctx)
    try:
        yield heads, port
    finally:
        server.close()


async def ask(backend: ChatCompletionsBackend) -> str:
    try:
        result = await asyncio.wait_for(backend.complete(ChatRequest(model="m", messages=b"[]")), 10)
    finally:
        await backend.aclose()
    return result.choices[0].text


async def test_ca_bundle_is_trusted_instead_of_the_system_store(certs, monkeypatch):
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    async with tls_upstream(certs) as (heads, port):
        url = f"https://localhost:{port}/v1"
        assert await ask(ChatCompletionsBackend(url, ca_bundle=str(certs["ca"]))) == "over TLS"
        with pytest.raises(BackendError) as err:  # the system's CAs don't know ours
            await ask(ChatCompletionsBackend(url, timeout=5))
        assert err.value.code == "upstream_unavailable" and "certificate" in err.value.message
    assert len(heads) == 1


async def test_ssl_cert_file_is_honoured(certs, monkeypatch):
    monkeypatch.setenv("SSL_CERT_FILE", str(certs["ca"]))
    async with tls_upstream(certs) as (_, port):
        assert await ask(ChatCompletionsBackend(f"https://127.0.0.1:{port}/v1")) == "over TLS"


async def test_the_ca_bundle_setting_reaches_the_backend(certs, tmp_path, monkeypatch):
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    async with tls_upstream(certs) as (_, port):
        settings = Settings(_env_file=None, upstream_base_url=f"https://localhost:{port}/v1",
                            upstream_ca_bundle=str(certs["ca"]))
        router = Router(settings)
        assert await ask(router.backend("m")) == "over TLS"


async def test_https_upstream_through_a_connect_tunnel(certs, monkeypatch):
    async with tls_upstream(certs) as (heads, port), proxy_server() as (proxy, url):
        user = url.replace("http://", "http://me:s%40cret@")
        monkeypatch.setenv("HTTPS_PROXY", user)
        backend = ChatCompletionsBackend(f"https://localhost:{port}/v1", ca_bundle=str(certs["ca"]))
        for _ in range(3):  # one tunnel, kept alive
            result = await backend.complete(ChatRequest(model="m", messages=b"[]"))
            assert result.choices[0].text == "over TLS"
        await backend.aclose()
    assert len(proxy.seen) == 1 and len(heads) == 3
    connect = proxy.seen[0]
    assert connect.startswith(b"CONNECT localhost:%d HTTP/1.1\r\n" % port)
    assert b"proxy-authorization: Basic " + base64.b64encode(b"me:s@cret") in connect
    assert b"proxy-authorization" not in heads[0]  # the credentials are the proxy's only


async def test_a_refused_tunnel_is_a_connect_error(certs, monkeypatch):
    async with proxy_server(refuse_connect=True) as (proxy, url):
        pool = Pool("https://localhost:1/v1", {}, proxy=url, ssl_context=transport.ssl_context(str(certs["ca"])))
        with pytest.raises(ConnectError, match="403"):
            await pool.connection()
        assert pool._open == 0  # the failed attempt gave its place back


# ---------------------------------------------------------------- the pool limit


async def test_no_more_connections_than_the_limit():
    connections = 0
    in_flight = 0
    most = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections, in_flight, most
        connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length:"))
                await reader.readexactly(length)
                in_flight += 1
                most = max(most, in_flight)
                await asyncio.sleep(0.02)
                in_flight -= 1
                close = connections % 2 == 0  # every other connection ends after its reply
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n%s\r\nok"
                             % (b"connection: close\r\n" if close else b""))
                await writer.drain()
                if close:
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    port = free_port()
    server = await asyncio.start_server(handle, "127.0.0.1", port)
    pool = Pool(f"http://127.0.0.1:{port}/v1", {}, max_connections=2)

    async def call() -> bytes:
        conn = await pool.connection()
        reply = await pool.post(conn, "/v1/chat/completions", b"{}")
        body = await reply.read()
        reply.release()
        return body

    try:
        assert await asyncio.wait_for(asyncio.gather(*(call() for _ in range(12))), 10) == [b"ok"] * 12
    finally:
        pool.close()
        server.close()
    assert most <= 2 and connections >= 3  # closed connections gave their places to new ones


async def test_a_caller_that_gives_up_waiting_leaves_no_trace():
    port = free_port()
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", port)
    pool = Pool(f"http://127.0.0.1:{port}/v1", {}, max_connections=1)
    try:
        first = await pool.connection()
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05):
                await pool.connection()
        assert not pool._waiters
        first.close()
        second = await asyncio.wait_for(pool.connection(), 5)  # the closed one's place is free
        second.close()
    finally:
        pool.close()
        server.close()
