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
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
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
from branchwise.engine.runs import TERMINAL, Run, Runs
from branchwise.ids import new_id, now
from branchwise.settings import Settings
from branchwise.store.paths import extend as extend_path
from branchwise.store.queries import Conversation, Placed, Store, place
from branchwise.wire import items as witems
from branchwise.wire import models as m
from branchwise.wire.errors import APIError, InvalidRequest, NotFound
from branchwise.wire.objects import response_object, sse

log = logging.getLogger("branchwise.engine")

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
    params: dict[str, Any]
    chat: ChatRequest | None = None
    history: bytes | None = None  # the base's messages, when already read
    lease: Lease | None = None
    run: Run | None = None  # set when the response outlives its request (stored stream, background)
    seq: _Seq = field(default_factory=lambda: _Seq())  # sequence_number, shared by the alternatives
    terminal_frames: list[bytes] = field(default_factory=list)
    upstream_s: float = 0.0  # seconds spent waiting for the model (for Server-Timing)
    body: bytes | None = None  # the stored Response (alternative 0) as serialised for its row

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
        p["tools"] = [
            {"type": "function", "function": {k: v for k, v in (
                ("name", t.name), ("description", t.description), ("parameters", t.parameters), ("strict", t.strict),
            ) if v is not None}}
            for t in req.tools
        ]
    tc = req.tool_choice
    if tc is not None:
        if isinstance(tc, str):
            p["tool_choice"] = tc
        else:
            if not any(t.name == tc.name for t in req.tools or []):
                raise InvalidRequest(f"Tool choice '{tc.name}' is not one of the provided tools.",
                                     param="tool_choice", code="invalid_value")
            p["tool_choice"] = {"type": "function", "function": {"name": tc.name}}
        if tc == "required" and not req.tools:
            raise InvalidRequest("tool_choice 'required' needs 'tools'.", param="tool_choice", code="invalid_value")
    if req.parallel_tool_calls is not None and req.tools:
        p["parallel_tool_calls"] = req.parallel_tool_calls
    if req.top_logprobs:
        p["logprobs"] = True
        p["top_logprobs"] = req.top_logprobs
    if req.reasoning is not None and req.reasoning.effort:
        p["reasoning_effort"] = req.reasoning.effort
    if req.prompt_cache_key:
        p["prompt_cache_key"] = req.prompt_cache_key
    if req.service_tier:
        p["service_tier"] = req.service_tier
    return p


