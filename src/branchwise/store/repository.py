"""The repository: the one store API that services and routes see. Conversations (pointers
into trees), their histories, items, responses, and the commit of a finished response by
compare-and-swap of the head. The tree's rules are `core.tree`'s pure functions; this module
executes what they compute, on one database (`sqlite_writer` or `postgres`), with the
statements of `statements`. Write transactions are short and never span a model call.

Every method acts for the caller's project (`core.projects.current_project`), read when the
method builds its parameters, in the caller's task: a grouped statement (PostgreSQL's
`OneInFlight`) carries each entry's project, since it runs in whichever task flushes it."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import orjson
from sqlalchemy.ext.asyncio import AsyncEngine

from branchwise.core.ids import now
from branchwise.core.projects import current_project
from branchwise.core.tree import (
    Conversation,
    ImportedConversation,
    NewItem,
    PathRow,
    Placed,
    ResponseRow,
    on_path,
    on_path_bounds,
    page_bounds,
    place,
    rehang,
)
from branchwise.store import statements as q
from branchwise.store.connect import is_sqlite
from branchwise.store.group_commit import OneInFlight
from branchwise.store.history_cache import PathCache
from branchwise.store.imports import store_batch
from branchwise.store.pg_groups import PgGroups
from branchwise.store.postgres import PgDatabase
from branchwise.store.prompts import PromptStore
from branchwise.store.sqlite_writer import SqliteWriter
from branchwise.store.statements import Tx


def _joined(value: str | bytes | None) -> bytes:
    """An aggregated path from the database (TEXT on SQLite, bytea on PostgreSQL) as bytes."""
    if value is None:
        return b""
    return value.encode() if isinstance(value, str) else bytes(value)


HEAVY_WRITE_BYTES = 1 << 20
"""Items this big in one commit are written off the event loop (`SqliteWriter.write`)."""


def _item_rows(tree: str, placed: Sequence[Placed], created: int, project: str) -> list[dict]:
    return [
        {
            "node": p.node, "parent": p.parent, "depth": p.depth, "tree": tree,
            "item_id": p.item.item_id, "type": p.item.type, "role": p.item.role,
            "status": p.item.status, "response_id": p.response_id, "created_at": created,
            "data": p.item.data, "chat": p.item.chat, "project": project,
        }
        for p in placed
    ]


RAREST_CAP = 1000  # metadata pairs are counted up to this many conversations to find the rarest


class Repository:
    def __init__(self, engine: AsyncEngine, history_cache_bytes: int = 16 << 20):
        self.engine = engine
        self.dialect = engine.dialect.name
        self.db: SqliteWriter | PgDatabase = SqliteWriter(engine) if is_sqlite(engine) else PgDatabase(engine)
        # PostgreSQL: the hot path's reads, commits (SQLite's group commit is the writer's) and
        # head moves, each kind grouped (see `group_commit`)
        groups = PgGroups(self.db)
        self._pg_reads = OneInFlight(groups.reads)
        self._pg_commits = OneInFlight(groups.commits)
        self._pg_moves = OneInFlight(groups.moves)
        self._history_cache_bytes = history_cache_bytes
        # node -> its path's messages (see `history_cache`); None when switched off
        self._histories = PathCache(history_cache_bytes) if history_cache_bytes > 0 else None
        # conversation -> the head this process last read or set (a hint: always checked)
        self._heads: dict[str, str] = {}
        self.prompts = PromptStore(self.db)

    async def close(self) -> None:
        await self.db.close()

    # ------------------------------------------------------------------ the history cache

    @property
    def caches_histories(self) -> bool:
        return self._histories is not None

    def forget_histories(self) -> None:
        """Empty the history cache (every history is read from the database again)."""
        if self._histories is not None:
            self._histories = PathCache(self._history_cache_bytes)

    def _note_head(self, conv_id: str, head: str | None) -> None:
        if self._histories is None:
            return
        if head is None:
            self._heads.pop(conv_id, None)
            return
        if len(self._heads) >= 100_000:
            self._heads.clear()
        self._heads[conv_id] = head

    # ------------------------------------------------------------------ reads

    async def conversation(self, conv_id: str) -> Conversation | None:
        row = await self.db.one(q.CONVERSATION, {"id": conv_id, "project": current_project()})
        return None if row is None else Conversation(*row)

    async def list_conversations(self, *, limit: int, order: str, after: str | None,
                                 metadata: Sequence[tuple[str, str]] = ()) -> tuple[list[Conversation], bool]:
        """A page of conversations in creation order (`desc`: newest first), after the id
        `after` (a cursor: it need not exist any more), each holding every (key, value) of
        `metadata`; and whether there is more. The one place conversations are listed."""
        if len(metadata) > 1:  # the rarest pair first: it drives the scan, the others are checked per row
            counts = [await self.db.value(q.METADATA_PAIR_COUNT, {"k": k, "v": v, "cap": RAREST_CAP})
                      for k, v in metadata]
            metadata = [pair for _, pair in sorted(zip(counts, metadata, strict=True), key=lambda x: x[0])]
        params: dict = {"limit": limit + 1, "project": current_project()}
        if after is not None:
            params["after"] = after
        for n, (key, value) in enumerate(metadata):
            params[f"k{n}"], params[f"v{n}"] = key, value
        rows = await self.db.all(q.list_conversations(order, after is not None, len(metadata)), params)
        return [Conversation(*r) for r in rows[:limit]], len(rows) > limit

    async def secret(self, name: str, make: Callable[[], str]) -> str:
        """The shared value `name`: the one stored, or `make()`'s, stored now. Two processes
        starting at once agree: the second's insert does nothing and it reads the first's."""
        value = await self.db.value(q.SECRET, {"name": name})
        if value is None:
            await self.db.write([(q.INSERT_SECRET, {"name": name, "value": make(), "created_at": now()})])
            value = await self.db.value(q.SECRET, {"name": name})
        return value

    async def conversation_with_history(self, conv_id: str) -> tuple[Conversation | None, bytes]:
        """The conversation and the comma-joined messages of its current path, in one query. When
        the head is still the one this process last saw and its history is cached, the query
        skips the walk and the history comes from the cache."""
        known = self._heads.get(conv_id)
        cached = self._histories.get(known) if known is not None and self._histories is not None else None
        if cached is None:
            known = None
        project = current_project()
        if self.dialect == "postgresql":
            row = await self._pg_reads.submit((conv_id, known, project))
        elif known is None:
            row = await self.db.one(q.CONVERSATION_HISTORY[self.dialect], {"id": conv_id, "project": project})
        else:
            row = await self.db.one(q.CONVERSATION_HISTORY_UNLESS[self.dialect],
                                    {"id": conv_id, "known": known, "project": project})
        if row is None:
            self._heads.pop(conv_id, None)
            return None, b""
        conv = Conversation(*row[:-1])
        if known is not None and conv.head == known:  # the walk was skipped
            history = cached
        else:
            history = _joined(row[-1])
            if self._histories is not None and conv.head is not None and history:
                self._histories.put(conv.head, history)
        self._note_head(conv_id, conv.head)
        return conv, history

    async def path_chat(self, node: str | None) -> bytes:
        """The Chat Completions messages of the path root..node, in order, comma-joined
        (b"" for an empty path)."""
        if node is None:
            return b""
        if self._histories is not None:
            hit = self._histories.get(node)
            if hit is not None:
                return hit
        history = _joined(await self.db.value(q.PATH_CHAT[self.dialect], {"node": node}))
        if self._histories is not None and history:  # (empty: perhaps a node not written yet)
            self._histories.put(node, history)
        return history

    async def walk(self, head: str, lo: int, hi: int, order: str = "asc") -> list[PathRow]:
        """The items of the path ending at `head` whose depth lies in [lo, hi]."""
        rows = await self.db.all(q.WALK[order], {"node": head, "lo": max(lo, 0), "hi": hi})
        return [PathRow(*r) for r in rows]

    async def candidates(self, tree: str, item_id: str) -> list[tuple[str, int]]:
        """Nodes holding `item_id` in `tree`: (node, depth), newest first."""
        return [tuple(r) for r in await self.db.all(q.CANDIDATES, {"tree": tree, "item_id": item_id})]

    async def find_on_path(self, conv: Conversation, item_id: str) -> PathRow | None:
        """The node holding `item_id` on the conversation's current path, if any."""
        return await _find_on_path(self.db, conv, item_id)

    async def list_path(self, conv: Conversation, *, limit: int, order: str,
                        after: PathRow | None) -> tuple[list[PathRow], bool]:
        """A page of the conversation's path, and whether there is more."""
        if conv.head is None:
            return [], False
        bounds = page_bounds(conv.head_depth, limit, order, after.depth if after else None)
        if bounds is None:
            return [], False
        rows = await self.walk(conv.head, *bounds, order)
        return rows[:limit], len(rows) > limit

    async def response(self, resp_id: str) -> ResponseRow | None:
        row = await self.db.one(q.RESPONSE, {"id": resp_id, "project": current_project()})
        return None if row is None else ResponseRow(*row)

    async def node_depth(self, node: str | None) -> int:
        return (await self.node_info(node))[0]

    async def node_info(self, node: str | None) -> tuple[int, str | None]:
        """(depth, item type) of a node; (-1, None) for no node."""
        if node is None:
            return -1, None
        row = await self.db.one(q.NODE_INFO, {"node": node})
        return (-1, None) if row is None else (row[0], row[1])

    async def node_data(self, node: str) -> bytes | None:
        return await self.db.value(q.NODE_DATA, {"node": node})

    async def items_by_id(self, ids: Sequence[str]) -> dict[str, tuple]:
        """Content of existing items of the project, for `item_reference` inputs."""
        ids = list(dict.fromkeys(ids))
        sql, names = q.items_by_id(len(ids))
        params = dict(zip(names, ids, strict=True))
        params["project"] = current_project()
        return {r[0]: tuple(r) for r in await self.db.all(sql, params)}

    async def tree_page(self, tree: str, *, limit: int, after: str | None = None,
                        after_node: str | None = None, data: bool = False) -> tuple[list[tuple], bool] | None:
        """A page of every node of `tree` in the order they were stored (rows end with the node
        and its parent's node, then, with `data`, the item's wire JSON), after the node
        `after_node` or after the newest node holding the item `after`; None when that is not in
        the tree."""
        after_seq = 0
        if after_node is not None:
            after_seq = await self.db.value(q.TREE_AFTER_NODE, {"tree": tree, "node": after_node})
        elif after is not None:
            after_seq = await self.db.value(q.TREE_AFTER, {"tree": tree, "item_id": after})
        if after_seq is None:
            return None
        rows = await self.db.all(q.TREE_PAGE_DATA if data else q.TREE_PAGE,
                                 {"tree": tree, "after": after_seq, "limit": limit + 1})
        return [tuple(r) for r in rows[:limit]], len(rows) > limit

    async def tree_items(self, tree: str, page: int = 1000) -> list[tuple]:
        """Every node of `tree` with its content, in the order stored (parents first): rows of
        (node, parent, item_id, type, role, response_id, created_at, data, chat)."""
        out: list[tuple] = []
        after = 0
        while True:
            rows = await self.db.all(q.TREE_ITEMS, {"tree": tree, "after": after, "limit": page})
            out += [tuple(r[1:]) for r in rows]
            if len(rows) < page:
                return out
            after = rows[-1][0]

    # ------------------------------------------------------------------ conversation writes

    async def create_conversation(self, conv_id: str, tree: str, metadata: dict, chain: Sequence[NewItem],
                                  *, head: str | None = None, forked_from: tuple[str, str | None] | None = None,
                                  ) -> None:
        """A new conversation: `chain` as a new root line of `tree` and the head at its end, or
        (a fork) no items and the head at `head`."""
        created = now()
        project = current_project()
        placed = place(chain, None, -1)
        if placed:
            head = placed[-1].node
        steps: list = []
        if placed:
            steps.append((q.INSERT_ITEMS, _item_rows(tree, placed, created, project)))
            steps += self._block_steps(placed)
        steps.append((q.INSERT_CONVERSATION, {
            "id": conv_id, "tree": tree, "head": head, "created_at": created,
            "metadata": orjson.dumps(metadata).decode(),
            "forked_from_conversation": forked_from[0] if forked_from else None,
            "forked_from_item": forked_from[1] if forked_from else None,
            "project": project,
        }))
        if metadata:
            steps.append((q.INSERT_CONVERSATION_METADATA, q.metadata_rows(conv_id, metadata)))
        await self.db.write(steps)

    async def import_conversations(self, batch: Sequence[ImportedConversation]) -> list[tuple[str, bool]]:
        """Store whole conversations made elsewhere, in one transaction, unless they are there
        already (see `imports.store_batch`): per conversation, (the id of the conversation that
        holds it, whether this call stored it)."""
        if not batch:
            return []
        return await self.db.transaction(lambda tx: store_batch(tx, self.dialect, batch))

    async def update_metadata(self, conv_id: str, metadata: dict) -> bool:
        """Replace the conversation's metadata; False when there is no such conversation."""
        project = current_project()

        async def update(tx: Tx) -> bool:
            if await tx.execute(q.UPDATE_METADATA, {"id": conv_id, "project": project,
                                                    "metadata": orjson.dumps(metadata).decode()}) == 0:
                return False
            await tx.execute(q.DELETE_CONVERSATION_METADATA, {"id": conv_id})
            await tx.execute(q.INSERT_CONVERSATION_METADATA, q.metadata_rows(conv_id, metadata))
            return True

        return await self.db.transaction(update)

    async def delete_conversation(self, conv_id: str) -> bool:
        """False when the project has no such conversation (nothing of another's is touched)."""
        project = current_project()

        async def delete(tx: Tx) -> bool:
            if await tx.execute(q.DELETE_CONVERSATION, {"id": conv_id, "project": project}) == 0:
                return False
            await tx.execute(q.DELETE_CONVERSATION_METADATA, {"id": conv_id})
            return True

        return await self.db.transaction(delete)

    async def _locked_conversation(self, tx: Tx, conv_id: str, project: str) -> Conversation | None:
        key = {"id": conv_id, "project": project}
        if await tx.one(q.LOCK_CONVERSATION[self.dialect], key) is None:
            return None
        return Conversation(*await tx.one(q.CONVERSATION, key))

    async def append_items(self, conv_id: str, chain: Sequence[NewItem],
                           also: tuple[q.SQL, dict] | None = None) -> Conversation | None:
        """Hang `chain` under the conversation's head and move the head to its end, atomically.
        The conversation as it was; None when there is no such conversation. `also`: a statement
        run in the same transaction once the items are in (an idempotency record's reply)."""
        project = current_project()

        async def append(tx: Tx) -> Conversation | None:
            conv = await self._locked_conversation(tx, conv_id, project)
            if conv is None:
                return None
            placed = place(chain, conv.head, conv.head_depth)
            if placed:
                await tx.execute(q.INSERT_ITEMS, _item_rows(conv.tree, placed, now(), project))
                for sql, params in self._block_steps(placed):
                    await tx.execute(sql, params)
                await tx.execute(q.SET_HEAD, {"id": conv_id, "head": placed[-1].node})
            if also is not None:
                await tx.execute(*also)
            return conv

        return await self.db.transaction(append)

    async def move_head_to_item(self, conv_id: str, item_id: str) -> tuple | None:
        """Point the head at the newest node holding `item_id` in the conversation's tree
        (`core.tree.head_target`): one statement, one round trip. The conversation's
        (created_at, metadata, forked_from_conversation, forked_from_item) after the move, or
        None when there is no such conversation or the item is not in its tree."""
        project = current_project()
        if self.dialect == "postgresql":
            row = await self._pg_moves.submit((conv_id, item_id, project))
        else:
            rows = await self.db.write_returning(q.SET_HEAD_TO_ITEM,
                                                 {"id": conv_id, "item_id": item_id, "project": project})
            row = rows[0] if rows else None
        if row is None:
            return None
        head, *rest = row
        self._note_head(conv_id, head)
        return tuple(rest)

    async def delete_from_path(self, conv_id: str, item_id: str) -> bool | None:
        """Take `item_id` out of the conversation's path without touching any shared node: the
        nodes below it are re-hung (copied, same item ids) under its parent (`core.tree.rehang`).
        None: no such conversation; False: the item is not on its path."""
        project = current_project()

        async def delete(tx: Tx) -> bool | None:
            conv = await self._locked_conversation(tx, conv_id, project)
            if conv is None:
                return None
            target = await _find_on_path(tx, conv, item_id)
            if target is None:
                return False
            path = await tx.all(q.WALK["asc"], {"node": conv.head, "lo": target.depth, "hi": conv.head_depth})
            below_nodes = [r[0] for r in path][1:]  # the first row is the target itself
            parent = (await tx.one(q.NODE_PARENT, {"node": target.node}))[0]
            below: list[dict] = []
            if below_nodes:
                sql, names = q.item_rows(len(below_nodes))
                rows = await tx.all(sql, dict(zip(names, below_nodes, strict=True)))
                by_node = {r[0]: dict(zip(q.ITEM_COLUMNS, r, strict=True)) for r in rows}
                below = [by_node[n] for n in below_nodes]
            copies, new_head = rehang(below, parent, target.depth)
            if copies:
                await tx.execute(q.INSERT_ITEMS, copies)
                blocks = q.block_rows([(c["node"], c["depth"]) for c in copies])
                if blocks:
                    await tx.execute(q.INSERT_BLOCK[self.dialect], blocks)
            await tx.execute(q.SET_HEAD, {"id": conv_id, "head": new_head})
            return True

        return await self.db.transaction(delete)

    # ------------------------------------------------------------------ responses

    async def commit_response(
        self,
        *,
        tree: str,
        placed: Sequence[Placed],
        response_rows: Sequence[dict],
        conversation_id: str | None,
        base: str | None,
        new_head: str | None,
        update_existing: bool = False,
        events: Sequence[dict] = (),
        histories: Sequence[tuple[str, bytes | None]] = (),
    ) -> bool:
        """Store a finished response in one short transaction: its items, its row(s), and the
        conversation head moved from `base` to `new_head` if it is still at `base`
        (compare-and-swap). `histories`: (node, its history) of the new branches'
        ends (`history_cache.extend`), kept once the items are stored. Returns whether the head
        moved."""
        project = current_project()
        for row in response_rows:
            row["project"] = project
        if self.dialect == "postgresql" and not events and not update_existing:
            conv = conversation_id if new_head is not None else None
            entry = (_item_rows(tree, placed, now(), project), list(response_rows), conv, base, new_head)
            moved = await self._pg_commits.submit(entry)
            if placed and placed[-1].depth + len(placed) >= q.FIRST_BLOCK_END:  # (else no block ends among them)
                blocks = self._block_steps(placed)
                if blocks:  # (after the commit, on its own: a block is derived data, and optional)
                    await self.db.write(blocks)
        else:
            moved = await self._commit_steps(tree, placed, response_rows, conversation_id, base, new_head,
                                             update_existing, events, project)
        if moved and conversation_id is not None:
            self._note_head(conversation_id, new_head)
        if placed and self._histories is not None:
            for node, history in histories:
                if history:
                    self._histories.put(node, history)
        return moved

    async def _commit_steps(self, tree: str, placed: Sequence[Placed], response_rows: Sequence[dict],
                            conversation_id: str | None, base: str | None, new_head: str | None,
                            update_existing: bool, events: Sequence[dict], project: str) -> bool:
        steps: list = []
        if placed:
            steps.append((q.INSERT_ITEMS, _item_rows(tree, placed, now(), project)))
            if placed[-1].depth + len(placed) >= q.FIRST_BLOCK_END:  # (else no block ends among them)
                steps += self._block_steps(placed)
        if events:
            steps.append((q.INSERT_EVENTS, list(events)))
            if self.dialect == "postgresql":  # (readers in other processes: `store.signals`)
                steps.append((q.NOTIFY_EVENTS, {"ids": list({e["response_id"]: 0 for e in events})}))
        if update_existing:
            steps.append((q.FINISH_RESPONSE, list(response_rows)))
        elif response_rows:
            steps.append((q.INSERT_RESPONSES, list(response_rows)))
        move = conversation_id is not None and new_head is not None
        if move:
            steps.append((q.MOVE_HEAD[self.dialect], {"id": conversation_id, "base": base, "head": new_head}))
        if not steps:
            return False
        count = await self.db.write(steps, heavy=sum(len(p.item.data) for p in placed) > HEAVY_WRITE_BYTES)
        return move and count > 0

    def _block_steps(self, placed: Sequence[Placed]) -> list:
        """The history blocks that `placed` ends (`statements.BLOCK`), as a write step."""
        rows = q.block_rows([(p.node, p.depth) for p in placed])
        return [(q.INSERT_BLOCK[self.dialect], rows)] if rows else []

    async def delete_response(self, resp_id: str) -> bool:
        return await self.db.write([(q.DELETE_RESPONSE, {"id": resp_id, "project": current_project()})]) > 0


async def _find_on_path(reader: SqliteWriter | PgDatabase | Tx, conv: Conversation, item_id: str) -> PathRow | None:
    """`Repository.find_on_path`, on the database or inside a transaction."""
    if conv.head is None:
        return None
    cands = [tuple(r) for r in await reader.all(q.CANDIDATES, {"tree": conv.tree, "item_id": item_id})]
    lo = on_path_bounds(cands, conv.head_depth)
    if lo is None:
        return None
    path = await reader.all(q.WALK["desc"], {"node": conv.head, "lo": lo, "hi": conv.head_depth})
    return on_path(cands, [PathRow(*r) for r in path])
