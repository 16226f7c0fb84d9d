"""Stored responses as a client reads them back: retrieve, delete, and the input items a
response was given (`GET /v1/responses/{id}/input_items`)."""

from __future__ import annotations

from branchwise.core.errors import not_found
from branchwise.core.tree import PathRow, ResponseRow
from branchwise.store.repository import Repository


class StoredResponses:
    def __init__(self, store: Repository):
        self.store = store

    async def get(self, response_id: str) -> ResponseRow:
        row = await self.store.response(response_id)
        if row is None:
            raise not_found("Response", response_id)
        return row

    async def delete(self, response_id: str) -> None:
        if not await self.store.delete_response(response_id):
            raise not_found("Response", response_id)

    async def input_items(self, response_id: str, *, limit: int, order: str,
                          after: str | None) -> tuple[list[PathRow], bool]:
        """A page of the items the response was given, in `order`, after the item `after`."""
        row = await self.get(response_id)
        if row.input_node is None or row.input_count == 0:
            return [], False
        top = await self.store.node_depth(row.input_node)
        rows = await self.store.walk(row.input_node, top - row.input_count + 1, top, order)
        if after is not None:
            idx = next((i for i, r in enumerate(rows) if r.item_id == after), None)
            if idx is None:
                raise not_found("Item", after)
            rows = rows[idx + 1:]
        return rows[:limit], len(rows) > limit
