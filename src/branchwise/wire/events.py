"""Responses streaming events: the output-item events of one response as a model produces
them (`Emitter`), and the whole sequence of a finished response that was never streamed
(`synthesize`), both as SSE frames."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from branchwise.core.chat import ChatDelta, Choice, ToolCall
from branchwise.core.ids import new_id
from branchwise.wire import items as witems
from branchwise.wire.objects import response_object, sse

INCOMPLETE = {"length": "max_output_tokens", "content_filter": "content_filter"}
"""Chat Completions finish reasons that make a Response `incomplete`, with its reason."""
TERMINAL_EVENTS = (b"event: response.completed\n", b"event: response.failed\n", b"event: response.incomplete\n")

Terminal = Callable[[list[dict[str, Any]]], list[bytes]]


def choice_deltas(c: Choice) -> list[ChatDelta]:
    out = []
    if c.reasoning:
        out.append(ChatDelta(index=c.index, reasoning=c.reasoning))
    if c.text:
        out.append(ChatDelta(index=c.index, text=c.text, logprobs=c.logprobs))
    if c.refusal:
        out.append(ChatDelta(index=c.index, refusal=c.refusal))
    for k, t in enumerate(c.tool_calls):
        out.append(ChatDelta(index=c.index, tool_index=k, tool_call_id=t.id, tool_name=t.name))
        out.append(ChatDelta(index=c.index, tool_index=k, tool_arguments=t.arguments))
    return out


class Seq:
    def __init__(self) -> None:
        self.n = -1

    def next(self) -> int:
        self.n += 1
        return self.n


class Emitter:
    """Turns model deltas into OpenAI's output-item events for one response, keeping
    `output_index` and `content_index` dense and in order."""

    def __init__(self, plan: Any, alternative: int = 0):
        self.plan = plan
        self.alt = alternative
        self.rid = plan.ids[alternative]
        self.seq = plan.seq
        self.items: list[witems.NewItem] = []
        self.done_wire: list[dict[str, Any]] = []
        self.cur: dict[str, Any] | None = None  # the open item: {"kind", "wire", "text", ...}
        self.tool_calls: list[ToolCall] = []
        self.text = ""
        self.refusal: str | None = None
        self.reasoning: str | None = None

    def event(self, type: str, **fields: Any) -> bytes:
        ev = {"type": type, "sequence_number": self.seq.next(), **fields}
        if self.plan.n > 1:
            ev["response_id"] = self.rid
            ev["alternative"] = self.alt
        return sse(ev)

    def snapshot(self, status: str) -> dict[str, Any]:
        return response_object(self.plan.req, id=self.rid, created_at=self.plan.created_at,
                               status=status, output=list(self.done_wire))

    @property
    def index(self) -> int:
        return len(self.done_wire)

    def feed(self, d: ChatDelta) -> list[bytes]:
        out: list[bytes] = []
        if d.reasoning:
            out += self._open("reasoning")
            self.cur["text"] += d.reasoning
            out.append(self.event("response.reasoning_text.delta", item_id=self.cur["id"],
                                  output_index=self.index, content_index=0, delta=d.reasoning))
        if d.text or d.refusal:
            out += self._open("message")
            if d.text:
                out += self._part("output_text")
                self.cur["text"] += d.text
                if d.logprobs:
                    self.cur["logprobs"] += d.logprobs
                out.append(self.event("response.output_text.delta", item_id=self.cur["id"],
                                      output_index=self.index, content_index=self.cur["ci"],
                                      delta=d.text, logprobs=d.logprobs or []))
            if d.refusal:
                out += self._part("refusal")
                self.cur["refusal"] += d.refusal
                out.append(self.event("response.refusal.delta", item_id=self.cur["id"],
                                      output_index=self.index, content_index=self.cur["ci"], delta=d.refusal))
        if d.tool_index is not None:
            if d.tool_call_id or self.cur is None or self.cur["kind"] != "function_call" \
                    or self.cur["tool_index"] != d.tool_index:
                out += self._close()
                out += self._open("function_call", tool_index=d.tool_index, call_id=d.tool_call_id,
                                  name=d.tool_name or "")
            if d.tool_arguments:
                self.cur["text"] += d.tool_arguments
                out.append(self.event("response.function_call_arguments.delta", item_id=self.cur["id"],
                                      output_index=self.index, delta=d.tool_arguments))
        return out

    def _open(self, kind: str, **extra: Any) -> list[bytes]:
        if self.cur is not None and self.cur["kind"] == kind and kind != "function_call":
            return []
        out = self._close()
        prefix = {"reasoning": "rs", "message": "msg", "function_call": "fc"}[kind]
        self.cur = {"kind": kind, "id": new_id(prefix), "text": "", "refusal": "", "part": None, "ci": -1,
                    "logprobs": [], **extra}
        if kind == "message":
            wire = {"id": self.cur["id"], "type": "message", "status": "in_progress", "role": "assistant",
                    "content": []}
        elif kind == "reasoning":
            wire = {"id": self.cur["id"], "type": "reasoning", "summary": [], "content": [],
                    "encrypted_content": None, "status": "in_progress"}
        else:
            self.cur["call_id"] = extra.get("call_id") or new_id("call")
            wire = {"id": self.cur["id"], "type": "function_call", "status": "in_progress",
                    "call_id": self.cur["call_id"], "name": extra.get("name", ""), "arguments": ""}
        out.append(self.event("response.output_item.added", output_index=self.index, item=wire))
        return out

    def _part(self, kind: str) -> list[bytes]:
        cur = self.cur
        if cur["part"] == kind:
            return []
        out = self._close_part()
        cur["part"] = kind
        cur["ci"] += 1
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []} if kind == "output_text" \
            else {"type": "refusal", "refusal": ""}
        out.append(self.event("response.content_part.added", item_id=cur["id"], output_index=self.index,
                              content_index=cur["ci"], part=part))
        return out

    def _close_part(self) -> list[bytes]:
        cur = self.cur
        if cur is None or cur["part"] is None:
            return []
        out = []
        if cur["part"] == "output_text":
            out.append(self.event("response.output_text.done", item_id=cur["id"], output_index=self.index,
                                  content_index=cur["ci"], text=cur["text"], logprobs=cur["logprobs"]))
            part = {"type": "output_text", "text": cur["text"], "annotations": [], "logprobs": cur["logprobs"]}
        else:
            out.append(self.event("response.refusal.done", item_id=cur["id"], output_index=self.index,
                                  content_index=cur["ci"], refusal=cur["refusal"]))
            part = {"type": "refusal", "refusal": cur["refusal"]}
        out.append(self.event("response.content_part.done", item_id=cur["id"], output_index=self.index,
                              content_index=cur["ci"], part=part))
        cur["part"] = None
        return out

    def _close(self, status: str = "completed") -> list[bytes]:
        cur = self.cur
        if cur is None:
            return []
        out: list[bytes] = []
        kind = cur["kind"]
        if kind == "message":
            if cur["ci"] < 0:  # an empty message still has one (empty) text part
                out += self._part("output_text")
            out += self._close_part()
            item = witems.output_message(cur["text"], cur["refusal"] or None, status, item_id=cur["id"],
                                         logprobs=cur["logprobs"])
            self.text += cur["text"]
            if cur["refusal"]:
                self.refusal = (self.refusal or "") + cur["refusal"]
        elif kind == "reasoning":
            out.append(self.event("response.reasoning_text.done", item_id=cur["id"], output_index=self.index,
                                  content_index=0, text=cur["text"]))
            item = witems._make({"id": cur["id"], "type": "reasoning", "summary": [],
                                 "content": [{"type": "reasoning_text", "text": cur["text"]}],
                                 "encrypted_content": None, "status": None}, None)
            self.reasoning = (self.reasoning or "") + cur["text"]
        else:
            out.append(self.event("response.function_call_arguments.done", item_id=cur["id"],
                                  output_index=self.index, name=cur["name"], arguments=cur["text"]))
            item = witems._make({"id": cur["id"], "type": "function_call", "status": "completed",
                                 "call_id": cur["call_id"], "name": cur["name"], "arguments": cur["text"]},
                                witems._chat_tool_call(cur["call_id"], cur["name"], cur["text"]))
            self.tool_calls.append(ToolCall(cur["call_id"], cur["name"], cur["text"]))
        out.append(self.event("response.output_item.done", output_index=self.index, item=item.wire))
        self.items.append(item)
        self.done_wire.append(item.wire)
        self.cur = None
        return out

    def close_all(self, incomplete: bool = False, aborted: bool = False) -> list[bytes]:
        if aborted:
            self.cur = None
            return []
        out = []
        if not self.items and self.cur is None:
            out += self._open("message")
        if self.cur is not None and self.cur["kind"] == "message":
            out += self._close("incomplete" if incomplete else "completed")
        else:
            out += self._close()
        return out

    def choice(self, finish: str | None) -> Choice:
        return Choice(index=self.alt, text=self.text, refusal=self.refusal, reasoning=self.reasoning,
                      tool_calls=self.tool_calls, finish_reason=finish)


def terminalsse(obj: dict, seq: int) -> bytes:
    kind = {"completed": "response.completed", "incomplete": "response.incomplete"}.get(
        obj["status"], "response.failed")
    return sse({"type": kind, "sequence_number": seq, "response": obj})


def synthesize(obj: dict) -> list[bytes]:
    """The event sequence of a finished response that was not streamed (so has no log): what a
    stream of it would have sent, one delta per part."""
    events: list[dict] = []
    start = {**obj, "status": "in_progress", "output": [], "usage": None, "error": None,
             "incomplete_details": None, "completed_at": None}
    events.append({"type": "response.created", "response": start})
    events.append({"type": "response.in_progress", "response": start})
    for oi, item in enumerate(obj.get("output") or []):
        kind = item.get("type")
        if kind == "message":
            events.append({"type": "response.output_item.added", "output_index": oi,
                           "item": {**item, "status": "in_progress", "content": []}})
            for ci, part in enumerate(item.get("content") or []):
                common = {"item_id": item["id"], "output_index": oi, "content_index": ci}
                if part["type"] == "output_text":
                    empty = {**part, "text": "", "annotations": [], "logprobs": []}
                    events.append({"type": "response.content_part.added", **common, "part": empty})
                    events.append({"type": "response.output_text.delta", **common, "delta": part["text"],
                                   "logprobs": []})
                    events.append({"type": "response.output_text.done", **common, "text": part["text"],
                                   "logprobs": []})
                else:
                    events.append({"type": "response.content_part.added", **common,
                                   "part": {"type": "refusal", "refusal": ""}})
                    events.append({"type": "response.refusal.delta", **common, "delta": part["refusal"]})
                    events.append({"type": "response.refusal.done", **common, "refusal": part["refusal"]})
                events.append({"type": "response.content_part.done", **common, "part": part})
        elif kind == "function_call":
            events.append({"type": "response.output_item.added", "output_index": oi,
                           "item": {**item, "status": "in_progress", "arguments": ""}})
            events.append({"type": "response.function_call_arguments.delta", "item_id": item["id"],
                           "output_index": oi, "delta": item["arguments"]})
            events.append({"type": "response.function_call_arguments.done", "item_id": item["id"],
                           "output_index": oi, "name": item["name"], "arguments": item["arguments"]})
        elif kind == "reasoning":
            events.append({"type": "response.output_item.added", "output_index": oi,
                           "item": {**item, "content": [], "status": "in_progress"}})
            text = "".join(c.get("text", "") for c in item.get("content") or [])
            common = {"item_id": item["id"], "output_index": oi, "content_index": 0}
            events.append({"type": "response.reasoning_text.delta", **common, "delta": text})
            events.append({"type": "response.reasoning_text.done", **common, "text": text})
        else:
            events.append({"type": "response.output_item.added", "output_index": oi, "item": item})
        events.append({"type": "response.output_item.done", "output_index": oi, "item": item})
    frames = []
    for seq, ev in enumerate(events):
        frames.append(sse({**ev, "sequence_number": seq}))
    frames.append(terminalsse(obj, len(events)))
    return frames
