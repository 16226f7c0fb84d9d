"""The upstream HTTP transport: the seam between the Chat Completions backend and the network.

A `Transport` posts a JSON body to one upstream and hands back a `Reply` to read whole or
chunk by chunk; the backend bounds each call with `asyncio.timeout_at` and retries only
`ConnectError` (nothing was sent). `for_upstream` picks the implementation an upstream needs
and configures it from the environment and settings:

- proxies from `HTTPS_PROXY` / `HTTP_PROXY` (or lowercase; lowercase wins), unless `NO_PROXY`
  names the host (`urllib.request`'s rules: host names, domain suffixes, `*`); only http://
  proxies (as curl's default); read once, when the upstream's backend is built;
- the certificate authorities for https: the `ca_bundle` file when set (instead of the system's
  store), else the system's, where OpenSSL honours `SSL_CERT_FILE` and `SSL_CERT_DIR`;
- `max_connections` open to the upstream at most.

Today every case is served by `http1.Pool` (direct, absolute-form through a proxy for http,
a CONNECT tunnel for https); see docs/decisions/0022 for why, with the numbers. Another
implementation (HTTP/2, a client library) only has to satisfy these protocols.
"""

from __future__ import annotations

import ssl
import urllib.request
from typing import Protocol
from urllib.parse import urlsplit

from branchwise.backends.http1 import BadReply, ConnectError, Disconnected, HTTPError, Pool

__all__ = ["BadReply", "ConnectError", "Connection", "Disconnected", "HTTPError", "Reply", "Transport",
           "for_upstream", "proxy_for", "ssl_context"]


class Reply(Protocol):
    """A reply whose status and headers are in."""

    status: int
    reason: str

    async def read(self) -> bytes:
        """The whole body."""
        ...

    async def read_chunk(self) -> bytes:
        """What has arrived since the last call, waiting for something; b"" at the end."""
        ...

    def release(self) -> None:
        """Done with it: the connection may be reused once the reply is complete."""
        ...

    def close(self) -> None:
        """Drop the connection (a cancelled or broken call: the upstream sees the client leave)."""
        ...


class Connection(Protocol):
    def close(self) -> None: ...


class Transport(Protocol):
    async def connection(self) -> Connection:
        """A connection to the upstream; `ConnectError` when none could be made (nothing sent)."""
        ...

    async def post(self, conn: Connection, path: str, body: bytes) -> Reply:
        """Send a POST of `body` to `path` on `conn`; returns once the status and headers are in
        (`Disconnected`, `BadReply` when no reply came). On failure `conn` is closed."""
        ...

    async def get(self, conn: Connection, path: str) -> Reply:
        """A GET of `path`, as `post` (the upstream's model list)."""
        ...

    def close(self) -> None: ...


def proxy_for(url: str) -> str | None:
    """The proxy a request to `url` goes through, from the environment, or None."""
    u = urlsplit(url)
    proxies = urllib.request.getproxies_environment()
    proxy = proxies.get(u.scheme)
    if not proxy or (u.hostname and urllib.request.proxy_bypass_environment(u.hostname, proxies)):
        return None
    return proxy


def ssl_context(ca_bundle: str | None = None) -> ssl.SSLContext:
    """Verifying, with hostname check: against `ca_bundle` alone when given, else the system's
    store (`SSL_CERT_FILE` / `SSL_CERT_DIR` when set)."""
    return ssl.create_default_context(cafile=ca_bundle) if ca_bundle else ssl.create_default_context()


def for_upstream(base_url: str, headers: dict[str, str], *, ca_bundle: str | None = None,
                 max_connections: int | None = None) -> Transport:
    """The transport for the upstream at `base_url`."""
    https = urlsplit(base_url).scheme == "https"
    return Pool(base_url, headers, proxy=proxy_for(base_url), max_connections=max_connections,
                ssl_context=ssl_context(ca_bundle) if https else None)
