"""Idempotency records: one per (project, Idempotency-Key), on the repository's database.

A record is `running` while the request that claimed it runs, held by that claim's `owner`
token until `locked_until` (renewed while it runs; a process that dies stops renewing), then
`done` with the reply to replay: a status and body, or (`stream`) the id of the response whose
event log replays it. `resource_id` names what the request makes (a response, a conversation),
chosen when the record is claimed, so that a retry after the claiming process died can find
out whether it made it. Records are kept until `expires_at`."""

from __future__ import annotations

import time
from dataclasses import dataclass

from branchwise.store.postgres import PgDatabase
from branchwise.store.sqlite_writer import SqliteWriter
from branchwise.store.statements import SQL

# A new record, or a record past its expiry made new; no row back: the key is taken.
CLAIM = SQL(
    "INSERT INTO idempotency (project, key, fingerprint, state, owner, locked_until, resource_id, status, body,"
    " stream, expires_at) VALUES (:project, :key, :fingerprint, 'running', :owner, :locked_until, :resource_id,"
    " NULL, NULL, :stream, :expires_at)"
    " ON CONFLICT (project, key) DO UPDATE SET fingerprint = excluded.fingerprint, state = 'running',"
    " owner = excluded.owner, locked_until = excluded.locked_until, resource_id = excluded.resource_id,"
    " status = NULL, body = NULL, stream = excluded.stream, expires_at = excluded.expires_at"
    " WHERE idempotency.expires_at < :now RETURNING key")
RECORD = SQL("SELECT fingerprint, state, owner, locked_until, resource_id, status, body, stream"
             " FROM idempotency WHERE project = :project AND key = :key")
# A running record whose owner stopped renewing it, taken over by a new claim (compare-and-swap
# on the old owner: of two retries, one takes it).
TAKE_OVER = SQL(
    "UPDATE idempotency SET owner = :owner, locked_until = :locked_until, resource_id = :resource_id"
    " WHERE project = :project AND key = :key AND state = 'running' AND owner = :old_owner"
    " AND locked_until < :now RETURNING key")
FINISH = SQL(
    "UPDATE idempotency SET state = 'done', status = :status, body = :body, stream = :stream, owner = NULL,"
    " locked_until = NULL WHERE project = :project AND key = :key AND owner = :owner")
RELEASE = SQL("DELETE FROM idempotency WHERE project = :project AND key = :key AND owner = :owner"
              " AND state = 'running'")
RENEW = SQL("UPDATE idempotency SET locked_until = :locked_until WHERE owner = :owner AND state = 'running'")
FORGET = SQL("DELETE FROM idempotency WHERE expires_at < :now AND (state = 'done' OR locked_until < :now)")


@dataclass(frozen=True, slots=True)
class Record:
    fingerprint: str
    state: str
    owner: str | None
    locked_until: float | None
    resource_id: str | None
    status: int | None
    body: bytes | None
    stream: bool


class IdempotencyStore:
    def __init__(self, db: SqliteWriter | PgDatabase):
        self.db = db

    async def claim(self, project: str, key: str, fingerprint: str, owner: str, resource_id: str | None,
                    lock_s: float, keep_s: float) -> bool:
        """Claim the key for a request (a new record, or one past its expiry): False when the
        key has a live record."""
        t = time.time()
        rows = await self.db.write_returning(CLAIM, {
            "project": project, "key": key, "fingerprint": fingerprint, "owner": owner, "locked_until": t + lock_s,
            "resource_id": resource_id, "stream": False, "expires_at": t + keep_s, "now": t})
        return bool(rows)

    async def record(self, project: str, key: str) -> Record | None:
        row = await self.db.one(RECORD, {"project": project, "key": key})
        if row is None:
            return None
        fingerprint, state, owner, locked, resource, status, body, stream = row
        return Record(fingerprint, state, owner, locked, resource, status,
                      None if body is None else bytes(body), bool(stream))

    async def take_over(self, project: str, key: str, old_owner: str, owner: str, resource_id: str | None,
                        lock_s: float) -> bool:
        t = time.time()
        rows = await self.db.write_returning(TAKE_OVER, {
            "project": project, "key": key, "old_owner": old_owner, "owner": owner, "locked_until": t + lock_s,
            "resource_id": resource_id, "now": t})
        return bool(rows)

    @staticmethod
    def finish_step(project: str, key: str, owner: str, status: int, body: bytes | None,
                    stream: bool) -> tuple[SQL, dict]:
        """The statement that records the reply: on its own (`finish`), or inside the
        transaction that stores what the request made (`Repository.append_items(also=...)`)."""
        return FINISH, {"project": project, "key": key, "owner": owner, "status": status, "body": body,
                        "stream": stream}

    async def finish(self, step: tuple[SQL, dict]) -> None:
        await self.db.write([step])

    async def release(self, project: str, key: str, owner: str) -> None:
        await self.db.write([(RELEASE, {"project": project, "key": key, "owner": owner})])

    async def renew(self, owners: list[str], lock_s: float) -> None:
        if owners:
            until = time.time() + lock_s
            await self.db.write([(RENEW, [{"owner": o, "locked_until": until} for o in owners])])

    async def forget_expired(self) -> None:
        await self.db.write([(FORGET, {"now": time.time()})])
