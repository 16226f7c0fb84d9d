"""Every query branchwise runs. SQLAlchemy Core and plain SQL; the same text on SQLite and
PostgreSQL. Write transactions are short and never span a model call.

Paths are walked with a recursive CTE from a node towards the root, bounded by depth, so a
page of a long conversation costs what the page needs, not the whole history.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import orjson
from sqlalchemy import delete, insert, select, text, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from branchwise.core.ids import new_node, now
from branchwise.core.tree import Conversation, NewItem, PathRow, Placed, ResponseRow, place
from branchwise.store.db import SQL, Database, PassBatch, writer
from branchwise.store.paths import PathCache
from branchwise.store.tables import conversations, items, responses

_CONV_SELECT = (
    "SELECT c.id, c.tree, c.head, i.item_id, COALESCE(i.depth, -1), i.type, c.created_at, c.metadata, "
    "c.forked_from_conversation, c.forked_from_item"
)
_CONV_FROM = " FROM conversations c LEFT JOIN items i ON i.node = c.head WHERE c.id = :id"
_CONV = text(_CONV_SELECT + _CONV_FROM)


def _path_from(seed: str) -> str:
    """The path from the node `seed` selects up to the root, carrying each item's chat message."""
    return (
        "WITH RECURSIVE path(node, parent, depth, chat) AS ("
        f" SELECT node, parent, depth, chat FROM items WHERE node = {seed}"
        " UNION ALL"
        " SELECT i.node, i.parent, i.depth, i.chat FROM items i JOIN path p ON i.node = p.parent"
        ") "
    )


# The path's messages joined by commas in the database: one value back, whatever the length.
_JOINED = {
    "sqlite": "(SELECT group_concat(chat, ',') FROM (SELECT chat FROM path WHERE chat IS NOT NULL ORDER BY depth))",
    "postgresql": "(SELECT string_agg(chat, '\\x2c'::bytea ORDER BY depth) FROM path WHERE chat IS NOT NULL)",
}
_PATH_CHAT = {d: text(_path_from(":node") + "SELECT " + agg) for d, agg in _JOINED.items()}


def _conv_history(history: str) -> str:
    """The conversation row and `history`, an expression over its path, in one round trip."""
    return _path_from("(SELECT head FROM conversations WHERE id = :id)") + f"{_CONV_SELECT}, {history}{_CONV_FROM}"


# The conversation and its history's messages, in one round trip (the hot path).
_CONV_HISTORY = {d: text(_conv_history(agg)) for d, agg in _JOINED.items()}


def _path_walk(order: str) -> Any:
    return text(
        "WITH RECURSIVE path(node, parent, depth) AS ("
        " SELECT node, parent, depth FROM items WHERE node = :node"
        " UNION ALL"
        " SELECT i.node, i.parent, i.depth FROM items i JOIN path p ON i.node = p.parent WHERE p.depth > :lo"
        ") SELECT i.node, i.depth, i.item_id, i.data FROM path JOIN items i ON i.node = path.node"
        f" WHERE path.depth BETWEEN :lo AND :hi ORDER BY path.depth {order}"
    )


_WALK = {"asc": _path_walk("ASC"), "desc": _path_walk("DESC")}
_RAW_WALK = {k: SQL(str(v)) for k, v in _WALK.items()}
_CANDIDATES_TEXT = "SELECT node, depth FROM items WHERE tree = :tree AND item_id = :item_id ORDER BY seq DESC"
_CANDIDATES = text(_CANDIDATES_TEXT)
_RAW_CANDIDATES = SQL(_CANDIDATES_TEXT)
_NODE_DATA = SQL("SELECT data FROM items WHERE node = :node")
_TREE_AFTER = SQL("SELECT seq FROM items WHERE tree = :tree AND item_id = :item_id ORDER BY seq DESC LIMIT 1")
_TREE_PAGE = SQL(
    "SELECT i.item_id, p.item_id, i.type, i.role, i.response_id, i.status, i.created_at"
    " FROM items i LEFT JOIN items p ON p.node = i.parent"
    " WHERE i.tree = :tree AND i.seq > :after ORDER BY i.seq LIMIT :limit"
)


