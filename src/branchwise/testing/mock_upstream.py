"""Deterministic mock of the OpenAI Chat Completions API, served over real HTTP.

Tests and benchmarks use it as the fake upstream model. It is a raw ASGI app
(no framework, orjson everywhere) so that it stays cheap enough to benchmark
against.

Routes
------
``POST /v1/chat/completions`` (also ``/chat/completions``)
    The completion endpoint, described below.
``GET /v1/models`` (also ``/models``)
    A model list: ``mock``, ``mock-reasoning``, ``mock-tools``.
``GET /_requests`` / ``DELETE /_requests``
    The JSON list of every chat request body received, in order / clear it.
``GET /healthz``
    ``{"status": "ok"}``.

Replies
-------
Let ``N = len(messages)`` and ``last_user`` be the text of the last message
with role ``user`` (string content, or the ``text`` of its text parts joined
with a single space), with directives removed and whitespace trimmed.
Choice ``i`` (``n`` choices, default 1) has the content::

    f"[{N} messages] Echo: {last_user}"              # i == 0
    f"[{N} messages] Alternative {i}: {last_user}"   # i > 0

If the last message has role ``tool`` the content is instead
``f"[{N} messages] Tool result: {tool_content}"`` (choices ``i > 0`` say
``f"[{N} messages] Alternative {i}: Tool result: {tool_content}"``), and no
tool is called again. Every chat response carries the header
``x-mock-messages: N``.

``max_completion_tokens`` (or else ``max_tokens``) truncates the content: it
is split with ``str.split(" ")`` and, when longer, only the first
``max_tokens`` words are kept and ``finish_reason`` is ``"length"``.

Usage: ``prompt_tokens`` is the number of whitespace-separated words in all
message text contents; ``completion_tokens`` the sum over choices of the
words of each choice's content (tool calls count 0);
``completion_tokens_details.reasoning_tokens`` the sum over choices of the
words of the reasoning text; ``prompt_tokens_details.cached_tokens`` is 0.

Streaming (``"stream": true``) sends SSE ``data: {json}\\n\\n`` events of
``chat.completion.chunk``, each in one ``send``: a ``{"role": "assistant",
"content": ""}`` delta per choice; the reasoning words (``reasoning_content``
deltas) then the content words, one word per chunk with its following space
kept, so that joining the deltas gives the exact text, choices interleaved
(word 0 of choice 0, word 0 of choice 1, ...); one empty delta with the
``finish_reason`` per choice; when ``stream_options.include_usage`` is set a
chunk with ``"choices": []`` and ``usage``; and finally ``data: [DONE]``.

Logprobs
--------
With ``logprobs: true`` each streamed piece of the content is one token whose entry is
``token_logprob(piece, k, top_logprobs)`` (deterministic), in ``choices[].logprobs.content``.

Disconnects
-----------
``MockUpstream.disconnected`` lists the requests whose client closed the
connection before the reply was complete.

Directives
----------
Written anywhere in the text of a ``system``, ``developer`` or ``user``
message as ``[[name=value]]`` or ``[[name]]``; they are removed from the
echoed text (together with the whitespace that follows them). When a
directive appears more than once, the last one wins. Note that directives in
earlier turns of a conversation still apply.

``[[delay=S]]``
    Sleep ``S`` seconds (float) before answering (before the headers).
``[[chunk_delay=S]]``
    Sleep ``S`` seconds between streamed events.
``[[fail=CODE]]``
    Answer HTTP ``CODE`` (400-599, otherwise 500) with the body
    ``{"error": {"message": "mock failure CODE", "type": "server_error",
    "param": null, "code": "mock_failure"}}``.
``[[words=K]]``
    The content is ``f"[{N} messages] w1 w2 ... wK"`` (choice ``i > 0``:
    ``f"[{N} messages] alt{i} w1 ... wK"``). Handy to get long replies.
``[[cut]]``
    Streaming: send the first half of the events, then drop the connection
    (no ``[DONE]``). Non-streaming: send the headers and half the body, then
    drop the connection. Clients see a protocol / read error either way.
``[[malformed]]``
    Streaming: after two good events send ``data: {not json`` and go on
    normally. Non-streaming: answer 200 with the body ``not json``.
``[[reasoning=TEXT]]``
    Add ``"reasoning_content": TEXT`` to each message (non-streaming), or
    stream it word by word as ``reasoning_content`` deltas before the
    content.
``[[tool=NAME]]`` / ``[[tool]]``
    Call the tool ``NAME`` (``[[tool]]``: the first tool of ``tools``, else
    ``mock_tool``). The same happens without a directive when ``tool_choice``
    is ``"required"`` (first tool) or names a function. ``tool_choice:
    "none"`` and a last message with role ``tool`` disable tool calls. The
    message then has ``content: null`` and ``tool_calls: [{"id":
    "call_<hex>", "type": "function", "function": {"name": NAME,
    "arguments": ARGS}}]``, with ``finish_reason: "tool_calls"``. ``ARGS`` is
    the JSON of a deterministic instance of the tool's ``parameters`` schema
    (strings ``"x"``, integers ``1``, numbers ``1.0``, booleans ``true``,
    arrays of one element, objects with every property, the first ``enum``
    value), or ``{}`` without a schema. Streaming sends a first
    ``tool_calls`` delta with the id, name and empty arguments, then the
    arguments in 2-3 pieces.

``response_format``
    ``{"type": "json_schema", "json_schema": {"schema": S}}``: the content is
    the JSON of a deterministic instance of ``S`` (as above, but string
    properties hold the property name). ``{"type": "json_object"}``: the
    content is ``{"echo": last_user}``.

Use :class:`MockUpstream` in tests (uvicorn in a daemon thread, on its own
event loop), or run ``python -m branchwise.testing.mock_upstream --port 9100``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import importlib.util
import itertools
import logging
import re
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import orjson

__all__ = [
    "MockAbort",
    "MockUpstream",
    "MockUpstreamApp",
    "build_reply",
    "create_app",
    "main",
    "schema_instance",
]

Scope = MutableMapping[str, Any]
ASGIMessage = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[ASGIMessage]]
Send = Callable[[ASGIMessage], Awaitable[None]]
Headers = list[tuple[bytes, bytes]]

DIRECTIVE_RE = re.compile(r"\[\[([A-Za-z_][A-Za-z0-9_]*)(?:=(.*?))?\]\]\s*", re.DOTALL)
DIRECTIVE_ROLES = frozenset({"system", "developer", "user"})
TEXT_PART_TYPES = frozenset({"text", "input_text", "output_text"})
MODEL_IDS = ("mock", "mock-reasoning", "mock-tools")
DEFAULT_TOOL_NAME = "mock_tool"
MAX_N = 128
_MAX_SCHEMA_DEPTH = 32

CHAT_PATHS = frozenset({"/v1/chat/completions", "/chat/completions"})
MODEL_PATHS = frozenset({"/v1/models", "/models"})

_JSON_HEADERS: Headers = [(b"content-type", b"application/json")]
_SSE_HEADERS: Headers = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
_MODELS_BODY = orjson.dumps(
    {
        "object": "list",
        "data": [
            {"id": m, "object": "model", "created": 0, "owned_by": "branchwise-mock"} for m in MODEL_IDS
        ],
    }
)
_HEALTH_BODY = b'{"status":"ok"}'
_DONE_EVENT = b"data: [DONE]\n\n"
_MALFORMED_EVENT = b"data: {not json\n\n"


class MockAbort(Exception):
    """Raised inside the app to make the server drop the connection mid-response."""


def _not_mock_abort(record: logging.LogRecord) -> bool:
    """Logging filter: hide uvicorn's traceback for the deliberate ``[[cut]]`` aborts."""
    exc = record.exc_info
    return not (exc and exc[0] is not None and issubclass(exc[0], MockAbort))


