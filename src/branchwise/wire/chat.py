"""A Responses request's sampling, output-format and tool settings as Chat Completions
parameters (what every backend receives in `ChatRequest.params`)."""

from __future__ import annotations

from typing import Any

from branchwise.core.errors import InvalidRequest
from branchwise.wire import models as m


def chat_params(req: m.CreateResponse) -> dict[str, Any]:
    p: dict[str, Any] = {}
    if req.temperature is not None:
        p["temperature"] = req.temperature
    if req.top_p is not None:
        p["top_p"] = req.top_p
    if req.presence_penalty is not None:
        p["presence_penalty"] = req.presence_penalty
    if req.frequency_penalty is not None:
        p["frequency_penalty"] = req.frequency_penalty
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
    tools, tc = req.tools, req.tool_choice
    if isinstance(tc, m.ToolChoiceAllowed):  # the model sees only the allowed tools
        named = {t.name for t in tools or []}
        for k, allowed in enumerate(tc.tools):
            if allowed.name not in named:
                raise InvalidRequest(f"Allowed tool '{allowed.name}' is not one of the provided tools.",
                                     param=f"tool_choice.tools[{k}].name", code="invalid_value")
        allowed_names = {a.name for a in tc.tools}
        tools, tc = [t for t in tools if t.name in allowed_names], tc.mode or "auto"
    if tools:
        p["tools"] = [
            {"type": "function", "function": {k: v for k, v in (
                ("name", t.name), ("description", t.description), ("parameters", t.parameters), ("strict", t.strict),
            ) if v is not None}}
            for t in tools
        ]
    if tc is not None:
        if isinstance(tc, str):
            p["tool_choice"] = tc
        else:
            if not any(t.name == tc.name for t in tools or []):
                raise InvalidRequest(f"Tool choice '{tc.name}' is not one of the provided tools.",
                                     param="tool_choice", code="invalid_value")
            p["tool_choice"] = {"type": "function", "function": {"name": tc.name}}
        if tc == "required" and not tools:
            raise InvalidRequest("tool_choice 'required' needs 'tools'.", param="tool_choice", code="invalid_value")
    if req.parallel_tool_calls is not None and tools:
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