class Engine:
    def __init__(self, store: Store, router: Router, settings: Settings, policies: Policies, runs: Runs):
        self.store = store
        self.policies = policies
        self.router = router
        self.settings = settings
        self.runs = runs

    # ------------------------------------------------------------------ prepare

    async def prepare(self, req: m.CreateResponse,
                      disconnected: Callable[[], Awaitable[bool]] | None = None) -> Plan:
        """`validate`, then `enter`: everything before the model runs. Raises an APIError
        before anything is stored."""
        plan = await self.validate(req)
        await self.enter(plan, disconnected)
        return plan

    async def validate(self, req: m.CreateResponse) -> Plan:
        """Check the request and resolve what it names (conversation, previous response, item
        references, model). Takes no lease and reads no history yet."""
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
        base_type: str | None = None
        conversation: Conversation | None = None
        history: bytes | None = None
        if conv_id:
            policy = req.concurrency or self.settings.default_concurrency
            if policy == "branch" and not req.background:  # the history it will run on: read it now
                conversation, history = await self.store.conversation_with_history(conv_id)
            else:
                conversation = await self.store.conversation(conv_id)
            if conversation is None:
                raise NotFound(f"Conversation with id '{conv_id}' not found.", param="conversation")
            base, base_depth, tree = conversation.head, conversation.head_depth, conversation.tree
        elif req.previous_response_id:
            prev = await self.store.response(req.previous_response_id)
            if prev is None:
                raise InvalidRequest(f"Previous response with id '{req.previous_response_id}' not found.",
                                     param="previous_response_id", code="previous_response_not_found")
            base, tree = prev.last_node, prev.tree
            base_depth, base_type = await self.store.node_info(base)
        else:
            tree = ids[0]
        if base is not None and (conversation.head_type if conversation else base_type) == "function_call":
            await self._check_tool_output(base, inputs)
        return Plan(req=req, ids=ids, created_at=now(), backend=backend, tree=tree, base=base,
                    base_depth=base_depth, conversation=conversation, inputs=inputs, params=params,
                    history=history)

    async def _check_tool_output(self, base: str, inputs: list[witems.NewItem]) -> None:
        """A history that ends in a function call can only go on with that call's output, as in
        OpenAI's API. (branchwise's way out: fork, or move the head, to before the call.)"""
        data = await self.store.node_data(base)
        call_id = orjson.loads(data).get("call_id") if data else None
        answered = {it.wire.get("call_id") for it in inputs if it.type == "function_call_output"}
        if call_id and call_id not in answered:
            raise InvalidRequest(f"No tool output found for function call {call_id}.", param="input",
                                 code="tool_output_missing")

    async def enter(self, plan: Plan, disconnected: Callable[[], Awaitable[bool]] | None = None) -> None:
        """Take the conversation's lease when its policy needs one (waiting in line for `queue`),
        then read the history the model will see."""
        req = plan.req
        if plan.conversation is not None:
            policy = req.concurrency or self.settings.default_concurrency
            plan.lease = await self.policies.acquire(plan.conversation.id, plan.ids[0], policy, disconnected)
        try:
            if plan.lease is not None:  # the head as it is now that this response is at the front
                conv = await self.store.conversation(plan.conversation.id)
                if conv is None:
                    raise NotFound(f"Conversation with id '{plan.conversation.id}' not found.",
                                   param="conversation")
                plan.conversation = conv
                plan.base, plan.base_depth = conv.head, conv.head_depth
                plan.history = None
            history = plan.history if plan.history is not None else await self.store.path_chat(plan.base)
            plan.history = history
        except BaseException:
            await self._release(plan)
            raise
        parts = [witems.instructions_message(req.instructions)] if req.instructions else []
        if history:
            parts.append(history)
        new = [c for c in (i.chat for i in plan.inputs) if c is not None]
        parts += new
        plan.chat = ChatRequest(model=req.model, messages=b"[" + b",".join(parts) + b"]", params=plan.params,
                                n=req.n)
        window = self.router.context_window(req.model)
        if window:
            try:
                await self._fit(plan, window, fixed_head=1 if req.instructions else 0, fixed_tail=len(new))
            except BaseException:
                await self._release(plan)
                raise

    async def _count(self, plan: Plan, messages: bytes) -> int:
        count = getattr(plan.backend, "count_tokens", None)
        if count is not None:
            return await count(messages, plan.params)
        return estimate_tokens(messages)

    async def _fit(self, plan: Plan, window: int, fixed_head: int, fixed_tail: int) -> None:
        """`truncation`: `disabled` refuses an input that does not fit the model's context window
        (leaving room for `max_output_tokens`); `auto` drops the oldest history items until it fits."""
        req = plan.req
        limit = window - (req.max_output_tokens or 0)
        tokens = await self._count(plan, plan.chat.messages)
        if tokens <= limit:
            return
        too_long = InvalidRequest(
            f"Your input ({tokens} tokens) exceeds the context window of this model ({window} tokens, "
            f"{req.max_output_tokens or 0} kept for the output). Shorten the input, or use truncation 'auto'.",
            param="input", code="context_length_exceeded")
        if req.truncation != "auto":
            raise too_long
        msgs = orjson.loads(plan.chat.messages)
        head, body, tail = msgs[:fixed_head], msgs[fixed_head:len(msgs) - fixed_tail], msgs[len(msgs) - fixed_tail:]
        while body and tokens > limit:
            body.pop(0)
            while body and body[0].get("role") == "tool":  # a tool result without its call
                body.pop(0)
            plan.chat.messages = orjson.dumps(head + body + tail)
            tokens = await self._count(plan, plan.chat.messages)
        if tokens > limit:
            raise too_long

    @staticmethod
    async def _release(plan: Plan) -> None:
        if plan.lease is not None:
            await asyncio.shield(plan.lease.release())

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
        witems.merge_tool_calls(out)
        return out

    # ------------------------------------------------------------------ generate

    async def _generate(self, plan: Plan) -> ChatResult:
        started = time.perf_counter()
        try:
            return await self._generate_now(plan)
        finally:
            plan.upstream_s += time.perf_counter() - started

    async def _generate_now(self, plan: Plan) -> ChatResult:
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
        """Run a non-streaming response in the request; returns the Response (alternative 0)."""
        try:
            try:
                result = await self._generate(plan)
            except BackendError as e:
                return (await self._fail(plan, e.code, e.message))[0]
            if plan.req.max_tool_calls is not None:
                for c in result.choices:
                    del c.tool_calls[plan.req.max_tool_calls:]
            outputs = [witems.from_choice(c, "incomplete" if c.finish_reason in INCOMPLETE else "completed")
                       for c in result.choices[: plan.n]]
            return (await self._commit(plan, result.choices[: plan.n], outputs, result.usage))[0]
        finally:
            await self._release(plan)

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
                      usage: Usage, terminal: Terminal | None = None) -> list[dict[str, Any]]:
        req = plan.req
        completed = now()
        placed_inputs = place(plan.inputs, plan.base, plan.base_depth, plan.ids[0])
        input_node = placed_inputs[-1].node if placed_inputs else plan.base
        input_depth = placed_inputs[-1].depth if placed_inputs else plan.base_depth
        placed = list(placed_inputs)
        objs: list[dict[str, Any]] = []
        lasts: list[str | None] = []
        usages = self._usages(plan, usage)
        # the new branches' histories, for the path cache once they are stored
        with_inputs = None
        if self.store.paths is not None and plan.history is not None:
            with_inputs = extend_path(plan.history, [p.item.chat for p in placed_inputs])
        paths: list[tuple[str, bytes]] = []
        for i, (choice, out) in enumerate(zip(choices, outputs, strict=True)):
            chain = place(out, input_node, input_depth, plan.ids[i])
            placed.extend(chain)
            lasts.append(chain[-1].node if chain else input_node)
            if with_inputs is not None and lasts[-1] is not None:
                paths.append((lasts[-1], extend_path(with_inputs, [p.item.chat for p in chain])))
            reason = INCOMPLETE.get(choice.finish_reason or "")
            objs.append(response_object(
                req, id=plan.ids[i], created_at=plan.created_at,
                status="incomplete" if reason else "completed",
                output=[it.wire for it in out], usage=usages[i],
                incomplete_reason=reason, completed_at=completed,
            ))
        return await self._store(plan, objs, placed, input_node, len(placed_inputs), lasts, terminal, paths)

    async def _store(self, plan: Plan, objs: list[dict[str, Any]], placed: list[Placed],
                     input_node: str | None, input_count: int, lasts: list[str | None],
                     terminal: Terminal | None = None,
                     paths: Sequence[tuple[str, bytes]] = ()) -> list[dict[str, Any]]:
        """One transaction: items, response rows, the run's last events and terminal events,
        and the head's compare-and-swap."""
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
        if rows:
            plan.body = rows[0]["body"]  # the reply reuses it: the object is serialised once
        events: list[dict] = []
        if terminal is not None:
            frames = terminal(objs)
            if plan.run is not None:
                events = await plan.run.drain(frames)
            plan.terminal_frames = frames
        keep_items = req.store is not False or plan.conversation is not None
        move = plan.conversation is not None and first["status"] in ("completed", "incomplete")
        if rows or events or (keep_items and placed):
            await self.store.commit_response(
                tree=plan.tree, placed=placed if keep_items else [], response_rows=rows,
                conversation_id=plan.conversation.id if move and plan.conversation else None,
                base=plan.base, new_head=lasts[0] if move else None,
                update_existing=plan.run is not None, events=events,
            )
            if keep_items and placed:  # (`paths` is empty when the cache is off)
                for node, history in paths:
                    if history:
                        self.store.paths.put(node, history)
        return objs

    async def _fail(self, plan: Plan, code: str, message: str | None, status: str = "failed",
                    terminal: Terminal | None = None) -> list[dict[str, Any]]:
        """A response that did not finish (upstream failure, cancel): stored with its input,
        the conversation's head stays where it was."""
        placed_inputs = place(plan.inputs, plan.base, plan.base_depth, plan.ids[0])
        input_node = placed_inputs[-1].node if placed_inputs else plan.base
        error = None if status == "cancelled" else {"code": code, "message": message}
        objs = [
            response_object(plan.req, id=rid, created_at=plan.created_at, status=status, output=[], error=error)
            for rid in plan.ids
        ]
        keep = plan.req.store is not False
        return await self._store(plan, objs, placed_inputs if keep else [], input_node,
                                 len(placed_inputs), [input_node] * plan.n, terminal)

    # ------------------------------------------------------------------ stream

    async def stream(self, plan: Plan) -> AsyncIterator[bytes]:
        """SSE for an unstored response, tied to its request: a client that goes away cancels
        the upstream call."""
        try:
            async for frame in self._stream(plan):
                yield frame
        finally:
            await self._release(plan)

    async def start_stream(self, plan: Plan) -> Run:
        """A stored streaming response: it runs to the end whatever its client does, and its
        events can be replayed (`GET /v1/responses/{id}?stream=true`). Its row is written while
        the first events are already on their way (see `_produce`)."""
        plan.run = self.runs.new(plan.ids)
        plan.run.task = asyncio.get_running_loop().create_task(self._produce(plan, background=False))
        return plan.run

    async def start_background(self, plan: Plan) -> Run:
        """`background: true`: stored as `queued` at once; a bounded worker runs it later."""
        run = plan.run = self.runs.new(plan.ids)
        rows = self._running_rows(plan, "queued")
        try:
            await self.runs.store.insert_rows(rows)
        except BaseException:
            self.runs.forget(run)
            run.finish()
            raise
        ems = [_Emitter(plan, i) for i in range(plan.n)]
        for em in ems:
            run.append(em.event("response.created", response=em.snapshot("queued")))
        for em in ems:
            run.append(em.event("response.queued", response=em.snapshot("queued")))
        run.task = asyncio.get_running_loop().create_task(self._produce(plan, background=True))
        return run

    def _running_rows(self, plan: Plan, status: str) -> list[dict]:
        req = plan.req
        return [{
            "id": rid, "status": status, "created_at": plan.created_at,
            "conversation_id": req.conversation_id, "previous_response_id": req.previous_response_id,
            "tree": plan.tree, "base_node": plan.base, "input_node": None, "input_count": 0, "last_node": None,
            "body": orjson.dumps(response_object(req, id=rid, created_at=plan.created_at, status=status, output=[])),
            "background": bool(req.background), "owner": self.runs.owner, "heartbeat_at": time.time(),
        } for rid in plan.ids]

    async def _produce(self, plan: Plan, background: bool) -> None:
        run = plan.run
        try:
            if background:
                async with self.runs.workers:
                    try:
                        await self.enter(plan)
                    except APIError as e:  # e.g. the queue's wait timed out, the conversation is gone
                        await self._fail(plan, e.code or "server_error", e.message,
                                         terminal=self._terminal_failed(plan))
                        self._emit_terminal(plan)
                        return
                    await self.runs.store.set_status(plan.ids, "in_progress", [
                        orjson.dumps(response_object(plan.req, id=rid, created_at=plan.created_at,
                                                     status="in_progress", output=[])) for rid in plan.ids])
                    async for frame in self._stream(plan, created=False):
                        run.append(frame)
            else:
                rows = self._running_rows(plan, "in_progress")
                async for frame in self._stream(plan, before_model=lambda: self.runs.store.insert_rows(rows)):
                    run.append(frame)
        except asyncio.CancelledError:
            status = "cancelled" if run.cancel_reason == "cancel" else "failed"
            message = "The server shut down before this response finished." if status == "failed" else None
            try:
                await self._fail(plan, "server_error", message, status=status, terminal=self._terminal_failed(plan))
                self._emit_terminal(plan)
            except Exception:
                log.exception("could not store cancelled response %s", plan.ids[0])
        except Exception as e:
            log.exception("response %s failed", plan.ids[0])
            with contextlib.suppress(Exception):
                await self._fail(plan, "server_error", f"The server had an error: {type(e).__name__}",
                                 terminal=self._terminal_failed(plan))
                self._emit_terminal(plan)
        finally:
            await self._release(plan)
            self.runs.forget(run)
            run.finish()

    def _terminal_failed(self, plan: Plan) -> Terminal:
        ems = [_Emitter(plan, i) for i in range(plan.n)]
        alts = lambda objs: [objs[0], *objs[0].get("alternatives", [])]  # noqa: E731
        return lambda objs: [em.event("response.failed", response=o) for em, o in zip(ems, alts(objs), strict=True)]

    @staticmethod
    def _emit_terminal(plan: Plan) -> None:
        for frame in plan.terminal_frames:
            plan.run.append(frame)

    async def cancel(self, response_id: str) -> bytes | None:
        """Cancel a background response (idempotent). Returns its stored body, or None when there
        is no such response. Raises when it is not a background response."""
        state = await self.runs.store.state(response_id)
        if state is None:
            return None
        status, body, background, _ = state
        if not background:
            raise InvalidRequest("Only responses created with background=true can be cancelled.",
                                 param="response_id", code="not_background")
        if status in TERMINAL:
            return body
        run = self.runs.active.get(response_id)
        if run is not None:
            if run.cancel_reason is None and run.task is not None:
                run.cancel_reason = "cancel"
                run.task.cancel()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(run.finished.wait()), 5)
        else:  # another process runs it: ask it through the database and wait for the answer
            await self.runs.store.request_cancel(response_id)
            for _ in range(50):
                await asyncio.sleep(0.1)
                state = await self.runs.store.state(response_id)
                if state is None or state[0] in TERMINAL:
                    break
        state = await self.runs.store.state(response_id)
        return None if state is None else state[1]

    async def _stream(self, plan: Plan, created: bool = True,
                      before_model: Callable[[], Awaitable[None]] | None = None) -> AsyncIterator[bytes]:
        """OpenAI's SSE for the plan's response(s). With n > 1 every alternative's events are
        interleaved in one stream; each event names its `response_id` and carries `alternative`
        (its index). Layout in docs/branching.md."""
        ems = [_Emitter(plan, i) for i in range(plan.n)]
        if created:
            for em in ems:
                yield em.event("response.created", response=em.snapshot("in_progress"))
        for em in ems:
            yield em.event("response.in_progress", response=em.snapshot("in_progress"))
        if before_model is not None:
            await before_model()
        usage = Usage()
        finish: dict[int, str | None] = {}
        max_calls = plan.req.max_tool_calls
        try:
            if plan.n == 1 or plan.backend.supports_n:
                async for d in plan.backend.stream(plan.chat):
                    if d.usage is not None:
                        usage = d.usage
                        continue
                    if d.finish_reason:
                        finish[d.index] = d.finish_reason
                    if d.tool_index is not None and max_calls is not None and d.tool_index >= max_calls:
                        continue  # `max_tool_calls`: later calls are dropped
                    if 0 <= d.index < plan.n:
                        for frame in ems[d.index].feed(d):
                            yield frame
            else:
                result = await self._generate(plan)
                usage = result.usage
                for c in result.choices:
                    if max_calls is not None:
                        del c.tool_calls[max_calls:]
                    finish[c.index] = c.finish_reason
                    for d in _choice_deltas(c):
                        for frame in ems[c.index].feed(d):
                            yield frame
        except BackendError as e:
            for em in ems:
                em.close_all(aborted=True)
            await self._fail(plan, e.code, e.message, terminal=self._terminal_failed(plan))
            for frame in plan.terminal_frames:
                yield frame
            return
        for i, em in enumerate(ems):
            for frame in em.close_all(incomplete=finish.get(i) in INCOMPLETE):
                yield frame

        def terminal(objs: list[dict[str, Any]]) -> list[bytes]:
            alts = [objs[0], *objs[0].get("alternatives", [])]
            return [em.event("response.incomplete" if o["status"] == "incomplete" else "response.completed",
                             response=o) for em, o in zip(ems, alts, strict=True)]

        for em in ems:
            witems.merge_tool_calls(em.items)
        await self._commit(plan, [em.choice(finish.get(i)) for i, em in enumerate(ems)],
                           [em.items for em in ems], usage, terminal)
        for frame in plan.terminal_frames:
            yield frame


Terminal = Callable[[list[dict[str, Any]]], list[bytes]]


def estimate_tokens(messages: bytes) -> int:
    """Tokens of a remote model's input, estimated: about four bytes of JSON per token."""
    return -(-len(messages) // 4)


def _choice_deltas(c: Choice) -> list[ChatDelta]:
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
