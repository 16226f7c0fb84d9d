"""The chat types every part speaks: what a model is asked (`ChatRequest`) and what it answers
(`ChatResult`, or `ChatDelta`s when streaming). Chat Completions semantics, no wire format.

`ChatRequest.messages` is already-serialised JSON (a JSON array of Chat Completions messages,
spliced from stored per-item blobs), so a history is never parsed again on its way to a model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class ChatRequest:
    model: str
    messages: bytes  # a JSON array of chat messages, ready to send
    params: dict[str, Any] = field(default_factory=dict)
    """Chat Completions parameters besides model/messages/stream: temperature, top_p,
    max_tokens, response_format, tools, tool_choice, parallel_tool_calls, n, user, ..."""
    n: int = 1


@dataclass(slots=True)
class ToolCall:
    id: str
    name: str
    arguments: str


@dataclass(slots=True)
class Choice:
    index: int = 0
    text: str = ""
    refusal: str | None = None
    reasoning: str | None = None
    tool_calls: list[ToolCall] = field(default_factory=list)
    finish_reason: str | None = None  # stop | length | tool_calls | content_filter
    logprobs: list[dict[str, Any]] | None = None  # per token: {token, logprob, bytes, top_logprobs}


@dataclass(slots=True)
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0


@dataclass(slots=True)
class ChatResult:
    choices: list[Choice]
    usage: Usage


@dataclass(slots=True)
class ChatDelta:
    """One streamed piece of one choice. Exactly one of the payload fields is set,
    except for the final delta of a choice, which carries `finish_reason`.

    Tool calls stream as: a delta with `tool_index`, `tool_call_id` and `tool_name`
    (start of a call), then deltas with `tool_index` and `tool_arguments` pieces.
    A delta with only `usage` set reports token usage for the whole request (last)."""

    index: int = 0
    text: str | None = None
    reasoning: str | None = None
    refusal: str | None = None
    tool_index: int | None = None
    tool_call_id: str | None = None
    tool_name: str | None = None
    tool_arguments: str | None = None
    finish_reason: str | None = None
    usage: Usage | None = None
    logprobs: list[dict[str, Any]] | None = None  # for the tokens of `text`
