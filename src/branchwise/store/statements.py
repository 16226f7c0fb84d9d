"""Every statement the repository runs, each written once (per dialect where the two differ),
with `:name` parameters, and the one way they are executed: on the raw drivers (sqlite3 on the
event loop, asyncpg's pool), never through SQLAlchemy's execution machinery, which cost more
CPU per stored response than the rest of the request together
(docs/decisions/0002-raw-drivers-one-round-trip.md).

Paths are walked with a recursive CTE from a node towards the root, bounded by depth, so a page
of a long conversation costs what the page needs, not the whole history.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

_PARAM = re.compile(r"(?<![:\w]):([A-Za-z_]\w*)")


class SQL:
    """One statement, written once with `:name` parameters: sqlite3 takes that text and a dict
    as they are; asyncpg gets `$n` and the values in order."""

    __slots__ = ("text", "pg", "names")

    def __init__(self, text: str):
        self.text = text
        names: list[str] = []

        def number(m: re.Match) -> str:
            if m.group(1) not in names:
                names.append(m.group(1))
            return f"${names.index(m.group(1)) + 1}"

        self.pg = _PARAM.sub(number, text)
        self.names = tuple(names)

    def args(self, params: dict) -> tuple:
        return tuple(params[n] for n in self.names)


# One write step: a statement and its parameters (a dict, or a list of dicts for many rows).
Step = tuple[SQL, dict | list[dict]]


class Tx:
    """The statements of one write transaction whose reads decide its writes (see
    `transaction` on each database)."""

    __slots__ = ()

    async def one(self, sql: SQL, params: dict) -> tuple | None:
        raise NotImplementedError

    async def all(self, sql: SQL, params: dict) -> list[tuple]:
        raise NotImplementedError

    async def execute(self, sql: SQL, params: dict | list[dict]) -> int:
        """A statement, or with a list one per row: the row count."""
        raise NotImplementedError


# Every statement that reads or writes stored objects by id names the caller's project
# (`:project`, `core.projects`): another project's id finds nothing, exactly as an unknown id.
# Statements on nodes and trees need not: a node or tree is only ever reached through a
# conversation or response that was found in the caller's project.
ITEM_COLUMNS = ("node", "parent", "depth", "tree", "item_id", "type", "role", "status", "response_id",
                "created_at", "data", "chat", "project")
_ITEM_TYPES = ("text", "text", "int", "text", "text", "text", "text", "text", "text", "bigint", "bytea", "bytea",
               "text")
RESPONSE_COLUMNS = ("id", "status", "created_at", "conversation_id", "previous_response_id", "tree", "base_node",
                    "input_node", "input_count", "last_node", "body", "project")
_RESPONSE_TYPES = ("text", "text", "bigint", "text", "text", "text", "text", "text", "int", "text", "bytea", "text")

# ---------------------------------------------------------------------------------- reads

_CONV_SELECT = (
    "SELECT c.id, c.tree, c.head, i.item_id, COALESCE(i.depth, -1), i.type, c.created_at, c.metadata, "
    "c.forked_from_conversation, c.forked_from_item"
)
_CONV_FROM = " FROM conversations c LEFT JOIN items i ON i.node = c.head WHERE c.id = :id AND c.project = :project"
CONVERSATION = SQL(_CONV_SELECT + _CONV_FROM)


# A long path is read in blocks: a node at depth 64k+63 (from the third block on) has a row in
# `history_blocks` with the joined messages of its 64-item block and the node above the block,
# so a history of 10,000 items is ~150 block steps and at most ~250 item steps, not 10,000
# (docs/decisions/0058). Nodes never change, so neither do blocks; a block that is missing (not
# written yet) only means item steps.
BLOCK = 64
FIRST_BLOCK_END = 3 * BLOCK - 1


def _path_from(seed: str) -> str:
    """The path from the node `seed` selects up to the root: (next node up, depth, chat) per
    step, a step being an item or, where a block ends, its whole block. The block is looked up
    only at a block's end (elsewhere its key is NULL, which matches nothing)."""
    block = f"LEFT JOIN history_blocks b ON b.node = CASE WHEN (i.depth + 1) % {BLOCK} = 0 THEN i.node END"
    step = ("SELECT CASE WHEN b.node IS NULL THEN i.parent ELSE b.below END, i.depth,"
            " CASE WHEN b.node IS NULL THEN i.chat ELSE b.chat END")
    return (
        "WITH RECURSIVE path(next, depth, chat) AS ("
        f" {step} FROM items i {block} WHERE i.node = {seed}"
        " UNION ALL"
        f" {step} FROM path p JOIN items i ON i.node = p.next {block}"
        ") "
    )


