"""Reply planning: everything one chat request will be answered with, without any I/O."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Any

import orjson

from .directives import DIRECTIVE_ROLES, parse_directives, strip_directives, text_of
from .schema import schema_instance

DEFAULT_TOOL_NAME = "mock_tool"
MAX_N = 128


class RequestError(ValueError):
    """A request the mock refuses with HTTP 400."""


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


_WORD = re.compile(r"[a-z0-9]+")


def _mentioned_tool(tools: list[Any], text: str) -> str | None:
    """The first tool whose name has a word of 4 or more letters (split at `_` and `-`) that
    `text` has as a word, case aside: what a model given `get_weather` does when asked about the
    weather."""
    words = set(_WORD.findall(text.lower()))
    for tool in tools:
        name = _tool_spec(tool)[0]
        if name and any(len(w) >= 4 and w in words for w in re.split(r"[_-]", name.lower())):
            return name
    return None


def _forced_tool(req: dict[str, Any], directives: dict[str, str | None], asked: str | None) -> str | None:
    """The name of the tool this request must call, if any; `asked` is the text of the last
    message when it is the user's."""
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
    if asked and isinstance(tools, list):
        return _mentioned_tool(tools, asked)
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
    asked = last_user if last_message.get("role") == "user" else None
    tool_name = None if after_tool else _forced_tool(req, directives, asked)
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