# The hot path's statements, for the raw drivers (see `Database`).
_RAW_CONV = SQL(_CONV_SELECT + _CONV_FROM)
_RAW_PATH_CHAT = {d: SQL(str(t)) for d, t in _PATH_CHAT.items()}
_RAW_CONV_HISTORY = {d: SQL(str(t)) for d, t in _CONV_HISTORY.items()}
# The same, with the walk skipped (NULL) when the head is still `:known`, a head whose history
# this process has cached: both databases leave the walk unexecuted then, so a cache hit and a
# miss (a head another process moved) are each one round trip.
_RAW_CONV_HISTORY_UNLESS = {
    d: SQL(_conv_history(f"CASE WHEN c.head = :known THEN NULL ELSE {agg} END")) for d, agg in _JOINED.items()
}
# PostgreSQL: the conversation reads that waited for the one before (`PassBatch`), in one
# statement: (ordinal, the conversation row, its history unless the head is still the known one)
# for each (id, known head) asked for; the walk is a subquery of each row.
_PG_CONV_HISTORY_MANY = SQL(
    "SELECT q.ord, " + _CONV_SELECT[len("SELECT "):] + ", CASE WHEN c.head = q.known THEN NULL ELSE ("
    + _path_from("c.head") + "SELECT " + _JOINED["postgresql"] + ") END"
    " FROM unnest(:ids::text[], :known::text[]) WITH ORDINALITY AS q(id, known, ord)"
    " JOIN conversations c ON c.id = q.id LEFT JOIN items i ON i.node = c.head"
)
_ITEM_COLUMNS = ("node", "parent", "depth", "tree", "item_id", "type", "role", "status", "response_id",
                 "created_at", "data", "chat")
_RESPONSE_COLUMNS = ("id", "status", "created_at", "conversation_id", "previous_response_id", "tree", "base_node",
                     "input_node", "input_count", "last_node", "body")


def _insert(table: str, columns: Sequence[str]) -> SQL:
    return SQL(f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join(':' + c for c in columns)})")


_INSERT_ITEMS = _insert("items", _ITEM_COLUMNS)
_INSERT_EVENTS = _insert("events", ("response_id", "alternative", "seq", "frame"))
_INSERT_RESPONSES = _insert("responses", _RESPONSE_COLUMNS)
_FINISH_RESPONSE = SQL("UPDATE responses SET status = :status, input_node = :input_node, input_count = :input_count,"
                       " last_node = :last_node, body = :body, owner = NULL WHERE id = :id")
# Compare-and-swap: the head moves only if it is still where the response started.
_MOVE_HEAD = {
    "sqlite": SQL("UPDATE conversations SET head = :head WHERE id = :id AND head IS :base"),
    "postgresql": SQL("UPDATE conversations SET head = :head WHERE id = :id AND head IS NOT DISTINCT FROM :base"),
}

def _unnest(table: str, columns: Sequence[str], types: Sequence[str], prefix: str) -> str:
    arrays = ", ".join(f":{prefix}{c}::{t}[]" for c, t in zip(columns, types, strict=True))
    return f"INSERT INTO {table} ({', '.join(columns)}) SELECT * FROM unnest({arrays})"