_uvicorn_error_logger = logging.getLogger("uvicorn.error")
if _not_mock_abort not in _uvicorn_error_logger.filters:
    _uvicorn_error_logger.addFilter(_not_mock_abort)


class RequestError(ValueError):
    """A request the mock refuses with HTTP 400."""


# --------------------------------------------------------------------------- text helpers


def text_of(content: Any) -> str | None:
    """The text of a message ``content``: a string, or the text parts joined by a space."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            part["text"]
            for part in content
            if isinstance(part, dict)
            and isinstance(part.get("text"), str)
            and part.get("type", "text") in TEXT_PART_TYPES
        )
    return None


def strip_directives(text: str) -> str:
    """Remove every ``[[...]]`` directive (and the whitespace after it), then trim."""
    if "[[" in text:
        text = DIRECTIVE_RE.sub("", text)
    return text.strip()


def parse_directives(texts: Iterable[str]) -> dict[str, str | None]:
    """Collect the directives of ``texts``, in order (later ones override earlier ones)."""
    found: dict[str, str | None] = {}
    for text in texts:
        if "[[" in text:
            for match in DIRECTIVE_RE.finditer(text):
                found[match.group(1)] = match.group(2)
    return found


def stream_pieces(text: str) -> list[str]:
    """Split ``text`` on spaces into pieces that keep their following space (join == text)."""
    words = text.split(" ")
    pieces = [word + " " for word in words[:-1]]
    if words[-1]:
        pieces.append(words[-1])
    return pieces


def _split_in_pieces(text: str, count: int = 3) -> list[str]:
    """Split ``text`` into at most ``count`` (at least 2 when possible) contiguous non-empty pieces."""
    if len(text) < 2:
        return [text]
    count = min(count, len(text))
    size = -(-len(text) // count)
    return [text[i : i + size] for i in range(0, len(text), size)]


# --------------------------------------------------------------------------- JSON schema instances


def schema_instance(schema: Any, *, use_names: bool = False) -> Any:
    """A deterministic instance of a JSON ``schema``.

    Strings are ``"x"`` (or, with ``use_names``, the name of the property that
    holds them), integers ``1``, numbers ``1.0``, booleans ``true``, arrays have
    one element, objects every property, enums their first value. ``$ref`` to
    ``#/...`` (e.g. ``#/$defs/Item``) is followed; ``anyOf``/``oneOf``/``allOf``
    take their first non-null option. An untyped top-level schema gives ``{}``.
    """
    return _instance(schema, schema, None, use_names, 0)


def _resolve_ref(root: Any, ref: str) -> Any:
    if not ref.startswith("#"):
        return None
    node = root
    for key in ref[1:].split("/"):
        if not key:
            continue
        key = key.replace("~1", "/").replace("~0", "~")
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def _instance(schema: Any, root: Any, name: str | None, use_names: bool, depth: int) -> Any:
    if depth > _MAX_SCHEMA_DEPTH or not isinstance(schema, dict):
        return {} if depth == 0 else None
    ref = schema.get("$ref")
    if isinstance(ref, str):
        return _instance(_resolve_ref(root, ref), root, name, use_names, depth + 1)
    if "const" in schema:
        return schema["const"]
    enum = schema.get("enum")
    if isinstance(enum, list) and enum:
        return enum[0]
    for key in ("anyOf", "oneOf", "allOf"):
        options = schema.get(key)
        if isinstance(options, list) and options:
            chosen = next(
                (o for o in options if not (isinstance(o, dict) and o.get("type") == "null")), options[0]
            )
            return _instance(chosen, root, name, use_names, depth + 1)

    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind is None:
        if "properties" in schema or depth == 0:
            kind = "object"
        elif "items" in schema:
            kind = "array"
        else:
            kind = "string"

    if kind == "object":
        props = schema.get("properties")
        if not isinstance(props, dict):
            return {}
        return {key: _instance(sub, root, key, use_names, depth + 1) for key, sub in props.items()}
    if kind == "array":
        return [_instance(schema.get("items", {}), root, name, use_names, depth + 1)]
    if kind == "string":
        return name if use_names and name else "x"
    if kind == "integer":
        return int(_bounded(schema, 1))
    if kind == "number":
        return float(_bounded(schema, 1.0))
    if kind == "boolean":
        return True
    return None


def _bounded(schema: dict[str, Any], value: float) -> float:
    low = schema.get("minimum")
    high = schema.get("maximum")
    if isinstance(low, int | float) and value < low:
        value = low
    if isinstance(high, int | float) and value > high:
        value = high
    return value


# --------------------------------------------------------------------------- reply planning


@dataclass(slots=True)
class Choice:
    index: int
    content: str | None
    finish_reason: str
    reasoning: str | None = None
    tool_call: dict[str, Any] | None = None


@dataclass(slots=True)
class Reply:
    """Everything needed to answer one chat request, computed without any I/O."""

    id: str
    created: int
    model: Any
    n_messages: int
    choices: list[Choice]
    usage: dict[str, Any]
    stream: bool = False
    include_usage: bool = False
    delay: float = 0.0
    chunk_delay: float = 0.0
    fail: int | None = None
    cut: bool = False
    malformed: bool = False
    directives: dict[str, str | None] = field(default_factory=dict)
    top_logprobs: int | None = None  # set when the request asked for `logprobs`


def _float_directive(directives: dict[str, str | None], name: str) -> float:
    value = directives.get(name)
    if value is None:
        return 0.0
    try:
        return max(0.0, float(value))
    except ValueError:
        raise RequestError(f"invalid [[{name}={value}]] directive") from None


def _int_directive(directives: dict[str, str | None], name: str) -> int | None:
    if name not in directives:
        return None
    value = directives[name]
    try:
        return int(value or "")
    except ValueError:
        raise RequestError(f"invalid [[{name}={value}]] directive") from None


def _int_param(req: dict[str, Any], name: str) -> int | None:
    value = req.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"'{name}' must be an integer")
    return value


def _tool_spec(tool: Any) -> tuple[str | None, Any]:
    """(name, parameters) of a Chat Completions (or flat, Responses-style) tool definition."""
    if not isinstance(tool, dict):
        return None, None
    fn = tool.get("function")
    spec = fn if isinstance(fn, dict) else tool
    name = spec.get("name")
    return (name if isinstance(name, str) else None), spec.get("parameters")


def _forced_tool(req: dict[str, Any], directives: dict[str, str | None]) -> str | None:
    """The name of the tool this request must call, if any."""
    tool_choice = req.get("tool_choice")
    if tool_choice == "none":
        return None
    tools = req.get("tools")
    first = _tool_spec(tools[0])[0] if isinstance(tools, list) and tools else None
    if "tool" in directives:
        return directives["tool"] or first or DEFAULT_TOOL_NAME
    if tool_choice == "required":
        return first or DEFAULT_TOOL_NAME
    if isinstance(tool_choice, dict):
        name, _ = _tool_spec(tool_choice)
        return name
    return None


def _tool_arguments(req: dict[str, Any], name: str) -> str:
    tools = req.get("tools")
    if isinstance(tools, list):
        for tool in tools:
            tool_name, params = _tool_spec(tool)
            if tool_name == name and isinstance(params, dict):
                return orjson.dumps(schema_instance(params)).decode()
    return "{}"


def _structured_content(req: dict[str, Any], last_user: str) -> str | None:
    fmt = req.get("response_format")
    if not isinstance(fmt, dict):
        return None
    kind = fmt.get("type")
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else fmt.get("schema")
        return orjson.dumps(schema_instance(schema, use_names=True)).decode()
    if kind == "json_object":
        return orjson.dumps({"echo": last_user}).decode()
    return None


def build_reply(req: dict[str, Any], counter: int) -> Reply:
    """Plan the deterministic reply to the chat request ``req`` (the ``counter``-th one)."""
    messages = req.get("messages")
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise RequestError("'messages' must be a list of objects")
    n_messages = len(messages)

    prompt_tokens = 0
    directive_texts: list[str] = []
    last_user = ""
    for message in messages:
        text = text_of(message.get("content"))
        if text is None:
            continue
        prompt_tokens += len(text.split())
        role = message.get("role")
        if role in DIRECTIVE_ROLES:
            directive_texts.append(text)
            if role == "user":
                last_user = text
    directives = parse_directives(directive_texts)
    last_user = strip_directives(last_user)

    n = _int_param(req, "n") or 1
    if not 1 <= n <= MAX_N:
        raise RequestError(f"'n' must be between 1 and {MAX_N}")
    max_tokens = _int_param(req, "max_completion_tokens")
    if max_tokens is None:
        max_tokens = _int_param(req, "max_tokens")
    if max_tokens is not None and max_tokens < 0:
        raise RequestError("'max_tokens' must be >= 0")

    last_message = messages[-1] if messages else {}
    after_tool = last_message.get("role") == "tool"
    prefix = f"[{n_messages} messages] "
    reasoning = directives.get("reasoning") or None
    tool_name = None if after_tool else _forced_tool(req, directives)
    tool_args = _tool_arguments(req, tool_name) if tool_name is not None else ""
    structured = None if tool_name is not None else _structured_content(req, last_user)
    words = _int_directive(directives, "words")
    word_text = " ".join(f"w{k}" for k in range(1, words + 1)) if words is not None else ""
    tool_content = (text_of(last_message.get("content")) or "") if after_tool else ""

    choices: list[Choice] = []
    completion_tokens = 0
    for i in range(n):
        if tool_name is not None:
            call = {
                "id": f"call_{counter:012x}{i:04x}",
                "type": "function",
                "function": {"name": tool_name, "arguments": tool_args},
            }
            choices.append(Choice(i, None, "tool_calls", reasoning, call))
            continue
        if structured is not None:
            content = structured
        elif after_tool:
            label = "" if i == 0 else f"Alternative {i}: "
            content = f"{prefix}{label}Tool result: {tool_content}"
        elif words is not None:
            content = prefix + (f"alt{i} " if i else "") + word_text
            content = content.rstrip(" ")
        else:
            content = prefix + ("Echo: " if i == 0 else f"Alternative {i}: ") + last_user
        finish = "stop"
        if max_tokens is not None:
            split = content.split(" ")
            if len(split) > max_tokens:
                content = " ".join(split[:max_tokens])
                finish = "length"
        completion_tokens += len(content.split())
        choices.append(Choice(i, content, finish, reasoning))

    reasoning_tokens = len(reasoning.split()) * n if reasoning else 0
    usage = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": reasoning_tokens},
    }

    fail = _int_directive(directives, "fail")
    if fail is not None and not 400 <= fail <= 599:
        fail = 500
    stream_options = req.get("stream_options")
    return Reply(
        id=f"chatcmpl-mock{counter}",
        created=int(time.time()),
        model=req.get("model", "mock"),
        n_messages=n_messages,
        choices=choices,
        usage=usage,
        stream=bool(req.get("stream")),
        include_usage=isinstance(stream_options, dict) and bool(stream_options.get("include_usage")),
        delay=_float_directive(directives, "delay"),
        chunk_delay=_float_directive(directives, "chunk_delay"),
        fail=fail,
        cut="cut" in directives,
        malformed="malformed" in directives,
        directives=directives,
        top_logprobs=int(req.get("top_logprobs") or 0) if req.get("logprobs") else None,
    )


def token_logprob(piece: str, k: int, top: int) -> dict[str, Any]:
    """The deterministic logprob entry of the k-th streamed piece (``logprobs: true``)."""
    lp = -round(0.1 * (k + 1), 3)
    entry = {"token": piece, "logprob": lp, "bytes": list(piece.encode())}
    alts = [entry] + [{"token": f"alt{j}", "logprob": lp - j, "bytes": list(f"alt{j}".encode())}
                      for j in range(1, top)]
    return {**entry, "top_logprobs": alts[:top]}


def completion_body(reply: Reply) -> dict[str, Any]:
    """The non-streaming ``chat.completion`` object for ``reply``."""
    choices = []
    for choice in reply.choices:
        message: dict[str, Any] = {"role": "assistant", "content": choice.content}
        if choice.reasoning is not None:
            message["reasoning_content"] = choice.reasoning
        if choice.tool_call is not None:
            message["tool_calls"] = [choice.tool_call]
        out: dict[str, Any] = {"index": choice.index, "message": message, "finish_reason": choice.finish_reason}
        if reply.top_logprobs is not None:
            pieces = stream_pieces(choice.content) if choice.content else []
            out["logprobs"] = {"content": [token_logprob(p, k, reply.top_logprobs) for k, p in enumerate(pieces)]}
        choices.append(out)
    return {
        "id": reply.id,
        "object": "chat.completion",
        "created": reply.created,
        "model": reply.model,
        "choices": choices,
        "usage": reply.usage,
    }


def _interleave(per_choice: list[list[Any]]) -> Iterable[tuple[int, Any]]:
    """(choice index, item) pairs: item 0 of every choice, then item 1, ..."""
    longest = max((len(items) for items in per_choice), default=0)
    for j in range(longest):
        for i, items in enumerate(per_choice):
            if j < len(items):
                yield i, items[j]


def stream_events(reply: Reply) -> list[bytes]:
    """The SSE events of a streamed ``reply``, without the final ``[DONE]``."""
    head = orjson.dumps(
        {"id": reply.id, "object": "chat.completion.chunk", "created": reply.created, "model": reply.model}
    )[:-1]  # '{"id":...,"model":...' - the choices are appended per event

    def event(index: int, delta: dict[str, Any], finish: str | None = None) -> bytes:
        choice = orjson.dumps({"index": index, "delta": delta, "finish_reason": finish})
        return b"data: " + head + b',"choices":[' + choice + b"]}\n\n"

    choices = reply.choices
    events = [event(c.index, {"role": "assistant", "content": ""}) for c in choices]
    reasoning = [stream_pieces(c.reasoning) if c.reasoning else [] for c in choices]
    events.extend(event(i, {"reasoning_content": piece}) for i, piece in _interleave(reasoning))
    for c in choices:
        if c.tool_call is not None:
            fn = c.tool_call["function"]
            first = {
                "index": 0,
                "id": c.tool_call["id"],
                "type": "function",
                "function": {"name": fn["name"], "arguments": ""},
            }
            events.append(event(c.index, {"tool_calls": [first]}))
    arguments = [
        _split_in_pieces(c.tool_call["function"]["arguments"]) if c.tool_call is not None else []
        for c in choices
    ]
    events.extend(
        event(i, {"tool_calls": [{"index": 0, "function": {"arguments": piece}}]})
        for i, piece in _interleave(arguments)
    )
    content = [stream_pieces(c.content) if c.content else [] for c in choices]
    if reply.top_logprobs is None:
        events.extend(event(i, {"content": piece}) for i, piece in _interleave(content))
    else:
        counters = [0] * len(choices)
        for i, piece in _interleave(content):
            lp = {"content": [token_logprob(piece, counters[i], reply.top_logprobs)]}
            counters[i] += 1
            choice = orjson.dumps({"index": i, "delta": {"content": piece}, "logprobs": lp, "finish_reason": None})
            events.append(b"data: " + head + b',"choices":[' + choice + b"]}\n\n")
    events.extend(event(c.index, {}, c.finish_reason) for c in choices)
    if reply.include_usage:
        events.append(b"data: " + head + b',"choices":[],"usage":' + orjson.dumps(reply.usage) + b"}\n\n")
    return events


# --------------------------------------------------------------------------- ASGI app


def _error_body(message: str, type_: str, code: str | None) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": type_, "param": None, "code": code}})


async def _send_bytes(send: Send, status: int, body: bytes, headers: Headers = _JSON_HEADERS) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [*headers, (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _read_body(receive: Receive) -> bytes | None:
    """The request body, or ``None`` when the client went away first."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


