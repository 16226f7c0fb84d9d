"""The load client and the process plumbing of the load benchmarks.

The client is raw asyncio (uvloop when installed) with httptools parsing the responses: one
`Conn` is one HTTP/1.1 keep-alive connection that carries one request at a time. Timestamps are
taken in `data_received`, before any parsing or task switch, so a busy client adds as little as
possible to what it measures. `python -m bench.loadgen canned --port P` serves a canned reply
(no framework, no parsing) to measure the client itself.

Processes: `Server` starts a command in its own process group, with its output in a log file,
waits for `GET /healthz`, and always ends it (SIGTERM to the group, then SIGKILL); on Linux the
child also gets SIGKILL when the benchmark process dies. `cpu_ticks` and `rss_kib` read /proc.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import http.client
import math
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httptools

perf = time.perf_counter
CLK_TCK = os.sysconf("SC_CLK_TCK")


def new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop

        return uvloop.new_event_loop()
    except ImportError:  # pragma: no cover
        return asyncio.new_event_loop()


def run(coro):
    """asyncio.run on uvloop when it is installed (tasks left over are cancelled on the way out).
    The collector is off meanwhile: a full pass over the client's heap stalled the load for up to
    ~90 ms, sending the requests due meanwhile in a burst (and charging the server for it)."""
    gc.collect()
    gc.disable()
    try:
        with asyncio.Runner(loop_factory=new_loop) as runner:
            return runner.run(coro)
    finally:
        gc.enable()


# --------------------------------------------------------------------------- the client


@dataclass
class Result:
    status: int
    body: bytes
    t_sent: float
    t_first: float  # first byte of the response
    t_done: float
    chunks: list[tuple[float, bytes]] = field(default_factory=list)  # (time read, body bytes)

    @property
    def ms(self) -> float:
        return (self.t_done - self.t_sent) * 1000


class Conn(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection, one request in flight at a time."""

    def __init__(self, host: str) -> None:
        self.host = host.encode()
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self._fut: asyncio.Future | None = None
        self._now = 0.0
        self._reset(False)

    @classmethod
    async def open(cls, host: str, port: int) -> Conn:
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(lambda: cls(host), host, port)
        sock = conn.transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn

    def _reset(self, record: bool) -> None:
        self._record = record
        self._status = 0
        self._body: list[bytes] = []
        self._chunks: list[tuple[float, bytes]] = []
        self._t_first = 0.0
        self._t_sent = 0.0

    # -- asyncio.Protocol

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self._now = now = perf()
        if not self._t_first:
            self._t_first = now
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            self._fail(ConnectionError(f"bad HTTP response: {e}"))

    def connection_lost(self, exc) -> None:
        self.transport = None
        self._fail(exc or ConnectionError("connection closed"))

    def _fail(self, exc: BaseException) -> None:
        if self._fut is not None and not self._fut.done():
            self._fut.set_exception(exc)

    # -- httptools callbacks

    def on_headers_complete(self) -> None:
        self._status = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        if self._record:
            self._chunks.append((self._now, body))
        else:
            self._body.append(body)

    def on_message_complete(self) -> None:
        fut = self._fut
        if fut is not None and not fut.done():
            fut.set_result(Result(self._status, b"".join(self._body), self._t_sent, self._t_first,
                                  self._now, self._chunks))

    # -- API

    async def request(self, method: str, path: str, body: bytes | None = None, *,
                      record_chunks: bool = False, headers: bytes = b"") -> Result:
        """`headers`: more header lines, each as b"\r\nname: value"."""
        if self.transport is None:
            raise ConnectionError("connection closed")
        self._reset(record_chunks)
        head = f"{method} {path} HTTP/1.1\r\nhost: ".encode() + self.host + headers
        if body is not None:
            head += b"\r\ncontent-type: application/json\r\ncontent-length: " + str(len(body)).encode()
        msg = head + b"\r\n\r\n" + (body or b"")
        self._fut = asyncio.get_running_loop().create_future()
        self._t_sent = perf()
        self.transport.write(msg)
        return await self._fut

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def open_conns(host: str, port: int, n: int) -> list[Conn]:
    return list(await asyncio.gather(*(Conn.open(host, port) for _ in range(n))))


def close_all(conns: list[Conn]) -> None:
    for c in conns:
        c.close()


# --------------------------------------------------------------------------- statistics


def pct(values: list[float], p: float) -> float:
    """Nearest-rank percentile; NaN for no values."""
    if not values:
        return math.nan
    s = sorted(values)
    k = max(0, min(len(s) - 1, math.ceil(p / 100 * len(s)) - 1))
    return s[k]


def median(values: list[float]) -> float:
    return pct(values, 50)


# --------------------------------------------------------------------------- /proc


def _children_map() -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        out.setdefault(ppid, []).append(int(d))
    return out


def tree(pid: int) -> list[int]:
    """`pid` and its descendants (a `--workers N` server is a supervisor and N children)."""
    kids = _children_map()
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


def cpu_ticks(pids: list[int], children: bool = True) -> int:
    """user+system clock ticks of `pids` (a vanished one counts 0), with `children` the ticks of
    their children that have exited and been waited for too (PostgreSQL's backends)."""
    total = 0
    for p in pids:
        try:
            f = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(f[11]) + int(f[12]) + ((int(f[13]) + int(f[14])) if children else 0)
    return total