# The path's messages joined by commas in the database: one value back, whatever the length
# (bytes: on SQLite group_concat makes text, which would be decoded and encoded again).
_JOINED = {
    "sqlite": "(SELECT CAST(group_concat(chat, ',') AS BLOB)"
              " FROM (SELECT chat FROM path WHERE chat IS NOT NULL ORDER BY depth))",
    "postgresql": "(SELECT string_agg(chat, '\\x2c'::bytea ORDER BY depth) FROM path WHERE chat IS NOT NULL)",
}
PATH_CHAT = {d: SQL(_path_from(":node") + "SELECT " + agg) for d, agg in _JOINED.items()}


# A block's row from the items already stored (they may have been written in the same
# transaction): the block of 64 ending at `:node`, whose first item is at depth `:lo`.
_BLOCK_AGG = {
    "sqlite": "(SELECT CAST(group_concat(chat, ',') AS BLOB) FROM (SELECT chat FROM up WHERE chat IS NOT NULL"
              " ORDER BY depth))",
    "postgresql": "(SELECT string_agg(chat, '\\x2c'::bytea ORDER BY depth) FROM up WHERE chat IS NOT NULL)",
}
INSERT_BLOCK = {d: SQL(
    "WITH RECURSIVE up(node, parent, depth, chat) AS ("
    " SELECT node, parent, depth, chat FROM items WHERE node = :node"
    " UNION ALL"
    " SELECT i.node, i.parent, i.depth, i.chat FROM items i JOIN up ON i.node = up.parent WHERE up.depth > :lo"
    ") INSERT INTO history_blocks (node, below, chat)"
    f" SELECT :node, (SELECT parent FROM up WHERE depth = :lo), {agg} ON CONFLICT (node) DO NOTHING"
) for d, agg in _BLOCK_AGG.items()}


def block_rows(nodes: Sequence[tuple[str, int]]) -> list[dict]:
    """`INSERT_BLOCK`'s parameters for those of `nodes` (node, depth) that end a block."""
    return [{"node": n, "lo": d - BLOCK + 1} for n, d in nodes if d >= FIRST_BLOCK_END and (d + 1) % BLOCK == 0]


def _conv_history(history: str) -> str:
    """The conversation row and `history`, an expression over its path, in one round trip."""
    return _path_from("(SELECT head FROM conversations WHERE id = :id AND project = :project)") + f"{_CONV_SELECT}, {history}{_CONV_FROM}"


