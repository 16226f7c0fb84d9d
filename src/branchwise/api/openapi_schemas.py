"""The reply schemas and query parameters of `/openapi.json` (`api.openapi` builds the document).

Replies are plain dicts built by `wire.objects`, `wire.items` and the handlers, so their schemas
are written here by hand: every field the server sends, with what it means where the name does
not say. `tests/test_openapi.py` checks them against real replies (every key of a real Response,
Conversation, item, prompt and list is a property here), so a field added to a reply without
its line here fails a test.
"""

from __future__ import annotations

REF = "#/components/schemas/{model}"


def ref(name: str) -> dict:
    return {"$ref": REF.format(model=name)}


def nullable(schema: dict) -> dict:
    return {"anyOf": [schema, {"type": "null"}]}


def obj(required: list[str], properties: dict, description: str | None = None, **extra) -> dict:
    out = {"type": "object", "required": required, "properties": properties, **extra}
    if description:
        out["description"] = description
    return out


STR = {"type": "string"}
INT = {"type": "integer"}
NUM = {"type": "number"}
BOOL = {"type": "boolean"}
ANY_OBJ = {"type": "object"}
METADATA = {"type": "object", "additionalProperties": STR, "description": "Up to 16 key-value pairs."}


def _list(item: str, description: str | None = None, cursor: dict = STR) -> dict:
    return obj(["object", "data", "first_id", "last_id", "has_more"], {
        "object": {"const": "list"}, "data": {"type": "array", "items": ref(item)},
        "first_id": nullable(cursor), "last_id": nullable(cursor), "has_more": BOOL}, description)


_CONTENT_PART = obj(["type"], {
    "type": {"enum": ["input_text", "output_text", "refusal", "input_image", "input_file"]},
    "text": STR, "annotations": {"type": "array"}, "logprobs": {"type": "array"}, "refusal": STR,
    "image_url": nullable(STR), "file_id": nullable(STR), "detail": STR, "file_data": STR, "file_url": STR,
    "filename": STR}, additionalProperties=True)

ITEM_SCHEMAS: dict[str, dict] = {
    "MessageItem": obj(["id", "type", "status", "role", "content"], {
        "id": STR, "type": {"const": "message"}, "status": {"enum": ["in_progress", "completed", "incomplete"]},
        "role": {"enum": ["user", "assistant", "system", "developer"]},
        "content": {"type": "array", "items": ref("ContentPart")}}),
    "FunctionCallItem": obj(["id", "type", "status", "call_id", "name", "arguments"], {
        "id": STR, "type": {"const": "function_call"}, "status": STR, "call_id": STR, "name": STR,
        "arguments": {**STR, "description": "The arguments, a JSON text."}}),
    "FunctionCallOutputItem": obj(["id", "type", "status", "call_id", "output"], {
        "id": STR, "type": {"const": "function_call_output"}, "status": STR, "call_id": STR,
        "output": {"anyOf": [STR, {"type": "array", "items": ref("ContentPart")}]}}),
    "ReasoningItem": obj(["id", "type", "summary"], {
        "id": STR, "type": {"const": "reasoning"}, "summary": {"type": "array", "items": ANY_OBJ},
        "content": nullable({"type": "array", "items": ANY_OBJ}), "encrypted_content": nullable(STR),
        "status": nullable(STR)}),
    "CompactionItem": obj(["id", "type", "encrypted_content"], {
        "id": STR, "type": {"const": "compaction"},
        "encrypted_content": {**STR, "description": "What the compaction stands for, signed by this server "
                                                    "(not encrypted: branchwise keeps no secret from the "
                                                    "conversation's owner). Opaque: send it back as it came."}},
        "Stands for the part of a history POST /v1/responses/compact replaced: sent back as input or "
        "stored in a conversation, the model sees a summary of it there."),
}

_USAGE = obj(["input_tokens", "input_tokens_details", "output_tokens", "output_tokens_details", "total_tokens"], {
    "input_tokens": INT, "input_tokens_details": obj(["cached_tokens"], {"cached_tokens": INT,
                                                                          "cache_write_tokens": INT}),
    "output_tokens": INT, "output_tokens_details": obj(["reasoning_tokens"], {"reasoning_tokens": INT}),
    "total_tokens": INT})

_PROMPT_REF = obj(["id"], {
    "id": STR, "version": nullable({**STR, "description": "The version used (the latest when the request "
                                                          "named none)."}),
    "variables": nullable({"type": "object", "additionalProperties": {"anyOf": [STR, ref("ContentPart")]}})},
    "The stored prompt the response used (`/v1/prompts`).")

