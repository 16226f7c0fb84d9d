"""The mock served in-process (:class:`MockUpstream`) or from the command line (:func:`main`)."""

from __future__ import annotations

import argparse
import http.client
import importlib.util
import socket
import threading
import time
from types import TracebackType
from typing import Any

from .asgi import create_app


class MockUpstream:
    """The mock served by uvicorn in a daemon thread, on that thread's own event loop.

    >>> with MockUpstream() as upstream:          # doctest: +SKIP
    ...     httpx.post(upstream.url + "/chat/completions", json={...})
    ...     upstream.requests[-1]
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, delay: float = 0.0) -> None:
        """`delay`: seconds every chat reply waits before it starts (as if every request said
        ``[[delay=S]]``), for clients whose messages cannot carry directives."""
        self.host = host
        self.port = port
        self.app = create_app(delay=delay)
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None

    @property
    def base_url(self) -> str:
        """``http://HOST:PORT`` (no ``/v1``)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def url(self) -> str:
        """The OpenAI-style base URL, ``http://HOST:PORT/v1``."""
        return self.base_url + "/v1"

    @property
    def requests(self) -> list[Any]:
        """A snapshot of every chat request body received, in order."""
        return list(self.app.requests)

    @property
    def disconnected(self) -> list[Any]:
        """Request bodies whose client closed the connection before the reply was complete."""
        return list(self.app.disconnected)

    def clear(self) -> None:
        """Forget the logged requests."""
        self.app.requests.clear()
        self.app.disconnected.clear()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, timeout: float = 10.0) -> MockUpstream:
        """Start serving and wait until ``/healthz`` answers. Returns ``self``."""
        if self.running:
            return self
        import uvicorn

        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            self.app,
            loop="asyncio",
            lifespan="off",
            log_level="warning",
            log_config=None,
            access_log=False,
            timeout_graceful_shutdown=2,
        )
        server = uvicorn.Server(config)
        thread = threading.Thread(
            target=server.run, kwargs={"sockets": [sock]}, name=f"mock-upstream:{self.port}", daemon=True
        )
        self._server, self._thread, self._sock = server, thread, sock
        thread.start()
        self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self._thread is None or not self._thread.is_alive():
                raise RuntimeError("mock upstream server thread exited during startup")
            conn = http.client.HTTPConnection(self.host, self.port, timeout=1.0)
            try:
                conn.request("GET", "/healthz")
                if conn.getresponse().status == 200:
                    return
            except OSError:
                pass
            finally:
                conn.close()
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"mock upstream did not answer on {self.base_url} within {timeout}s")
            time.sleep(0.01)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving and join the thread."""
        server, thread, sock = self._server, self._thread, self._sock
        self._server = self._thread = self._sock = None
        if server is not None:
            server.should_exit = True
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive() and server is not None:
                server.force_exit = True
                thread.join(timeout)
        if sock is not None:
            sock.close()

    def __enter__(self) -> MockUpstream:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> None:
    """``python -m branchwise.testing.mock_upstream --host 127.0.0.1 --port 9100``."""
    parser = argparse.ArgumentParser(
        prog="python -m branchwise.testing.mock_upstream",
        description="Deterministic mock OpenAI Chat Completions server (see the module docstring).",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9100)
    parser.add_argument("--log-level", default="warning")
    parser.add_argument(
        "--no-request-log",
        action="store_true",
        help="do not keep request bodies for GET /_requests (for long benchmark runs)",
    )
    args = parser.parse_args(argv)

    import uvicorn

    uvicorn.run(
        create_app(log_requests=not args.no_request_log),
        host=args.host,
        port=args.port,
        loop="uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
        http="httptools" if importlib.util.find_spec("httptools") else "h11",
        lifespan="off",
        log_level=args.log_level,
        access_log=False,
    )
