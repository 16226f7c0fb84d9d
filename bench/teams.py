"""(j) What teams cost the hot path: the (a)/(b) workload (stored, non-streaming
`POST /v1/responses` on seeded conversations) on one server, phase after phase,
- with no key at all (the single-user server: its requests pass the key check untouched),
- with an API key (a key of the `default` project, made with `branchwise keys create`: a hash and
  a dictionary lookup per request, the project in every statement),
- with a key with limits (`--rpm`, `--max-concurrent` set far above the load: a counter upsert
  and a slot taken and given back per response, in the database),
- with a key and a new `Idempotency-Key` on every request (a claim before, the reply kept after).
Each phase at concurrency 1 (latency) and 32 (throughput); the phases run back to back on the same
server so that they share the machine's speed of the moment. Added = the phase's p50 - the
no-key phase's p50.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from itertools import count

from bench.load import HOST, RESET_EVERY, _BranchwiseWorker, _meter, closed_loop, create_conversations
from bench.loadgen import Conn, Server, perf

AT = (1, 32)
PHASES = ("no key", "key", "key with limits", "key + Idempotency-Key")
_ids = count()


class _Worker(_BranchwiseWorker):
    """`_BranchwiseWorker` with an Authorization header and, optionally, a new Idempotency-Key a
    request."""

    def __init__(self, conv, auth: bytes, idempotent: bool):
        super().__init__(conv)
        self.auth = auth
        self.idempotent = idempotent

    async def step(self, conn: Conn):
        if self.k == RESET_EVERY:
            t = perf()
            r = await conn.request("POST", f"/v1/conversations/{self.conv[0]}/head",
                                   b'{"item_id":"%s"}' % self.conv[1].encode(), headers=self.auth)
            if r.status != 200:
                raise RuntimeError(f"resetting a head: {r.status} {r.body[:300]!r}")
            self.resets.append((t, perf()))
            self.k = 0
        headers = self.auth
        if self.idempotent:
            headers += b"\r\nidempotency-key: bench-%d-%d" % (os.getpid(), next(_ids))
        r = await conn.request("POST", "/v1/responses", self.bodies[self.k], headers=headers)
        self.k += 1
        return r, r.status == 200 and b'"status":"completed"' in r.body


def _make_key(db_url: str, *options: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BRANCHWISE_")}
    env["BRANCHWISE_DATABASE_URL"] = db_url
    out = subprocess.run([sys.executable, "-m", "branchwise", "keys", "create", "--project", "default", *options],
                         env=env, check=True, capture_output=True, text=True, timeout=120)
    return out.stdout.strip().splitlines()[-1]


async def teams_load(bw: Server, mock: Server, db_url: str, warmup: float, duration: float) -> dict:
    meter = _meter({"branchwise": bw, "mock": mock})
    setup = await Conn.open(HOST, bw.port)
    try:
        convs = await create_conversations(setup, max(AT))  # (the `default` project's, as the keys are)
    finally:
        setup.close()
    out: dict = {}
    auth = b""
    for phase in PHASES:
        if phase == "key":
            auth = b"\r\nauthorization: Bearer " + _make_key(db_url).encode()
        elif phase == "key with limits":
            auth = b"\r\nauthorization: Bearer " + _make_key(db_url, "--rpm", "1000000000",
                                                             "--max-concurrent", "100000").encode()
        if phase in ("key", "key with limits"):
            await asyncio.sleep(2.5)  # every server process has loaded the new key (key_refresh_interval 1 s)
        out[phase] = {c: await closed_loop(bw.port, [_Worker(conv, auth, phase.endswith("Idempotency-Key"))
                                                     for conv in convs[:c]], warmup, duration, meter)
                      for c in AT}
    return out


def added(res: dict) -> dict:
    """Per phase: added p50 at c=1 (ms) and throughput at c=32 relative to no key."""
    base = res["no key"]
    return {phase: {"added_p50_ms": r[1]["p50_ms"] - base[1]["p50_ms"],
                    "throughput_ratio": r[32]["rps"] / base[32]["rps"] if base[32]["rps"] else float("nan")}
            for phase, r in res.items()}