_RESPONSE_FIELDS = {
    "id": STR, "object": {"const": "response"}, "created_at": INT,
    "status": {"enum": ["queued", "in_progress", "completed", "failed", "incomplete", "cancelled"]},
    "background": BOOL, "completed_at": nullable(INT),
    "conversation": nullable(obj(["id"], {"id": STR})),
    "error": nullable(obj(["code", "message"], {"code": STR, "message": STR})),
    "incomplete_details": nullable(obj(["reason"], {"reason": STR})),
    "instructions": nullable(STR), "max_output_tokens": nullable(INT), "max_tool_calls": nullable(INT),
    "metadata": METADATA, "model": STR, "output": {"type": "array", "items": ref("Item")},
    "parallel_tool_calls": BOOL, "previous_response_id": nullable(STR), "prompt": nullable(_PROMPT_REF),
    "prompt_cache_key": nullable(STR), "prompt_cache_retention": nullable(STR),
    "reasoning": obj([], {"effort": nullable(STR), "summary": nullable(STR)}),
    "safety_identifier": nullable(STR), "service_tier": STR, "store": BOOL, "temperature": NUM,
    "presence_penalty": NUM, "frequency_penalty": NUM,
    "text": obj(["format"], {"format": obj(["type"], {"type": STR, "name": STR, "schema": ANY_OBJ,
                                                      "description": nullable(STR), "strict": nullable(BOOL)}),
                             "verbosity": STR}),
    "tool_choice": {"anyOf": [STR, obj(["type", "name"], {"type": {"const": "function"}, "name": STR})]},
    "tools": {"type": "array", "items": obj(["type", "name"], {
        "type": {"const": "function"}, "name": STR, "description": nullable(STR),
        "parameters": nullable(ANY_OBJ), "strict": BOOL})},
    "top_logprobs": INT, "top_p": NUM, "truncation": {"enum": ["auto", "disabled"]},
    "usage": nullable(ref("Usage")), "user": nullable(STR),
    "alternatives": {"type": "array", "items": ref("Response"),
                     "description": "branchwise extension: the other n-1 responses when n > 1"},
}

_CONVERSATION = obj(["id", "object", "created_at", "metadata", "head", "forked_from"], {
    "id": STR, "object": {"const": "conversation"}, "created_at": INT, "metadata": METADATA,
    "head": {**nullable(STR), "description": "branchwise extension: the item at the head of the path"},
    "forked_from": {**nullable(obj(["conversation_id", "item_id"], {"conversation_id": STR,
                                                                     "item_id": nullable(STR)})),
                    "description": "branchwise extension: where a fork started"}})

_PROMPT = obj(["id", "object", "version", "created_at", "instructions", "input", "variables", "metadata"], {
    "id": STR, "object": {"const": "prompt"},
    "version": {**STR, "description": "The version's number, as text (1, 2, ...)."}, "created_at": INT,
    "instructions": nullable(STR), "input": nullable({"type": "array", "items": ref("MessageItemParam")}),
    "variables": {"type": "array", "items": STR,
                  "description": "The names of the `{{name}}` placeholders in the version's text: the "
                                 "variables a response that uses it must give."},
    "metadata": METADATA}, "branchwise extension: one version of a stored prompt.")