# PostgreSQL: stored responses (their items, their rows, each head's compare-and-swap) in one
# statement, so one round trip and its own transaction; each conversation at most once
# (`Store._pg_commit_group`), the heads moved in conversation order (one lock order for all such
# transactions, so two of them never wait for each other in a cycle); RETURNING names the
# conversations whose head moved. This form takes unnest'ed arrays, for groups of more than
# eight: one short text, so one prepared statement per connection whatever the group's size.
_PG_COMMIT_MANY = SQL(
    "WITH new_items AS ("
    + _unnest("items", _ITEM_COLUMNS, ("text", "text", "int", "text", "text", "text", "text", "text", "text", "bigint",
                                       "bytea", "bytea"), "i_")
    + "), new_responses AS ("
    + _unnest("responses", _RESPONSE_COLUMNS, ("text", "text", "bigint", "text", "text", "text", "text", "text", "int",
                                               "text", "bytea"), "r_")
    + ") UPDATE conversations c SET head = m.head"
    " FROM unnest(:m_id::text[], :m_base::text[], :m_head::text[]) AS m(id, base, head)"
    " WHERE c.id = m.id AND c.head IS NOT DISTINCT FROM m.base RETURNING c.id"
)
# ... and this one (`_pg_commit_values`) a VALUES row per item, response row and head move, for a
# lone commit and small groups: asyncpg encodes scalars for ~60% of the client CPU of arrays
# (micro-benchmarks: one commit 250 -> 160 us; in a group of ten, 90 -> 60 us each). But it is one
# text per shape (items, rows, moves), and each new shape is a parse and a plan on each pooled
# connection: at concurrency 64, where groups of 1-63 commits come and go, 31% of the group
# statements were parsed again (0.8 ms each in postgres), and those of more than ~55 commits
# (over asyncpg's 15 KB cacheable-statement limit) every time, so that a slow group made the
# next one larger and slower still. Groups of more than eight therefore take unnest (3 A/B pairs
# at c=64: branchwise p99 39.4-43.1 -> 34.9-39.7 ms, postgres CPU per response -9%); at four
# connections, where groups are small, instructions per response are the same (1.257 -> 1.263 M;
# unnest for every group: 1.285 M). PostgreSQL's limit of 32,767 parameters is the other bound.
_PG_VALUES_PARAMS_MAX = 4000  # (a lone commit of ~300 items, or eight of ~35)
_PG_VALUES_COMMITS_MAX = 8
_PG_COMMIT_SHAPES: dict[tuple[int, int, int], str] = {}


def _pg_commit_values(n_items: int, n_rows: int, n_moves: int) -> str:
    key = (n_items, n_rows, n_moves)
    text = _PG_COMMIT_SHAPES.get(key)
    if text is not None:
        return text
    k = 0

    def values(columns: Sequence[str], n: int, cast: str = "") -> str:
        nonlocal k
        rows = []
        for _ in range(n):
            rows.append("(" + ", ".join(f"${k + j + 1}{cast}" for j in range(len(columns))) + ")")
            k += len(columns)
        return ", ".join(rows)

    ctes = []
    if n_items:
        ctes.append(f"new_items AS (INSERT INTO items ({', '.join(_ITEM_COLUMNS)}) VALUES "
                    f"{values(_ITEM_COLUMNS, n_items)})")
    if n_rows:
        ctes.append(f"new_responses AS (INSERT INTO responses ({', '.join(_RESPONSE_COLUMNS)}) VALUES "
                    f"{values(_RESPONSE_COLUMNS, n_rows)})")
    text = f"WITH {', '.join(ctes)} " if ctes else ""
    if n_moves:
        text += (f"UPDATE conversations c SET head = m.head FROM (VALUES {values(('id', 'base', 'head'), n_moves, '::text')})"
                 " AS m(id, base, head) WHERE c.id = m.id AND c.head IS NOT DISTINCT FROM m.base RETURNING c.id")
    else:
        text += "SELECT NULL WHERE false"
    _PG_COMMIT_SHAPES[key] = text
    return text


# Move a conversation's head to the newest node holding an item of its tree, in one statement
# (no row: no such conversation, or the item is not in its tree).
_SET_HEAD_TO_ITEM = SQL(
    "UPDATE conversations SET head = (SELECT i.node FROM items i WHERE i.tree = conversations.tree"
    " AND i.item_id = :item_id ORDER BY i.seq DESC LIMIT 1)"
    " WHERE id = :id AND EXISTS (SELECT 1 FROM items i WHERE i.tree = conversations.tree AND i.item_id = :item_id)"
    " RETURNING head, created_at, metadata, forked_from_conversation, forked_from_item")
