"""`GET /openapi.json`: the OpenAPI 3.1 document of the routes the server serves.

It is built once, at start-up, from the route table (`api.app.ROUTES`) and the description
table below. Request bodies are the JSON Schemas of the request models the handlers validate
with (`wire.models`), so the document cannot drift from what the server accepts, and the
branchwise extensions (`concurrency`, `n`, the fork/head/tree routes) are in it because they
are in the models; extension routes say so (`x-branchwise-extension`), extension fields in
their descriptions. Every route must have a line in `OPERATIONS`: `document` refuses a route
without one, so a new route cannot be left out.

Replies are described by hand (the server builds them as plain dicts), every field, in
`api.openapi_schemas`.
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

from branchwise.api import openapi_schemas as schemas
from branchwise.api.common import json_response
from branchwise.wire import models as m

REF = schemas.REF
_ref, _STR = schemas.ref, schemas.STR
RESPONSE_SCHEMAS = schemas.RESPONSE_SCHEMAS
_paging = schemas.paging

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
_P = "/v1/prompts/{prompt_id}"

OPERATIONS: dict[tuple[str, str], Op] = {
    ("POST", "/v1/responses"): Op("Create a model response", "Response", m.CreateResponse,
                                  errors=(400, 404, 409, 502), stream=True),
    ("GET", "/v1/responses/{response_id}"): Op("Retrieve a response", "Response", query=schemas.RETRIEVE_RESPONSE,
                                               errors=(400, 404), stream=True),
    ("DELETE", "/v1/responses/{response_id}"): Op("Delete a response", "ResponseDeleted", errors=(404,)),
    ("POST", "/v1/responses/{response_id}/cancel"): Op("Cancel a background response", "Response",
                                                       errors=(400, 404)),
    ("GET", "/v1/responses/{response_id}/input_items"): Op("List a response's input items", "ItemList",
                                                           query=_paging(), errors=(400, 404)),
    ("POST", "/v1/responses/input_tokens"): Op("Count input tokens", "InputTokens", m.CountInputTokens,
                                               errors=(400, 404)),
    ("POST", "/v1/responses/compact"): Op(
        "Compact a history: its user messages and one compaction item", "CompactedResponse", m.CompactRequest,
        errors=(400, 404, 502)),
    ("POST", "/v1/conversations"): Op("Create a conversation", "Conversation", m.CreateConversation,
                                      errors=(400, 404), tag="conversations"),
    ("GET", "/v1/conversations"): Op("List conversations (newest first), by metadata", "ConversationList",
                                     query=schemas.LIST_CONVERSATIONS, errors=(400,), tag="conversations",
                                     extension=True),
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
                               query=(*_paging(max_limit=1000, default_limit=100, order=False), schemas.query(
                                   "include", {"type": "array", "items": {"enum": ["item", "node"]}},
                                   "item: each row's item as stored; node: the node ids of the rows and the head.")),
                               errors=(400, 404), tag="conversations", extension=True),
    ("POST", "/v1/prompts"): Op("Create a stored prompt (its version 1)", "Prompt", m.CreatePrompt,
                                tag="prompts", extension=True),
    ("GET", "/v1/prompts"): Op("List stored prompts (each its latest version)", "PromptList", query=_paging(),
                               tag="prompts", extension=True),
    ("GET", _P): Op("Retrieve a prompt's latest version, or the one named", "Prompt", query=schemas.PROMPT_VERSION,
                    errors=(400, 404), tag="prompts", extension=True),
    ("POST", _P): Op("Add a version to a prompt (it becomes the latest)", "Prompt", m.CreatePrompt,
                     errors=(400, 404), tag="prompts", extension=True),
    ("DELETE", _P): Op("Delete a prompt and all its versions", "PromptDeleted", errors=(400, 404),
                       tag="prompts", extension=True),
    ("GET", _P + "/versions"): Op("List a prompt's versions", "PromptList", query=schemas.PROMPT_VERSIONS,
                                  errors=(400, 404), tag="prompts", extension=True),
    ("GET", "/v1/models"): Op("List the model names routable", "ModelList", errors=(), tag="server"),
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
    found, defs = models_json_schema([(model, "validation") for model in models], ref_template=REF)
    bodies = {model: found[(model, "validation")] for model in models}
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
                           "Operations marked `x-branchwise-extension` and fields whose description "
                           "says 'branchwise extension' are branchwise's own (docs/api.md, "
                           "docs/branching.md).",
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
