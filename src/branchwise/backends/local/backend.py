"""`LocalBackend`: the embedded model behind the Backend protocol.

The model loads once, lazily, on first use, under an asyncio lock, and starts the decode loop
(`engine.Engine`); `aclose` stops the loop and frees the model (it loads again if used after
that). Rendering, tokenising and building grammars run on one preparing thread, off the event
loop and off the decoding thread.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from branchwise.backends.base import BackendError, BaseBackend, Capabilities
from branchwise.backends.local.engine import Engine
from branchwise.backends.local.generate import Generator
from branchwise.backends.local.model import Model, default_model_path, default_threads
from branchwise.backends.local.prompt import plan
from branchwise.core.chat import ChatDelta, ChatRequest, ChatResult

DEFAULT_PARALLEL = 4
"""Sequences decoded together. On two cores with one llama.cpp thread, four decode at about
twice the rate of one; more add little rate and one context window of KV cache each
(docs/decisions/0046)."""

_DONE = object()


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
        parallel: int = DEFAULT_PARALLEL,
    ):
        self._model_path = model_path
        self.n_ctx = n_ctx
        """The context window of one sequence (prompt and output)."""
        self.n_threads = n_threads or default_threads()
        self.repeat_penalty = repeat_penalty
        self.seed = seed
        self.parallel = max(1, parallel)
        """Sequences decoded together; more wait for a free one."""
        # `slots`: requests beyond `parallel` wait in line in services (`services.upstream`), visibly
        self.capabilities = Capabilities(supports_n=True, count_tokens=True, context_window=n_ctx,
                                         slots=self.parallel)
        self._model: Model | None = None
        self._engine: Engine | None = None
        self._gen: Generator | None = None
        self._prep: ThreadPoolExecutor | None = None
        self._load_lock = asyncio.Lock()
        self.cancelled: list[int] = []  # tokens each cancelled generation had sampled when it stopped

    # -- what can be read for metrics ----------------------------------------------------------

    @property
    def model_path(self) -> str:
        return default_model_path(self._model_path)

    @property
    def loaded(self) -> bool:
        return self._model is not None

    @property
    def load_seconds(self) -> float | None:
        return None if self._model is None else self._model.load_seconds

    @property
    def queue_depth(self) -> int:
        """Sequences waiting for one of the `parallel` slots."""
        return 0 if self._engine is None else self._engine.queue_depth

    @property
    def active_sequences(self) -> int:
        """Sequences being decoded (reading their prompt or generating)."""
        return 0 if self._engine is None else self._engine.active

    @property
    def prompt_tokens_decoded(self) -> int:
        """Prompt tokens decoded since loading; the others were found in the KV cache."""
        return 0 if self._engine is None else self._engine.prompt_tokens_decoded

    @property
    def kv_cells(self) -> int:
        """Tokens the KV cache holds, all sequences together: `parallel` context windows."""
        return self.parallel * self.n_ctx if self._model is None else self._model.n_ctx

    # -- lifecycle ---------------------------------------------------------------------------

    def _pool(self) -> ThreadPoolExecutor:
        if self._prep is None:
            self._prep = ThreadPoolExecutor(max_workers=1, thread_name_prefix="branchwise-llama-prep")
        return self._prep

    async def load(self) -> None:
        """Load the model now (it otherwise loads on first use)."""
        if self._gen is not None:
            return
        async with self._load_lock:
            if self._gen is not None:
                return
            try:
                model = await asyncio.get_running_loop().run_in_executor(
                    self._pool(), Model.load, self.model_path, self.n_ctx, self.parallel, self.n_threads)
            except BackendError:
                raise
            except Exception as e:
                raise BackendError(f"could not load the embedded model: {e}", code="model_error") from e
            self._model = model
            self._engine = Engine(model, self.cancelled.append)
            seeds = random.Random(self.seed) if self.seed is not None else None
            self._gen = Generator(model, self._engine, self._pool(), self.repeat_penalty, seeds)

    async def aclose(self) -> None:
        """Stop decoding (requests still running fail) and free the model. The backend can still
        be used afterwards (it reloads lazily)."""
        async with self._load_lock:
            engine, model, prep = self._engine, self._model, self._prep
            self._gen = self._engine = self._model = None
            self._prep = None
            if engine is None and prep is None:
                return
            loop = asyncio.get_running_loop()
            if engine is not None:
                await loop.run_in_executor(None, engine.stop)  # the current step ends first
            if model is not None:
                model.close()
            if prep is not None:
                prep.shutdown(wait=False)

    def _generator(self) -> Generator:
        if self._gen is None:
            raise BackendError("the embedded model has been closed", code="model_error")
        return self._gen

    # -- the Backend protocol ------------------------------------------------------------------

    async def count_tokens(self, messages_json: bytes, params: dict[str, Any] | None = None) -> int:
        """Exact prompt token count for these Chat Completions messages (rendered with the
        model's chat template; with `params["tools"]` the tool instructions count too)."""
        p = plan(ChatRequest(model="", messages=messages_json, params=params or {}))
        await self.load()
        model = self._model
        if model is None:
            raise BackendError("the embedded model has been closed", code="model_error")
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool(), model.count, p.messages)
        except Exception as e:
            raise BackendError(str(e), code="model_error") from e

    async def complete(self, request: ChatRequest) -> ChatResult:
        p = plan(request)
        await self.load()
        try:
            return await self._generator().run(p, None)
        except BackendError:
            raise
        except Exception as e:
            raise BackendError(f"embedded model failed: {e}", code="model_error") from e

    async def stream(self, request: ChatRequest) -> AsyncIterator[ChatDelta]:
        p = plan(request)
        await self.load()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        task = asyncio.ensure_future(self._generator().run(p, queue.put_nowait))
        task.add_done_callback(lambda _: queue.put_nowait(_DONE))
        try:
            while True:
                item = await queue.get()
                if item is _DONE:
                    break
                yield item
            try:
                result = task.result()
            except BackendError:
                raise
            except Exception as e:
                raise BackendError(f"embedded model failed: {e}", code="model_error") from e
            yield ChatDelta(usage=result.usage)
        finally:
            if not task.done():
                task.cancel()  # its jobs leave the batch at the engine's next step
            elif not task.cancelled():
                task.exception()  # (retrieved: a consumer that left early is not told of it)