def thread_ticks(pid: int) -> tuple[int, int]:
    """(main thread, other threads) user+system clock ticks of process `pid`."""
    main = other = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0, 0
    for t in tids:
        try:
            f = Path(f"/proc/{pid}/task/{t}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks = int(f[11]) + int(f[12])
        if int(t) == pid:
            main += ticks
        else:
            other += ticks
    return main, other


def threads_in_syscall(pids: list[int], nr: int) -> int:
    """How many threads of `pids` are blocked in system call `nr` right now."""
    n = 0
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for t in tids:
            try:
                if Path(f"/proc/{pid}/task/{t}/syscall").read_text().split(" ", 1)[0] == str(nr):
                    n += 1
            except (OSError, ValueError):
                pass
    return n


CLOCK_NANOSLEEP = 230 if os.uname().machine == "x86_64" else 115  # aarch64: 115


def pids_named(name: str) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                if Path(f"/proc/{d}/comm").read_text().strip() == name:
                    out.append(int(d))
            except OSError:
                pass
    return out


def machine_ticks() -> tuple[int, int]:
    """(busy, total) clock ticks of the whole machine since boot."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = f[3] + f[4]
    return sum(f) - idle, sum(f)


def rss_kib(pids: list[int], field: str = "VmRSS") -> int:
    """Resident memory of `pids` together (`field` "VmHWM": each one's peak)."""
    total = 0
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith(field + ":"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


class CpuMeter:
    """CPU seconds used between `start()` and `stop()` by named groups of processes (each a
    function returning their pids, read at both ends), this process (the client), the whole
    machine, and with `threads_of` the main thread and the other threads of one process."""

    def __init__(self, groups: dict, threads_of: str | None = None) -> None:
        self.groups = groups
        self.threads_of = threads_of

    def _read(self) -> dict[str, float]:
        out = {}
        for name, pids in self.groups.items():
            ps = pids()
            out[name] = cpu_ticks(ps) / CLK_TCK
            if name == self.threads_of:
                main = other = 0
                for p in ps:  # a --workers N server: every process's main thread is "main"
                    m, o = thread_ticks(p)
                    main, other = main + m, other + o
                out[name + "_main_thread"], out[name + "_other_threads"] = main / CLK_TCK, other / CLK_TCK
        out["client"] = time.process_time()
        busy, total = machine_ticks()
        out["machine_busy"], out["machine_total"] = busy / CLK_TCK, total / CLK_TCK
        out["wall"] = perf()
        return out

    def start(self) -> None:
        self._a = self._read()

    def stop(self) -> dict[str, float]:
        b = self._read()
        return {k: b[k] - self._a[k] for k in b}


# --------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    os.setsid()
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class Server:
    """A server process on 127.0.0.1:`port`: started, waited for, always stopped."""

    def __init__(self, name: str, argv: list[str], port: int, log_dir: Path, env: dict | None = None,
                 cwd: str | None = None) -> None:
        self.name, self.argv, self.port = name, argv, port
        self.log = log_dir / f"{name}.log"
        # inherited BRANCHWISE_* settings would change what is measured
        self.env = {**{k: v for k, v in os.environ.items() if not k.startswith("BRANCHWISE_")}, **(env or {})}
        self.cwd = cwd
        self.proc: subprocess.Popen | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def pids(self) -> list[int]:
        return tree(self.pid) if self.proc is not None else []

    def start(self, timeout: float = 60.0) -> Server:
        self._fh = open(self.log, "wb")
        self.proc = subprocess.Popen(self.argv, stdout=self._fh, stderr=subprocess.STDOUT, env=self.env,
                                     cwd=self.cwd, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.tail()}")
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=1.0)
            try:
                conn.request("GET", "/healthz")
                if conn.getresponse().status == 200:
                    return self
            except OSError:
                pass
            finally:
                conn.close()
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"{self.name} did not answer /healthz within {timeout}s:\n{self.tail()}")
            time.sleep(0.05)

    def tail(self, n: int = 4000) -> str:
        try:
            return self.log.read_bytes()[-n:].decode(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        p, self.proc = self.proc, None
        if p is None:
            return
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait(5)
        with contextlib.suppress(ProcessLookupError):  # stray workers of a `--workers N` server
            os.killpg(p.pid, signal.SIGKILL)
        self._fh.close()

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# --------------------------------------------------------------------------- canned server


_CANNED_BODY = b'{"ok":true}'
_CANNED = (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
           + str(len(_CANNED_BODY)).encode() + b"\r\n\r\n" + _CANNED_BODY)


class _Canned(asyncio.Protocol):
    """Answers every request with the same bytes: finds the end of the headers and skips
    `content-length` bytes of body. Good enough for this client's requests, nothing else."""

    def connection_made(self, transport) -> None:
        self.t = transport
        self.buf = b""

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                break
            head = buf[:end].lower()
            i = head.find(b"content-length:")
            length = int(head[i + 15:].split(b"\r\n", 1)[0]) if i >= 0 else 0
            if len(buf) < end + 4 + length:
                break
            buf = buf[end + 4 + length:]
            self.t.write(_CANNED)
        self.buf = buf


async def _serve_canned(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_Canned, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m bench.loadgen")
    ap.add_argument("mode", choices=["canned"])
    ap.add_argument("--port", type=int, required=True)
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    run(_serve_canned(args.port))


if __name__ == "__main__":
    main()
