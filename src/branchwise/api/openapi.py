"""`GET /openapi.json`: the OpenAPI 3.1 document of the routes the server serves.

It is built once, at start-up, from the route table (`api.app.ROUTES`) and the description
table below. Request bodies are the JSON Schemas of the request models the handlers validate
with (`wire.models`), so the document cannot drift from what the server accepts, and the
branchwise extensions (`concurrency`, `n`, the fork/head/tree routes) are in it because they
are in the models. Every route must have a line in `OPERATIONS`: `document` refuses a route
without one, so a new route cannot be left out.

Responses are described by hand (the server builds them as plain dicts): the fields a client
relies on, with other fields allowed.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import orjson
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from starlette.requests import Request
from starlette.responses import Response

from branchwise.api.common import json_response
from branchwise.wire import models as m

REF = "#/components/schemas/{model}"


def _ref(name: str) -> dict:
    return {"$ref": REF.format(model=name)}


def _nullable(schema: dict) -> dict:
    return {"anyOf": [schema, {"type": "null"}]}


_STR = {"type": "string"}
_INT = {"type": "integer"}

# ---------------------------------------------------------------- response schemas

RESPONSE_SCHEMAS: dict[str, dict] = {
    "Error": {
        "type": "object", "required": ["error"],
        "properties": {"error": {
            "type": "object", "required": ["message", "type", "param", "code"],
            "properties": {"message": _STR, "type": _STR, "param": _nullable(_STR), "code": _nullable(_STR)},
        }},
    },
    "Item": {
        "type": "object", "required": ["id", "type"], "additionalProperties": True,
        "properties": {"id": _STR, "type": _STR, "status": _STR, "role": _STR},
    },
    "ItemList": {
        "type": "object", "required": ["object", "data", "first_id", "last_id", "has_more"],
        "properties": {"object": {"const": "list"}, "data": {"type": "array", "items": _ref("Item")},
                       "first_id": _nullable(_STR), "last_id": _nullable(_STR), "has_more": {"type": "boolean"}},
    },
    "Response": {
        "type": "object", "required": ["id", "object", "created_at", "status", "model", "output"],
        "additionalProperties": True,
        "properties": {
            "id": _STR, "object": {"const": "response"}, "created_at": _INT,
            "status": {"enum": ["queued", "in_progress", "completed", "failed", "incomplete", "cancelled"]},
            "model": _STR, "output": {"type": "array", "items": _ref("Item")},
            "conversation": _nullable({"type": "object", "properties": {"id": _STR}}),
            "previous_response_id": _nullable(_STR),
            "error": _nullable({"type": "object", "properties": {"code": _STR, "message": _STR}}),
            "usage": _nullable({"type": "object"}),
            "metadata": {"type": "object", "additionalProperties": _STR},
            "alternatives": {"type": "array", "items": _ref("Response"),
                             "description": "branchwise extension: the other n-1 responses when n > 1"},
        },
    },
    "ResponseDeleted": {
        "type": "object", "required": ["id", "object", "deleted"],
        "properties": {"id": _STR, "object": {"const": "response"}, "deleted": {"const": True}},
    },
    "InputTokens": {
        "type": "object", "required": ["object", "input_tokens"],
        "properties": {"object": {"const": "response.input_tokens"}, "input_tokens": _INT},
    },
    "Compaction": {
        "type": "object", "required": ["id", "object", "output", "created_at", "usage"],
        "properties": {"id": _STR, "object": {"const": "response.compaction"},
                       "output": {"type": "array", "items": {"type": "object"}}, "created_at": _INT,
                       "usage": _nullable({"type": "object"})},
    },
    "Conversation": {
        "type": "object", "required": ["id", "object", "created_at", "metadata"],
        "properties": {
            "id": _STR, "object": {"const": "conversation"}, "created_at": _INT,
            "metadata": {"type": "object", "additionalProperties": _STR},
            "head": {**_nullable(_STR), "description": "branchwise extension: the active leaf item"},
            "forked_from": {**_nullable({"type": "object", "properties": {
                "conversation_id": _STR, "item_id": _nullable(_STR)}}),
                "description": "branchwise extension: where a fork started"},
        },
    },
    "ConversationDeleted": {
        "type": "object", "required": ["id", "object", "deleted"],
        "properties": {"id": _STR, "object": {"const": "conversation.deleted"}, "deleted": {"const": True}},
    },
    "ConversationTree": {
        "description": "branchwise extension: every item of a conversation's tree with its parent",
        "type": "object", "required": ["object", "head", "data", "has_more", "first_id", "last_id"],
        "properties": {
            "object": {"const": "conversation.tree"}, "head": _nullable(_STR),
            "head_node": {**_STR, "description": "with include=node: the head's node"},
            "data": {"type": "array", "items": {"type": "object", "properties": {
                "id": _STR, "parent_id": _nullable(_STR), "type": _STR, "role": _nullable(_STR),
                "response_id": _nullable(_STR), "status": _nullable(_STR), "created_at": _INT,
                "node": {**_STR, "description": "with include=node: this row's node (its cursor)"},
                "parent_node": {**_nullable(_STR), "description": "with include=node: the parent's node"},
                "item": {"type": "object", "description": "with include=item: the item as stored"}}}},
            "has_more": {"type": "boolean"}, "first_id": _nullable(_STR), "last_id": _nullable(_STR),
        },
    },
    "ModelList": {
        "type": "object", "required": ["object", "data"],
        "properties": {"object": {"const": "list"}, "data": {"type": "array", "items": {
            "type": "object", "properties": {"id": _STR, "object": {"const": "model"}}}}},
    },
    "Health": {"type": "object", "properties": {"status": {"const": "ok"}}},
    "OpenAPI": {"type": "object", "required": ["openapi", "paths"]},
}

# ---------------------------------------------------------------- parameters


def _query(name: str, schema: dict, description: str) -> dict:
    return {"name": name, "in": "query", "required": False, "schema": schema, "description": description}


def _paging(max_limit: int = 100, default_limit: int = 20, order: bool = True) -> tuple[dict, ...]:
    params = [
        _query("limit", {"type": "integer", "minimum": 1, "maximum": max_limit, "default": default_limit},
               "How many to return."),
        _query("after", _STR, "An id of the list: return what comes after it."),
    ]
    if order:
        params.insert(1, _query("order", {"enum": ["asc", "desc"], "default": "desc"}, "Sort order."))
    return tuple(params)


_RETRIEVE = (
    _query("stream", {"type": "boolean", "default": False},
           "Replay the response's events as Server-Sent Events."),
    _query("starting_after", {"type": "integer", "minimum": -(2**31 - 1), "maximum": 2**31 - 1}, "With `stream`: the sequence number to resume after."),
)

# ---------------------------------------------------------------- the operations


@dataclass(frozen=True)
class Op:
    summary: str
    reply: str  # a name in RESPONSE_SCHEMAS
    body: type[BaseModel] | None = None
    query: tuple[dict, ...] = ()
    errors: tuple[int, ...] = (400,)
    tag: str = "responses"
    extension: bool = False  # a branchwise extension (OpenAI has no such route)
    stream: bool = False  # may answer with Server-Sent Events


_V1 = "/v1/conversations/{conversation_id}"

OPERATIONS: dict[tuple[str, str], Op] = {
    ("POST", "/v1/responses"): Op("Create a model response", "Response", m.CreateResponse,
                                  errors=(400, 404, 409, 502), stream=True),
    ("GET", "/v1/responses/{response_id}"): Op("Retrieve a response", "Response", query=_RETRIEVE,
                                               errors=(400, 404), stream=True),
    ("DELETE", "/v1/responses/{response_id}"): Op("Delete a response", "ResponseDeleted", errors=(404,)),
    ("POST", "/v1/responses/{response_id}/cancel"): Op("Cancel a background response", "Response",
                                                       errors=(400, 404)),
    ("GET", "/v1/responses/{response_id}/input_items"): Op("List a response's input items", "ItemList",
                                                           query=_paging(), errors=(400, 404)),
    ("POST", "/v1/responses/input_tokens"): Op("Count input tokens", "InputTokens", m.CountInputTokens,
                                               errors=(400, 404)),
    ("POST", "/v1/responses/compact"): Op("Compact a conversation's history", "Compaction", m.CompactRequest,
                                          errors=(400, 404, 502)),
    ("POST", "/v1/conversations"): Op("Create a conversation", "Conversation", m.CreateConversation,
                                      errors=(400, 404), tag="conversations"),
    ("GET", _V1): Op("Retrieve a conversation", "Conversation", errors=(404,), tag="conversations"),
    ("POST", _V1): Op("Update a conversation's metadata", "Conversation", m.UpdateConversation,
                      errors=(400, 404), tag="conversations"),
    ("DELETE", _V1): Op("Delete a conversation", "ConversationDeleted", errors=(404,), tag="conversations"),
    ("POST", _V1 + "/items"): Op("Add items to a conversation", "ItemList", m.AddItems,
                                 errors=(400, 404, 409), tag="conversations"),
    ("GET", _V1 + "/items"): Op("List a conversation's items (root to head)", "ItemList", query=_paging(),
                                errors=(400, 404), tag="conversations"),
    ("GET", _V1 + "/items/{item_id}"): Op("Retrieve an item", "Item", errors=(404,), tag="conversations"),
    ("DELETE", _V1 + "/items/{item_id}"): Op("Delete an item (returns the conversation)", "Conversation",
                                             errors=(400, 404), tag="conversations"),
    ("POST", _V1 + "/fork"): Op("Fork a conversation at an item", "Conversation", m.ForkConversation,
                                errors=(400, 404), tag="conversations", extension=True),
    ("POST", _V1 + "/head"): Op("Move a conversation's head to an item of its tree", "Conversation",
                                m.MoveHead, errors=(400, 404), tag="conversations", extension=True),
    ("GET", _V1 + "/tree"): Op("Every item of a conversation's tree", "ConversationTree",
                               query=(*_paging(max_limit=1000, default_limit=100, order=False), _query(
                                   "include", {"type": "array", "items": {"enum": ["item", "node"]}},
                                   "item: each row's item as stored; node: the node ids of rows and head.")),
                               errors=(400, 404), tag="conversations", extension=True),
    ("GET", "/v1/models"): Op("List the model names routed", "ModelList", errors=(), tag="server"),
    ("GET", "/healthz"): Op("200 once the server is ready", "Health", errors=(), tag="server",
                            extension=True),
    ("GET", "/openapi.json"): Op("This document", "OpenAPI", errors=(), tag="server", extension=True),
}

_ERROR_TEXT = {400: "Invalid request", 401: "Missing or wrong API key (when one is configured)",
               404: "Not found", 409: "Conflict with the conversation's state", 502: "The model failed"}


def _operation(method: str, path: str, op: Op, bodies: dict[type[BaseModel], dict]) -> dict:
    ok: dict[str, Any] = {"application/json": {"schema": _ref(op.reply)}}
    if op.stream:
        ok["text/event-stream"] = {"schema": _STR}
    errors = op.errors + ((401,) if path.startswith("/v1/") else ())
    out: dict[str, Any] = {
        "operationId": f"{method.lower()}_{path.strip('/').replace('/', '_').replace('{', '').replace('}', '')}"
                       .replace(".", "_"),
        "summary": op.summary,
        "tags": [op.tag],
        "responses": {
            "200": {"description": "OK", "content": ok},
            **{str(s): {"description": _ERROR_TEXT[s], "content": {"application/json": {"schema": _ref("Error")}}}
               for s in sorted(errors)},
        },
    }
    if op.extension:
        out["x-branchwise-extension"] = True
    params = [{"name": name, "in": "path", "required": True, "schema": _STR}
              for name in _path_params(path)] + list(op.query)
    if params:
        out["parameters"] = params
    if op.body is not None:
        out["requestBody"] = {"required": True, "content": {"application/json": {"schema": bodies[op.body]}}}
    if path.startswith("/v1/"):
        out["security"] = [{"bearer": []}, {}]  # the key is checked only when one is configured
    return out


def _path_params(path: str) -> list[str]:
    return [part[1:-1] for part in path.split("/") if part.startswith("{")]


def _version() -> str:
    try:
        return version("branchwise")
    except PackageNotFoundError:
        return "0"


def document(routes: Iterable[tuple[str, str, Any]]) -> dict:
    """The OpenAPI document of `routes` (method, path, handler). Raises for a route that has no
    line in `OPERATIONS`, and for a line whose route is gone."""
    routes = [(method, path) for method, path, _ in routes]
    missing = [r for r in routes if r not in OPERATIONS]
    stale = [r for r in OPERATIONS if r not in routes]
    if missing or stale:
        raise LookupError(f"api.openapi.OPERATIONS is out of date: routes without a description {missing}, "
                          f"descriptions without a route {stale}")
    models = list(dict.fromkeys(op.body for op in OPERATIONS.values() if op.body is not None))
    schemas, defs = models_json_schema([(model, "validation") for model in models], ref_template=REF)
    bodies = {model: schemas[(model, "validation")] for model in models}
    clash = set(defs.get("$defs", {})) & set(RESPONSE_SCHEMAS)
    if clash:
        raise LookupError(f"request and response schemas share the names {sorted(clash)}")
    paths: dict[str, dict] = {}
    for method, path in routes:
        paths.setdefault(path, {})[method.lower()] = _operation(method, path, OPERATIONS[(method, path)], bodies)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "branchwise",
            "version": _version(),
            "description": "OpenAI's Responses and Conversations APIs, where a conversation is a tree. "
                           "Operations and fields marked as extensions are branchwise's own "
                           "(docs/branching.md).",
        },
        "paths": paths,
        "components": {
            "schemas": {**defs.get("$defs", {}), **RESPONSE_SCHEMAS},
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


_served: bytes = b""


def publish(routes: Iterable[tuple[str, str, Any]]) -> None:
    """Build the document of `routes` once (at start-up), for `serve`."""
    global _served
    _served = orjson.dumps(document(routes))


async def serve(request: Request) -> Response:
    return json_response(_served)
