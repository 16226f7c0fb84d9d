"""Running one POST /v1/responses: build the context, call a backend, emit events, commit.

The sequence, and why it is short:
1. `prepare` validates references and reads the base (one query for the conversation or the
   previous response, one recursive query for the path's Chat Completions messages).
2. The backend generates; no transaction is open meanwhile.
3. `_commit` writes input items, output items and the response row(s) in one transaction and
   moves the conversation head with a compare-and-swap from the base it started on.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson

from branchwise.backends.base import (
    Backend,
    BackendError,
    ChatDelta,
    ChatRequest,
    ChatResult,
    Choice,
    ToolCall,
    Usage,
)
from branchwise.backends.router import Router
from branchwise.engine.policy import Lease, Policies
from branchwise.ids import new_id, now
from branchwise.settings import Settings
from branchwise.store.queries import Conversation, Placed, Store, place
from branchwise.wire import items as witems
from branchwise.wire import models as m
from branchwise.wire.errors import InvalidRequest, NotFound
from branchwise.wire.objects import response_object, sse

INCOMPLETE = {"length": "max_output_tokens", "content_filter": "content_filter"}


@dataclass
class Plan:
    req: m.CreateResponse
    ids: list[str]
    created_at: int
    backend: Backend
    tree: str
    base: str | None
    base_depth: int
    conversation: Conversation | None
    inputs: list[witems.NewItem]
    chat: ChatRequest
    lease: Lease | None = None

    @property
    def n(self) -> int:
        return len(self.ids)


def _chat_params(req: m.CreateResponse) -> dict[str, Any]:
    p: dict[str, Any] = {}
    if req.temperature is not None:
        p["temperature"] = req.temperature
    if req.top_p is not None:
        p["top_p"] = req.top_p
    if req.max_output_tokens is not None:
        p["max_tokens"] = req.max_output_tokens
    if req.safety_identifier or req.user:
        p["user"] = req.safety_identifier or req.user
    if req.text is not None and req.text.format is not None:
        f = req.text.format
        if f.type == "json_schema":
            js: dict[str, Any] = {"name": f.name, "schema": f.schema_}
            if f.strict is not None:
                js["strict"] = f.strict
            if f.description:
                js["description"] = f.description
            p["response_format"] = {"type": "json_schema", "json_schema": js}
        elif f.type == "json_object":
            p["response_format"] = {"type": "json_object"}
    if req.tools:
        tools = []
        for t in req.tools:
            if t.get("type") != "function":
                raise InvalidRequest(f"Tool type '{t.get('type')}' is not supported; use 'function' tools.",
                                     param="tools", code="unsupported_tool")
            if not isinstance(t.get("name"), str):
                raise InvalidRequest("Missing required parameter: 'tools[].name'.", param="tools",
                                     code="missing_required_parameter")
            fn = {k: t[k] for k in ("name", "description", "parameters", "strict") if t.get(k) is not None}
            tools.append({"type": "function", "function": fn})
        p["tools"] = tools
    if req.tool_choice is not None:
        tc = req.tool_choice
        if isinstance(tc, dict) and tc.get("type") == "function":
            p["tool_choice"] = {"type": "function", "function": {"name": tc.get("name")}}
        else:
            p["tool_choice"] = tc
    if req.parallel_tool_calls is not None and req.tools:
        p["parallel_tool_calls"] = req.parallel_tool_calls
    if req.top_logprobs:
        p["logprobs"] = True
        p["top_logprobs"] = req.top_logprobs
    if req.reasoning and req.reasoning.get("effort"):
        p["reasoning_effort"] = req.reasoning["effort"]
    return p


class Engine:
    def __init__(self, store: Store, router: Router, settings: Settings, policies: Policies):
        self.store = store
        self.policies = policies
        self.router = router
        self.settings = settings

    # ------------------------------------------------------------------ prepare

    async def prepare(self, req: m.CreateResponse,
                      disconnected: Callable[[], Awaitable[bool]] | None = None) -> Plan:
        """Validate, take the conversation's lease when the policy needs one, read the context.
        Raises an APIError before anything is stored."""
        conv_id = req.conversation_id
        if req.previous_response_id and conv_id:
            raise InvalidRequest("Cannot use both 'previous_response_id' and 'conversation' in one request.",
                                 param="previous_response_id", code="invalid_parameters")
        if req.background and req.store is False:
            raise InvalidRequest("Background responses must be stored ('store' must not be false).",
                                 param="background")
        backend = self.router.backend(req.model)
        if backend is None:
            raise InvalidRequest(f"The model '{req.model}' does not exist or no upstream serves it.",
                                 param="model", code="model_not_found")
        raw = req.input
        if raw is None or raw == [] or raw == "":
            if not conv_id and not req.previous_response_id:
                raise InvalidRequest("Missing required parameter: 'input'.", param="input",
                                     code="missing_required_parameter")
            raw = []
        inputs = await self.input_items(raw)
        params = _chat_params(req)
        ids = [new_id("resp") for _ in range(req.n)]
        base: str | None = None
        base_depth = -1
        conversation: Conversation | None = None
        lease: Lease | None = None
        if conv_id:
            conversation, lease = await self._enter(conv_id, ids[0], req.concurrency, disconnected)
            base, base_depth, tree = conversation.head, conversation.head_depth, conversation.tree
        elif req.previous_response_id:
            prev = await self.store.response(req.previous_response_id)
            if prev is None:
                raise InvalidRequest(f"Previous response with id '{req.previous_response_id}' not found.",
                                     param="previous_response_id", code="previous_response_not_found")
            base, tree = prev.last_node, prev.tree
            base_depth = await self.store.node_depth(base)
        else:
            tree = ids[0]
        try:
            history = await self.store.path_chat(base)
        except BaseException:
            if lease is not None:
                await lease.release()
            raise
        parts = [witems.instructions_message(req.instructions)] if req.instructions else []
        if history:
            parts.append(history)
        parts += [c for c in (i.chat for i in inputs) if c is not None]
        chat = ChatRequest(model=req.model, messages=b"[" + b",".join(parts) + b"]", params=params, n=req.n)
        return Plan(req=req, ids=ids, created_at=now(), backend=backend, tree=tree, base=base,
                    base_depth=base_depth, conversation=conversation, inputs=inputs, chat=chat, lease=lease)

    async def _enter(self, conv_id: str, holder: str, concurrency: str | None,
                     disconnected: Callable[[], Awaitable[bool]] | None) -> tuple[Conversation, Lease | None]:
        """The conversation to run on, after its policy let this response in."""
        conversation = await self.store.conversation(conv_id)
        if conversation is None:
            raise NotFound(f"Conversation with id '{conv_id}' not found.", param="conversation")
        policy = concurrency or self.settings.default_concurrency
        lease = await self.policies.acquire(conv_id, holder, policy, disconnected)
        if lease is None:
            return conversation, None
        try:  # the head as it is now that this response is at the front of the line
            conversation = await self.store.conversation(conv_id)
            if conversation is None:
                raise NotFound(f"Conversation with id '{conv_id}' not found.", param="conversation")
        except BaseException:
            await lease.release()
            raise
        return conversation, lease

    async def input_items(self, raw: str | list, param: str = "input") -> list[witems.NewItem]:
        """New items for `raw` (a string, or validated input items); `item_reference`s are
        resolved to the stored content. `param` names the list in errors."""
        if isinstance(raw, str):
            return [witems.from_input(m.Message(role="user", content=raw))]
        refs = [it.id for it in raw if isinstance(it, m.ItemReference)]
        found = await self.store.items_by_id(refs) if refs else {}
        out = []
        for i, it in enumerate(raw):
            if isinstance(it, m.ItemReference):
                row = found.get(it.id)
                if row is None:
                    raise NotFound(f"Item with id '{it.id}' not found.", param=f"{param}[{i}].id",
                                   code="item_not_found")
                item_id, type_, role, status, data, chat = row
                out.append(witems.NewItem(item_id, type_, role, status, {}, data, chat))
            else:
                out.append(witems.from_input(it))
        return out

    # ------------------------------------------------------------------ generate

    async def _generate(self, plan: Plan) -> ChatResult:
        backend, chat = plan.backend, plan.chat
        if plan.n == 1 or backend.supports_n:
            result = await backend.complete(chat)
            if len(result.choices) < plan.n:
                raise BackendError(f"The upstream returned {len(result.choices)} choices for n={plan.n}.",
                                   code="upstream_error")
            return result
        one = ChatRequest(model=chat.model, messages=chat.messages, params=chat.params, n=1)
        results = await asyncio.gather(*(backend.complete(one) for _ in range(plan.n)))
        usage = Usage(
            input_tokens=results[0].usage.input_tokens,
            output_tokens=sum(r.usage.output_tokens for r in results),
            cached_tokens=results[0].usage.cached_tokens,
            reasoning_tokens=sum(r.usage.reasoning_tokens for r in results),
        )
        choices = []
        for i, r in enumerate(results):
            c = r.choices[0]
            c.index = i
            choices.append(c)
        return ChatResult(choices=choices, usage=usage)

    async def complete(self, plan: Plan) -> dict[str, Any]:
        """Run a non-streaming response; returns the Response object (alternative 0)."""
        try:
            try:
                result = await self._generate(plan)
            except BackendError as e:
                return await self._fail(plan, e)
            outputs = [witems.from_choice(c, "incomplete" if c.finish_reason in INCOMPLETE else "completed")
                       for c in result.choices[: plan.n]]
            return await self._commit(plan, result.choices[: plan.n], outputs, result.usage)
        finally:
            if plan.lease is not None:
                await asyncio.shield(plan.lease.release())

    # ------------------------------------------------------------------ commit

    def _usages(self, plan: Plan, usage: Usage) -> list[Usage]:
        """Per alternative: the same input, the output tokens shared out."""
        n = plan.n
        share, rest = divmod(usage.output_tokens, n)
        rshare, rrest = divmod(usage.reasoning_tokens, n)
        return [
            Usage(input_tokens=usage.input_tokens, cached_tokens=usage.cached_tokens,
                  output_tokens=share + (rest if i == 0 else 0),
                  reasoning_tokens=rshare + (rrest if i == 0 else 0))
            for i in range(n)
        ]

    async def _commit(self, plan: Plan, choices: list[Choice], outputs: list[list[witems.NewItem]],
                      usage: Usage) -> dict[str, Any]:
        req = plan.req
        completed = now()
        placed_inputs = place(plan.inputs, plan.base, plan.base_depth, plan.ids[0])
        input_node = placed_inputs[-1].node if placed_inputs else plan.base
        input_depth = placed_inputs[-1].depth if placed_inputs else plan.base_depth
        placed = list(placed_inputs)
        objs: list[dict[str, Any]] = []
        lasts: list[str | None] = []
        usages = self._usages(plan, usage)
        for i, (choice, out) in enumerate(zip(choices, outputs, strict=True)):
            chain = place(out, input_node, input_depth, plan.ids[i])
            placed.extend(chain)
            lasts.append(chain[-1].node if chain else input_node)
            reason = INCOMPLETE.get(choice.finish_reason or "")
            objs.append(response_object(
                req, id=plan.ids[i], created_at=plan.created_at,
                status="incomplete" if reason else "completed",
                output=[it.wire for it in out], usage=usages[i],
                incomplete_reason=reason, completed_at=completed,
            ))
        return await self._store(plan, objs, placed, input_node, len(placed_inputs), lasts)

    async def _store(self, plan: Plan, objs: list[dict[str, Any]], placed: list[Placed],
                     input_node: str | None, input_count: int, lasts: list[str | None]) -> dict[str, Any]:
        req = plan.req
        first = objs[0]
        if len(objs) > 1:
            first["alternatives"] = objs[1:]
        rows = []
        if req.store is not False:
            for obj, last in zip(objs, lasts, strict=True):
                rows.append({
                    "id": obj["id"], "status": obj["status"], "created_at": plan.created_at,
                    "conversation_id": req.conversation_id, "previous_response_id": req.previous_response_id,
                    "tree": plan.tree, "base_node": plan.base, "input_node": input_node,
                    "input_count": input_count, "last_node": last, "body": orjson.dumps(obj),
                })
        keep_items = req.store is not False or plan.conversation is not None
        move = plan.conversation is not None and first["status"] in ("completed", "incomplete")
        if rows or (keep_items and placed):
            await self.store.commit_response(
                tree=plan.tree, placed=placed if keep_items else [], response_rows=rows,
                conversation_id=plan.conversation.id if move and plan.conversation else None,
                base=plan.base, new_head=lasts[0] if move else None,
            )
        return first

    async def _fail(self, plan: Plan, e: BackendError) -> dict[str, Any]:
        """A failed upstream call: the response is stored `failed` with its input, the
        conversation head stays where it was."""
        placed_inputs = place(plan.inputs, plan.base, plan.base_depth, plan.ids[0])
        input_node = placed_inputs[-1].node if placed_inputs else plan.base
        objs = [
            response_object(plan.req, id=rid, created_at=plan.created_at, status="failed", output=[],
                            error={"code": e.code, "message": e.message})
            for rid in plan.ids
        ]
        keep = plan.req.store is not False
        return await self._store(plan, objs, placed_inputs if keep else [], input_node,
                                 len(placed_inputs), [input_node] * plan.n)

    # ------------------------------------------------------------------ stream

    async def stream(self, plan: Plan) -> AsyncIterator[bytes]:
        """Server-Sent Events, in OpenAI's order."""
        try:
            async for frame in self._stream(plan):
                yield frame
        finally:
            if plan.lease is not None:
                await asyncio.shield(plan.lease.release())

    async def _stream(self, plan: Plan) -> AsyncIterator[bytes]:
        if plan.n > 1:
            async for frame in self._stream_n(plan):
                yield frame
            return
        em = _Emitter(plan)
        yield em.event("response.created", response=em.snapshot("in_progress"))
        yield em.event("response.in_progress", response=em.snapshot("in_progress"))
        usage = Usage()
        finish: str | None = None
        try:
            async for d in plan.backend.stream(plan.chat):
                if d.usage is not None:
                    usage = d.usage
                    continue
                if d.finish_reason:
                    finish = d.finish_reason
                for frame in em.feed(d):
                    yield frame
        except BackendError as e:
            for frame in em.close_all(aborted=True):
                yield frame
            failed = await self._fail(plan, e)
            yield em.event("response.failed", response=failed)
            return
        for frame in em.close_all(incomplete=finish in INCOMPLETE):
            yield frame
        choice = em.choice(finish)
        final = await self._commit(plan, [choice], [em.items], usage)
        kind = "response.incomplete" if final["status"] == "incomplete" else "response.completed"
        yield em.event(kind, response=final)

    async def _stream_n(self, plan: Plan) -> AsyncIterator[bytes]:
        """n > 1 over SSE: every alternative's events interleaved in one stream; each event names
        its `response_id` and carries `alternative` (its index). Layout in docs/branching.md."""
        ems = [_Emitter(plan, i) for i in range(plan.n)]
        seq = _Seq()
        for em in ems:
            em.seq = seq
        for em in ems:
            yield em.event("response.created", response=em.snapshot("in_progress"))
        for em in ems:
            yield em.event("response.in_progress", response=em.snapshot("in_progress"))
        usage = Usage()
        finish: dict[int, str | None] = {}
        try:
            if plan.backend.supports_n:
                async for d in plan.backend.stream(plan.chat):
                    if d.usage is not None:
                        usage = d.usage
                        continue
                    if d.finish_reason:
                        finish[d.index] = d.finish_reason
                    if 0 <= d.index < plan.n:
                        for frame in ems[d.index].feed(d):
                            yield frame
            else:
                result = await self._generate(plan)
                usage = result.usage
                for c in result.choices:
                    finish[c.index] = c.finish_reason
                    for d in _choice_deltas(c):
                        for frame in ems[c.index].feed(d):
                            yield frame
        except BackendError as e:
            failed = await self._fail(plan, e)
            yield ems[0].event("response.failed", response=failed)
            return
        for i, em in enumerate(ems):
            for frame in em.close_all(incomplete=finish.get(i) in INCOMPLETE):
                yield frame
        final = await self._commit(plan, [em.choice(finish.get(i)) for i, em in enumerate(ems)],
                                   [em.items for em in ems], usage)
        alts = [final, *final.get("alternatives", [])]
        for em, obj in zip(ems, alts, strict=True):
            kind = "response.incomplete" if obj["status"] == "incomplete" else "response.completed"
            yield em.event(kind, response=obj)


