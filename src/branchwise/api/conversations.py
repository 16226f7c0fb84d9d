"""/v1/conversations routes, with the branchwise extensions fork, head and tree: each parses
the request, calls the conversations service, and replies."""

from __future__ import annotations

import re

import orjson
from starlette.requests import Request
from starlette.responses import Response

from branchwise.api.common import json_response, paging, parse_body
from branchwise.api.idempotency import Found, claim_of, idempotent
from branchwise.core.errors import InvalidRequest, NotFound
from branchwise.core.tree import Conversation
from branchwise.services.concurrency import ClientGone
from branchwise.services.conversations import Conversations
from branchwise.wire import models as m
from branchwise.wire.ids import check_id
from branchwise.wire.objects import conversation_object, item_list


def _service(request: Request) -> Conversations:
    return request.app.state.conversations


def _obj(c: Conversation) -> dict:
    return conversation_object(c.id, c.created_at, c.metadata, c.head_item,
                               c.forked_from_conversation, c.forked_from_item)


def _made_id(request: Request) -> str | None:
    claim = claim_of(request)
    return None if claim is None else claim.resource_id


async def _made_conversation(request: Request, conv_id: str, body: bytes) -> Found:
    """The conversation a request whose process died made, if it stored it (`api.idempotency`):
    as it is now."""
    try:
        return ("json", 200, orjson.dumps(_obj(await _service(request).get(conv_id))))
    except NotFound:
        return None


@idempotent("conv", _made_conversation)
async def create_conversation(request: Request) -> Response:
    body = await parse_body(request, m.CreateConversation)
    return json_response(_obj(await _service(request).create(body.metadata, body.items or [], _made_id(request))))


MAX_METADATA_FILTERS = 16  # (metadata holds 16 pairs at most)


def _metadata_filters(request: Request) -> list[tuple[str, str]]:
    """`metadata[KEY]=VALUE` query parameters: (key, value) pairs a conversation's metadata must
    all hold."""
    found = []
    for name, value in request.query_params.multi_items():
        if not name.startswith("metadata"):
            continue
        if not (name.startswith("metadata[") and name.endswith("]")) or len(name) == len("metadata[]"):
            raise InvalidRequest(f"Invalid query parameter '{name[:80]}': filter by metadata with "
                                 "'metadata[KEY]=VALUE'.", param="metadata", code="invalid_value")
        key = name[len("metadata["):-1]
        if len(key) > 64 or len(value) > 512 or "\x00" in key or "\x00" in value:
            raise InvalidRequest("Invalid metadata filter: keys have at most 64 characters and values at most "
                                 "512, without NUL.", param=f"metadata[{key[:64]}]", code="invalid_value")
        found.append((key, value))
    if len(found) > MAX_METADATA_FILTERS:
        raise InvalidRequest(f"Too many metadata filters: at most {MAX_METADATA_FILTERS}.", param="metadata",
                             code="invalid_value")
    return found


async def list_conversations(request: Request) -> Response:
    """branchwise extension: GET /v1/conversations (OpenAI has no such route)."""
    limit, order, after = paging(request, kind="conversation")
    convs, has_more = await _service(request).list(limit=limit, order=order, after=after,
                                                   metadata=_metadata_filters(request))
    return json_response({"object": "list", "data": [_obj(c) for c in convs],
                          "first_id": convs[0].id if convs else None, "last_id": convs[-1].id if convs else None,
                          "has_more": has_more})


async def retrieve_conversation(request: Request, conversation_id: str) -> Response:
    check_id(conversation_id, "conversation", "conversation_id")
    return json_response(_obj(await _service(request).get(conversation_id)))


async def update_conversation(request: Request, conversation_id: str) -> Response:
    check_id(conversation_id, "conversation", "conversation_id")
    body = await parse_body(request, m.UpdateConversation)
    return json_response(_obj(await _service(request).update(conversation_id, body.metadata)))


async def delete_conversation(request: Request, conversation_id: str) -> Response:
    check_id(conversation_id, "conversation", "conversation_id")
    await _service(request).delete(conversation_id)
    return json_response({"id": conversation_id, "object": "conversation.deleted", "deleted": True})


def _items_reply(chain) -> bytes:
    return item_list([it.data for it in chain], chain[0].item_id if chain else None,
                     chain[-1].item_id if chain else None, False)


