"""Responses streaming events, all made by one `Builder`: the events of one response (one
alternative) from model deltas as they come (`Emitter`, a live stream), from the output items
of a stored response that was never streamed (`synthesize`: the same deltas, one per part), and
the terminal event of any Response object (`Builder.terminal`), including those made up after a
crash or a cancel. Every event is an SSE frame."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import orjson

from branchwise.core.chat import ChatDelta, Choice, ToolCall
from branchwise.core.ids import new_id
from branchwise.wire import items as witems
from branchwise.wire.objects import response_object, sse

INCOMPLETE = {"length": "max_output_tokens", "content_filter": "content_filter"}
"""Chat Completions finish reasons that make a Response `incomplete`, with its reason."""
TERMINAL_EVENTS = (b"event: response.completed\n", b"event: response.failed\n", b"event: response.incomplete\n")

Terminal = Callable[[list[dict[str, Any]]], list[bytes]]
"""The terminal frames of a finished response's alternatives (objects in alternative order)."""


def terminal_type(obj: dict[str, Any]) -> str:
    """The terminal event of a Response: OpenAI's stream has no cancelled event, so a cancelled
    response ends with `response.failed` (its Response says `cancelled`)."""
    return {"completed": "response.completed", "incomplete": "response.incomplete"}.get(
        obj["status"], "response.failed")


def terminals(builders: Sequence[Builder]) -> Terminal:
    """A `Terminal` that gives each alternative's Response its terminal event."""
    return lambda objs: [b.terminal(o) for b, o in zip(builders, objs, strict=True)]


def choice_deltas(c: Choice) -> list[ChatDelta]:
    """The deltas of a whole choice, one per part: what a model that does not stream would have
    streamed."""
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


def item_deltas(item: dict[str, Any]) -> list[ChatDelta]:
    """The deltas of a stored output item, one per content part."""
    kind = item["type"]
    if kind == "message":
        return [ChatDelta(text=p["text"], logprobs=p.get("logprobs") or None) if p["type"] == "output_text"
                else ChatDelta(refusal=p["refusal"]) for p in item.get("content") or []]
    if kind == "reasoning":
        return [ChatDelta(reasoning="".join(c.get("text", "") for c in item.get("content") or []))]
    return [ChatDelta(tool_index=0, tool_arguments=item["arguments"])]


class Seq:
    def __init__(self, start: int = 0) -> None:
        self.n = start - 1

    def next(self) -> int:
        self.n += 1
        return self.n