class MockUpstreamApp:
    """The raw ASGI application. ``requests`` is the in-process log of chat request bodies."""

    def __init__(self, *, log_requests: bool = True, delay: float = 0.0) -> None:
        self.delay = delay
        self.requests: list[Any] = []
        self.disconnected: list[Any] = []  # request bodies whose client went away before the reply ended
        self.log_requests = log_requests
        self._counter = itertools.count(1)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        if len(path) > 1 and path.endswith("/"):
            path = path.rstrip("/")
        method: str = scope["method"]
        if path in CHAT_PATHS:
            if method == "POST":
                await self._chat(receive, send)
                return
            allowed = "POST"
        elif path in MODEL_PATHS:
            if method == "GET":
                await _send_bytes(send, 200, _MODELS_BODY)
                return
            allowed = "GET"
        elif path == "/_requests":
            if method == "GET":
                await _send_bytes(send, 200, orjson.dumps(self.requests))
                return
            if method == "DELETE":
                count = len(self.requests)
                self.requests.clear()
                await _send_bytes(send, 200, orjson.dumps({"deleted": count}))
                return
            allowed = "GET, DELETE"
        elif path == "/healthz":
            if method == "GET":
                await _send_bytes(send, 200, _HEALTH_BODY)
                return
            allowed = "GET"
        else:
            body = _error_body(f"no route for {method} {path}", "invalid_request_error", "not_found")
            await _send_bytes(send, 404, body)
            return
        body = _error_body(f"method {method} not allowed", "invalid_request_error", "method_not_allowed")
        await _send_bytes(send, 405, body, [*_JSON_HEADERS, (b"allow", allowed.encode())])

    async def _chat(self, receive: Receive, send: Send) -> None:
        raw = await _read_body(receive)
        if raw is None:
            return
        try:
            req = orjson.loads(raw)
        except orjson.JSONDecodeError:
            body = _error_body("request body is not valid JSON", "invalid_request_error", None)
            await _send_bytes(send, 400, body)
            return
        if self.log_requests:
            self.requests.append(req)
        try:
            if not isinstance(req, dict):
                raise RequestError("request body must be a JSON object")
            reply = build_reply(req, next(self._counter))
        except RequestError as exc:
            await _send_bytes(send, 400, _error_body(str(exc), "invalid_request_error", None))
            return

        mock_header = (b"x-mock-messages", str(reply.n_messages).encode())
        gone = asyncio.Event()

        async def watch() -> None:  # the client closing its connection
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()

        watcher = asyncio.ensure_future(watch())
        try:
            await self._reply(req, reply, send, mock_header, gone)
        finally:
            watcher.cancel()
        if gone.is_set():
            self.disconnected.append(req)

    async def _reply(self, req: Any, reply: Reply, send: Send, mock_header: tuple[bytes, bytes],
                     gone: asyncio.Event) -> None:
        delay = max(reply.delay, self.delay)
        if delay > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(gone.wait(), delay)
            if gone.is_set():
                return
        if reply.fail is not None:
            body = _error_body(f"mock failure {reply.fail}", "server_error", "mock_failure")
            await _send_bytes(send, reply.fail, body, [*_JSON_HEADERS, mock_header])
            return
        if reply.stream:
            await self._stream(reply, send, mock_header, gone)
            return
        if reply.malformed:
            await _send_bytes(send, 200, b"not json", [*_JSON_HEADERS, mock_header])
            return
        body = orjson.dumps(completion_body(reply))
        if reply.cut:
            headers = [*_JSON_HEADERS, mock_header, (b"content-length", str(len(body)).encode())]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": body[: len(body) // 2], "more_body": True})
            raise MockAbort("[[cut]]: dropping the connection")
        await _send_bytes(send, 200, body, [*_JSON_HEADERS, mock_header])

    async def _stream(self, reply: Reply, send: Send, mock_header: tuple[bytes, bytes],
                      gone: asyncio.Event) -> None:
        events = stream_events(reply)
        if reply.cut:
            events = events[: max(1, len(events) // 2)]
        else:
            if reply.malformed:
                events.insert(min(2, len(events)), _MALFORMED_EVENT)
            events.append(_DONE_EVENT)
        await send({"type": "http.response.start", "status": 200, "headers": [*_SSE_HEADERS, mock_header]})
        delay = reply.chunk_delay
        for k, data in enumerate(events):
            if delay > 0 and k:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(gone.wait(), delay)
            if gone.is_set():
                return
            await send({"type": "http.response.body", "body": data, "more_body": True})
        if reply.cut:
            raise MockAbort("[[cut]]: dropping the stream")
        await send({"type": "http.response.body", "body": b""})


def create_app(*, log_requests: bool = True, delay: float = 0.0) -> MockUpstreamApp:
    """A fresh mock app, with its own request log and id counter.

    ``log_requests=False`` keeps ``/_requests`` empty (long benchmark runs); ``delay`` is a
    minimum ``[[delay]]`` for every chat request.
    """
    return MockUpstreamApp(log_requests=log_requests, delay=delay)


app = create_app()
"""Module-level app, for ``uvicorn branchwise.testing.mock_upstream:app``."""


# --------------------------------------------------------------------------- in-process server


class MockUpstream:
    """The mock served by uvicorn in a daemon thread, on that thread's own event loop.

    >>> with MockUpstream() as upstream:          # doctest: +SKIP
    ...     httpx.post(upstream.url + "/chat/completions", json={...})
    ...     upstream.requests[-1]
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, delay: float = 0.0) -> None:
        """`delay`: seconds every chat reply waits before it starts (as if every request said
        ``[[delay=S]]``), for clients whose messages cannot carry directives."""
        self.host = host
        self.port = port
        self.app = create_app(delay=delay)
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None

    @property
    def base_url(self) -> str:
        """``http://HOST:PORT`` (no ``/v1``)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def url(self) -> str:
        """The OpenAI-style base URL, ``http://HOST:PORT/v1``."""
        return self.base_url + "/v1"

    @property
    def requests(self) -> list[Any]:
        """A snapshot of every chat request body received, in order."""
        return list(self.app.requests)

    @property
    def disconnected(self) -> list[Any]:
        """Request bodies whose client closed the connection before the reply was complete."""
        return list(self.app.disconnected)

    def clear(self) -> None:
        """Forget the logged requests."""
        self.app.requests.clear()
        self.app.disconnected.clear()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, timeout: float = 10.0) -> MockUpstream:
        """Start serving and wait until ``/healthz`` answers. Returns ``self``."""
        if self.running:
            return self
        import uvicorn

        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            self.app,
            loop="asyncio",
            lifespan="off",
            log_level="warning",
            log_config=None,
            access_log=False,
            timeout_graceful_shutdown=2,
        )
        server = uvicorn.Server(config)
        thread = threading.Thread(
            target=server.run, kwargs={"sockets": [sock]}, name=f"mock-upstream:{self.port}", daemon=True
        )
        self._server, self._thread, self._sock = server, thread, sock
        thread.start()
        self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self._thread is None or not self._thread.is_alive():
                raise RuntimeError("mock upstream server thread exited during startup")
            conn = http.client.HTTPConnection(self.host, self.port, timeout=1.0)
            try:
                conn.request("GET", "/healthz")
                if conn.getresponse().status == 200:
                    return
            except OSError:
                pass
            finally:
                conn.close()
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"mock upstream did not answer on {self.base_url} within {timeout}s")
            time.sleep(0.01)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving and join the thread."""
        server, thread, sock = self._server, self._thread, self._sock
        self._server = self._thread = self._sock = None
        if server is not None:
            server.should_exit = True
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive() and server is not None:
                server.force_exit = True
                thread.join(timeout)
        if sock is not None:
            sock.close()

    def __enter__(self) -> MockUpstream:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> None:
    """``python -m branchwise.testing.mock_upstream --host 127.0.0.1 --port 9100``."""
    parser = argparse.ArgumentParser(
        prog="python -m branchwise.testing.mock_upstream",
        description="Deterministic mock OpenAI Chat Completions server (see the module docstring).",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9100)
    parser.add_argument("--log-level", default="warning")
    parser.add_argument(
        "--no-request-log",
        action="store_true",
        help="do not keep request bodies for GET /_requests (for long benchmark runs)",
    )
    args = parser.parse_args(argv)

    import uvicorn

    uvicorn.run(
        create_app(log_requests=not args.no_request_log),
        host=args.host,
        port=args.port,
        loop="uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
        http="httptools" if importlib.util.find_spec("httptools") else "h11",
        lifespan="off",
        log_level=args.log_level,
        access_log=False,
    )


if __name__ == "__main__":
    main()
