"""The two utility routes beside POST /v1/responses: counting input tokens and compacting.

Both see exactly the context POST /v1/responses would build: the request is turned into a
`CreateResponse`, checked by `Engine.validate` (same errors: unknown conversation 404, unknown
`previous_response_id` 400 `previous_response_not_found`, ...) and its messages built by
`Engine.enter` under the `branch` policy, which takes no lease. Nothing is stored.

Token counts. With the embedded model the count is exact: the messages rendered with the
model's chat template and tokenised (`LocalBackend.count_tokens`), the number a real response
reports as `usage.input_tokens`. With a remote upstream nothing is asked of it (Chat Completions
has no counting route) and the count is an estimate, `estimate_tokens`:

    sum over messages of (4 + ceil(b / 4))  +  ceil(t / 4)

where `b` is the number of UTF-8 bytes of a message's text (its text content parts, refusal,
tool call names and arguments, `name`), and `t` the number of bytes of the `tools` JSON (the
Chat Completions form) when there are tools. Four bytes a token is the usual rule of thumb for
English with BPE tokenisers; 4 tokens a message stands for the role and the template's framing.
Images and files are not counted.
"""
from __future__ import annotations

import asyncio
import math
from typing import Any

import orjson
from pydantic import ValidationError

from branchwise.backends.base import BackendError
from branchwise.backends.router import LOCAL_MODEL_ID, Router
from branchwise.core.errors import InvalidRequest, ServerFault
from branchwise.services.responses import Plan, Responses
from branchwise.wire import models as m
from branchwise.wire.errors import from_validation

BYTES_PER_TOKEN = 4
TOKENS_PER_MESSAGE = 4
BIG_MESSAGES_BYTES = 256 << 10

async def messages_for(engine: Responses, **fields: Any) -> Plan:
    """The `CreateResponse` made of `fields`, validated, and the messages the model would see
    (`plan.chat`), built without a lease."""
    try:  # `branch`: `enter` takes no lease, so nothing waits and nothing is locked
        req = m.CreateResponse(**fields, store=False, concurrency="branch")
    except ValidationError as e:
        raise from_validation(e) from None
    plan = await engine.validate(req)
    await engine.enter(plan)
    if plan.lease is not None:  # never with `branch`; should that change, don't hold the conversation
        await plan.lease.release()
    return plan


def _any_model(router: Router) -> str | None:
    """A model name the router serves, for an input_tokens request that names none."""
    if router.embedded:
        return LOCAL_MODEL_ID
    for name in router.model_ids():
        return name
    for cfg, _ in router.routes:  # only globs: a name each matches ("*" matches the empty string)
        for pattern in cfg.models:
            if "[" not in pattern:
                return pattern.replace("*", "").replace("?", "x") or "model"
    return None


def _text_bytes(msg: dict[str, Any]) -> int:
    n = 0
    content = msg.get("content")
    if isinstance(content, str):
        n += len(content.encode())
    elif isinstance(content, list):
        for part in content:
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                n += len(part["text"].encode())
    for key in ("refusal", "name"):
        if isinstance(msg.get(key), str):
            n += len(msg[key].encode())
    for call in msg.get("tool_calls") or []:
        fn = (call.get("function") or {}) if isinstance(call, dict) else {}
        for key in ("name", "arguments"):
            if isinstance(fn.get(key), str):
                n += len(fn[key].encode())
    return n


def estimate_tokens(messages_json: bytes, params: dict[str, Any] | None = None) -> int:
    """Estimated prompt tokens of Chat Completions messages for a model whose tokeniser we don't
    have: sum of (4 + ceil(UTF-8 text bytes / 4)) per message, plus ceil(tools JSON bytes / 4)."""
    total = 0
    for msg in orjson.loads(messages_json):
        if isinstance(msg, dict):
            total += TOKENS_PER_MESSAGE + math.ceil(_text_bytes(msg) / BYTES_PER_TOKEN)
    tools = (params or {}).get("tools")
    if tools:
        total += math.ceil(len(orjson.dumps(tools)) / BYTES_PER_TOKEN)
    return total


async def count_input_tokens(engine: Responses, body: Any) -> dict[str, Any]:
    """POST /v1/responses/input_tokens for a validated `CountInputTokens` body."""
    model = body.model or _any_model(engine.router)
    if model is None:
        raise InvalidRequest("Missing required parameter: 'model'.", param="model", code="missing_required_parameter")
    shared = {k: getattr(body, k) for k in body.model_fields_set if k not in ("model", "personality")}
    plan = await messages_for(engine, model=model, **shared)
    chat = plan.chat
    if plan.backend.capabilities.count_tokens:
        try:
            n = await plan.backend.count_tokens(chat.messages, chat.params)
        except BackendError as e:
            if e.status == 400:
                raise InvalidRequest(f"The input cannot be counted: {e.message}") from None
            raise ServerFault(f"The model could not count the input: {e.message}",
                              code="server_error") from None
    elif len(chat.messages) > BIG_MESSAGES_BYTES:  # (parsing them all would hold the event loop)
        n = await asyncio.to_thread(estimate_tokens, chat.messages, chat.params)
    else:
        n = estimate_tokens(chat.messages, chat.params)
    return {"object": "response.input_tokens", "input_tokens": n}
