"""Compaction. One chat call to the routed backend: a system message asking for a summary (with
the request's `instructions`, if any, as context), the conversation's messages, and a last user
message repeating the request (a model that sees a conversation ending on a user turn would
otherwise answer that turn). The output is plain input items, so it can be sent back as
`input` to continue: a `user` message whose text is the summary, followed by the user messages
that ended the conversation unanswered, kept verbatim.
"""


from __future__ import annotations

from typing import Any

import orjson

from branchwise.backends.base import BackendError
from branchwise.core.chat import ChatRequest
from branchwise.core.errors import ModelFailed
from branchwise.core.ids import new_id, now
from branchwise.services.responses import Responses
from branchwise.services.tokens import messages_for
from branchwise.wire.objects import usage_object

COMPACT_PROMPT = (
    "You are compacting a conversation so that it can be continued later from a summary alone. "
    "Write a summary of the conversation so far that keeps everything needed to continue it: the "
    "user's goals, requests and preferences, the facts, names, numbers, code and decisions that were "
    "established, what was answered, what was done with tools and their results, and what is still "
    "open. Write it as notes, not as a reply to the user."
)
COMPACT_REQUEST = "Summarise the conversation above so that it can be continued later from the summary alone."
SUMMARY_HEADER = "Summary of the conversation so far (compacted):\n\n"


def _input_parts(content: Any) -> list[dict[str, Any]]:
    """A Chat Completions user message's content as Responses input content parts."""
    if isinstance(content, str):
        return [{"type": "input_text", "text": content}]
    parts: list[dict[str, Any]] = []
    for p in content or []:
        if not isinstance(p, dict):
            continue
        if p.get("type") == "text":
            parts.append({"type": "input_text", "text": p.get("text") or ""})
        elif p.get("type") == "image_url":
            img = p.get("image_url") or {}
            parts.append({"type": "input_image", "image_url": img.get("url"), "detail": img.get("detail", "auto")})
        elif p.get("type") == "file":
            parts.append({"type": "input_file", **(p.get("file") or {})})
    return parts


def _user_item(parts: list[dict[str, Any]]) -> dict[str, Any]:
    return {"id": new_id("msg"), "type": "message", "status": "completed", "role": "user", "content": parts}


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
    tail = []  # the user messages after the last thing the model said: still unanswered
    for msg in reversed(history):
        if not isinstance(msg, dict) or msg.get("role") != "user":
            break
        tail.append(_user_item(_input_parts(msg.get("content"))))
    output = [_user_item([{"type": "input_text", "text": SUMMARY_HEADER + summary}]), *reversed(tail)]
    return {"id": new_id("resp"), "object": "response.compaction", "created_at": now(), "output": output,
            "usage": usage_object(result.usage)}