# The conversation and its history's messages, in one round trip (the hot path).
CONVERSATION_HISTORY = {d: SQL(_conv_history(agg)) for d, agg in _JOINED.items()}
# The same, with the walk skipped (NULL) when the head is still `:known`, a head whose history
# this process has cached: both databases leave the walk unexecuted then, so a cache hit and a
# miss (a head another process moved) are each one round trip.
CONVERSATION_HISTORY_UNLESS = {
    d: SQL(_conv_history(f"CASE WHEN c.head = :known THEN NULL ELSE {agg} END")) for d, agg in _JOINED.items()
}
# PostgreSQL: the conversation reads that waited for the one before (`OneInFlight`), in one
# statement: (ordinal, the conversation row, its history unless the head is still the known one)
# for each (id, known head) asked for; the walk is a subquery of each row.
PG_CONVERSATION_HISTORY_MANY = SQL(
    "SELECT q.ord, " + _CONV_SELECT[len("SELECT "):] + ", CASE WHEN c.head = q.known THEN NULL ELSE ("
    + _path_from("c.head") + "SELECT " + _JOINED["postgresql"] + ") END"
    " FROM unnest(:ids::text[], :known::text[], :projects::text[]) WITH ORDINALITY AS q(id, known, project, ord)"
    " JOIN conversations c ON c.id = q.id AND c.project = q.project LEFT JOIN items i ON i.node = c.head"
)


def _path_walk(order: str) -> SQL:
    return SQL(
        "WITH RECURSIVE path(node, parent, depth) AS ("
        " SELECT node, parent, depth FROM items WHERE node = :node"
        " UNION ALL"
        " SELECT i.node, i.parent, i.depth FROM items i JOIN path p ON i.node = p.parent WHERE p.depth > :lo"
        ") SELECT i.node, i.depth, i.item_id, i.data FROM path JOIN items i ON i.node = path.node"
        f" WHERE path.depth BETWEEN :lo AND :hi ORDER BY path.depth {order}"
    )


# The items of the path ending at :node whose depth lies in [:lo, :hi].
WALK = {"asc": _path_walk("ASC"), "desc": _path_walk("DESC")}
# Nodes holding an item in a tree, newest first.
CANDIDATES = SQL("SELECT node, depth FROM items WHERE tree = :tree AND item_id = :item_id ORDER BY seq DESC")
NODE_DATA = SQL("SELECT data FROM items WHERE node = :node")
NODE_INFO = SQL("SELECT depth, type FROM items WHERE node = :node")
NODE_PARENT = SQL("SELECT parent FROM items WHERE node = :node")
# Where a tree page resumes: after a node (the cursor a page returns; unique, unlike item ids,
# which re-hung copies share), or after the newest node holding an item id.
TREE_AFTER_NODE = SQL("SELECT seq FROM items WHERE node = :node AND tree = :tree")
TREE_AFTER = SQL("SELECT seq FROM items WHERE tree = :tree AND item_id = :item_id ORDER BY seq DESC LIMIT 1")
_TREE_COLUMNS = "i.item_id, p.item_id, i.type, i.role, i.response_id, i.status, i.created_at, i.node, i.parent"
_TREE_PAGE = " FROM items i LEFT JOIN items p ON p.node = i.parent WHERE i.tree = :tree AND i.seq > :after" \
             " ORDER BY i.seq LIMIT :limit"
TREE_PAGE = SQL(f"SELECT {_TREE_COLUMNS}{_TREE_PAGE}")
TREE_PAGE_DATA = SQL(f"SELECT {_TREE_COLUMNS}, i.data{_TREE_PAGE}")  # the same rows with each item's wire JSON
# Every node of a tree with its content, in the order stored (a parent always before its
# children): what the CLI's `tree` and `export` show; a page at a time, after a seq.
TREE_ITEMS = SQL(
    "SELECT seq, node, parent, item_id, type, role, response_id, created_at, data, chat FROM items"
    " WHERE tree = :tree AND seq > :after ORDER BY seq LIMIT :limit"
)
RESPONSE = SQL("SELECT id, status, conversation_id, tree, base_node, input_node, input_count, last_node, body"
               " FROM responses WHERE id = :id AND project = :project")
# The conversation's row, locked until the transaction ends (PostgreSQL; SQLite's write
# transactions are serial already): what every read-then-write of a conversation starts with.
LOCK_CONVERSATION = {
    "sqlite": SQL("SELECT id FROM conversations WHERE id = :id AND project = :project"),
    "postgresql": SQL("SELECT id FROM conversations WHERE id = :id AND project = :project FOR UPDATE"),
}


