"""Running one POST /v1/responses: build the context, call a backend, commit.

The sequence, and why it is short:
1. `prepare` validates references and reads the base (one query for the conversation or the
   previous response, one recursive query for the path's Chat Completions messages).
2. The backend generates; no transaction is open meanwhile.
3. `commit` writes input items, output items and the response row(s) in one transaction and
   moves the conversation head with a compare-and-swap from the base it started on.

Streams and background responses (`services.streams`) run the same steps around an event log.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from branchwise.backends.base import Backend, BackendError
from branchwise.backends.router import Router
from branchwise.core.chat import ChatRequest, ChatResult, Choice, Usage
from branchwise.core.errors import InvalidRequest, NotFound
from branchwise.core.ids import new_id, now
from branchwise.core.projects import Slot
from branchwise.core.tree import Conversation, NewItem, Placed, place
from branchwise.services.concurrency import Lease, Policies
from branchwise.services.context import Context
from branchwise.services.prompts import Prompts
from branchwise.services.runs import Run, Runs
from branchwise.services.upstream import Upstream
from branchwise.settings import Settings
from branchwise.store.history_cache import extend
from branchwise.store.repository import Repository
from branchwise.wire import items as witems
from branchwise.wire import models as m
from branchwise.wire.chat import chat_params
from branchwise.wire.events import INCOMPLETE, Seq, Terminal
from branchwise.wire.objects import response_object


@dataclass(frozen=True)
class Previous:
    """A response as a later request continues it, held by the client's connection rather than
    read from the store (WebSocket mode, `services.sockets`): its last node, and the messages the
    model saw up to and including its output."""

    response_id: str
    tree: str
    node: str | None
    depth: int
    node_type: str | None
    call_id: str | None  # the last item's, when it is a function call
    history: bytes
    stored: bool  # whether its items are in the store (a response may hang under them)


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
    inputs: list[NewItem]
    params: dict[str, Any]
    chat: ChatRequest | None = None
    history: bytes | None = None  # the base's messages, when already read
    prefix: list[bytes] | None = None  # with a `prompt`: the messages before the history (instructions too)
    lease: Lease | None = None
    run: Run | None = None  # set when the response outlives its request (stored stream, background)
    seq: Seq = field(default_factory=Seq)  # sequence_number, shared by the alternatives
    terminal_frames: list[bytes] = field(default_factory=list)
    upstream_s: float = 0.0  # seconds spent waiting for the model (for Server-Timing)
    body: bytes | None = None  # the stored Response (alternative 0) as serialised for its row
    slot: Slot | None = None  # the API key's concurrent-response slot a run holds until it ends
    status: str = "queued"  # alternative 0's, once stored (for the request's log line)
    usage: Usage | None = None  # the model's, once it answered (for the request's log line)
    keep: bool = False  # make `kept` when it commits (a WebSocket turn)
    kept: list[Previous] | None = None  # each finished alternative, for a next turn to continue

    @property
    def n(self) -> int:
        return len(self.ids)


class Responses:
    """One response's life up to its commit: validate, take its place (lease), build the
    context, generate (with `n` fanned out when the backend cannot), commit."""

    def __init__(self, store: Repository, router: Router, settings: Settings, policies: Policies, runs: Runs):
        self.store = store
        self.policies = policies
        self.router = router
        self.settings = settings
        self.runs = runs
        self.context = Context(store)
        self.upstream = Upstream()
        self.prompts = Prompts(store)

    # ------------------------------------------------------------------ prepare

    async def prepare(self, req: m.CreateResponse,
                      disconnected: Callable[[], Awaitable[bool]] | None = None,
                      previous: Previous | None = None, first_id: str | None = None) -> Plan:
        """`validate`, then `enter`: everything before the model runs. Raises an APIError
        before anything is stored."""
        plan = await self.validate(req, previous, first_id)
        await self.enter(plan, disconnected)
        return plan

    async def validate(self, req: m.CreateResponse, previous: Previous | None = None,
                       first_id: str | None = None) -> Plan:
        """Check the request and resolve what it names (conversation, previous response, item
        references, model). Takes no lease and reads no history yet (unless a branch's is at
        hand). `previous` is `req.previous_response_id` as the client's connection holds it:
        then the store is not asked for it. `first_id`: the id of the response (alternative 0)
        when it was chosen before (an Idempotency-Key's claim)."""
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
        caps = backend.capabilities
        if req.max_output_tokens is None and caps.default_max_output_tokens:
            req.max_output_tokens = caps.default_max_output_tokens  # (echoed: the response says what applied)
        if req.truncation is None and caps.default_truncation:
            req.truncation = caps.default_truncation
        raw = req.input
        if raw is None or raw == [] or raw == "":
            if not conv_id and not req.previous_response_id:
                raise InvalidRequest("Missing required parameter: 'input'.", param="input",
                                     code="missing_required_parameter")
            raw = []
        inputs = await self.context.input_items(raw)
        prefix = None if req.prompt is None else await self.prompts.prefix(req)
        params = chat_params(req)
        ids = [new_id("resp") for _ in range(req.n)]
        if first_id is not None:
            ids[0] = first_id
        base: str | None = None
        base_depth = -1
        base_type: str | None = None
        conversation: Conversation | None = None
        history: bytes | None = None
        call_id: str | None = None
        if conv_id:
            policy = req.concurrency or self.settings.default_concurrency
            if policy == "branch" and not req.background:  # the history it will run on: read it now
                conversation, history = await self.store.conversation_with_history(conv_id)
            else:
                conversation = await self.store.conversation(conv_id)
            if conversation is None:
                raise NotFound(f"Conversation with id '{conv_id}' not found.", param="conversation")
            base, base_depth, tree = conversation.head, conversation.head_depth, conversation.tree
        elif previous is not None:
            if req.store is not False and not previous.stored:
                raise InvalidRequest(
                    f"Previous response with id '{previous.response_id}' was not stored (store: false), so a "
                    "response that continues it cannot be stored: send 'store': false, or start a new chain.",
                    param="store", code="invalid_value")
            base, tree, base_depth, base_type = previous.node, previous.tree, previous.depth, previous.node_type
            history, call_id = previous.history, previous.call_id
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
            self.context.check_tool_output(call_id if previous is not None else await self.context.call_id(base),
                                           inputs)
        return Plan(req=req, ids=ids, created_at=now(), backend=backend, tree=tree, base=base,
                    base_depth=base_depth, conversation=conversation, inputs=inputs, params=params,
                    history=history, prefix=prefix)

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
            if any(i.type == "function_call_output" for i in plan.inputs):
                self.context.check_tool_calls(history, plan.inputs)
        except BaseException:
            await self.release(plan)
            raise
        if plan.prefix is not None:
            parts = list(plan.prefix)
        else:
            parts = [witems.instructions_message(req.instructions)] if req.instructions else []
        fixed_head = len(parts)
        if history:
            parts.append(history)
        new = [c for c in (i.chat for i in plan.inputs) if c is not None]
        parts += new
        plan.chat = ChatRequest(model=req.model, messages=b"[" + b",".join(parts) + b"]", params=plan.params,
                                n=req.n)
        window = plan.backend.capabilities.context_window
        if window:
            try:
                await self.context.fit(plan, window, fixed_head=fixed_head, fixed_tail=len(new))
            except BaseException:
                await self.release(plan)
                raise

    @staticmethod
    async def release(plan: Plan) -> None:
        if plan.lease is not None:
            await asyncio.shield(plan.lease.release())

    # ------------------------------------------------------------------ generate

    async def generate(self, plan: Plan) -> ChatResult:
        """The model's answer(s); the time it took is added to `plan.upstream_s`."""
        backend, chat = plan.backend, plan.chat
        if plan.n == 1 or backend.capabilities.supports_n:
            started = time.perf_counter()
            try:
                result = await self.upstream.complete(plan, chat)
            finally:
                plan.upstream_s += time.perf_counter() - started
            if len(result.choices) < plan.n:
                raise BackendError(f"The upstream returned {len(result.choices)} choices for n={plan.n}.",
                                   code="upstream_error")
            return result
        one = ChatRequest(model=chat.model, messages=chat.messages, params=chat.params, n=1)
        started = time.perf_counter()
        try:
            results = await asyncio.gather(*(self.upstream.complete(plan, one) for _ in range(plan.n)))
        finally:
            plan.upstream_s += time.perf_counter() - started
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
                result = await self.runs.tie(self.generate(plan))
            except BackendError as e:  # (a drain that ended first too: `Runs.tie`)
                return (await self.fail(plan, e.code, e.message))[0]
            if plan.req.max_tool_calls is not None:
                for c in result.choices:
                    del c.tool_calls[plan.req.max_tool_calls:]
            outputs = [witems.from_choice(c, "incomplete" if c.finish_reason in INCOMPLETE else "completed")
                       for c in result.choices[: plan.n]]
            return (await self.commit(plan, result.choices[: plan.n], outputs, result.usage))[0]
        finally:
            await self.release(plan)

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

    async def commit(self, plan: Plan, choices: list[Choice], outputs: list[list[NewItem]],
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
        plan.usage = usage
        # the new branches' histories: for the path cache once they are stored, and for the
        # client's next turn when it keeps them (`keep`)
        caches = self.store.caches_histories
        with_inputs = None
        if plan.history is not None and (caches or plan.keep):
            with_inputs = extend(plan.history, [p.item.chat for p in placed_inputs])
        paths: list[tuple[str, bytes]] = []
        ends: list[tuple[Placed | None, bytes | None]] = []  # each alternative's last node, history
        for i, (choice, out) in enumerate(zip(choices, outputs, strict=True)):
            chain = place(out, input_node, input_depth, plan.ids[i])
            placed.extend(chain)
            lasts.append(chain[-1].node if chain else input_node)
            history = None
            if with_inputs is not None and lasts[-1] is not None:
                history = extend(with_inputs, [p.item.chat for p in chain])
                if caches:
                    paths.append((lasts[-1], history))
            ends.append((chain[-1] if chain else (placed_inputs[-1] if placed_inputs else None), history))
            reason = INCOMPLETE.get(choice.finish_reason or "")
            objs.append(response_object(
                req, id=plan.ids[i], created_at=plan.created_at,
                status="incomplete" if reason else "completed",
                output=[it.wire for it in out], usage=usages[i],
                incomplete_reason=reason, completed_at=completed,
            ))
        objs = await self._store(plan, objs, placed, input_node, len(placed_inputs), lasts, terminal, paths)
        if plan.keep:
            plan.kept = [self._previous(plan, obj, end, history) for obj, (end, history) in zip(objs, ends, strict=True)
                         if obj["status"] in ("completed", "incomplete") and history is not None]
        return objs

    @staticmethod
    def _previous(plan: Plan, obj: dict[str, Any], end: Placed | None, history: bytes) -> Previous:
        if end is None:  # (no input, no output: the base is still the last node)
            node, depth, kind, call_id = plan.base, plan.base_depth, None, None
        else:
            node, depth, kind = end.node, end.depth, end.item.type
            call_id = end.item.wire.get("call_id") if kind == "function_call" else None
        stored = plan.req.store is not False or plan.conversation is not None
        return Previous(obj["id"], plan.tree, node, depth, kind, call_id, history, stored)

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
        plan.status = first["status"]
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
                update_existing=plan.run is not None, events=events, histories=paths,
            )
        return objs

    async def fail(self, plan: Plan, code: str, message: str | None, status: str = "failed",
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
