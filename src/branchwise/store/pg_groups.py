"""PostgreSQL's grouped statements of the hot path (`store.group_commit.OneInFlight` hands each
a group of calls): conversation reads, head moves and commits, one statement for a group. Each
entry carries everything its statement needs, its project included: a group runs in whichever
request's task flushes it (docs/decisions/0012, 0051)."""

from __future__ import annotations

from branchwise.store import statements as q
from branchwise.store.group_commit import in_rounds
from branchwise.store.postgres import PgDatabase


class PgGroups:
    def __init__(self, db: PgDatabase):
        self.db = db

    async def reads(self, entries: list[tuple[str, str | None, str]]) -> list:
        """A group of conversation reads (conversation id, known head, project), one statement for
        all of them when there are several: each one's row or None."""
        if len(entries) == 1:  # (no known head: `c.head = NULL` is not true, so it walks)
            conv_id, known, project = entries[0]
            return [await self.db.one(q.CONVERSATION_HISTORY_UNLESS["postgresql"],
                                      {"id": conv_id, "known": known, "project": project})]
        out: list = [None] * len(entries)
        rows = await self.db.all(q.PG_CONVERSATION_HISTORY_MANY, {"ids": [e[0] for e in entries],
                                                                  "known": [e[1] for e in entries],
                                                                  "projects": [e[2] for e in entries]})
        for row in rows:
            out[row[0] - 1] = row[1:]
        return out

    async def moves(self, entries: list[tuple[str, str, str]]) -> list:
        """A group of head moves (conversation id, item id, project), in rounds (see `in_rounds`; a second
        move of one conversation sees the first): each one's (head, created_at, metadata,
        forked_from...) or None when it did not move."""
        async def together(group: list[int]) -> list:
            rows = await self.db.write_returning(q.PG_SET_HEADS_TO_ITEMS, {
                "ids": [entries[i][0] for i in group], "item_ids": [entries[i][1] for i in group],
                "projects": [entries[i][2] for i in group]})
            out: list = [None] * len(group)
            for row in rows:
                out[row[0] - 1] = row[1:]
            return out

        async def alone(i: int):
            rows = await self.db.write_returning(q.SET_HEAD_TO_ITEM, {"id": entries[i][0], "item_id": entries[i][1],
                                                                      "project": entries[i][2]})
            return rows[0] if rows else None

        return await in_rounds([e[0] for e in entries], together, alone)

    async def commits(self, entries: list[tuple]) -> list:
        """The group commit: commits (items, response rows, conversation, base, new head) in
        rounds (see `in_rounds`; a conversation named twice, parallel branches, waits for the
        next round, so that each compare-and-swap sees the one before it): whether each one
        moved its head."""
        async def together(group: list[int]) -> list:
            moved = await self._commit_many([entries[i] for i in group])
            return [entries[i][2] in moved for i in group]

        async def alone(i: int) -> bool:
            moved = await self._commit_many([entries[i]])
            return entries[i][2] is not None and entries[i][2] in moved

        return await in_rounds([e[2] for e in entries], together, alone)

    async def _commit_many(self, entries: list[tuple]) -> set[str]:
        """Commits (items, response rows, conversation, base, new head), each conversation at most
        once and in conversation order, in one statement: the conversations whose head moved."""
        rows = [r for e in entries for r in e[0]]
        response_rows = [r for e in entries for r in e[1]]
        moves = [(e[2], e[3], e[4]) for e in entries if e[2] is not None]  # (in conversation order)
        arrays = q.commit_in_arrays(len(entries), len(rows), len(response_rows), len(moves))
        text = q.pg_commit(len(rows), len(response_rows), len(moves), arrays)
        return {r[0] for r in await self.db.fetch_numbered(text, q.commit_args(rows, response_rows, moves, arrays))}