def _in(column: str, n: int) -> tuple[str, list[str]]:
    names = [f"k{k}" for k in range(n)]
    return f"{column} IN ({', '.join(':' + k for k in names)})", names


def items_by_id(n: int) -> tuple[SQL, list[str]]:
    """Content of `n` items of the project by item id, and the parameter names in order."""
    where, names = _in("item_id", n)
    return SQL(f"SELECT item_id, type, role, status, data, chat FROM items WHERE {where} AND project = :project"), names


def item_rows(n: int) -> tuple[SQL, list[str]]:
    """`n` whole item rows by node, and the parameter names in order."""
    where, names = _in("node", n)
    return SQL(f"SELECT {', '.join(ITEM_COLUMNS)} FROM items WHERE {where}"), names


# --------------------------------------------------------------------------------- writes


def _insert(table: str, columns: Sequence[str]) -> SQL:
    return SQL(f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join(':' + c for c in columns)})")


INSERT_ITEMS = _insert("items", ITEM_COLUMNS)
INSERT_EVENTS = _insert("events", ("response_id", "alternative", "seq", "frame"))
INSERT_RESPONSES = _insert("responses", RESPONSE_COLUMNS)
INSERT_CONVERSATION = _insert("conversations", ("id", "tree", "head", "created_at", "metadata",
                                                "forked_from_conversation", "forked_from_item", "project"))
UPDATE_METADATA = SQL("UPDATE conversations SET metadata = :metadata WHERE id = :id AND project = :project")
SET_HEAD = SQL("UPDATE conversations SET head = :head WHERE id = :id")  # (after LOCK_CONVERSATION)
DELETE_CONVERSATION = SQL("DELETE FROM conversations WHERE id = :id AND project = :project")
DELETE_RESPONSE = SQL("DELETE FROM responses WHERE id = :id AND project = :project")
FINISH_RESPONSE = SQL("UPDATE responses SET status = :status, input_node = :input_node, input_count = :input_count,"
                      " last_node = :last_node, body = :body, owner = NULL WHERE id = :id")
# Compare-and-swap: the head moves only if it is still where the response started.
MOVE_HEAD = {
    "sqlite": SQL("UPDATE conversations SET head = :head WHERE id = :id AND head IS :base"),
    "postgresql": SQL("UPDATE conversations SET head = :head WHERE id = :id AND head IS NOT DISTINCT FROM :base"),
}


# PostgreSQL: stored responses (their items, their rows, each head's compare-and-swap) in one
# statement, so one round trip and its own transaction; each conversation at most once
# (`PgGroups.commits`), the heads moved in conversation order (one lock order for all
# such transactions, so two of them never wait for each other in a cycle); RETURNING names the
# conversations whose head moved. One builder, from one description of the columns, in two
# forms (docs/decisions/0013-postgresql-commit-values-unnest.md, 0020): a VALUES row per row
# for a lone commit and small groups (scalars encode for far less client CPU than arrays), and
# unnest'ed arrays for larger ones (one short text whatever the group's size, so one prepared
# statement per connection instead of a parse and a plan per new shape). Built, not written, it
# is the one statement numbered `$n` directly, its arguments in `commit_args`'s order.
_COMMIT_INSERTS = (("items", ITEM_COLUMNS, _ITEM_TYPES), ("responses", RESPONSE_COLUMNS, _RESPONSE_TYPES))
_MOVE_COLUMNS = ("id", "base", "head")
PG_VALUES_PARAMS_MAX = 4000  # (a lone commit of ~300 items, or eight of ~35)
PG_VALUES_COMMITS_MAX = 8
_COMMIT_TEXTS: dict[tuple[int, int, int], str] = {}


