"""API keys and their limits in the database: the keys themselves (made, listed and revoked by
`branchwise keys`, read by every server process), the requests-per-minute counters and the
concurrent-response slots. Every server process and instance sharing the database shares these
rows, so limits hold across `--workers` and across instances (docs/security.md).

A key's secret is 32 random bytes; only its SHA-256 is stored. A fast hash is right here: the
secret is random and long, so nothing can be guessed from the hash, and a slow hash would cost
every request that misses the per-process cache (`services.keys`)."""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass

from sqlalchemy import insert, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from branchwise.core.ids import new_id, now
from branchwise.store.connect import reader, writer
from branchwise.store.postgres import PgDatabase
from branchwise.store.sqlite_writer import SqliteWriter
from branchwise.store.statements import SQL, Tx
from branchwise.store.tables import api_keys

SECRET_PREFIX = "sk-bw-"


def new_secret() -> str:
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def secret_hash(secret: bytes | str) -> str:
    """The hex SHA-256 of a secret, as stored."""
    return hashlib.sha256(secret.encode() if isinstance(secret, str) else secret).hexdigest()


@dataclass(frozen=True, slots=True)
class KeyRow:
    id: str
    project: str
    name: str | None
    hint: str
    rpm: int | None
    max_concurrent: int | None
    created_at: int
    last_used_at: int | None
    revoked_at: int | None
    secret_hash: str = ""


_COLUMNS = (api_keys.c.id, api_keys.c.project, api_keys.c.name, api_keys.c.hint, api_keys.c.rpm,
            api_keys.c.max_concurrent, api_keys.c.created_at, api_keys.c.last_used_at, api_keys.c.revoked_at,
            api_keys.c.secret_hash)


class KeyStore:
    """The keys' rows (SQLAlchemy: none of this is on a request's path)."""

    def __init__(self, engine: AsyncEngine):
        self.writer = writer(engine)
        self.reader = reader(engine)

    async def create(self, project: str, name: str | None, rpm: int | None,
                     max_concurrent: int | None) -> tuple[KeyRow, str]:
        """A new key: its row and its secret (shown once, never stored)."""
        secret = new_secret()
        row = {"id": new_id("key"), "project": project, "name": name, "secret_hash": secret_hash(secret),
               "hint": secret[-4:], "rpm": rpm, "max_concurrent": max_concurrent, "created_at": now()}
        async with self.writer.begin() as conn:
            await conn.execute(insert(api_keys), row)
        return KeyRow(**{k: row.get(k) for k in KeyRow.__slots__}), secret

    async def all(self) -> list[KeyRow]:
        async with self.reader.connect() as conn:
            rows = (await conn.execute(select(*_COLUMNS).order_by(api_keys.c.created_at, api_keys.c.id))).all()
        return [KeyRow(*r) for r in rows]

    async def active(self) -> list[KeyRow]:
        async with self.reader.connect() as conn:
            rows = (await conn.execute(select(*_COLUMNS).where(api_keys.c.revoked_at.is_(None)))).all()
        return [KeyRow(*r) for r in rows]

    async def revoke(self, key_id: str) -> bool:
        """False when there is no such key or it was revoked already."""
        async with self.writer.begin() as conn:
            r = await conn.execute(update(api_keys).where(api_keys.c.id == key_id, api_keys.c.revoked_at.is_(None))
                                   .values(revoked_at=now()))
        return r.rowcount > 0

    async def touch(self, key_ids: list[str], when: int) -> None:
        """Record `last_used_at` (a minute's precision is all `keys list` shows)."""
        if key_ids:
            async with self.writer.begin() as conn:
                await conn.execute(update(api_keys).where(api_keys.c.id.in_(key_ids)).values(last_used_at=when))


# ------------------------------------------------------------------ limits (on the raw drivers)