RESPONSE_SCHEMAS: dict[str, dict] = {
    "Error": obj(["error"], {"error": obj(["message", "type", "param", "code"], {
        "message": STR, "type": STR, "param": nullable(STR), "code": nullable(STR)})}),
    "ContentPart": _CONTENT_PART,
    **ITEM_SCHEMAS,
    "Item": {"anyOf": [ref(name) for name in ITEM_SCHEMAS]},
    "MessageItemParam": obj(["role", "content"], {
        "role": {"enum": ["user", "assistant", "system", "developer"]},
        "content": {"anyOf": [STR, {"type": "array", "items": ref("ContentPart")}]}, "type": {"const": "message"}}),
    "ItemList": _list("Item"),
    "Usage": _USAGE,
    "Response": obj(["id", "object", "created_at", "status", "model", "output"], _RESPONSE_FIELDS,
                    additionalProperties=True),
    "ResponseDeleted": obj(["id", "object", "deleted"], {
        "id": STR, "object": {"const": "response"}, "deleted": {"const": True}}),
    "InputTokens": obj(["object", "input_tokens"], {"object": {"const": "response.input_tokens"},
                                                    "input_tokens": INT}),
    "CompactedResponse": obj(["id", "object", "output", "created_at", "usage"], {
        "id": STR, "object": {"const": "response.compaction"},
        "output": {"type": "array", "items": ref("Item"),
                   "description": "The history's user messages, verbatim, then one compaction item."},
        "created_at": INT, "usage": ref("Usage")}),
    "Conversation": _CONVERSATION,
    "ConversationList": _list("Conversation", "branchwise extension: a page of the stored conversations"),
    "ConversationDeleted": obj(["id", "object", "deleted"], {
        "id": STR, "object": {"const": "conversation.deleted"}, "deleted": {"const": True}}),
    "ConversationTree": obj(["object", "head", "data", "has_more", "first_id", "last_id"], {
        "object": {"const": "conversation.tree"}, "head": nullable(STR),
        "head_node": {**nullable(STR), "description": "With `include=node`: the head's node."},
        "data": {"type": "array", "items": obj(
            ["id", "parent_id", "type", "role", "response_id", "status", "created_at"], {
                "id": STR, "parent_id": nullable(STR), "type": STR, "role": nullable(STR),
                "response_id": nullable(STR), "status": nullable(STR), "created_at": INT,
                "node": {**STR, "description": "With `include=node`: this row's node (its cursor)."},
                "parent_node": {**nullable(STR), "description": "With `include=node`: the parent's node."},
                "item": {**ref("Item"), "description": "With `include=item`: the item as stored."}})},
        "has_more": BOOL,
        "first_id": {**nullable(STR), "description": "A node id: the cursor (`after`) of the next page."},
        "last_id": nullable(STR)},
        "branchwise extension: every item of a conversation's tree with its parent"),
    "Prompt": _PROMPT,
    "PromptList": _list("Prompt", "branchwise extension: a page of prompts (each its latest version) or of "
                                  "one prompt's versions (`first_id`/`last_id` are then version numbers)"),
    "PromptDeleted": obj(["id", "object", "deleted"], {
        "id": STR, "object": {"const": "prompt.deleted"}, "deleted": {"const": True}}),
    "ModelList": obj(["object", "data"], {"object": {"const": "list"}, "data": {"type": "array", "items": obj(
        ["id", "object", "created", "owned_by"], {
            "id": STR, "object": {"const": "model"}, "created": INT,
            "owned_by": {**STR, "description": "The upstream (route name) that serves it; `branchwise` for "
                                               "the embedded model."}})}}),
    "Health": obj(["status"], {"status": {"const": "ok"}}),
    "OpenAPI": obj(["openapi", "paths"], {"openapi": STR, "paths": ANY_OBJ}),
}

# ---------------------------------------------------------------- query parameters


def query(name: str, schema: dict, description: str, **extra) -> dict:
    return {"name": name, "in": "query", "required": False, "schema": schema, "description": description, **extra}


def paging(max_limit: int = 100, default_limit: int = 20, order: bool = True,
           after: str = "An id of the list: return what comes after it.", after_schema: dict = STR) -> tuple:
    params = [
        query("limit", {"type": "integer", "minimum": 1, "maximum": max_limit, "default": default_limit},
              "How many to return."),
        query("after", after_schema, after),
    ]
    if order:
        params.insert(1, query("order", {"enum": ["asc", "desc"], "default": "desc"}, "Sort order."))
    return tuple(params)


RETRIEVE_RESPONSE = (
    query("stream", {"type": "boolean", "default": False}, "Replay the response's events as Server-Sent Events."),
    query("starting_after", {"type": "integer", "minimum": -(2**31 - 1), "maximum": 2**31 - 1},
          "With `stream`: the sequence number to resume after."),
)
LIST_CONVERSATIONS = (
    *paging(after="The id of the last conversation of the previous page (it need not exist any more)."),
    query("metadata", {"type": "object", "additionalProperties": {"type": "string", "maxLength": 512},
                       "maxProperties": 16},
          "Only conversations whose metadata holds each pair, as `metadata[KEY]=VALUE`.",
          style="deepObject", explode=True),
)
PROMPT_VERSION = (query("version", {"type": "string", "pattern": "^[1-9][0-9]{0,8}$"},
                        "The version to read (default: the latest)."),)
PROMPT_VERSIONS = paging(after="The version number after which the page starts.",
                         after_schema={"type": "string", "pattern": "^[1-9][0-9]{0,8}$"})
