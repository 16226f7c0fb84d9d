"""The tree: items are immutable nodes with a parent; a history is the path from a root to a
node; a conversation is a movable pointer (its head) into a tree.

What is here is the domain's view, free of SQL and wire format: an item ready to be stored
(`NewItem`), an item placed under a parent (`Placed`), and the records the repository hands
back (`Conversation`, `PathRow`, `ResponseRow`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from branchwise.core.ids import new_node


@dataclass(slots=True)
class NewItem:
    """An item ready to store, with its two serialisations made once: `data` (the item as the
    API shows it) and `chat` (as a Chat Completions message; None when a model never sees it)."""

    item_id: str
    type: str
    role: str | None
    status: str | None
    wire: dict[str, Any]
    data: bytes
    chat: bytes | None


@dataclass(slots=True)
class Conversation:
    id: str
    tree: str
    head: str | None  # node
    head_item: str | None
    head_depth: int  # -1 when empty
    head_type: str | None
    created_at: int
    metadata: str  # JSON text
    forked_from_conversation: str | None
    forked_from_item: str | None


@dataclass(slots=True)
class PathRow:
    node: str
    depth: int
    item_id: str
    data: bytes


@dataclass(slots=True)
class ResponseRow:
    id: str
    status: str
    conversation_id: str | None
    tree: str
    base_node: str | None
    input_node: str | None
    input_count: int
    last_node: str | None
    body: bytes


@dataclass(slots=True)
class Placed:
    """A new item placed in the tree: its node and the node above it."""

    item: NewItem
    node: str
    parent: str | None
    depth: int
    response_id: str | None = None


def place(chain: Sequence[NewItem], parent: str | None, parent_depth: int,
          response_id: str | None = None) -> list[Placed]:
    """Hang `chain` as a line under `parent` (None: as a new root)."""
    out = []
    for it in chain:
        node = new_node()
        parent_depth += 1
        out.append(Placed(it, node, parent, parent_depth, response_id))
        parent = node
    return out


def place_tree(parents: Sequence[int | None]) -> list[tuple[str, int | None, int]]:
    """Nodes for a whole tree given as parent positions: `parents[k]` is the position of item
    k's parent (None: a root), always before k. Returns (node, parent position, depth) per item."""
    out: list[tuple[str, int | None, int]] = []
    for k, p in enumerate(parents):
        if p is not None and not 0 <= p < k:
            raise ValueError(f"item {k}: its parent must come before it")
        out.append((new_node(), p, 0 if p is None else out[p][2] + 1))
    return out


@dataclass(slots=True)
class ImportedResponse:
    """A stored response of an imported conversation, its nodes given as positions among the
    conversation's items: `base` (its input hangs under it), `input_last` (its last input
    item) and `last` (its last item: what a follow-up chains from). `body`: the Response object
    as the API returns it."""

    id: str
    created_at: int
    base: int | None
    input_last: int | None
    input_count: int
    last: int | None
    body: bytes
    status: str = "completed"
    previous_response_id: str | None = None


@dataclass(slots=True)
class ImportedConversation:
    """A conversation made elsewhere (an export file), whole: its items as a tree
    (`place_tree`'s parent positions) with their own creation times, and its head's position.
    `key`: the metadata entry (name, value) that says whether it was imported already; None:
    its id says so."""

    conv_id: str
    tree: str
    metadata: dict[str, Any]
    created_at: int
    items: list[NewItem]
    parents: list[int | None]
    item_created: list[int]
    head: int | None
    key: tuple[str, str] | None = None
    forked_from: tuple[str | None, str | None] | None = None
    response_ids: list[str | None] | None = None
    responses: list[ImportedResponse] | None = None  # their rows, when the source kept them


# A branch is the path from a tree's root to one of its nodes: what a model sees as history and
# what a conversation's head names. Branches share their common nodes; a new branch is a new
# line of nodes hung under a node of an existing one (`place`), never a copy.


def on_path_bounds(candidates: Sequence[tuple[str, int]], head_depth: int) -> int | None:
    """The shallowest depth at which one of `candidates` (nodes holding an item, with their
    depths) could lie on a path of `head_depth`; None when none can."""
    if not candidates:
        return None
    lo = min(d for _, d in candidates)
    return None if lo > head_depth else lo


def on_path(candidates: Sequence[tuple[str, int]], path: Sequence[PathRow]) -> PathRow | None:
    """The row of `path` (deepest first) that holds one of `candidates`: an item id may stand on
    several nodes of a tree (a re-hung copy, a forked line), and the one that counts is the
    one on this path."""
    nodes = {n for n, _ in candidates}
    return next((row for row in path if row.node in nodes), None)


def page_bounds(head_depth: int, limit: int, order: str, after_depth: int | None) -> tuple[int, int] | None:
    """The depths [lo, hi] to read for a page of `limit` items of a path of `head_depth`
    (one more than the page, to tell whether there is more), from the root ("asc") or the head
    ("desc"), after the item at `after_depth`; None for an empty page."""
    if order == "asc":
        lo = after_depth + 1 if after_depth is not None else 0
        hi = lo + limit
    else:
        hi = after_depth - 1 if after_depth is not None else head_depth
        lo = hi - limit
    if hi < lo or hi < 0:
        return None
    return lo, hi


def head_target(candidates: Sequence[tuple[str, int]]) -> str | None:
    """Where a conversation's head goes when moved to an item: the newest node holding that item
    in the conversation's tree (`candidates`, newest first); an item of another tree, or none,
    is no valid target (None). The repository runs this rule as one statement."""
    return candidates[0][0] if candidates else None


def fork_point(source: Conversation, at: PathRow | None) -> tuple[str | None, tuple[str, str | None]]:
    """A fork of `source`: the new conversation's head (the source's head, or the node `at` of
    an item on its path) and what it was forked from (conversation, item). Nothing is copied:
    the new pointer shares the source's tree."""
    if at is None:
        return source.head, (source.id, source.head_item)
    return at.node, (source.id, at.item_id)


def rehang(below: Sequence[dict[str, Any]], parent: str | None, depth: int) -> tuple[list[dict[str, Any]], str | None]:
    """Deleting an item from a path without touching a shared node: the items `below` it (whole
    rows, in path order from the one under it to the head) are copied, same item ids and
    content, in a new line under its `parent` (at `depth`, the deleted item's own). Returns the
    copies to insert and the path's new head (the parent itself when nothing was below)."""
    copies = []
    for row in below:
        node = new_node()
        copies.append({**row, "node": node, "parent": parent, "depth": depth})
        parent, depth = node, depth + 1
    return copies, parent