# One request more in the key's current minute, unless the minute's count has reached the limit:
# the row's lock makes concurrent counts queue, and each sees the one before it, so exactly
# `limit` requests get a count back (both databases; no row back: over the limit). The minute is
# the database's, so instances whose clocks differ a little still count in one row.
_MINUTE = {
    "sqlite": "CAST(strftime('%s', 'now') AS INTEGER) / 60 * 60",
    "postgresql": "CAST(floor(extract(epoch FROM clock_timestamp()) / 60) * 60 AS integer)",
}
COUNT_REQUEST = {d: SQL(
    f"INSERT INTO rate_windows (key_id, window_start, used) VALUES (:key_id, {minute}, 1)"
    " ON CONFLICT (key_id, window_start) DO UPDATE SET used = rate_windows.used + 1"
    " WHERE rate_windows.used < :limit RETURNING used, window_start") for d, minute in _MINUTE.items()}
LOCK_KEY = {
    "sqlite": SQL("SELECT id FROM api_keys WHERE id = :key_id"),  # (SQLite's write transactions are serial)
    "postgresql": SQL("SELECT id FROM api_keys WHERE id = :key_id FOR UPDATE"),
}
LIVE_SLOTS = SQL("SELECT count(*) FROM key_slots WHERE key_id = :key_id AND expires_at > :now")
TAKE_SLOT = SQL("INSERT INTO key_slots (key_id, expires_at) VALUES (:key_id, :expires_at) RETURNING seq")
DROP_SLOT = SQL("DELETE FROM key_slots WHERE seq = :seq")
RENEW_SLOT = SQL("UPDATE key_slots SET expires_at = :expires_at WHERE seq = :seq")
FORGET_SLOTS = SQL("DELETE FROM key_slots WHERE expires_at < :now")
FORGET_WINDOWS = SQL("DELETE FROM rate_windows WHERE window_start < :before")
# (keys made, keys revoked): keys are never deleted nor un-revoked, so this changes exactly when
# the set of valid keys does. Every process asks it every second: on the raw driver, not through
# SQLAlchemy's execution, which costs many times the query.
KEYS_VERSION = SQL("SELECT count(*), count(revoked_at) FROM api_keys")


class Limits:
    """What a server process asks of the keys' rows on its hot paths, on the repository's
    database (its raw drivers): whether the keys changed; requests per minute and concurrent
    responses per key."""

    def __init__(self, db: SqliteWriter | PgDatabase, dialect: str):
        self.db = db
        self.dialect = dialect

    async def keys_version(self) -> tuple[int, int]:
        row = await self.db.one(KEYS_VERSION, {})
        return int(row[0]), int(row[1])

    async def count_request(self, key_id: str, limit: int) -> tuple[int | None, int]:
        """(the key's count in this minute with this request, the minute's start); the count is
        None when the minute's `limit` was reached already (nothing is counted then)."""
        rows = await self.db.write_returning(COUNT_REQUEST[self.dialect], {"key_id": key_id, "limit": limit})
        if rows:
            return rows[0][0], rows[0][1]
        return None, int(time.time()) // 60 * 60

    async def take_slot(self, key_id: str, limit: int, ttl: float) -> int | None:
        """A slot among the key's `limit` concurrent ones, expiring after `ttl` seconds unless
        renewed; None when all are taken. The key's row is locked meanwhile, so two processes
        never both take the last one."""
        lock = LOCK_KEY[self.dialect]

        async def take(tx: Tx) -> int | None:
            t = time.time()
            await tx.one(lock, {"key_id": key_id})
            live = (await tx.one(LIVE_SLOTS, {"key_id": key_id, "now": t}))[0]
            if live >= limit:
                return None
            return (await tx.one(TAKE_SLOT, {"key_id": key_id, "expires_at": t + ttl}))[0]

        return await self.db.transaction(take)

    async def drop_slot(self, seq: int) -> None:
        await self.db.write([(DROP_SLOT, {"seq": seq})])

    async def renew_slots(self, seqs: list[int], ttl: float) -> None:
        if seqs:
            expires = time.time() + ttl
            await self.db.write([(RENEW_SLOT, [{"seq": s, "expires_at": expires} for s in seqs])])

    async def forget_old(self, window_start: int) -> None:
        """Expired slots (their process died) and the counters of minutes before `window_start`."""
        await self.db.write([(FORGET_SLOTS, {"now": time.time()}), (FORGET_WINDOWS, {"before": window_start})])
