"""The conversation use cases: create, read, update and delete a conversation; append items
under the conversation's concurrency policy; list, read and delete the items of its path; and
the branchwise extensions: fork, move the head, page through the whole tree. The tree's rules
are `core.tree`'s; the repository stores what they compute."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from branchwise.core.errors import InvalidRequest, not_found
from branchwise.core.ids import new_id
from branchwise.core.tree import Conversation, NewItem, PathRow, fork_point
from branchwise.services.concurrency import Policies
from branchwise.services.context import Context
from branchwise.settings import Settings
from branchwise.store.repository import Repository


class Conversations:
    def __init__(self, store: Repository, context: Context, policies: Policies, settings: Settings):
        self.store = store
        self.context = context
        self.policies = policies
        self.settings = settings

    async def get(self, conv_id: str) -> Conversation:
        conv = await self.store.conversation(conv_id)
        if conv is None:
            raise not_found("Conversation", conv_id)
        return conv

    async def list(self, *, limit: int, order: str, after: str | None,
                   metadata: list[tuple[str, str]]) -> tuple[list[Conversation], bool]:
        """A page of the stored conversations (a branchwise extension), in creation order, those
        whose metadata holds every (key, value) of `metadata`; and whether there is more."""
        return await self.store.list_conversations(limit=limit, order=order, after=after, metadata=metadata)

    async def _items(self, raw: list) -> list[NewItem]:
        return await self.context.input_items(raw, param="items")

    async def create(self, metadata: dict | None, raw_items: list, conv_id: str | None = None) -> Conversation:
        """A new conversation (with the id `conv_id` when it was chosen before: an
        Idempotency-Key's claim)."""
        chain = await self._items(raw_items)
        conv_id = conv_id or new_id("conv")
        await self.store.create_conversation(conv_id, conv_id, metadata or {}, chain)
        return await self.get(conv_id)

    async def update(self, conv_id: str, metadata: dict | None) -> Conversation:
        if not await self.store.update_metadata(conv_id, metadata or {}):
            raise not_found("Conversation", conv_id)
        return await self.get(conv_id)

    async def delete(self, conv_id: str) -> None:
        if not await self.store.delete_conversation(conv_id):
            raise not_found("Conversation", conv_id)

    async def append(self, conv_id: str, raw_items: list, policy: str | None,
                     disconnected: Callable[[], Awaitable[bool]],
                     record: Callable[[list[NewItem]], tuple] | None = None) -> list[NewItem]:
        """Hang the items under the head and move it to their end, under the conversation's
        policy's lease (waiting in line for `queue`; raises `ClientGone` when the client leaves
        while it waits): the items as stored. `record(items)`: a statement stored in the same
        transaction (an Idempotency-Key's reply)."""
        await self.get(conv_id)
        chain = await self._items(raw_items)
        lease = await self.policies.acquire(conv_id, new_id("append"), policy or self.settings.default_concurrency,
                                            disconnected)
        try:
            also = record(chain) if record is not None else None
            if await self.store.append_items(conv_id, chain, also) is None:
                raise not_found("Conversation", conv_id)
        finally:
            if lease is not None:
                await lease.release()
        return chain

    async def items(self, conv_id: str, *, limit: int, order: str, after: str | None) -> tuple[list[PathRow], bool]:
        """A page of the items of the conversation's path, and whether there is more."""
        conv = await self.get(conv_id)
        after_row = None
        if after is not None:
            after_row = await self.store.find_on_path(conv, after)
            if after_row is None:
                raise not_found("Item", after)
        return await self.store.list_path(conv, limit=limit, order=order, after=after_row)

    async def item(self, conv_id: str, item_id: str) -> bytes:
        row = await self.store.find_on_path(await self.get(conv_id), item_id)
        if row is None:
            raise not_found("Item", item_id)
        return row.data

    async def delete_item(self, conv_id: str, item_id: str) -> Conversation:
        done = await self.store.delete_from_path(conv_id, item_id)
        if done is None:
            raise not_found("Conversation", conv_id)
        if done is False:
            raise not_found("Item", item_id)
        return await self.get(conv_id)

    async def fork(self, conv_id: str, item_id: str | None, metadata: dict | None,
                   new_conv_id: str | None = None) -> Conversation:
        """A new conversation on the same tree, its head at the source's head or at an item on
        the source's path (with the id `new_conv_id` when it was chosen before)."""
        source = await self.get(conv_id)
        at = None
        if item_id is not None:
            at = await self.store.find_on_path(source, item_id)
            if at is None:
                raise InvalidRequest(f"Item '{item_id}' is not in conversation '{conv_id}'.",
                                     param="item_id", code="item_not_found")
        head, forked_from = fork_point(source, at)
        new = new_conv_id or new_id("conv")
        await self.store.create_conversation(new, source.tree, metadata or {}, [], head=head, forked_from=forked_from)
        return await self.get(new)

    async def move_head(self, conv_id: str, item_id: str) -> tuple[Any, ...]:
        """Move the head to the newest node holding `item_id` in the conversation's tree, in one
        statement: the conversation's (created_at, metadata, forked_from_conversation,
        forked_from_item) after the move."""
        moved = await self.store.move_head_to_item(conv_id, item_id)
        if moved is None:
            await self.get(conv_id)  # 404 when there is no such conversation
            raise InvalidRequest(f"Item '{item_id}' is not in the tree of conversation '{conv_id}'.",
                                 param="item_id", code="item_not_found")
        return moved

    async def tree(self, conv_id: str, *, limit: int, after: str | None = None,
                   after_node: str | None = None, data: bool = False) -> tuple[Conversation, list[tuple], bool]:
        """A page of every node of the conversation's tree, in the order they were stored: after
        the node `after_node` (the cursor a page returns), or after the newest node holding the
        item `after`. Rows end with their node and their parent's node, then (with `data`) the
        item as stored."""
        conv = await self.get(conv_id)
        page = await self.store.tree_page(conv.tree, limit=limit, after=after, after_node=after_node, data=data)
        if page is None:
            raise not_found("Item", after_node or after)
        rows, has_more = page
        return conv, rows, has_more
