"""The Backend protocol: what the engine needs from a model.

A backend speaks Chat Completions semantics. The engine hands it a `ChatRequest` whose
`messages` is already-serialised JSON (a JSON array of Chat Completions messages, built by
splicing stored per-item blobs, never re-parsed on the hot path) and gets back either one
`ChatResult` or, when streaming, an async iterator of `ChatDelta`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol


class BackendError(Exception):
    """The upstream model failed. `code` ends up in the Response's `error.code`."""

    def __init__(self, message: str, code: str = "server_error", status: int | None = None):
        super().__init__(message)
        self.message = message
        self.code = code
        self.status = status


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


class Backend(Protocol):
    """A model provider. Implementations: `ChatCompletionsBackend` (any OpenAI-compatible
    upstream over HTTP) and `LocalBackend` (the embedded llama.cpp model)."""

    name: str
    supports_n: bool

    async def complete(self, request: ChatRequest) -> ChatResult: ...

    def stream(self, request: ChatRequest) -> AsyncIterator[ChatDelta]: ...

    async def aclose(self) -> None: ...