@idempotent(None)
async def create_items(request: Request, conversation_id: str) -> Response:
    check_id(conversation_id, "conversation", "conversation_id")
    body = await parse_body(request, m.AddItems)
    claim, record = claim_of(request), None
    if claim is not None:  # the reply is kept in the transaction that stores the items
        idempotency = request.app.state.idempotency

        def record(chain):
            return idempotency.finish_step(claim, 200, _items_reply(chain))
    try:
        chain = await _service(request).append(conversation_id, body.items, body.concurrency,
                                               request.is_disconnected, record)
    except ClientGone:
        return Response(status_code=499)
    if claim is not None:
        request.app.state.idempotency.finished(claim)
    return json_response(_items_reply(chain))


async def list_items(request: Request, conversation_id: str) -> Response:
    check_id(conversation_id, "conversation", "conversation_id")
    limit, order, after = paging(request)
    rows, has_more = await _service(request).items(conversation_id, limit=limit, order=order, after=after)
    return json_response(item_list([r.data for r in rows], rows[0].item_id if rows else None,
                                   rows[-1].item_id if rows else None, has_more))


async def retrieve_item(request: Request, conversation_id: str, item_id: str) -> Response:
    check_id(conversation_id, "conversation", "conversation_id")
    check_id(item_id, "item", "item_id")
    return json_response(await _service(request).item(conversation_id, item_id))


async def delete_item(request: Request, conversation_id: str, item_id: str) -> Response:
    check_id(conversation_id, "conversation", "conversation_id")
    check_id(item_id, "item", "item_id")
    return json_response(_obj(await _service(request).delete_item(conversation_id, item_id)))


# ---------------------------------------------------------------- branchwise extensions


@idempotent("conv", _made_conversation)
async def fork_conversation(request: Request, conversation_id: str) -> Response:
    check_id(conversation_id, "conversation", "conversation_id")
    body = await parse_body(request, m.ForkConversation)
    return json_response(_obj(await _service(request).fork(conversation_id, body.item_id, body.metadata,
                                                           _made_id(request))))


@idempotent(None)
async def move_head(request: Request, conversation_id: str) -> Response:
    check_id(conversation_id, "conversation", "conversation_id")
    body = await parse_body(request, m.MoveHead)
    created_at, metadata, forked_from_conversation, forked_from_item = \
        await _service(request).move_head(conversation_id, body.item_id)
    return json_response(conversation_object(conversation_id, created_at, metadata, body.item_id,
                                             forked_from_conversation, forked_from_item))


# The tree's cursor: a node id (`core.ids.new_node`), unique where item ids are not (a deleted
# item's re-hung copies keep the ids of the items they copy).
_NODE = re.compile(r"[0-9a-f]{32}")
TREE_INCLUDES = ("item", "node")
"""What `include` may ask of the tree: each row's item as stored (`item`), and the node ids
that tell apart the copies of one item id (`node`: the row's `node` and `parent_node`, and the
tree's `head_node`)."""


def _tree_includes(request: Request) -> set[str]:
    wanted = set()
    for value in request.query_params.getlist("include") + request.query_params.getlist("include[]"):
        for part in value.split(","):
            if part not in TREE_INCLUDES:
                raise InvalidRequest(f"Invalid value for 'include': expected one of {', '.join(TREE_INCLUDES)}, "
                                     f"got '{part[:64]}'.", param="include", code="invalid_value")
            wanted.add(part)
    return wanted


async def tree(request: Request, conversation_id: str) -> Response:
    check_id(conversation_id, "conversation", "conversation_id")
    limit, _, after = paging(request, max_limit=1000, default_limit=100, default_order="asc", cursor=_NODE)
    includes = _tree_includes(request)
    node = after if after is not None and _NODE.fullmatch(after) else None
    conv, rows, has_more = await _service(request).tree(conversation_id, limit=limit, after_node=node,
                                                        after=None if node else after, data="item" in includes)
    data = [
        {"id": r[0], "parent_id": r[1], "type": r[2], "role": r[3], "response_id": r[4], "status": r[5],
         "created_at": r[6]}
        for r in rows
    ]
    if "node" in includes:
        for d, r in zip(data, rows, strict=True):
            d["node"], d["parent_node"] = r[7], r[8]
    if "item" in includes:  # the stored bytes go out as they are, never parsed
        for d, r in zip(data, rows, strict=True):
            d["item"] = orjson.Fragment(r[9])
    body = {"object": "conversation.tree", "head": conv.head_item}
    if "node" in includes:
        body["head_node"] = conv.head
    body.update(data=data, has_more=has_more, first_id=rows[0][7] if rows else None,
                last_id=rows[-1][7] if rows else None)
    return json_response(orjson.dumps(body))


ROUTES = [
    ("POST", "/v1/conversations", create_conversation),
    ("GET", "/v1/conversations", list_conversations),
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
