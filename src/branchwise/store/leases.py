"""Leases in the database: one line per conversation, shared by every server process."""

from __future__ import annotations

import time
from collections.abc import Iterable

from sqlalchemy import delete, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from branchwise.store.connect import reader, writer
from branchwise.store.tables import conversations, leases


async def _lock_conversation(conn: AsyncConnection, conv_id: str) -> bool:
    """Serialise lease changes per conversation (row lock on PostgreSQL; SQLite's write
    transactions are serial already). False when the conversation does not exist."""
    q = select(conversations.c.id).where(conversations.c.id == conv_id)
    if conn.dialect.name == "postgresql":
        q = q.with_for_update()
    return (await conn.execute(q)).first() is not None


class Leases:
    def __init__(self, engine: AsyncEngine):
        self.engine = engine
        self.writer = writer(engine)
        self.reader = reader(engine)

    async def take_if_free(self, conv_id: str, holder: str, ttl: float) -> int | None:
        """A lease if nobody holds or waits for one on `conv_id`, else None."""
        now = time.time()
        async with self.writer.begin() as conn:
            await _lock_conversation(conn, conv_id)
            busy = (await conn.execute(
                select(leases.c.seq).where(leases.c.conversation_id == conv_id, leases.c.expires_at > now).limit(1)
            )).first()
            if busy is not None:
                return None
            r = await conn.execute(insert(leases).returning(leases.c.seq),
                                   {"conversation_id": conv_id, "holder": holder, "expires_at": now + ttl})
            return r.scalar_one()

    async def enqueue(self, conv_id: str, holder: str, ttl: float) -> int:
        """A place at the end of the line. Inserts are serialised per conversation, so `seq`
        order is arrival order."""
        async with self.writer.begin() as conn:
            await _lock_conversation(conn, conv_id)
            r = await conn.execute(insert(leases).returning(leases.c.seq),
                                   {"conversation_id": conv_id, "holder": holder, "expires_at": time.time() + ttl})
            return r.scalar_one()

    async def first(self, conv_id: str) -> int | None:
        """The live lease at the front of the line."""
        async with self.reader.connect() as conn:
            return (await conn.execute(
                select(leases.c.seq).where(leases.c.conversation_id == conv_id, leases.c.expires_at > time.time())
                .order_by(leases.c.seq).limit(1)
            )).scalar()

    async def renew(self, seqs: Iterable[int], ttl: float) -> None:
        seqs = list(seqs)
        if not seqs:
            return
        async with self.writer.begin() as conn:
            await conn.execute(update(leases).where(leases.c.seq.in_(seqs)).values(expires_at=time.time() + ttl))

    async def release(self, seq: int) -> None:
        async with self.writer.begin() as conn:
            await conn.execute(delete(leases).where(leases.c.seq == seq))

    async def live(self, conv_id: str) -> list[tuple[int, str]]:
        async with self.reader.connect() as conn:
            rows = await conn.execute(
                select(leases.c.seq, leases.c.holder)
                .where(leases.c.conversation_id == conv_id, leases.c.expires_at > time.time())
                .order_by(leases.c.seq)
            )
            return [tuple(r) for r in rows.all()]