class Builder:
    """The events of one response (one alternative of a request): fed deltas, it opens, fills
    and closes output items and content parts, keeping `output_index` and `content_index` dense
    and in order. The alternatives of a request share one `Seq`; with `n` > 1 (`alternative` is
    not None) every event names its `response_id` and `alternative`."""

    def __init__(self, seq: Seq, response_id: str, alternative: int | None = None):
        self.seq = seq
        self.rid = response_id
        self.tag = alternative
        self.items: list[witems.NewItem] = []
        self.done_wire: list[dict[str, Any]] = []
        self.cur: dict[str, Any] | None = None  # the open item: {"kind", "wire", "text", ...}
        self.tool_calls: list[ToolCall] = []
        self.text = ""
        self.refusal: str | None = None
        self.reasoning: str | None = None

    def event(self, type: str, **fields: Any) -> bytes:
        ev = {"type": type, "sequence_number": self.seq.next(), **fields}
        if self.tag is not None:
            ev["response_id"] = self.rid
            ev["alternative"] = self.tag
        return sse(ev)

    def terminal(self, obj: dict[str, Any]) -> bytes:
        return self.event(terminal_type(obj), response=obj)

    @property
    def index(self) -> int:
        return len(self.done_wire)

    def feed(self, d: ChatDelta) -> list[bytes]:
        out: list[bytes] = []
        if d.reasoning:
            out += self._open("reasoning")
            self.cur["text"] += d.reasoning
            out.append(self.event("response.reasoning.delta", item_id=self.cur["id"],
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

    def _open(self, kind: str, item_id: str | None = None, **extra: Any) -> list[bytes]:
        if self.cur is not None and self.cur["kind"] == kind and kind != "function_call":
            return []
        out = self._close()
        if item_id is None:
            item_id = new_id({"reasoning": "rs", "message": "msg", "function_call": "fc"}[kind])
        self.cur = {"kind": kind, "id": item_id, "text": "", "refusal": "", "part": None, "ci": -1,
                    "logprobs": [], **extra}
        if kind == "message":
            wire = {"id": self.cur["id"], "type": "message", "status": "in_progress", "role": "assistant",
                    "content": []}
        elif kind == "reasoning":
            wire = {"id": self.cur["id"], "type": "reasoning", "summary": [], "content": [],
                    "status": "in_progress"}
        else:
            self.cur["call_id"] = extra.get("call_id") or new_id("call")
            wire = {"id": self.cur["id"], "type": "function_call", "status": "in_progress",
                    "call_id": self.cur["call_id"], "name": extra.get("name", ""), "arguments": ""}
        out.append(self.event("response.output_item.added", output_index=self.index, item=wire))
        if kind == "reasoning":  # its text streams in its one content part
            out.append(self.event("response.content_part.added", item_id=item_id, output_index=self.index,
                                  content_index=0, part={"type": "reasoning_text", "text": ""}))
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

    def _close(self, status: str = "completed", stored: dict[str, Any] | None = None) -> list[bytes]:
        """Close the open item. A replay passes the item as it is stored, which the last event
        carries instead of one made from the deltas."""
        cur = self.cur
        if cur is None:
            return []
        out: list[bytes] = []
        kind = cur["kind"]
        item = None
        if kind == "message":
            if cur["ci"] < 0:  # an empty message still has one (empty) text part
                out += self._part("output_text")
            out += self._close_part()
            if stored is None:
                item = witems.output_message(cur["text"], cur["refusal"] or None, status, item_id=cur["id"],
                                             logprobs=cur["logprobs"])
                self.text += cur["text"]
                if cur["refusal"]:
                    self.refusal = (self.refusal or "") + cur["refusal"]
        elif kind == "reasoning":
            out.append(self.event("response.reasoning.done", item_id=cur["id"], output_index=self.index,
                                  content_index=0, text=cur["text"]))
            out.append(self.event("response.content_part.done", item_id=cur["id"], output_index=self.index,
                                  content_index=0, part={"type": "reasoning_text", "text": cur["text"]}))
            if stored is None:
                item = witems.output_reasoning(cur["text"], cur["id"])
                self.reasoning = (self.reasoning or "") + cur["text"]
        else:
            out.append(self.event("response.function_call_arguments.done", item_id=cur["id"],
                                  output_index=self.index, name=cur["name"], arguments=cur["text"]))
            if stored is None:
                item = witems._make({"id": cur["id"], "type": "function_call", "status": "completed",
                                     "call_id": cur["call_id"], "name": cur["name"], "arguments": cur["text"]},
                                    witems._chat_tool_call(cur["call_id"], cur["name"], cur["text"]))
                self.tool_calls.append(ToolCall(cur["call_id"], cur["name"], cur["text"]))
        if item is not None:
            self.items.append(item)
            stored = item.wire
        out.append(self.event("response.output_item.done", output_index=self.index, item=stored))
        self.done_wire.append(stored)
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

    def replay(self, item: dict[str, Any]) -> list[bytes]:
        """A stored output item's events: the item opened, fed its deltas (one per part) and
        closed as it is stored."""
        kind = item.get("type")
        if kind not in ("message", "reasoning", "function_call"):  # no deltas: added, then done
            out = [self.event("response.output_item.added", output_index=self.index, item=item),
                   self.event("response.output_item.done", output_index=self.index, item=item)]
            self.done_wire.append(item)
            return out
        out = self._open(kind, item["id"], tool_index=0, call_id=item.get("call_id"), name=item.get("name", ""))
        for d in item_deltas(item):
            out += self.feed(d)
        return out + self._close(stored=item)


class Emitter(Builder):
    """A live stream's builder for one alternative of a plan."""

    def __init__(self, plan: Any, alternative: int = 0):
        super().__init__(plan.seq, plan.ids[alternative], alternative if plan.n > 1 else None)
        self.plan = plan
        self.alt = alternative

    def snapshot(self, status: str) -> dict[str, Any]:
        return response_object(self.plan.req, id=self.rid, created_at=self.plan.created_at,
                               status=status, output=list(self.done_wire))

    def choice(self, finish: str | None) -> Choice:
        return Choice(index=self.alt, text=self.text, refusal=self.refusal, reasoning=self.reasoning,
                      tool_calls=self.tool_calls, finish_reason=finish)


def synthesize(obj: dict[str, Any]) -> list[bytes]:
    """The events of a finished response that was not streamed (so has no log): what a stream
    of it would have sent, one delta per part, numbered from 0."""
    b = Builder(Seq(), obj["id"])
    start = {**obj, "status": "in_progress", "output": [], "usage": None, "error": None,
             "incomplete_details": None, "completed_at": None}
    frames = [b.event("response.created", response=start), b.event("response.in_progress", response=start)]
    for item in obj.get("output") or []:
        frames += b.replay(item)
    frames.append(b.terminal(obj))
    return frames


def tags(frame: bytes) -> int | None:
    """The `alternative` an event names (None: a response with one alternative)."""
    return orjson.loads(frame[frame.index(b"\ndata: ") + 7:]).get("alternative")
