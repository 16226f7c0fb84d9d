"""`LocalBackend`: the embedded model behind the Backend protocol.

The model loads once, lazily, on first use, on the worker thread, under an asyncio lock; it is
freed by `aclose` (and loads again if used after that).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

from branchwise.backends.base import BackendError, BaseBackend, Capabilities
from branchwise.backends.local.generate import Generator
from branchwise.backends.local.model import Model, default_model_path, default_threads
from branchwise.backends.local.prompt import Plan, plan
from branchwise.backends.local.runner import Runner
from branchwise.core.chat import ChatDelta, ChatRequest, ChatResult


class LocalBackend(BaseBackend):
    """The embedded llama.cpp model. Answers every model name routed to it."""

    name = "local"

    def __init__(
        self,
        model_path: str | None = None,
        n_ctx: int = 2048,
        n_threads: int | None = None,
        repeat_penalty: float = 1.15,
        seed: int | None = None,
    ):
        self._model_path = model_path
        self.n_ctx = n_ctx
        self.n_threads = n_threads or default_threads()
        self.repeat_penalty = repeat_penalty
        self.seed = seed
        self.capabilities = Capabilities(supports_n=False, count_tokens=True, context_window=n_ctx, slots=1)
        self._model: Model | None = None
        self._runner = Runner()
        self._load_lock = asyncio.Lock()
        self._model_lock = threading.Lock()  # belt and braces: the one worker thread already serialises
        self.cancelled: list[int] = []  # tokens each cancelled generation had sampled when it stopped

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def model_path(self) -> str:
        return default_model_path(self._model_path)

    @property
    def loaded(self) -> bool:
        return self._model is not None

    @property
    def load_seconds(self) -> float | None:
        return None if self._model is None else self._model.load_seconds

    async def load(self) -> None:
        """Load the model now (it otherwise loads on first use)."""
        if self._model is not None:
            return
        async with self._load_lock:
            if self._model is None:
                try:
                    await self._runner.call(self._load_sync)
                except BackendError:
                    raise
                except Exception as e:
                    raise BackendError(f"could not load the embedded model: {e}", code="model_error") from e

    def _load_sync(self) -> None:
        self._model = Model.load(self.model_path, self.n_ctx, self.n_threads, self.seed)

    async def aclose(self) -> None:
        """Free the model. The backend can still be used afterwards (it reloads lazily)."""
        self._runner.cancel_all()
        async with self._load_lock:
            if not self._runner.started:
                return
            if self._model is not None:
                await self._runner.call(self._free_sync)
            self._runner.shutdown()

    def _free_sync(self) -> None:
        with self._model_lock:
            model, self._model = self._model, None
            if model is not None:
                model.close()

    # -- on the worker thread ----------------------------------------------------------------

    def _count_sync(self, messages: list[dict[str, Any]]) -> int:
        with self._model_lock:
            return self._loaded().count(messages)

    def _loaded(self) -> Model:
        if self._model is None:
            raise BackendError("the embedded model has been closed", code="model_error")
        return self._model

    def _work(self, p: Plan) -> Callable[[threading.Event, Callable[[ChatDelta], None]], ChatResult]:
        def work(cancel: threading.Event, emit: Callable[[ChatDelta], None]) -> ChatResult:
            with self._model_lock:
                gen = Generator(self._loaded(), self.n_ctx, self.repeat_penalty, self.seed, self.cancelled)
                return gen.run(p, cancel, emit)

        return work

    # -- the Backend protocol ------------------------------------------------------------------

    async def count_tokens(self, messages_json: bytes, params: dict[str, Any] | None = None) -> int:
        """Exact prompt token count for these Chat Completions messages (rendered with the
        model's chat template; with `params["tools"]` the tool instructions count too)."""
        p = plan(ChatRequest(model="", messages=messages_json, params=params or {}))
        await self.load()
        try:
            return await self._runner.call(self._count_sync, p.messages)
        except BackendError:
            raise
        except Exception as e:
            raise BackendError(str(e), code="model_error") from e

    async def complete(self, request: ChatRequest) -> ChatResult:
        p = plan(request)
        await self.load()
        try:
            return await self._runner.complete(self._work(p))
        except BackendError:
            raise
        except Exception as e:
            raise BackendError(f"embedded model failed: {e}", code="model_error") from e

    async def stream(self, request: ChatRequest) -> AsyncIterator[ChatDelta]:
        p = plan(request)
        await self.load()
        deltas = self._runner.stream(self._work(p))
        try:
            while True:
                try:
                    delta = await anext(deltas)
                except StopAsyncIteration:
                    return
                except BackendError:
                    raise
                except Exception as e:
                    raise BackendError(f"embedded model failed: {e}", code="model_error") from e
                yield delta
        finally:
            await deltas.aclose()