def pg_commit(n_items: int, n_rows: int, n_moves: int, arrays: bool) -> str:
    """The commit of `n_items` items, `n_rows` response rows and `n_moves` head moves: as
    unnest'ed arrays (one text for every size), or as VALUES rows (a text per shape, cached)."""
    key = (-1, -1, -1) if arrays else (n_items, n_rows, n_moves)
    text = _COMMIT_TEXTS.get(key)
    if text is not None:
        return text
    k = 0

    def source(columns: Sequence[str], types: Sequence[str], n: int) -> str:
        nonlocal k
        if arrays:
            out = ", ".join(f"${k + j + 1}::{t}[]" for j, t in enumerate(types))
            k += len(columns)
            return f"SELECT * FROM unnest({out})"
        rows = []
        for _ in range(n):
            rows.append("(" + ", ".join(f"${k + j + 1}::{t}" for j, t in enumerate(types)) + ")")
            k += len(columns)
        return "VALUES " + ", ".join(rows)

    ctes = [f"new_{table} AS (INSERT INTO {table} ({', '.join(columns)}) {source(columns, types, n)})"
            for (table, columns, types), n in zip(_COMMIT_INSERTS, (n_items, n_rows), strict=True) if arrays or n]
    text = f"WITH {', '.join(ctes)} " if ctes else ""
    if arrays or n_moves:
        moves = source(_MOVE_COLUMNS, ("text",) * 3, n_moves)
        text += (f"UPDATE conversations c SET head = m.head FROM ({moves}) AS m(id, base, head)"
                 " WHERE c.id = m.id AND c.head IS NOT DISTINCT FROM m.base RETURNING c.id")
    else:
        text += "SELECT NULL WHERE false"
    _COMMIT_TEXTS[key] = text
    return text


def commit_args(rows: Sequence[dict], response_rows: Sequence[dict], moves: Sequence[tuple], arrays: bool) -> list:
    """`pg_commit`'s arguments, in its order: column by column (arrays) or row by row."""
    if arrays:
        args = [[r[c] for r in rows] for c in ITEM_COLUMNS]
        args += [[r[c] for r in response_rows] for c in RESPONSE_COLUMNS]
        args += [[m[j] for m in moves] for j in range(3)]
        return args
    args = [r[c] for r in rows for c in ITEM_COLUMNS]
    args += [r[c] for r in response_rows for c in RESPONSE_COLUMNS]
    args += [v for m in moves for v in m]
    return args


def commit_in_arrays(n_commits: int, n_items: int, n_rows: int, n_moves: int) -> bool:
    return (n_commits > PG_VALUES_COMMITS_MAX or n_items * len(ITEM_COLUMNS) + n_rows * len(RESPONSE_COLUMNS)
            + 3 * n_moves > PG_VALUES_PARAMS_MAX)


# Move a conversation's head to the newest node holding an item of its tree, in one statement
# (no row: no such conversation, or the item is not in its tree; see `core.tree.head_target`).
SET_HEAD_TO_ITEM = SQL(
    "UPDATE conversations SET head = (SELECT i.node FROM items i WHERE i.tree = conversations.tree"
    " AND i.item_id = :item_id ORDER BY i.seq DESC LIMIT 1)"
    " WHERE id = :id AND project = :project"
    " AND EXISTS (SELECT 1 FROM items i WHERE i.tree = conversations.tree AND i.item_id = :item_id)"
    " RETURNING head, created_at, metadata, forked_from_conversation, forked_from_item")
# The same for several conversations (each at most once, in conversation order: one lock order
# for every such statement) in one statement: their ordinals and rows.
PG_SET_HEADS_TO_ITEMS = SQL(
    "UPDATE conversations c SET head = (SELECT i.node FROM items i WHERE i.tree = c.tree"
    " AND i.item_id = m.item_id ORDER BY i.seq DESC LIMIT 1)"
    " FROM unnest(:ids::text[], :item_ids::text[], :projects::text[]) WITH ORDINALITY AS m(id, item_id, project, ord)"
    " WHERE c.id = m.id AND c.project = m.project AND EXISTS (SELECT 1 FROM items i WHERE i.tree = c.tree AND i.item_id = m.item_id)"
    " RETURNING m.ord, c.head, c.created_at, c.metadata, c.forked_from_conversation, c.forked_from_item")


