"""The Backend protocol: what the engine needs from a model.

A backend speaks Chat Completions semantics. The engine hands it a `ChatRequest` whose
`messages` is already-serialised JSON (a JSON array of Chat Completions messages, built by
splicing stored per-item blobs, never re-parsed on the hot path) and gets back either one
`ChatResult` or, when streaming, an async iterator of `ChatDelta`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

from branchwise.core.chat import ChatDelta, ChatRequest, ChatResult


class BackendError(Exception):
    """The upstream model failed. `code` ends up in the Response's `error.code`."""

    def __init__(self, message: str, code: str = "server_error", status: int | None = None):
        super().__init__(message)
        self.message = message
        self.code = code
        self.status = status


class Backend(Protocol):
    """A model provider. Implementations: `ChatCompletionsBackend` (any OpenAI-compatible
    upstream over HTTP) and `LocalBackend` (the embedded llama.cpp model)."""

    name: str
    supports_n: bool

    async def complete(self, request: ChatRequest) -> ChatResult: ...

    def stream(self, request: ChatRequest) -> AsyncIterator[ChatDelta]: ...

    async def aclose(self) -> None: ...
