"""Compaction: POST /v1/responses/compact, as OpenAI's and Open Responses' specs have it.

The output is the history's user messages, verbatim, followed by one `compaction` item that
stands for everything else (the model's answers, tool calls and their results, the system and
developer messages): sent back as `input` (or stored in a conversation), the model sees the
user messages and, where the compaction item is, a summary of the rest.

The summary comes from one chat call to the routed backend: a system message asking for a
summary (with the request's `instructions`, if any, as context), the conversation's messages,
and a last user message repeating the request (a model that sees a conversation ending on a
user turn would otherwise answer that turn). It travels inside the item, signed with the
server's compaction key (`wire.compaction`, docs/decisions/0040), so that the server can trust
it when it comes back; a changed or foreign item is a 400 there (`services.context`).
"""

from __future__ import annotations

import secrets
from typing import Any

import orjson

from branchwise.backends.base import BackendError
from branchwise.core.chat import ChatRequest
from branchwise.core.errors import ModelFailed
from branchwise.core.ids import new_id, now
from branchwise.services.responses import Plan, Responses
from branchwise.services.tokens import messages_for
from branchwise.settings import Settings
from branchwise.store.repository import Repository
from branchwise.wire import compaction
from branchwise.wire.objects import usage_object

COMPACT_PROMPT = (
    "You are compacting a conversation so that it can be continued later from a summary alone. "
    "Write a summary of the conversation so far that keeps everything needed to continue it: the "
    "user's goals, requests and preferences, the facts, names, numbers, code and decisions that were "
    "established, what was answered, what was done with tools and their results, and what is still "
    "open. Write it as notes, not as a reply to the user."
)
COMPACT_REQUEST = "Summarise the conversation above so that it can be continued later from the summary alone."
SUMMARY_HEADER = compaction.SUMMARY_HEADER
KEY_NAME = "compaction_key"


async def compaction_key(store: Repository, settings: Settings) -> bytes:
    """The key compaction items are signed with: `compaction_secret` when set, else 32 random
    bytes made on the first start on this database and kept there, so that every process and
    instance sharing the database accepts the items any of them made."""
    if settings.compaction_secret:
        return settings.compaction_secret.encode()
    return bytes.fromhex(await store.secret(KEY_NAME, lambda: secrets.token_hex(32)))


async def _user_messages(engine: Responses, plan: Plan) -> list[dict[str, Any]]:
    """The user messages of the history and the new input, in order, as stored."""
    items: list[dict[str, Any]] = []
    if plan.base is not None:
        items += [orjson.loads(row.data) for row in await engine.store.walk(plan.base, 0, plan.base_depth)]
    items += [it.wire or orjson.loads(it.data) for it in plan.inputs]
    return [it for it in items if it.get("type") == "message" and it.get("role") == "user"]


async def compact(engine: Responses, body: Any) -> dict[str, Any]:
    """POST /v1/responses/compact for a validated `CompactRequest` body."""
    shared = {k: getattr(body, k) for k in body.model_fields_set
              if k in ("input", "previous_response_id", "conversation")}
    plan = await messages_for(engine, model=body.model, **shared)
    history = orjson.loads(plan.chat.messages)
    system = COMPACT_PROMPT
    if body.instructions:
        system += "\n\nThe conversation was held under these instructions:\n" + body.instructions
    messages = [{"role": "system", "content": system}, *history, {"role": "user", "content": COMPACT_REQUEST}]
    try:
        cap = plan.req.max_output_tokens  # (a backend's default cap, when it has one)
        result = await engine.upstream.complete(plan, ChatRequest(
            model=body.model, messages=orjson.dumps(messages), params={"max_tokens": cap} if cap else {}))
    except BackendError as e:
        raise ModelFailed(f"The model failed to compact the conversation: {e.message}",
                          code="server_error") from None
    summary = result.choices[0].text.strip() if result.choices else ""
    if not summary:
        raise ModelFailed("The model returned an empty summary.", code="server_error")
    created = now()
    token = compaction.seal(engine.context.compaction_key,
                            {"summary": summary, "model": body.model, "created_at": created})
    output = [*await _user_messages(engine, plan),
              {"id": new_id("cmp"), "type": "compaction", "encrypted_content": token}]
    return {"id": new_id("resp"), "object": "response.compaction", "created_at": created, "output": output,
            "usage": usage_object(result.usage)}