# ------------------------------------------------------------- lists, prompts, secrets

_CONV_LISTS: dict[tuple, SQL] = {}


def list_conversations(order: str, after: bool, n_metadata: int) -> SQL:
    """A page of conversations in id order (ids begin with their creation time, so newest first
    is `desc`), after the id `:after` when `after`, whose metadata holds the `n_metadata` pairs
    `:kN` = `:vN`; `:limit` rows, each the `CONVERSATION` row. Without a pair, a range of the
    primary key; with pairs, a range of `conversation_metadata`'s (key, value, conversation)
    index for the first (put the rarest first), the others looked up per row."""
    key = (order, after, n_metadata)
    sql = _CONV_LISTS.get(key)
    if sql is None:
        cmp = "<" if order == "desc" else ">"
        if n_metadata:
            source = ("conversation_metadata m0 JOIN conversations c ON c.id = m0.conversation_id"
                      " LEFT JOIN items i ON i.node = c.head")
            where = ["m0.key = :k0", "m0.value = :v0", "c.project = :project"]
            where += [f"m0.conversation_id {cmp} :after"] if after else []
            where += [f"EXISTS (SELECT 1 FROM conversation_metadata m{n} WHERE m{n}.conversation_id = c.id"
                      f" AND m{n}.key = :k{n} AND m{n}.value = :v{n})" for n in range(1, n_metadata)]
            by = "m0.conversation_id"
        else:
            source = "conversations c LEFT JOIN items i ON i.node = c.head"
            where = ["c.project = :project"] + ([f"c.id {cmp} :after"] if after else [])
            by = "c.id"
        sql = _CONV_LISTS[key] = SQL(_CONV_SELECT + " FROM " + source
                                     + (" WHERE " + " AND ".join(where) if where else "")
                                     + f" ORDER BY {by} {order.upper()} LIMIT :limit")
    return sql


# How many conversations hold a metadata pair, counted up to :cap (a range of the index): with
# several pairs, the rarest drives the list.
METADATA_PAIR_COUNT = SQL("SELECT COUNT(*) FROM (SELECT 1 FROM conversation_metadata WHERE key = :k AND value = :v"
                          " LIMIT :cap) AS found")
INSERT_CONVERSATION_METADATA = _insert("conversation_metadata", ("conversation_id", "key", "value"))


def metadata_rows(conv_id: str, metadata: dict) -> list[dict]:
    """`INSERT_CONVERSATION_METADATA`'s rows for one conversation's metadata."""
    return [{"conversation_id": conv_id, "key": k, "value": v} for k, v in metadata.items()]
DELETE_CONVERSATION_METADATA = SQL("DELETE FROM conversation_metadata WHERE conversation_id = :id")


SECRET = SQL("SELECT value FROM secrets WHERE name = :name")
# The first process to start makes the value; the others keep the one already there.
INSERT_SECRET = SQL("INSERT INTO secrets (name, value, created_at) VALUES (:name, :value, :created_at)"
                    " ON CONFLICT (name) DO NOTHING")

# Prompts belong to a project: every statement names it (a prompt's versions through their prompt).
INSERT_PROMPT = SQL("INSERT INTO prompts (id, created_at, version, project) VALUES (:id, :created_at, 1, :project)")
INSERT_PROMPT_VERSION = SQL("INSERT INTO prompt_versions (prompt_id, version, created_at, data)"
                            " VALUES (:prompt_id, :version, :created_at, :data)")