def _choice_deltas(c: Choice) -> list[ChatDelta]:
    out = []
    if c.reasoning:
        out.append(ChatDelta(index=c.index, reasoning=c.reasoning))
    if c.text:
        out.append(ChatDelta(index=c.index, text=c.text))
    if c.refusal:
        out.append(ChatDelta(index=c.index, refusal=c.refusal))
    for k, t in enumerate(c.tool_calls):
        out.append(ChatDelta(index=c.index, tool_index=k, tool_call_id=t.id, tool_name=t.name))
        out.append(ChatDelta(index=c.index, tool_index=k, tool_arguments=t.arguments))
    return out


class _Seq:
    def __init__(self) -> None:
        self.n = -1

    def next(self) -> int:
        self.n += 1
        return self.n


class _Emitter:
    """Turns model deltas into OpenAI's output-item events for one response, keeping
    `output_index` and `content_index` dense and in order."""

    def __init__(self, plan: Plan, alternative: int = 0):
        self.plan = plan
        self.alt = alternative
        self.rid = plan.ids[alternative]
        self.seq = _Seq()
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
                out.append(self.event("response.output_text.delta", item_id=self.cur["id"],
                                      output_index=self.index, content_index=self.cur["ci"],
                                      delta=d.text, logprobs=[]))
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
                    **extra}
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
                                  content_index=cur["ci"], text=cur["text"], logprobs=[]))
            part = {"type": "output_text", "text": cur["text"], "annotations": [], "logprobs": []}
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
            item = witems.output_message(cur["text"], cur["refusal"] or None, status, item_id=cur["id"])
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
