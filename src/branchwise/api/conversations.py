"""/v1/conversations routes, with the branchwise extensions fork, head and tree."""

from __future__ import annotations

import orjson
from starlette.requests import Request
from starlette.responses import Response

from branchwise.api.common import json_response, paging, parse_body
from branchwise.core.errors import InvalidRequest, not_found
from branchwise.core.ids import new_id
from branchwise.core.tree import Conversation, NewItem
from branchwise.services.concurrency import ClientGone, Policies
from branchwise.store.queries import Store
from branchwise.wire import models as m
from branchwise.wire.objects import conversation_object, item_list


def _store(request: Request) -> Store:
    return request.app.state.store


def _obj(c: Conversation) -> dict:
    return conversation_object(c.id, c.created_at, c.metadata, c.head_item,
                               c.forked_from_conversation, c.forked_from_item)


async def _get(store: Store, conv_id: str) -> Conversation:
    conv = await store.conversation(conv_id)
    if conv is None:
        raise not_found("Conversation", conv_id)
    return conv


async def _new_items(request: Request, raw: list) -> list[NewItem]:
    return await request.app.state.responses.context.input_items(raw, param="items")


async def create_conversation(request: Request) -> Response:
    body = await parse_body(request, m.CreateConversation)
    store = _store(request)
    chain = await _new_items(request, body.items or [])
    conv_id = new_id("conv")
    await store.create_conversation(conv_id, conv_id, body.metadata or {}, chain)
    return json_response(_obj(await _get(store, conv_id)))


async def retrieve_conversation(request: Request, conversation_id: str) -> Response:
    return json_response(_obj(await _get(_store(request), conversation_id)))


async def update_conversation(request: Request, conversation_id: str) -> Response:
    body = await parse_body(request, m.UpdateConversation)
    store = _store(request)
    if not await store.update_metadata(conversation_id, body.metadata or {}):
        raise not_found("Conversation", conversation_id)
    return json_response(_obj(await _get(store, conversation_id)))


async def delete_conversation(request: Request, conversation_id: str) -> Response:
    if not await _store(request).delete_conversation(conversation_id):
        raise not_found("Conversation", conversation_id)
    return json_response({"id": conversation_id, "object": "conversation.deleted", "deleted": True})


async def create_items(request: Request, conversation_id: str) -> Response:
    body = await parse_body(request, m.AddItems)
    store = _store(request)
    await _get(store, conversation_id)
    chain = await _new_items(request, body.items)
    policies: Policies = request.app.state.policies
    policy = body.concurrency or request.app.state.settings.default_concurrency
    try:
        lease = await policies.acquire(conversation_id, new_id("append"), policy, request.is_disconnected)
    except ClientGone:
        return Response(status_code=499)
    try:
        if await store.append_items(conversation_id, chain) is None:
            raise not_found("Conversation", conversation_id)
    finally:
        if lease is not None:
            await lease.release()
    return json_response(item_list([it.data for it in chain], chain[0].item_id if chain else None,
                                   chain[-1].item_id if chain else None, False))


async def list_items(request: Request, conversation_id: str) -> Response:
    limit, order, after = paging(request)
    store = _store(request)
    conv = await _get(store, conversation_id)
    after_row = None
    if after is not None:
        after_row = await store.find_on_path(conv, after)
        if after_row is None:
            raise not_found("Item", after)
    rows, has_more = await store.list_path(conv.head, conv.head_depth, limit=limit, order=order, after=after_row)
    return json_response(item_list([r.data for r in rows], rows[0].item_id if rows else None,
                                   rows[-1].item_id if rows else None, has_more))


async def retrieve_item(request: Request, conversation_id: str, item_id: str) -> Response:
    store = _store(request)
    row = await store.find_on_path(await _get(store, conversation_id), item_id)
    if row is None:
        raise not_found("Item", item_id)
    return json_response(row.data)


async def delete_item(request: Request, conversation_id: str, item_id: str) -> Response:
    store = _store(request)
    done = await store.delete_from_path(conversation_id, item_id)
    if done is None:
        raise not_found("Conversation", conversation_id)
    if done is False:
        raise not_found("Item", item_id)
    return json_response(_obj(await _get(store, conversation_id)))


# ---------------------------------------------------------------- branchwise extensions


async def fork_conversation(request: Request, conversation_id: str) -> Response:
    body = await parse_body(request, m.ForkConversation)
    store = _store(request)
    src = await _get(store, conversation_id)
    node, item = src.head, src.head_item
    if body.item_id is not None:
        row = await store.find_on_path(src, body.item_id)
        if row is None:
            raise InvalidRequest(f"Item '{body.item_id}' is not in conversation '{conversation_id}'.",
                                 param="item_id", code="item_not_found")
        node, item = row.node, row.item_id
    conv_id = new_id("conv")
    await store.create_conversation(conv_id, src.tree, body.metadata or {}, [], head=node,
                                    forked_from=(conversation_id, item))
    return json_response(_obj(await _get(store, conv_id)))


async def move_head(request: Request, conversation_id: str) -> Response:
    body = await parse_body(request, m.MoveHead)
    store = _store(request)
    moved = await store.move_head_to_item(conversation_id, body.item_id)
    if moved is None:
        await _get(store, conversation_id)  # 404 when there is no such conversation
        raise InvalidRequest(f"Item '{body.item_id}' is not in the tree of conversation '{conversation_id}'.",
                             param="item_id", code="item_not_found")
    created_at, metadata, forked_from_conversation, forked_from_item = moved
    return json_response(conversation_object(conversation_id, created_at, metadata, body.item_id,
                                             forked_from_conversation, forked_from_item))


async def tree(request: Request, conversation_id: str) -> Response:
    limit, _, after = paging(request, max_limit=1000, default_limit=100, default_order="asc")
    store = _store(request)
    conv = await _get(store, conversation_id)
    rows, has_more = await store.tree_page(conv.tree, limit=limit, after=after)
    if after is not None and not rows and not await store.candidates(conv.tree, after):
        raise not_found("Item", after)
    data = [
        {"id": r[0], "parent_id": r[1], "type": r[2], "role": r[3], "response_id": r[4], "status": r[5],
         "created_at": r[6]}
        for r in rows
    ]
    return json_response(orjson.dumps({
        "object": "conversation.tree", "head": conv.head_item, "data": data, "has_more": has_more,
        "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None,
    }))


ROUTES = [
    ("POST", "/v1/conversations", create_conversation),
    ("GET", "/v1/conversations/{conversation_id}", retrieve_conversation),
    ("POST", "/v1/conversations/{conversation_id}", update_conversation),
    ("DELETE", "/v1/conversations/{conversation_id}", delete_conversation),
    ("POST", "/v1/conversations/{conversation_id}/items", create_items),
    ("GET", "/v1/conversations/{conversation_id}/items", list_items),
    ("GET", "/v1/conversations/{conversation_id}/items/{item_id}", retrieve_item),
    ("DELETE", "/v1/conversations/{conversation_id}/items/{item_id}", delete_item),
    ("POST", "/v1/conversations/{conversation_id}/fork", fork_conversation),
    ("GET", "/v1/conversations/{conversation_id}/tree", tree),
]
