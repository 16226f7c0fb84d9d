"""API keys as a server process sees them: which secrets are valid and for which project, and
each key's limits (requests per minute, concurrent responses).

The valid keys are kept in memory by the SHA-256 of their secret, so checking a request's key
is a hash and a dictionary lookup, with no database round trip. Every `refresh_s` the process
asks the database whether the keys changed (one aggregate row) and reloads them when they did:
a key revoked with `branchwise keys revoke` stops working on every process within about that
long. A key this process does not know yet (made a moment ago) makes it look again at once, at
most every `MISS_REFRESH_S`, so unknown keys cannot turn into a stream of queries.

Once any key was ever made, or `api_key` is set, every `/v1` request needs a valid key;
revoking every key does not open the server again. `api_key` (BRANCHWISE_API_KEY) is a key of
the `default` project without limits.
(docs/security.md; docs/decisions/0053-keys-and-limits-in-the-database.md)"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import time

from branchwise.core.errors import RateLimited
from branchwise.core.projects import DEFAULT_PROJECT
from branchwise.settings import Settings
from branchwise.store.keys import KeyStore, Limits, secret_hash

log = logging.getLogger("branchwise.keys")

MISS_REFRESH_S = 0.2
TOUCH_EVERY_S = 60.0
WINDOW_S = 60


class Key:
    __slots__ = ("id", "project", "rpm", "max_concurrent")

    def __init__(self, id: str | None, project: str, rpm: int | None = None, max_concurrent: int | None = None):
        self.id = id
        self.project = project
        self.rpm = rpm
        self.max_concurrent = max_concurrent


class OverLimit(RateLimited):
    """Over a key's limit, with the rate headers to send."""

    def __init__(self, message: str, retry_after: int, headers: list[tuple[bytes, bytes]]):
        super().__init__(message, retry_after=retry_after, code="rate_limit_exceeded")
        self.headers = headers


class HeldSlot:
    """A concurrent response of a key (`core.projects.Slot`): given back when its last holder
    (the request, and a run that outlives it) drops it."""

    __slots__ = ("keys", "seq", "refs")

    def __init__(self, keys: Keys, seq: int):
        self.keys = keys
        self.seq = seq
        self.refs = 1

    def hold(self) -> None:
        self.refs += 1

    async def drop(self) -> None:
        self.refs -= 1
        if self.refs == 0:
            self.keys._slots.discard(self.seq)
            await self.keys.limits.drop_slot(self.seq)


def rate_headers(limit: int, remaining: int, reset_s: float) -> list[tuple[bytes, bytes]]:
    """OpenAI's request rate headers."""
    return [(b"x-ratelimit-limit-requests", b"%d" % limit),
            (b"x-ratelimit-remaining-requests", b"%d" % max(0, remaining)),
            (b"x-ratelimit-reset-requests", b"%ds" % max(1, math.ceil(reset_s)))]


class Keys:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.refresh_s = settings.key_refresh_interval
        self._env: dict[str, Key] = {}
        if settings.api_key:
            self._env[secret_hash(settings.api_key)] = Key(None, DEFAULT_PROJECT)
        self.by_hash: dict[str, Key] = dict(self._env)
        self.locked = bool(self._env)
        """Whether `/v1` requests need a key (read on every request: a plain attribute)."""
        self.store: KeyStore | None = None
        self.limits: Limits | None = None
        self._version: tuple[int, int] | None = None
        self._refreshed = 0.0
        self._refreshing: asyncio.Future | None = None
        self._used: set[str] = set()
        self._slots: set[int] = set()
        self._task: asyncio.Task | None = None

    # ------------------------------------------------------------------ life

    async def start(self, store: KeyStore, limits: Limits) -> None:
        """Load the keys (before the first request is served), then keep them fresh."""
        self.store, self.limits = store, limits
        await self.refresh()
        self._task = asyncio.get_running_loop().create_task(self._upkeep())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        with contextlib.suppress(Exception):
            await self._touch()

    async def refresh(self) -> None:
        """Reload the keys if they changed (one query when they did not). Concurrent callers
        share one refresh."""
        if self._refreshing is not None:
            await asyncio.shield(self._refreshing)
            return
        self._refreshing = asyncio.get_running_loop().create_future()
        try:
            version = await self.limits.keys_version()
            if version != self._version:
                by_hash = dict(self._env)
                for row in await self.store.active():
                    by_hash[row.secret_hash] = Key(row.id, row.project, row.rpm, row.max_concurrent)
                self.by_hash = by_hash
                self._version = version
                self.locked = bool(self._env) or version[0] > 0
            self._refreshed = time.monotonic()
        finally:
            self._refreshing.set_result(None)
            self._refreshing = None

    async def _upkeep(self) -> None:
        """Every `refresh_s`: the keys; every third of `lease_ttl`: the slots held here; every
        minute: last-used times and the counters and slots nobody needs any more."""
        ttl = self.settings.lease_ttl
        since_renew = since_touch = 0.0
        while True:
            await asyncio.sleep(self.refresh_s)
            since_renew += self.refresh_s
            since_touch += self.refresh_s
            try:
                await self.refresh()
                if since_renew >= ttl / 3:
                    since_renew = 0.0
                    await self.limits.renew_slots(list(self._slots), ttl)
                if since_touch >= TOUCH_EVERY_S:
                    since_touch = 0.0
                    await self._touch()
                    await self.limits.forget_old(int(time.time()) // WINDOW_S * WINDOW_S - WINDOW_S)
            except Exception:
                log.exception("key upkeep failed")

    async def _touch(self) -> None:
        if self._used and self.store is not None:
            used, self._used = list(self._used), set()
            await self.store.touch(used, int(time.time()))

    # ------------------------------------------------------------------ requests

    async def find(self, secret: bytes) -> Key | None:
        """The valid key whose secret this is, or None."""
        digest = hashlib.sha256(secret).hexdigest()
        key = self.by_hash.get(digest)
        if key is None and self.store is not None and time.monotonic() - self._refreshed > MISS_REFRESH_S:
            await self.refresh()  # (made since the last refresh?)
            key = self.by_hash.get(digest)
        if key is not None and key.id is not None:
            self._used.add(key.id)
        return key

    async def count_request(self, key: Key) -> list[tuple[bytes, bytes]]:
        """One request of `key` against its requests-per-minute limit: the rate headers to send,
        or OverLimit."""
        used, window_start = await self.limits.count_request(key.id, key.rpm)
        reset_s = window_start + WINDOW_S - time.time()
        if used is None:
            retry = max(1, math.ceil(reset_s))
            raise OverLimit(f"Rate limit reached for requests per minute (RPM): limit {key.rpm}. "
                              f"Please try again in {retry}s.", retry, rate_headers(key.rpm, 0, reset_s))
        return rate_headers(key.rpm, key.rpm - used, reset_s)

    async def take_slot(self, key: Key) -> HeldSlot:
        """One of `key`'s concurrent responses, or OverLimit."""
        seq = await self.limits.take_slot(key.id, key.max_concurrent, self.settings.lease_ttl)
        if seq is None:
            raise OverLimit(f"Too many concurrent responses for this API key: limit {key.max_concurrent}. "
                              "Please try again when one has finished.", 1, [])
        self._slots.add(seq)
        return HeldSlot(self, seq)
