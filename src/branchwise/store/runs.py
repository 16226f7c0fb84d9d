"""Queries for responses that run for a while: their rows while running, their event logs,
heartbeats, cancel requests, and the reaper that fails responses whose process died."""

from __future__ import annotations

import time
from collections.abc import Sequence

import orjson
from sqlalchemy import and_, func, insert, select, text, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from branchwise.core.projects import current_project
from branchwise.store.connect import reader, writer
from branchwise.store.signals import Signals
from branchwise.store.statements import EVENTS_CHANNEL
from branchwise.store.tables import events, responses

RUNNING = ("queued", "in_progress")
_APPEND_AND_NOTIFY = text(
    "WITH new AS (INSERT INTO events (response_id, alternative, seq, frame)"
    " SELECT * FROM unnest(CAST(:ids AS text[]), CAST(:alts AS int[]), CAST(:seqs AS int[]), CAST(:frames AS bytea[]))"
    " RETURNING response_id)"
    f" SELECT pg_notify('{EVENTS_CHANNEL}', r) FROM (SELECT DISTINCT response_id AS r FROM new) AS d")


class RunStore:
    def __init__(self, engine: AsyncEngine):
        self.engine = engine
        self.writer = writer(engine)
        self.reader = reader(engine)
        self.pg = engine.dialect.name == "postgresql"
        # wakes readers of a response that runs in another process (PostgreSQL; see `signals`)
        self.signals = Signals(engine)

    async def _notify(self, conn: AsyncConnection, response_ids) -> None:
        """Readers in other processes learn of `response_ids`' new events (or end) when the
        transaction of `conn` commits."""
        if self.pg:
            for rid in dict.fromkeys(response_ids):
                await conn.execute(select(func.pg_notify(EVENTS_CHANNEL, rid)))

    async def insert_rows(self, rows: Sequence[dict]) -> None:
        """A running response's rows, in the caller's project."""
        project = current_project()
        async with self.writer.begin() as conn:
            await conn.execute(insert(responses), [{**r, "project": project} for r in rows])

    async def set_status(self, ids: Sequence[str], status: str, bodies: Sequence[bytes]) -> None:
        async with self.writer.begin() as conn:
            for rid, body in zip(ids, bodies, strict=True):
                await conn.execute(update(responses).where(responses.c.id == rid).values(status=status, body=body))

    async def append_events(self, rows: Sequence[dict]) -> None:
        """Rows of `events`: {response_id, alternative, seq, frame}. On PostgreSQL in one
        statement that also notifies the readers (one round trip: a reader elsewhere waits for
        it, see `signals`)."""
        if not rows:
            return
        if self.pg:
            async with self.reader.connect() as conn:  # (autocommit: the statement is its transaction)
                await conn.execute(_APPEND_AND_NOTIFY, {
                    "ids": [r["response_id"] for r in rows], "alts": [r["alternative"] for r in rows],
                    "seqs": [r["seq"] for r in rows], "frames": [r["frame"] for r in rows]})
            return
        async with self.writer.begin() as conn:
            await conn.execute(insert(events), list(rows))

    async def events_after(self, response_id: str, after: int, limit: int = 1000) -> list[tuple[int, bytes]]:
        """(seq, frame) of one response's log (one alternative's), after `after`, in order."""
        async with self.reader.connect() as conn:
            rows = await conn.execute(
                select(events.c.seq, events.c.frame)
                .where(events.c.response_id == response_id, events.c.seq > after)
                .order_by(events.c.seq).limit(limit)
            )
            return [(s, bytes(f)) for s, f in rows.all()]

    async def state(self, response_id: str) -> tuple[str, bytes, bool, bool] | None:
        """(status, body, background, cancel_requested) of the caller's project's response."""
        async with self.reader.connect() as conn:
            row = (await conn.execute(
                select(responses.c.status, responses.c.body, responses.c.background, responses.c.cancel_requested)
                .where(responses.c.id == response_id, responses.c.project == current_project())
            )).first()
        return None if row is None else (row[0], bytes(row[1]), bool(row[2]), bool(row[3]))

    async def heartbeat(self, ids: Sequence[str]) -> None:
        if not ids:
            return
        async with self.writer.begin() as conn:
            await conn.execute(update(responses).where(responses.c.id.in_(list(ids))).values(heartbeat_at=time.time()))

    async def request_cancel(self, response_id: str) -> None:
        async with self.writer.begin() as conn:
            await conn.execute(update(responses).where(responses.c.id == response_id).values(cancel_requested=True))

    async def cancel_requests(self, owner: str) -> list[str]:
        async with self.reader.connect() as conn:
            rows = await conn.execute(select(responses.c.id).where(
                responses.c.status.in_(RUNNING), responses.c.owner == owner, responses.c.cancel_requested.is_(True)))
            return [r[0] for r in rows.all()]

    async def reap(self, ttl: float, message: str) -> list[str]:
        """Fail every running response whose owner stopped heart-beating `ttl` seconds ago.
        The conversation heads are untouched: a response only moves a head when it commits."""
        stale = time.time() - ttl
        reaped = []
        async with self.reader.connect() as conn:
            rows = (await conn.execute(select(responses.c.id, responses.c.body).where(
                responses.c.status.in_(RUNNING), responses.c.heartbeat_at < stale))).all()
        for rid, body in rows:
            obj = orjson.loads(body)
            obj.update(status="failed", error={"code": "server_error", "message": message})
            async with self.writer.begin() as conn:
                r = await conn.execute(
                    update(responses)
                    .where(and_(responses.c.id == rid, responses.c.status.in_(RUNNING),
                                responses.c.heartbeat_at < stale))
                    .values(status="failed", body=orjson.dumps(obj), owner=None)
                )
                if r.rowcount:
                    await self._notify(conn, [rid])
            if r.rowcount:
                reaped.append(rid)
        return reaped
