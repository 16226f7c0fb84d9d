"""Wire objects branchwise sends: Response, Conversation, lists, SSE frames."""

from __future__ import annotations

from typing import Any

import orjson

from branchwise.core.chat import Usage
from branchwise.wire.models import CreateResponse


def usage_object(u: Usage | None) -> dict[str, Any] | None:
    if u is None:
        return None
    return {
        "input_tokens": u.input_tokens,
        "input_tokens_details": {"cached_tokens": u.cached_tokens, "cache_write_tokens": 0},
        "output_tokens": u.output_tokens,
        "output_tokens_details": {"reasoning_tokens": u.reasoning_tokens},
        "total_tokens": u.input_tokens + u.output_tokens,
    }


# OpenAI's `ResponseErrorCode` enum. Strict clients (the SDK's own types) reject any other code in a
# Response's `error`, so a backend's own codes (`upstream_error`, ...) go out as `server_error`; the
# message keeps the detail.
RESPONSE_ERROR_CODES = frozenset({
    "server_error", "rate_limit_exceeded", "invalid_prompt", "data_residency_mismatch", "bio_policy",
    "vector_store_timeout", "invalid_image", "invalid_image_format", "invalid_base64_image",
    "invalid_image_url", "image_too_large", "image_too_small", "image_parse_error",
    "image_content_policy_violation", "invalid_image_mode", "image_file_too_large",
    "unsupported_image_media_type", "empty_image_file", "failed_to_download_image", "image_file_not_found",
})


def error_object(error: dict[str, Any] | None) -> dict[str, Any] | None:
    if error is None:
        return None
    code = error.get("code")
    return {"code": code if code in RESPONSE_ERROR_CODES else "server_error",
            "message": str(error.get("message") or "The model failed to generate a response.")}


def _text_param(req: CreateResponse) -> dict[str, Any]:
    fmt: dict[str, Any] = {"type": "text"}
    verbosity = "medium"
    if req.text is not None:
        verbosity = req.text.verbosity or "medium"
        if req.text.format is not None:
            f = req.text.format
            fmt = {"type": f.type}
            if f.type == "json_schema":
                # `strict` is a boolean in the Response (Open Responses requires it), false unless asked
                fmt.update(name=f.name, schema=f.schema_, description=f.description, strict=bool(f.strict))
    return {"format": fmt, "verbosity": verbosity}


def _tool(t: Any) -> dict[str, Any]:
    return {"type": "function", "name": t.name, "description": t.description, "parameters": t.parameters,
            "strict": True if t.strict is None else t.strict}


def _tool_choice(req: CreateResponse) -> Any:
    tc = req.tool_choice
    if tc is None:
        return "auto"
    if isinstance(tc, str):
        return tc
    if tc.type == "allowed_tools":
        return {"type": "allowed_tools", "mode": tc.mode or "auto",
                "tools": [{"type": "function", "name": t.name} for t in tc.tools]}
    return {"type": "function", "name": tc.name}


def _prompt(req: CreateResponse) -> dict[str, Any]:
    """The `prompt` as used: its id, the version that was used, the variables given."""
    p = req.prompt
    variables = None if p.variables is None else {
        k: v if isinstance(v, str) else v.model_dump(exclude_none=True) for k, v in p.variables.items()}
    return {"id": p.id, "version": p.version, "variables": variables}


def response_object(
    req: CreateResponse,
    *,
    id: str,
    created_at: int,
    status: str,
    output: list[dict[str, Any]],
    usage: Usage | None = None,
    error: dict[str, Any] | None = None,
    incomplete_reason: str | None = None,
    completed_at: int | None = None,
) -> dict[str, Any]:
    """Every field of OpenAI's Response schema, null where unknown."""
    conv = req.conversation_id
    return {
        "id": id,
        "object": "response",
        "created_at": created_at,
        "status": status,
        "background": bool(req.background),
        "completed_at": completed_at,
        "conversation": {"id": conv} if conv else None,
        "error": error_object(error),
        "frequency_penalty": 0.0 if req.frequency_penalty is None else req.frequency_penalty,
        "incomplete_details": {"reason": incomplete_reason} if incomplete_reason else None,
        "instructions": req.instructions,
        "max_output_tokens": req.max_output_tokens,
        "max_tool_calls": req.max_tool_calls,
        "metadata": req.metadata or {},
        "model": req.model,
        "output": output,
        "parallel_tool_calls": True if req.parallel_tool_calls is None else req.parallel_tool_calls,
        "presence_penalty": 0.0 if req.presence_penalty is None else req.presence_penalty,
        "previous_response_id": req.previous_response_id,
        "prompt": None if req.prompt is None else _prompt(req),
        "prompt_cache_key": req.prompt_cache_key,
        "prompt_cache_retention": req.prompt_cache_retention,
        "reasoning": {"effort": req.reasoning.effort if req.reasoning else None,
                      "summary": (req.reasoning.summary or req.reasoning.generate_summary) if req.reasoning else None},
        "safety_identifier": req.safety_identifier,
        "service_tier": req.service_tier or "default",
        "store": True if req.store is None else req.store,
        "temperature": 1.0 if req.temperature is None else req.temperature,
        "text": _text_param(req),
        "tool_choice": _tool_choice(req),
        "tools": [_tool(t) for t in req.tools or []],
        "top_logprobs": req.top_logprobs if req.top_logprobs is not None else 0,
        "top_p": 1.0 if req.top_p is None else req.top_p,
        "truncation": req.truncation or "disabled",
        "usage": usage_object(usage),
        "user": req.user,
    }


def conversation_object(conv_id: str, created_at: int, metadata: str | dict, head_item: str | None,
                        forked_from_conversation: str | None, forked_from_item: str | None) -> dict[str, Any]:
    return {
        "id": conv_id,
        "object": "conversation",
        "created_at": created_at,
        "metadata": orjson.loads(metadata) if isinstance(metadata, str) else metadata,
        "head": head_item,
        "forked_from": (
            {"conversation_id": forked_from_conversation, "item_id": forked_from_item}
            if forked_from_conversation
            else None
        ),
    }


def item_list(datas: list[bytes], first_id: str | None, last_id: str | None, has_more: bool) -> bytes:
    """A `list` object spliced from stored item blobs: no stored item is parsed."""
    return b"".join((
        b'{"object":"list","data":[', b",".join(datas), b'],"first_id":', orjson.dumps(first_id),
        b',"last_id":', orjson.dumps(last_id), b',"has_more":', b"true" if has_more else b"false", b"}",
    ))


def sse(event: dict[str, Any]) -> bytes:
    """One Server-Sent Event, written in one piece."""
    return b"event: " + event["type"].encode() + b"\ndata: " + orjson.dumps(event) + b"\n\n"


def sse_data(frame: bytes) -> bytes:
    """The event of an `sse` frame without its framing: the JSON object, as a WebSocket message
    carries it."""
    return frame[frame.index(b"\ndata: ") + 7:-2]
