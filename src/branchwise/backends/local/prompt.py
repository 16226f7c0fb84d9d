"""Prompts for the embedded model: a Chat Completions request planned into plain chat messages
for the model's own chat template, the tool-calling preamble, and the grammars that constrain
generation (JSON output, the choice between a message and a function call, a function's
arguments).

Tool calling uses a ChatML function-calling format (as llama-cpp-python's
`chatml-function-calling`), driven with grammars: the model first picks `message:` or
`functions.<name>:` (grammar-constrained), then the arguments are generated under a grammar built
from that function's JSON schema. One tool call per turn.

Everything here is pure Python, with no model access: planning runs on the event loop, the
grammars on the preparing thread (`generate`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

import orjson

from branchwise.backends.base import BackendError
from branchwise.core.chat import ChatRequest

log = logging.getLogger(__name__)

DEFAULT_TEMPERATURE = 0.8
DEFAULT_TOP_P = 0.95

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
"""Used when the GGUF carries no chat template."""

TOOLS_PREAMBLE = (
    "You have access to the following functions:\n"
    "{functions}\n\n"
    "You can respond to the user either with a message or with a function call.\n"
    "To respond with a message, begin with 'message:' on its own line, then the message.\n"
    "To call a function, begin with 'functions.<function_name>:' on its own line, "
    "then the arguments as a JSON object, for example:\n"
    "functions.<function_name>:\n"
    '{{"arg1": "value1", "arg2": "value2"}}'
)


@dataclass(slots=True)
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]


@dataclass(slots=True)
class Plan:
    messages: list[dict[str, Any]]
    sampling: dict[str, Any]
    max_tokens: int | None
    stop: list[str]
    seed: int | None
    response_format: dict[str, Any] | None
    tools: list[Tool] = field(default_factory=list)
    # None: no tool calling; "auto" | "required" | a function name (forced)
    tool_mode: str | None = None
    n: int = 1


def bad_request(message: str) -> BackendError:
    return BackendError(message, code="invalid_request_error", status=400)


def _content_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts: list[str] = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, dict):
                text = part.get("text")
                if text is None and part.get("type") == "refusal":
                    text = part.get("refusal")
                if isinstance(text, str):
                    parts.append(text)
        return "".join(parts)
    return str(content)


def _parse_tools(raw: Any) -> list[Tool]:
    tools: list[Tool] = []
    for t in raw or []:
        if not isinstance(t, dict) or t.get("type", "function") != "function":
            continue
        fn = t.get("function") if isinstance(t.get("function"), dict) else t  # Responses-style: flat
        name = fn.get("name")
        if not isinstance(name, str) or not name:
            continue
        params = fn.get("parameters")
        if not isinstance(params, dict):
            params = {"type": "object", "properties": {}}
        tools.append(Tool(name=name, description=fn.get("description") or "", parameters=params))
    return tools


def _tool_mode(tools: list[Tool], choice: Any) -> str | None:
    if not tools:
        return None
    if choice is None or choice == "auto":
        return "auto"
    if choice == "none":
        return None
    if choice == "required":
        return "required"
    if isinstance(choice, dict):
        if choice.get("type") == "function":
            fn = choice.get("function")
            name = fn.get("name") if isinstance(fn, dict) else choice.get("name")
            if not any(t.name == name for t in tools):
                raise bad_request(f"tool_choice names a function that is not in tools: {name!r}")
            return name
        if choice.get("type") == "allowed_tools":
            return "required" if choice.get("mode") == "required" else "auto"
    return "auto"


def _render_tool_calls(calls: Any) -> str:
    lines: list[str] = []
    for call in calls or []:
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict):
            continue
        args = fn.get("arguments")
        if not isinstance(args, str):
            args = json.dumps(args if args is not None else {})
        lines.append(f"functions.{fn.get('name', '')}:\n{args}")
    return "\n".join(lines)


def _normalise_messages(raw: list[Any], tools: list[Tool] | None) -> list[dict[str, Any]]:
    """Chat Completions messages -> plain {role, content: str} messages for the chat template."""
    call_names: dict[str, str] = {}
    out: list[dict[str, Any]] = []
    for m in raw:
        if not isinstance(m, dict):
            raise bad_request("each message must be a JSON object")
        role = m.get("role") or "user"
        text = _content_text(m.get("content"))
        if role == "developer":
            role = "system"
        if role == "assistant":
            calls = m.get("tool_calls") or []
            if not calls and isinstance(m.get("function_call"), dict):  # legacy
                calls = [{"id": None, "function": m["function_call"]}]
            for call in calls:
                if isinstance(call, dict) and isinstance(call.get("function"), dict):
                    call_names[str(call.get("id"))] = str(call["function"].get("name", ""))
            if not text and m.get("refusal"):
                text = str(m["refusal"])
            pieces = [f"message:\n{text}" if tools else text] if text else []
            if calls:
                pieces.append(_render_tool_calls(calls))
            text = "\n".join(pieces)
        elif role in ("tool", "function"):
            name = m.get("name") or call_names.get(str(m.get("tool_call_id")), "")
            role = "tool"
            if name:
                text = f"functions.{name} returned:\n{text}"
        out.append({"role": role, "content": text})
    if tools:
        listing = "\n".join(
            f"functions.{t.name}:"
            + (f" {t.description}" if t.description else "")
            + f"\nparameters: {json.dumps(t.parameters, ensure_ascii=False)}"
            for t in tools
        )
        preamble = TOOLS_PREAMBLE.format(functions=listing)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": (out[0]["content"] + "\n\n" + preamble).strip()}
        else:
            out.insert(0, {"role": "system", "content": preamble})
    return out


def plan(request: ChatRequest) -> Plan:
    try:
        return _plan_unchecked(request)
    except (TypeError, ValueError) as e:
        raise bad_request(f"invalid request parameters: {e}") from None


def _plan_unchecked(request: ChatRequest) -> Plan:
    try:
        raw = orjson.loads(request.messages)
    except orjson.JSONDecodeError as e:
        raise bad_request(f"messages is not valid JSON: {e}") from None
    if not isinstance(raw, list):
        raise bad_request("messages must be a JSON array")
    p = request.params or {}

    tools = _parse_tools(p.get("tools"))
    mode = _tool_mode(tools, p.get("tool_choice"))
    if mode is None:
        tools = []
    messages = _normalise_messages(raw, tools)

    temperature = p.get("temperature")
    temperature = DEFAULT_TEMPERATURE if temperature is None else max(0.0, float(temperature))
    top_p = p.get("top_p")
    sampling: dict[str, Any] = {
        "temperature": temperature,
        "top_p": DEFAULT_TOP_P if top_p is None else float(top_p),
    }
    for key in ("presence_penalty", "frequency_penalty", "min_p", "repeat_penalty"):
        if p.get(key) is not None:
            sampling[key] = float(p[key])
    if p.get("top_k") is not None:
        sampling["top_k"] = int(p["top_k"])

    max_tokens = None
    for key in ("max_completion_tokens", "max_tokens", "max_output_tokens"):
        if p.get(key) is not None:
            max_tokens = int(p[key])
            break
    if max_tokens is not None and max_tokens <= 0:
        raise bad_request("max_tokens must be positive")

    stop = p.get("stop")
    stops = [stop] if isinstance(stop, str) else [s for s in (stop or []) if isinstance(s, str) and s]

    seed = p.get("seed")
    response_format = p.get("response_format")
    if not isinstance(response_format, dict) or response_format.get("type") in (None, "text"):
        response_format = None

    # `request.n` is authoritative; a stray params["n"] is ignored.
    n = request.n if request.n and request.n > 1 else 1
    return Plan(
        messages=messages,
        sampling=sampling,
        max_tokens=max_tokens,
        stop=stops,
        seed=int(seed) if seed is not None else None,
        response_format=response_format,
        tools=tools,
        tool_mode=mode,
        n=n,
    )


# --------------------------------------------------------------------------------------------
# Grammars (GBNF text, root rule `root`; built off the event loop, just before generating)
# --------------------------------------------------------------------------------------------


def response_grammar(response_format: dict[str, Any] | None) -> str | None:
    """The grammar of `response_format` (`json_schema`, `json_object`), or None for text."""
    if not response_format:
        return None
    from llama_cpp.llama_grammar import JSON_GBNF

    kind = response_format.get("type")
    schema = None
    if kind == "json_schema":
        spec = response_format.get("json_schema") or {}
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if schema is None and "schema" in response_format:  # Responses-style flat format
            schema = response_format["schema"]
    elif kind == "json_object":
        schema = response_format.get("schema")
    else:
        return None
    return schema_grammar(schema) if schema is not None else JSON_GBNF


def schema_grammar(schema: Any) -> str:
    from llama_cpp.llama_grammar import JSON_GBNF, json_schema_to_gbnf

    try:
        return json_schema_to_gbnf(json.dumps(schema))
    except Exception as e:  # unsupported schema feature: fall back to any JSON
        log.warning("JSON schema not convertible to a grammar (%s); constraining to JSON only", e)
        return JSON_GBNF


def choice_grammar(options: list[str]) -> str:
    """A grammar that produces exactly one of `options`."""
    rule = " | ".join(json.dumps(o) for o in options)
    return f"root ::= {rule}\n"