# A new version's number, taken under the prompt row's lock (two new versions at once get two
# numbers); no row: no such prompt.
BUMP_PROMPT = SQL("UPDATE prompts SET version = version + 1 WHERE id = :id AND project = :project RETURNING version")
_PROMPT_IS_MINE = "EXISTS (SELECT 1 FROM prompts p WHERE p.id = :id AND p.project = :project)"
PROMPT_VERSION = SQL("SELECT version, created_at, data FROM prompt_versions WHERE prompt_id = :id AND version = :version"
                     f" AND {_PROMPT_IS_MINE}")
PROMPT_LATEST = SQL("SELECT v.version, v.created_at, v.data FROM prompts p"
                    " JOIN prompt_versions v ON v.prompt_id = p.id AND v.version = p.version"
                    " WHERE p.id = :id AND p.project = :project")
PROMPT_EXISTS = SQL("SELECT 1 FROM prompts WHERE id = :id AND project = :project")
DELETE_PROMPT_VERSIONS = SQL(f"DELETE FROM prompt_versions WHERE prompt_id = :id AND {_PROMPT_IS_MINE}")
DELETE_PROMPT = SQL("DELETE FROM prompts WHERE id = :id AND project = :project")


def _prompt_pages(after: bool, order: str) -> SQL:
    return SQL("SELECT p.id, v.version, v.created_at, v.data FROM prompts p"
               " JOIN prompt_versions v ON v.prompt_id = p.id AND v.version = p.version WHERE p.project = :project"
               + (f" AND p.id {'<' if order == 'desc' else '>'} :after" if after else "")
               + f" ORDER BY p.id {order.upper()} LIMIT :limit")


def _version_pages(after: bool, order: str) -> SQL:
    return SQL(f"SELECT version, created_at, data FROM prompt_versions WHERE prompt_id = :id AND {_PROMPT_IS_MINE}"
               + (f" AND version {'<' if order == 'desc' else '>'} :after" if after else "")
               + f" ORDER BY version {order.upper()} LIMIT :limit")


# (after given, order) -> a page of prompts (their latest versions) / of one prompt's versions
LIST_PROMPTS = {(a, o): _prompt_pages(a, o) for a in (False, True) for o in ("asc", "desc")}
LIST_PROMPT_VERSIONS = {(a, o): _version_pages(a, o) for a in (False, True) for o in ("asc", "desc")}


# Imports (`Repository.import_conversations`). Which of a batch's conversations are there
# already: by id (ids are the whole database's), or by a metadata entry in the project (`:keys`, a JSON array of values on SQLite, an array on
# PostgreSQL). Metadata is JSON text with no index: each batch reads the conversations table
# once. On PostgreSQL imports take turns on an advisory lock so that two running at once never
# both find a conversation missing; SQLite's write transactions take turns already.
IMPORTED_BY_ID = {
    "sqlite": SQL("SELECT id, id FROM conversations WHERE id IN (SELECT value FROM json_each(:keys))"),
    "postgresql": SQL("SELECT id, id FROM conversations WHERE id = ANY(:keys::text[])"),
}
IMPORTED_BY_METADATA = {
    "sqlite": SQL("SELECT id, json_extract(metadata, :path) FROM conversations WHERE project = :project"
                  " AND json_extract(metadata, :path) IN (SELECT value FROM json_each(:keys))"),
    "postgresql": SQL("SELECT id, metadata::jsonb ->> :name FROM conversations WHERE project = :project"
                      " AND metadata::jsonb ->> :name = ANY(:keys::text[])"),
}
IMPORT_LOCK = SQL("SELECT pg_advisory_xact_lock(7351002)")

# PostgreSQL's notifications (`store.signals`): a response's new events, sent with the
# transaction that writes them (delivered when it commits).
EVENTS_CHANNEL = "branchwise_events"
FOLLOW_CHANNEL = "branchwise_follow"
NOTIFY_EVENTS = SQL(f"SELECT pg_notify('{EVENTS_CHANNEL}', id) FROM unnest(:ids::text[]) AS t(id)")
