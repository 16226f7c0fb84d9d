"""Stored prompts: a prompt is a line of versions, each one JSON document written once. The
repository hands this out as `Repository.prompts`; the rules (templates, variables) are the
prompts service's. Every statement names the caller's project (`core.projects`)."""

from __future__ import annotations

from branchwise.core.ids import now
from branchwise.core.projects import current_project
from branchwise.store import statements as q
from branchwise.store.postgres import PgDatabase
from branchwise.store.sqlite_writer import SqliteWriter
from branchwise.store.statements import Tx

# a version as read: (version, created_at, data)
Version = tuple[int, int, str]


class PromptStore:
    def __init__(self, db: SqliteWriter | PgDatabase):
        self.db = db

    async def create(self, prompt_id: str, data: str) -> Version:
        """A new prompt, its first version holding `data`."""
        created = now()
        await self.db.write([
            (q.INSERT_PROMPT, {"id": prompt_id, "created_at": created, "project": current_project()}),
            (q.INSERT_PROMPT_VERSION, {"prompt_id": prompt_id, "version": 1, "created_at": created, "data": data}),
        ])
        return 1, created, data

    async def add_version(self, prompt_id: str, data: str) -> Version | None:
        """The prompt's next version, holding `data`; None when there is no such prompt."""
        created = now()
        project = current_project()

        async def add(tx: Tx) -> int | None:
            row = await tx.one(q.BUMP_PROMPT, {"id": prompt_id, "project": project})
            if row is None:
                return None
            await tx.execute(q.INSERT_PROMPT_VERSION, {"prompt_id": prompt_id, "version": row[0],
                                                       "created_at": created, "data": data})
            return row[0]

        version = await self.db.transaction(add)
        return None if version is None else (version, created, data)

    async def get(self, prompt_id: str, version: int | None = None) -> Version | None:
        """A version of the prompt (its latest when `version` is None), or None."""
        if version is None:
            row = await self.db.one(q.PROMPT_LATEST, {"id": prompt_id, "project": current_project()})
        else:
            row = await self.db.one(q.PROMPT_VERSION, {"id": prompt_id, "version": version,
                                                       "project": current_project()})
        return None if row is None else (row[0], row[1], row[2])

    async def exists(self, prompt_id: str) -> bool:
        return await self.db.one(q.PROMPT_EXISTS, {"id": prompt_id, "project": current_project()}) is not None

    async def page(self, *, limit: int, order: str, after: str | None) -> tuple[list[tuple], bool]:
        """A page of prompts in id (creation) order, each its latest version: rows (id, version,
        created_at, data), and whether there is more."""
        params: dict = {"limit": limit + 1, "project": current_project()}
        if after is not None:
            params["after"] = after
        rows = await self.db.all(q.LIST_PROMPTS[(after is not None, order)], params)
        return [tuple(r) for r in rows[:limit]], len(rows) > limit

    async def versions(self, prompt_id: str, *, limit: int, order: str,
                       after: int | None) -> tuple[list[Version], bool]:
        """A page of the prompt's versions, and whether there is more."""
        params: dict = {"id": prompt_id, "limit": limit + 1, "project": current_project()}
        if after is not None:
            params["after"] = after
        rows = await self.db.all(q.LIST_PROMPT_VERSIONS[(after is not None, order)], params)
        return [(r[0], r[1], r[2]) for r in rows[:limit]], len(rows) > limit

    async def delete(self, prompt_id: str) -> bool:
        """The prompt and every version of it; False when there was no such prompt."""
        key = {"id": prompt_id, "project": current_project()}
        return await self.db.write([(q.DELETE_PROMPT_VERSIONS, key), (q.DELETE_PROMPT, key)]) > 0
