"""What a model sees: the new input as items (item references resolved, compaction items
checked and expanded), the rule that a function call is answered before anything else, and
`truncation` against the context window."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import orjson

from branchwise.core.errors import InvalidRequest, NotFound
from branchwise.core.tree import NewItem
from branchwise.store.repository import Repository
from branchwise.wire import compaction
from branchwise.wire import items as witems
from branchwise.wire import models as m

if TYPE_CHECKING:
    from branchwise.services.responses import Plan


MANY_ITEMS = 256
"""An input with more items than this is turned into items on a thread (`Context.input_items`)."""


def estimate_tokens(messages: bytes) -> int:
    """Tokens of a remote model's input, estimated: about four bytes of JSON per token."""
    return -(-len(messages) // 4)


class Context:
    def __init__(self, store: Repository, compaction_key: bytes = b""):
        self.store = store
        self.compaction_key = compaction_key
        """The key compaction items are signed with (`services.compact.compaction_key`), set once
        the database is open."""

    async def call_id(self, node: str) -> str | None:
        """The call id of the function call stored at `node`."""
        data = await self.store.node_data(node)
        return orjson.loads(data).get("call_id") if data else None

    @staticmethod
    def check_tool_output(call_id: str | None, inputs: list[NewItem]) -> None:
        """A history that ends in a function call (`call_id`) can only go on with that call's
        output, as in OpenAI's API. (branchwise's way out: fork, or move the head, to before the
        call.)"""
        answered = {it.wire.get("call_id") for it in inputs if it.type == "function_call_output"}
        if call_id and call_id not in answered:
            raise InvalidRequest(f"No tool output found for function call {call_id}.", param="input",
                                 code="tool_output_missing")

    @staticmethod
    def check_tool_calls(history: bytes, inputs: list[NewItem]) -> None:
        """Every function call output answers a call made before it, in the history or in the
        input (OpenAI's rule and wording; its `code` is null). The calls are found in the
        messages' bytes: a tool call is serialised as `{"id":<call id>,"type":"function"`, which
        no text can contain unescaped."""
        made = [history, *(it.chat for it in inputs if it.chat and it.type != "function_call_output")]
        for it in inputs:
            if it.type != "function_call_output":
                continue
            call_id = it.wire.get("call_id")
            if call_id is None:  # (referenced content: it was checked when it was stored)
                continue
            needle = b'{"id":' + orjson.dumps(call_id) + b',"type":"function"'
            if not any(needle in part for part in made):
                raise InvalidRequest(f"No tool call found for function call output with call_id {call_id}.",
                                     param="input")

    async def count(self, plan: Plan, messages: bytes) -> int:
        if plan.backend.capabilities.count_tokens:
            return await plan.backend.count_tokens(messages, plan.params)
        return estimate_tokens(messages)

    async def fit(self, plan: Plan, window: int, fixed_head: int, fixed_tail: int) -> None:
        """`truncation`: `disabled` refuses an input that does not fit the model's context window
        (leaving room for `max_output_tokens`); `auto` drops the oldest history items until it fits."""
        req = plan.req
        limit = window - (req.max_output_tokens or 0)
        tokens = await self.count(plan, plan.chat.messages)
        if tokens <= limit:
            return
        too_long = InvalidRequest(
            f"Your input ({tokens} tokens) exceeds the context window of this model ({window} tokens, "
            f"{req.max_output_tokens or 0} kept for the output). Shorten the input, or use truncation 'auto'.",
            param="input", code="context_length_exceeded")
        if req.truncation != "auto":
            raise too_long
        msgs = orjson.loads(plan.chat.messages)
        head, body, tail = msgs[:fixed_head], msgs[fixed_head:len(msgs) - fixed_tail], msgs[len(msgs) - fixed_tail:]
        while body and tokens > limit:
            body.pop(0)
            while body and body[0].get("role") == "tool":  # a tool result without its call
                body.pop(0)
            plan.chat.messages = orjson.dumps(head + body + tail)
            tokens = await self.count(plan, plan.chat.messages)
        if tokens > limit:
            raise too_long

    async def input_items(self, raw: str | list, param: str = "input") -> list[NewItem]:
        """New items for `raw` (a string, or validated input items); `item_reference`s are
        resolved to the stored content, and a `compaction` item, once its signature is checked,
        becomes an item that the model sees as the summary it carries (so a conversation can
        hold one, and every later turn sees the summary from the stored item, as any other).
        `param` names the list in errors."""
        if isinstance(raw, str):
            return [witems.from_input(m.Message(role="user", content=raw))]
        refs = [it.id for it in raw if isinstance(it, m.ItemReference)]
        found = await self.store.items_by_id(refs) if refs else {}
        if len(raw) > MANY_ITEMS:  # serialising them all would hold the event loop: a thread's work
            return await asyncio.to_thread(self._new_items, raw, found, param)
        return self._new_items(raw, found, param)

    def _new_items(self, raw: list, found: dict, param: str) -> list[NewItem]:
        out = []
        for i, it in enumerate(raw):
            if isinstance(it, m.ItemReference):
                row = found.get(it.id)
                if row is None:
                    raise NotFound(f"Item with id '{it.id}' not found.", param=f"{param}[{i}].id",
                                   code="item_not_found")
                item_id, type_, role, status, data, chat = row
                out.append(NewItem(item_id, type_, role, status, {}, data, chat))
            elif isinstance(it, m.Compaction):
                payload = compaction.open_token(self.compaction_key, it.encrypted_content)
                if payload is None:
                    raise compaction.unverified(f"{param}[{i}].encrypted_content")
                out.append(witems.compaction_item(it.encrypted_content, payload["summary"]))
            else:
                out.append(witems.from_input(it))
        witems.merge_tool_calls(out)
        return out