# The same for several conversations (each at most once, in conversation order: one lock order
# for every such statement) in one statement: their ordinals and rows.
_PG_SET_HEADS_TO_ITEMS = SQL(
    "UPDATE conversations c SET head = (SELECT i.node FROM items i WHERE i.tree = c.tree"
    " AND i.item_id = m.item_id ORDER BY i.seq DESC LIMIT 1)"
    " FROM unnest(:ids::text[], :item_ids::text[]) WITH ORDINALITY AS m(id, item_id, ord)"
    " WHERE c.id = m.id AND EXISTS (SELECT 1 FROM items i WHERE i.tree = c.tree AND i.item_id = m.item_id)"
    " RETURNING m.ord, c.head, c.created_at, c.metadata, c.forked_from_conversation, c.forked_from_item")
_RESPONSE = SQL("SELECT id, status, conversation_id, tree, base_node, input_node, input_count, last_node, body"
                " FROM responses WHERE id = :id")
_NODE_INFO = SQL("SELECT depth, type FROM items WHERE node = :node")


def _rounds(keys: Sequence[str | None]) -> list[list[int]]:
    """The positions of `keys` in rounds, in order, each key (None aside) at most once a round."""
    rounds: list[tuple[set, list[int]]] = []
    for i, key in enumerate(keys):
        fit = next((r for r in rounds if key is None or key not in r[0]), None)
        if fit is None:
            fit = (set(), [])
            rounds.append(fit)
        if key is not None:
            fit[0].add(key)
        fit[1].append(i)
    return [members for _, members in rounds]


async def _in_rounds(keys: Sequence[str | None], together: Callable[[list[int]], Awaitable[list]],
                     alone: Callable[[int], Awaitable[Any]]) -> list:
    """PostgreSQL's grouped writes (one per conversation in `keys`): in rounds, each conversation
    at most once a round and the round in conversation order (one lock order for every such
    statement, so two never wait for each other in a cycle); a round of several in one statement
    (`together`: their results in the round's order), else, and should that statement fail, one
    by one (`alone`), so that the others land and a failure is its write's alone."""
    out: list = [None] * len(keys)
    for group in _rounds(keys):
        if len(group) > 1:
            group.sort(key=lambda i: (keys[i] is None, keys[i] or ""))
            try:
                results = await together(group)
            except Exception:
                pass
            else:
                for i, result in zip(group, results, strict=True):
                    out[i] = result
                continue
        for i in group:
            try:
                out[i] = await alone(i)
            except Exception as e:
                out[i] = e
    return out


def _joined(value: str | bytes | None) -> bytes:
    """An aggregated path from the database (TEXT on SQLite, bytea on PostgreSQL) as bytes."""
    if value is None:
        return b""
    return value.encode() if isinstance(value, str) else bytes(value)


def _item_rows(tree: str, placed: Sequence[Placed], created: int) -> list[dict]:
    return [
        {
            "node": p.node, "parent": p.parent, "depth": p.depth, "tree": tree,
            "item_id": p.item.item_id, "type": p.item.type, "role": p.item.role,
            "status": p.item.status, "response_id": p.response_id, "created_at": created,
            "data": p.item.data, "chat": p.item.chat,
        }
        for p in placed
    ]


