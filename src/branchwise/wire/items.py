"""Items: from request input to what is stored, and from model output to items.

Every stored item carries two serialisations made once, when it is created:
`data` (the item as it goes on the wire) and `chat` (the item as a Chat Completions message, or
None when the model never sees it). Building a model's context is then a byte splice of stored
`chat` blobs, and listing items a splice of `data` blobs: nothing stored is parsed again.
"""

from __future__ import annotations

from typing import Any

import orjson

from branchwise.core.chat import Choice
from branchwise.core.ids import new_id
from branchwise.core.tree import NewItem
from branchwise.wire import compaction
from branchwise.wire import models as m


def _make(wire: dict[str, Any], chat: dict[str, Any] | None) -> NewItem:
    return NewItem(
        item_id=wire["id"],
        type=wire["type"],
        role=wire.get("role"),
        status=wire.get("status"),
        wire=wire,
        data=orjson.dumps(wire),
        chat=None if chat is None else orjson.dumps(chat),
    )


def _chat_role(role: str) -> str:
    # Most Chat Completions servers (vLLM, llama.cpp, Ollama) know no "developer" role.
    return "system" if role == "developer" else role


def _wire_parts(role: str, content: str | list) -> list[dict[str, Any]]:
    if isinstance(content, str):
        if role == "assistant":
            return [{"type": "output_text", "text": content, "annotations": [], "logprobs": []}]
        return [{"type": "input_text", "text": content}]
    parts = []
    for p in content:
        d = p.model_dump(exclude_none=False)
        if d["type"] == "output_text":
            d["logprobs"] = d.get("logprobs") or []
        parts.append({k: v for k, v in d.items() if v is not None or k in ("type",)})
    return parts


def _chat_content(parts: list[dict[str, Any]]) -> str | list[dict[str, Any]]:
    """Chat Completions content: a plain string when there is only text."""
    if all(p["type"] in ("input_text", "output_text", "refusal") for p in parts):
        return "".join(p.get("text") or p.get("refusal") or "" for p in parts)
    out: list[dict[str, Any]] = []
    for p in parts:
        t = p["type"]
        if t in ("input_text", "output_text"):
            out.append({"type": "text", "text": p["text"]})
        elif t == "refusal":
            out.append({"type": "text", "text": p["refusal"]})
        elif t == "input_image":
            url = p.get("image_url") or p.get("file_id") or ""
            out.append({"type": "image_url", "image_url": {"url": url, "detail": p.get("detail", "auto")}})
        elif t == "input_file":
            f = {k: p[k] for k in ("file_id", "file_data", "filename") if p.get(k)}
            out.append({"type": "file", "file": f})
    return out


def from_input(item: Any) -> NewItem:
    """One validated input item (see `wire.models.InputItem`) as a new stored item.

    Input items always get fresh ids: an id is the name of one node's content, and a client
    that re-sends an item (copying a conversation, say) creates a new one."""
    if isinstance(item, m.Message):
        parts = _wire_parts(item.role, item.content)
        wire = {
            "id": new_id("msg"),
            "type": "message",
            "status": "completed",
            "role": item.role,
            "content": parts,
        }
        if item.phase is not None:  # Chat Completions has no phase: kept for the client, not the model
            wire["phase"] = item.phase
        return _make(wire, {"role": _chat_role(item.role), "content": _chat_content(parts)})
    if isinstance(item, m.FunctionCall):
        wire = {
            "id": new_id("fc"),
            "type": "function_call",
            "status": "completed",
            "call_id": item.call_id,
            "name": item.name,
            "arguments": item.arguments,
        }
        return _make(wire, _chat_tool_call(item.call_id, item.name, item.arguments))
    if isinstance(item, m.FunctionCallOutput):
        output = item.output if isinstance(item.output, str) else _wire_parts("user", item.output)
        wire = {
            "id": new_id("fco"),
            "type": "function_call_output",
            "status": "completed",
            "call_id": item.call_id,
            "output": output,
        }
        content = output if isinstance(output, str) else _chat_content(output)
        return _make(wire, {"role": "tool", "tool_call_id": item.call_id, "content": content})
    if isinstance(item, m.Reasoning):
        # absent rather than null: Open Responses types `content` as an array and
        # `encrypted_content` as a string, and OpenAI's SDK takes either as optional
        wire = {"id": new_id("rs"), "type": "reasoning", "summary": item.summary}
        if item.content is not None:
            wire["content"] = item.content
        if item.encrypted_content is not None:
            wire["encrypted_content"] = item.encrypted_content
        return _make(wire, None)
    # item_reference is resolved by the store, compaction checked by `compaction_item`'s caller
    raise TypeError(f"not an input item: {type(item).__name__}")


