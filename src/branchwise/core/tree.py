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