class Store:
    def __init__(self, engine: AsyncEngine, path_cache_bytes: int = 16 << 20):
        self.engine = engine
        self.writer = writer(engine)
        self.db = Database(engine)  # the hot path's queries
        # PostgreSQL: the hot path's reads, commits (SQLite's group commit is in `Database`) and
        # head moves, each kind grouped (`PassBatch`: while one statement is out, the calls made
        # meanwhile wait and go as one statement): a lone statement cost postgres
        # ~200 us of CPU and asyncpg ~140 us on this machine; ten in one, ~40 and ~20 us each
        self._pg_reads = PassBatch(self._pg_read_group)
        self._pg_commits = PassBatch(self._pg_commit_group)
        self._pg_moves = PassBatch(self._pg_move_group)
        self.dialect = engine.dialect.name
        # node -> its path's messages (see `store.paths`); None when switched off
        self.paths = PathCache(path_cache_bytes) if path_cache_bytes > 0 else None
        # conversation -> the head this process last read or set (a hint: always checked)
        self._heads: dict[str, str] = {}

    def _note_head(self, conv_id: str, head: str | None) -> None:
        if self.paths is None:
            return
        if head is None:
            self._heads.pop(conv_id, None)
            return
        if len(self._heads) >= 100_000:
            self._heads.clear()
        self._heads[conv_id] = head

    # ------------------------------------------------------------------ reads

    async def conversation(self, conv_id: str, conn: AsyncConnection | None = None) -> Conversation | None:
        if conn is not None:
            row = (await conn.execute(_CONV, {"id": conv_id})).first()
        else:
            row = await self.db.one(_RAW_CONV, {"id": conv_id})
        return None if row is None else Conversation(*row)

    async def conversation_with_history(self, conv_id: str) -> tuple[Conversation | None, bytes]:
        """The conversation and the comma-joined messages of its current path, in one query. When
        the head is still the one this process last saw and its history is cached, the query
        skips the walk and the history comes from the cache."""
        known = self._heads.get(conv_id)
        cached = self.paths.get(known) if known is not None and self.paths is not None else None
        if cached is None:
            known = None
        if self.dialect == "postgresql":
            row = await self._pg_reads.submit((conv_id, known))
        elif known is None:
            row = await self.db.one(_RAW_CONV_HISTORY[self.dialect], {"id": conv_id})
        else:
            row = await self.db.one(_RAW_CONV_HISTORY_UNLESS[self.dialect], {"id": conv_id, "known": known})
        if row is None:
            self._heads.pop(conv_id, None)
            return None, b""
        conv = Conversation(*row[:-1])
        if known is not None and conv.head == known:  # the walk was skipped
            history = cached
        else:
            history = _joined(row[-1])
            if self.paths is not None and conv.head is not None and history:
                self.paths.put(conv.head, history)
        self._note_head(conv_id, conv.head)
        return conv, history

    async def path_chat(self, node: str | None) -> bytes:
        """The Chat Completions messages of the path root..node, in order, comma-joined
        (b"" for an empty path)."""
        if node is None:
            return b""
        if self.paths is not None:
            hit = self.paths.get(node)
            if hit is not None:
                return hit
        history = _joined(await self.db.value(_RAW_PATH_CHAT[self.dialect], {"node": node}))
        if self.paths is not None and history:  # (empty: perhaps a node not written yet)
            self.paths.put(node, history)
        return history

    async def walk(self, head: str, lo: int, hi: int, order: str = "asc",
                   conn: AsyncConnection | None = None) -> list[PathRow]:
        """The items of the path ending at `head` whose depth lies in [lo, hi]."""
        params = {"node": head, "lo": max(lo, 0), "hi": hi}
        if conn is not None:
            rows = (await conn.execute(_WALK[order], params)).all()
        else:
            rows = await self.db.all(_RAW_WALK[order], params)
        return [PathRow(*r) for r in rows]

    async def candidates(self, tree: str, item_id: str, conn: AsyncConnection | None = None) -> list[tuple[str, int]]:
        """Nodes holding `item_id` in `tree`: (node, depth), newest first."""
        params = {"tree": tree, "item_id": item_id}
        if conn is not None:
            return [tuple(r) for r in (await conn.execute(_CANDIDATES, params)).all()]
        return [tuple(r) for r in await self.db.all(_RAW_CANDIDATES, params)]

    async def find_on_path(self, conv: Conversation, item_id: str,
                           conn: AsyncConnection | None = None) -> PathRow | None:
        """The node holding `item_id` on the conversation's current path, if any."""
        if conv.head is None:
            return None
        cands = await self.candidates(conv.tree, item_id, conn)
        if not cands:
            return None
        lo = min(d for _, d in cands)
        if lo > conv.head_depth:
            return None
        nodes = {n for n, _ in cands}
        for row in await self.walk(conv.head, lo, conv.head_depth, "desc", conn):
            if row.node in nodes:
                return row
        return None

    async def list_path(self, conv_head: str | None, head_depth: int, *, limit: int, order: str,
                        after: PathRow | None) -> tuple[list[PathRow], bool]:
        """A page of the path ending at `conv_head`."""
        if conv_head is None:
            return [], False
        if order == "asc":
            lo = after.depth + 1 if after else 0
            hi = lo + limit
        else:
            hi = after.depth - 1 if after else head_depth
            lo = hi - limit
        if hi < lo or hi < 0:
            return [], False
        rows = await self.walk(conv_head, lo, hi, order)
        return rows[:limit], len(rows) > limit

    async def response(self, resp_id: str) -> ResponseRow | None:
        row = await self.db.one(_RESPONSE, {"id": resp_id})
        return None if row is None else ResponseRow(*row)

    async def node_depth(self, node: str | None) -> int:
        return (await self.node_info(node))[0]

    async def node_info(self, node: str | None) -> tuple[int, str | None]:
        """(depth, item type) of a node; (-1, None) for no node."""
        if node is None:
            return -1, None
        row = await self.db.one(_NODE_INFO, {"node": node})
        return (-1, None) if row is None else (row[0], row[1])

    async def node_data(self, node: str) -> bytes | None:
        return await self.db.value(_NODE_DATA, {"node": node})

    async def items_by_id(self, ids: Sequence[str]) -> dict[str, tuple]:
        """Content of existing items, for `item_reference` inputs."""
        ids = list(dict.fromkeys(ids))
        names = [f"i{k}" for k in range(len(ids))]
        q = SQL("SELECT item_id, type, role, status, data, chat FROM items WHERE item_id IN ("
                + ", ".join(":" + n for n in names) + ")")
        return {r[0]: tuple(r) for r in await self.db.all(q, dict(zip(names, ids, strict=True)))}

    async def tree_page(self, tree: str, *, limit: int, after: str | None) -> tuple[list[tuple], bool]:
        after_seq = 0
        if after is not None:
            s = await self.db.value(_TREE_AFTER, {"tree": tree, "item_id": after})
            if s is None:
                return [], False  # caller turns this into a 404 when it must
            after_seq = s
        rows = await self.db.all(_TREE_PAGE, {"tree": tree, "after": after_seq, "limit": limit + 1})
        return [tuple(r) for r in rows[:limit]], len(rows) > limit

    # ------------------------------------------------------------------ writes

    @staticmethod
    async def _insert_items(conn: AsyncConnection, tree: str, placed: Sequence[Placed], created: int) -> None:
        if placed:
            await conn.execute(insert(items), _item_rows(tree, placed, created))

    async def create_conversation(self, conv_id: str, tree: str, metadata: dict, chain: Sequence[NewItem],
                                  *, head: str | None = None, forked_from: tuple[str, str | None] | None = None,
                                  ) -> None:
        created = now()
        placed = place(chain, None, -1)
        if placed:
            head = placed[-1].node
        async with self.writer.begin() as conn:
            await self._insert_items(conn, tree, placed, created)
            await conn.execute(insert(conversations), {
                "id": conv_id, "tree": tree, "head": head, "created_at": created,
                "metadata": orjson.dumps(metadata).decode(),
                "forked_from_conversation": forked_from[0] if forked_from else None,
                "forked_from_item": forked_from[1] if forked_from else None,
            })

    async def update_metadata(self, conv_id: str, metadata: dict) -> bool:
        async with self.writer.begin() as conn:
            r = await conn.execute(
                update(conversations).where(conversations.c.id == conv_id)
                .values(metadata=orjson.dumps(metadata).decode())
            )
        return r.rowcount > 0

    async def delete_conversation(self, conv_id: str) -> bool:
        async with self.writer.begin() as conn:
            r = await conn.execute(delete(conversations).where(conversations.c.id == conv_id))
        return r.rowcount > 0

    async def _locked_conversation(self, conn: AsyncConnection, conv_id: str) -> Conversation | None:
        if conn.dialect.name == "postgresql":
            await conn.execute(
                select(conversations.c.id).where(conversations.c.id == conv_id).with_for_update()
            )
        return await self.conversation(conv_id, conn)

    async def append_items(self, conv_id: str, chain: Sequence[NewItem]) -> Conversation | None:
        """Hang `chain` under the conversation's head and move the head to its end, atomically."""
        async with self.writer.begin() as conn:
            conv = await self._locked_conversation(conn, conv_id)
            if conv is None:
                return None
            placed = place(chain, conv.head, conv.head_depth)
            await self._insert_items(conn, conv.tree, placed, now())
            if placed:
                await conn.execute(
                    update(conversations).where(conversations.c.id == conv_id).values(head=placed[-1].node)
                )
        return conv

    async def move_head_to_item(self, conv_id: str, item_id: str) -> tuple | None:
        """Point the head at the newest node holding `item_id` in the conversation's tree: one
        statement, one round trip (it was three: the conversation, the candidates, the write).
        The conversation's (created_at, metadata, forked_from_conversation, forked_from_item)
        after the move, or None when there is no such conversation or the item is not in its tree."""
        if self.dialect == "postgresql":
            row = await self._pg_moves.submit((conv_id, item_id))
        else:
            rows = await self.db.write_returning(_SET_HEAD_TO_ITEM, {"id": conv_id, "item_id": item_id})
            row = rows[0] if rows else None
        if row is None:
            return None
        head, *rest = row
        self._note_head(conv_id, head)
        return tuple(rest)

    async def delete_from_path(self, conv_id: str, item_id: str) -> bool | None:
        """Take `item_id` out of the conversation's path without touching any shared node:
        the nodes below it are re-hung (copied, same item ids) under its parent.
        None: no such conversation; False: the item is not on its path."""
        async with self.writer.begin() as conn:
            conv = await self._locked_conversation(conn, conv_id)
            if conv is None:
                return None
            target = await self.find_on_path(conv, item_id, conn)
            if target is None:
                return False
            below = await conn.execute(
                _WALK["asc"], {"node": conv.head, "lo": target.depth, "hi": conv.head_depth}
            )
            below_nodes = [r[0] for r in below.all()][1:]  # first row is the target itself
            parent_row = (await conn.execute(
                select(items.c.parent).where(items.c.node == target.node)
            )).scalar()
            new_head = parent_row
            if below_nodes:
                rows = (await conn.execute(
                    select(items).where(items.c.node.in_(below_nodes))
                )).mappings().all()
                by_node = {r["node"]: r for r in rows}
                copies = []
                parent, depth = parent_row, target.depth - 1
                for n in below_nodes:
                    r = dict(by_node[n])
                    r.pop("seq")
                    depth += 1
                    r.update(node=new_node(), parent=parent, depth=depth)
                    parent = r["node"]
                    copies.append(r)
                await conn.execute(insert(items), copies)
                new_head = parent
            await conn.execute(update(conversations).where(conversations.c.id == conv_id).values(head=new_head))
        return True

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
    ) -> bool:
        """Store a finished response in one short transaction: its items, its row(s), and
        the conversation head moved from `base` to `new_head` if it is still at `base`
        (compare-and-swap). Returns whether the head moved."""
        if self.dialect == "postgresql" and not events and not update_existing:
            conv = conversation_id if new_head is not None else None
            entry = (_item_rows(tree, placed, now()), list(response_rows), conv, base, new_head)
            return self._moved(conversation_id, new_head, await self._pg_commits.submit(entry))
        steps: list = []
        if placed:
            steps.append((_INSERT_ITEMS, _item_rows(tree, placed, now())))
        if events:
            steps.append((_INSERT_EVENTS, list(events)))
        if update_existing:
            steps.append((_FINISH_RESPONSE, list(response_rows)))
        elif response_rows:
            steps.append((_INSERT_RESPONSES, list(response_rows)))
        move = conversation_id is not None and new_head is not None
        if move:
            steps.append((_MOVE_HEAD[self.dialect], {"id": conversation_id, "base": base, "head": new_head}))
        if not steps:
            return False
        count = await self.db.write(steps)
        return self._moved(conversation_id, new_head, move and count > 0)

    async def _pg_read_group(self, entries: list[tuple[str, str | None]]) -> list:
        """PostgreSQL: a group of conversation reads (conversation id, known head),
        one statement for all of them when there are several: each one's row or None."""
        if len(entries) == 1:  # (no known head: `c.head = NULL` is not true, so it walks)
            conv_id, known = entries[0]
            return [await self.db.one(_RAW_CONV_HISTORY_UNLESS["postgresql"], {"id": conv_id, "known": known})]
        out: list = [None] * len(entries)
        rows = await self.db.all(_PG_CONV_HISTORY_MANY, {"ids": [e[0] for e in entries],
                                                         "known": [e[1] for e in entries]})
        for row in rows:
            out[row[0] - 1] = row[1:]
        return out

    async def _pg_move_group(self, entries: list[tuple[str, str]]) -> list:
        """PostgreSQL: a group of head moves (conversation id, item id), in rounds (see
        `_in_rounds`; a second move of one conversation sees the first): each one's (head,
        created_at, metadata, forked_from...) or None when it did not move."""
        async def together(group: list[int]) -> list:
            rows = await self.db.write_returning(_PG_SET_HEADS_TO_ITEMS, {
                "ids": [entries[i][0] for i in group], "item_ids": [entries[i][1] for i in group]})
            out: list = [None] * len(group)
            for row in rows:
                out[row[0] - 1] = row[1:]
            return out

        async def alone(i: int):
            rows = await self.db.write_returning(_SET_HEAD_TO_ITEM, {"id": entries[i][0], "item_id": entries[i][1]})
            return rows[0] if rows else None

        return await _in_rounds([e[0] for e in entries], together, alone)

    async def _pg_commit_group(self, entries: list[tuple]) -> list:
        """PostgreSQL's group commit (see `PassBatch`): commits (items, response rows,
        conversation, base, new head) in rounds (see `_in_rounds`; a conversation named twice,
        parallel branches, waits for the next round, so that each compare-and-swap sees the one
        before it): whether each one moved its head."""
        async def together(group: list[int]) -> list:
            moved = await self._pg_commit_many([entries[i] for i in group])
            return [entries[i][2] in moved for i in group]

        return await _in_rounds([e[2] for e in entries], together, lambda i: self._pg_commit_one(*entries[i]))

    async def _pg_commit_one(self, rows: list[dict], response_rows: list[dict], conv: str | None,
                             base: str | None, new_head: str | None) -> bool:
        moved = await self._pg_commit_many([(rows, response_rows, conv, base, new_head)])
        return conv is not None and conv in moved

    async def _pg_commit_many(self, entries: list[tuple]) -> set[str]:
        """Commits (items, response rows, conversation, base, new head), each conversation at most
        once and in conversation order, in one statement: the conversations whose head moved."""
        rows = [r for e in entries for r in e[0]]
        response_rows = [r for e in entries for r in e[1]]
        moves = [(e[2], e[3], e[4]) for e in entries if e[2] is not None]  # (in conversation order)
        if len(entries) <= _PG_VALUES_COMMITS_MAX and len(rows) * len(_ITEM_COLUMNS) + len(response_rows) * len(_RESPONSE_COLUMNS) \
                + 3 * len(moves) <= _PG_VALUES_PARAMS_MAX:
            args = [r[c] for r in rows for c in _ITEM_COLUMNS]
            args += [r[c] for r in response_rows for c in _RESPONSE_COLUMNS]
            args += [v for move in moves for v in move]
            text = _pg_commit_values(len(rows), len(response_rows), len(moves))
            return {r[0] for r in await self.db.fetch_pg_positional(text, args)}
        params: dict = {f"i_{c}": [r[c] for r in rows] for c in _ITEM_COLUMNS}
        params.update({f"r_{c}": [r[c] for r in response_rows] for c in _RESPONSE_COLUMNS})
        params.update(m_id=[m[0] for m in moves], m_base=[m[1] for m in moves], m_head=[m[2] for m in moves])
        return {r[0] for r in await self.db.write_returning(_PG_COMMIT_MANY, params)}

    def _moved(self, conv_id: str | None, head: str | None, moved: bool) -> bool:
        if moved and conv_id is not None:
            self._note_head(conv_id, head)
        return moved

    async def delete_response(self, resp_id: str) -> bool:
        async with self.writer.begin() as conn:
            r = await conn.execute(delete(responses).where(responses.c.id == resp_id))
        return r.rowcount > 0