def compaction_item(encrypted_content: str, summary: str) -> NewItem:
    """A `compaction` item whose content was verified: kept as it came (the client sends it back
    verbatim), seen by the model as the summary it carries."""
    wire = {"id": new_id("cmp"), "type": "compaction", "encrypted_content": encrypted_content}
    return _make(wire, compaction.chat_message(summary))


def _chat_tool_call(call_id: str, name: str, arguments: str) -> dict[str, Any]:
    return {
        "role": "assistant",
        "content": None,
        "tool_calls": [{"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}],
    }


def from_choice(choice: Choice, status: str = "completed") -> list[NewItem]:
    """The output items of one model choice: reasoning, then the message, then tool calls."""
    out: list[NewItem] = []
    if choice.reasoning:
        out.append(output_reasoning(choice.reasoning))
    if choice.text or choice.refusal or not choice.tool_calls:
        out.append(output_message(choice.text, choice.refusal, status, logprobs=choice.logprobs))
    for call in choice.tool_calls:
        wire = {
            "id": new_id("fc"),
            "type": "function_call",
            "status": "completed",
            "call_id": call.id,
            "name": call.name,
            "arguments": call.arguments,
        }
        out.append(_make(wire, _chat_tool_call(call.id, call.name, call.arguments)))
    merge_tool_calls(out)
    return out


def merge_tool_calls(items: list[NewItem]) -> None:
    """Chat Completions wants one assistant message per turn: its text and every tool call it
    made together, then the tool results. The Responses API has one item each. So in each run of
    an assistant message and/or function calls (reasoning items between them are invisible to the
    model), the first item carries the whole assistant message and the others none."""
    i = 0
    while i < len(items):
        run = []
        j = i
        while j < len(items):
            it = items[j]
            if not it.wire:  # referenced content: keep its own message
                break
            if it.type == "function_call" or (it.type == "message" and it.role == "assistant" and not run):
                run.append(it)
            elif it.type != "reasoning":
                break
            j += 1
        calls = [it for it in run if it.type == "function_call"]
        if calls and len(run) > 1:
            text = "".join(p.get("text") or p.get("refusal") or "" for it in run if it.type == "message"
                           for p in it.wire["content"])
            merged = {
                "role": "assistant",
                "content": text or None,
                "tool_calls": [{"id": c.wire["call_id"], "type": "function",
                                "function": {"name": c.wire["name"], "arguments": c.wire["arguments"]}}
                               for c in calls],
            }
            run[0].chat = orjson.dumps(merged)
            for it in run[1:]:
                it.chat = None
        i = max(j, i + 1)


def output_reasoning(text: str, item_id: str | None = None) -> NewItem:
    """The model's reasoning as one `reasoning_text` part. It has no `encrypted_content` (there
    is nothing to encrypt; Open Responses types the field as a string, so it is left out rather
    than null) and is never sent back to a model."""
    return _make({"id": item_id or new_id("rs"), "type": "reasoning", "summary": [],
                  "content": [{"type": "reasoning_text", "text": text}], "status": "completed"}, None)


def output_message(text: str, refusal: str | None = None, status: str = "completed",
                   item_id: str | None = None, logprobs: list[dict[str, Any]] | None = None) -> NewItem:
    parts: list[dict[str, Any]] = []
    if text or not refusal:
        parts.append({"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs or []})
    if refusal:
        parts.append({"type": "refusal", "refusal": refusal})
    wire = {
        "id": item_id or new_id("msg"),
        "type": "message",
        "status": status,
        "role": "assistant",
        "content": parts,
    }
    return _make(wire, {"role": "assistant", "content": text or refusal or ""})


def instructions_message(instructions: str) -> bytes:
    return orjson.dumps({"role": "system", "content": instructions})
