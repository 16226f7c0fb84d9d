"""`Idempotency-Key` (IETF draft "The Idempotency-Key HTTP Header Field"): a client that retries a
POST with the key it sent the first time gets the first reply again, and nothing new is stored.

Per project, a key names one request (its fingerprint: method, path and body) for
`idempotency_ttl` seconds:
- the first request claims the key and runs; its reply (2xx) is kept with the key; a reply
  that is not a success gives the key back, so the client may try again (nothing was stored);
- the same key with the same request replays the kept reply (a stream: the same events, from
  the response's event log), with `Idempotent-Replayed: true`;
- the same key with another request is 422; while the first still runs, 409 with `Retry-After`.

A claim is renewed while its request runs. Should the claiming process die, the claim goes stale
after `lease_ttl` seconds and a retry takes it over: when what the first request made exists (its
id was chosen at the claim: a response, a conversation), the retry gets it; items appended are
recorded in the transaction that stores them; otherwise the retry runs again.
(docs/decisions/0052-idempotency-keys.md)"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
import time

from branchwise.core.errors import Conflict, InvalidRequest, Unprocessable
from branchwise.core.ids import new_id
from branchwise.core.projects import current_project
from branchwise.settings import Settings
from branchwise.store.idempotency import IdempotencyStore, Record

__all__ = ["Claim", "Idempotency", "Record", "Stale", "fingerprint", "parse_key"]
from branchwise.store.statements import SQL

log = logging.getLogger("branchwise.idempotency")

MAX_KEY_CHARS = 255
# A structured-field string (RFC 8941, as the draft asks: `"8e03978e-..."`) or the same text
# without its quotes (as Stripe and most clients send it): printable ASCII, no quote or
# backslash inside.
_KEY = re.compile(r'"([\x20\x21\x23-\x5b\x5d-\x7e]{1,255})"|([\x21\x23-\x5b\x5d-\x7e][\x20\x21\x23-\x5b\x5d-\x7e]*)')
FORGET_EVERY_S = 60.0


def parse_key(raw: bytes) -> str:
    """The key of an `Idempotency-Key` header's value, or a 400."""
    try:
        text = raw.decode("ascii").strip(" \t")
    except UnicodeDecodeError:
        text = None
    m = _KEY.fullmatch(text) if text else None
    key = (m.group(1) or m.group(2)).rstrip(" ") if m else None
    if not key or len(key) > MAX_KEY_CHARS:
        raise InvalidRequest(
            f"Invalid 'Idempotency-Key' header: expected 1 to {MAX_KEY_CHARS} printable ASCII characters "
            '(a string, quoted or not, with no " or \\ inside).', param="Idempotency-Key",
            code="invalid_idempotency_key")
    return key


def fingerprint(method: str, path: str, body: bytes) -> str:
    h = hashlib.sha256(method.encode())
    h.update(b" ")
    h.update(path.encode())
    h.update(b"\n")
    h.update(body)
    return h.hexdigest()


class Claim:
    """A key held by the request that runs under it."""

    __slots__ = ("project", "key", "owner", "resource_id", "finished")

    def __init__(self, project: str, key: str, owner: str, resource_id: str | None):
        self.project = project
        self.key = key
        self.owner = owner
        self.resource_id = resource_id
        """The id of what the request makes (chosen now, so that a retry can look for it)."""
        self.finished = False


class Stale:
    """A claim whose process stopped renewing it: `record.resource_id` may exist or not."""

    __slots__ = ("key", "record")

    def __init__(self, key: str, record: Record):
        self.key = key
        self.record = record


def in_use() -> Conflict:
    return Conflict("A request with this Idempotency-Key is still being processed. Retry after a moment.",
                    param="Idempotency-Key", code="idempotency_key_in_use", retry_after=1, retryable=True)


class Idempotency:
    def __init__(self, store: IdempotencyStore, settings: Settings):
        self.store = store
        self.settings = settings
        self._held: set[str] = set()  # owners of the claims this process runs under
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._upkeep())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    async def _upkeep(self) -> None:
        """Every third of `lease_ttl`: renew the claims held here; every minute: forget the
        records past their time."""
        ttl = self.settings.lease_ttl
        since_forget = 0.0
        while True:
            await asyncio.sleep(ttl / 3)
            since_forget += ttl / 3
            try:
                await self.store.renew(list(self._held), ttl)
                if since_forget >= FORGET_EVERY_S:
                    since_forget = 0.0
                    await self.store.forget_expired()
            except Exception:
                log.exception("idempotency upkeep failed")

    def _hold(self, claim: Claim) -> Claim:
        self._held.add(claim.owner)
        return claim

    async def claim(self, key: str, fingerprint: str, prefix: str | None) -> Claim | Record | Stale:
        """The key claimed for this request (a `Claim`, whose `resource_id` is a new id with
        `prefix`); or the record of the request that used it first: done (replay it), or
        `Stale`. 422 for another request under the key, 409 while its first request runs."""
        project = current_project()
        ttl = self.settings.lease_ttl
        for _ in range(3):  # (a record that expired and was forgotten meanwhile: claim again)
            claim = Claim(project, key, new_id("idem"), new_id(prefix) if prefix else None)
            if await self.store.claim(project, key, fingerprint, claim.owner, claim.resource_id, ttl,
                                      self.settings.idempotency_ttl):
                return self._hold(claim)
            record = await self.store.record(project, key)
            if record is None:
                continue
            if record.fingerprint != fingerprint:
                raise Unprocessable(
                    "This Idempotency-Key was already used with a different request (another body or route). "
                    "Use a new key for a new request.", param="Idempotency-Key", code="idempotency_key_reused")
            if record.state == "done":
                return record
            if (record.locked_until or 0) > time.time():
                raise in_use()
            return Stale(key, record)
        raise in_use()

    async def take_over(self, stale: Stale, prefix: str | None, resource_id: str | None = None) -> Claim:
        """The stale claim made this request's: with a new resource id, or with `resource_id`
        (what the first request made, found). 409 when another retry took it first."""
        project = current_project()
        claim = Claim(project, stale.key, new_id("idem"), resource_id or (new_id(prefix) if prefix else None))
        if not await self.store.take_over(project, stale.key, stale.record.owner, claim.owner, claim.resource_id,
                                          self.settings.lease_ttl):
            raise in_use()
        return self._hold(claim)

    def finish_step(self, claim: Claim, status: int, body: bytes | None, stream: bool = False) -> tuple[SQL, dict]:
        """The statement that records the reply, to run in the transaction that stores what the
        request made (then call `finished`)."""
        return self.store.finish_step(claim.project, claim.key, claim.owner, status, body, stream)

    def finished(self, claim: Claim) -> None:
        claim.finished = True
        self._held.discard(claim.owner)

    async def finish(self, claim: Claim, status: int, body: bytes | None, stream: bool = False) -> None:
        """Keep the reply with the key."""
        if claim.finished:
            return
        await self.store.finish(self.finish_step(claim, status, body, stream))
        self.finished(claim)

    async def release(self, claim: Claim) -> None:
        """Give the key back (the request failed, and stored nothing): a retry runs again."""
        if claim.finished:
            return
        self.finished(claim)
        await self.store.release(claim.project, claim.key, claim.owner)
