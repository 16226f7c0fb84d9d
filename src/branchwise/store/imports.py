"""Conversations made elsewhere (a ChatGPT export, a branchwise JSONL export) stored whole: each
one's items as a new tree, with their own creation times, the rows of their responses when the
source has them, and the conversation with its head, in one transaction per batch, skipping
those stored before."""

from __future__ import annotations

from collections.abc import Sequence

import orjson

from branchwise.core.projects import current_project
from branchwise.core.tree import ImportedConversation, place_tree
from branchwise.store import statements as q
from branchwise.store.statements import Tx


async def store_batch(tx: Tx, dialect: str, batch: Sequence[ImportedConversation]) -> list[tuple[str, bool]]:
    """`batch` in the transaction `tx`, except the conversations there already: by their `key`
    metadata entry, or by id when they have none (the batch's conversations all alike). Per
    conversation: (the id of the conversation that holds it, whether it was stored now). They
    are stored in the caller's project (`core.projects`)."""
    project = current_project()
    name = batch[0].key[0] if batch[0].key else None
    if any((c.key[0] if c.key else None) != name for c in batch):
        raise ValueError("a batch of imports must be told apart all alike")
    keys = [c.key[1] if c.key else c.conv_id for c in batch]
    if dialect == "postgresql":
        await tx.one(q.IMPORT_LOCK, {})
    arg = keys if dialect == "postgresql" else orjson.dumps(keys).decode()
    if name is None:
        found = await tx.all(q.IMPORTED_BY_ID[dialect], {"keys": arg})
    else:
        found = await tx.all(q.IMPORTED_BY_METADATA[dialect], {"keys": arg, "name": name, "path": f'$."{name}"',
                                                                "project": project})
    there = {key: conv_id for conv_id, key in found}
    out: list[tuple[str, bool]] = []
    rows: list[dict] = []
    convs: list[dict] = []
    pairs: list[dict] = []  # the listing's metadata filter reads these (GET /v1/conversations?metadata[k]=v)
    responses: list[dict] = []
    for c, key in zip(batch, keys, strict=True):
        if key in there:  # (stored before, or twice in this batch)
            out.append((there[key], False))
            continue
        there[key] = c.conv_id
        out.append((c.conv_id, True))
        first = len(rows)
        rows += _rows(c, project)
        head = None if c.head is None else rows[first + c.head]["node"]
        if c.responses:
            responses += _response_rows(c, rows[first:], project)
        pairs += q.metadata_rows(c.conv_id, c.metadata)
        convs.append({
            "id": c.conv_id, "tree": c.tree, "head": head, "created_at": c.created_at,
            "metadata": orjson.dumps(c.metadata).decode(),
            "forked_from_conversation": c.forked_from[0] if c.forked_from else None,
            "forked_from_item": c.forked_from[1] if c.forked_from else None,
            "project": project,
        })
    if rows:
        await tx.execute(q.INSERT_ITEMS, rows)
        blocks = q.block_rows([(r["node"], r["depth"]) for r in rows])
        if blocks:
            await tx.execute(q.INSERT_BLOCK[dialect], blocks)
    if responses:
        await tx.execute(q.INSERT_RESPONSES, responses)
    if convs:
        await tx.execute(q.INSERT_CONVERSATION, convs)
        if pairs:
            await tx.execute(q.INSERT_CONVERSATION_METADATA, pairs)
    return out


def _rows(c: ImportedConversation, project: str) -> list[dict]:
    nodes = place_tree(c.parents)
    responses = c.response_ids or [None] * len(c.items)
    return [
        {
            "node": node, "parent": None if parent is None else nodes[parent][0], "depth": depth,
            "tree": c.tree, "item_id": it.item_id, "type": it.type, "role": it.role, "status": it.status,
            "response_id": resp, "created_at": created, "data": it.data, "chat": it.chat, "project": project,
        }
        for it, (node, parent, depth), created, resp in zip(c.items, nodes, c.item_created, responses, strict=True)
    ]


def _response_rows(c: ImportedConversation, rows: list[dict], project: str) -> list[dict]:
    def node(k: int | None) -> str | None:
        return None if k is None else rows[k]["node"]

    return [
        {"id": r.id, "status": r.status, "created_at": r.created_at, "conversation_id": c.conv_id,
         "previous_response_id": r.previous_response_id, "tree": c.tree, "base_node": node(r.base),
         "input_node": node(r.input_last), "input_count": r.input_count, "last_node": node(r.last), "body": r.body,
         "project": project}
        for r in c.responses
    ]
