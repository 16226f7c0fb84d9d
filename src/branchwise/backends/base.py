"""The Backend protocol: what the engine needs from a model.

A backend speaks Chat Completions semantics. The engine hands it a `ChatRequest` whose
`messages` is already-serialised JSON (a JSON array of Chat Completions messages, built by
splicing stored per-item blobs, never re-parsed on the hot path) and gets back either one
`ChatResult` or, when streaming, an async iterator of `ChatDelta`.

What a backend can do beyond that is declared, not probed: `capabilities` says whether it
honours `n` in one call, whether `count_tokens` gives exact counts, and its context window.
Every method exists on every backend (`BaseBackend` has the defaults), so callers read
`backend.capabilities` and never ask `hasattr`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

from branchwise.core.chat import ChatDelta, ChatRequest, ChatResult


class BackendError(Exception):
    """The upstream model failed. `code` ends up in the Response's `error.code`."""

    def __init__(self, message: str, code: str = "server_error", status: int | None = None):
        super().__init__(message)
        self.message = message
        self.code = code
        self.status = status


@dataclass(frozen=True, slots=True)
class Capabilities:
    supports_n: bool = False
    """`n` > 1 is answered in one call; otherwise the engine makes n calls at once."""
    count_tokens: bool = False
    """`count_tokens` gives the exact count the model will report as `usage.input_tokens`;
    otherwise callers estimate."""
    context_window: int | None = None
    """Tokens the model takes (input + output), when known: `truncation` is enforced before the
    call. None: an input that is too long is left to the model to refuse."""
    slots: int | None = None
    """Requests the backend works on at once, when it is a fixed number (the embedded model);
    the others wait in line before it is called (`services.upstream`), visibly. None: no limit."""
    default_max_output_tokens: int | None = None
    """The cap on output tokens of a request that sets no `max_output_tokens`. None: the model's."""
    default_truncation: str | None = None
    """`truncation` for a request that does not say (`auto` or `disabled`). None: `disabled`."""


class Backend(Protocol):
    """A model provider. Implementations: `ChatCompletionsBackend` (any OpenAI-compatible
    upstream over HTTP) and `LocalBackend` (the embedded llama.cpp model); see
    `backends.registry` for how a kind of backend is added."""

    name: str
    capabilities: Capabilities

    @property
    def supports_n(self) -> bool: ...

    async def complete(self, request: ChatRequest) -> ChatResult: ...

    def stream(self, request: ChatRequest) -> AsyncIterator[ChatDelta]: ...

    async def count_tokens(self, messages_json: bytes, params: dict[str, Any] | None = None) -> int:
        """Exact prompt tokens of these messages; only when `capabilities.count_tokens`."""
        ...

    async def list_models(self, timeout: float) -> list[str]:
        """The model names the backend itself reports (an upstream's /models), within
        `timeout` seconds; `BackendError` when it cannot say. Empty for a backend with no list."""
        ...

    async def aclose(self) -> None: ...


class BaseBackend:
    """Defaults for the optional parts of `Backend`; a backend subclasses it and overrides what
    its `capabilities` declare."""

    name: str = "backend"
    capabilities: Capabilities = Capabilities()

    @property
    def supports_n(self) -> bool:
        return self.capabilities.supports_n

    async def count_tokens(self, messages_json: bytes, params: dict[str, Any] | None = None) -> int:
        raise BackendError(f"The backend {self.name!r} cannot count tokens.", code="unsupported")

    async def list_models(self, timeout: float) -> list[str]:
        return []

    async def aclose(self) -> None:
        return None
