"""The embedded model's one worker thread, and the queue that carries a stream's deltas from it
to the event loop.

A `Llama` is not thread-safe, so every call into it (load, tokenise, generate, free) runs on one
dedicated single-thread executor: generations are serialised in FIFO order and the event loop
never blocks. A stream's worker hands `ChatDelta`s to the async side through an `asyncio.Queue`
(`loop.call_soon_threadsafe`). Closing or cancelling the consumer sets a `threading.Event` that
the worker checks between tokens (and that a stopping criterion checks inside llama's loop), so
generation stops promptly.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from branchwise.core.chat import ChatDelta, ChatResult

Work = Callable[[threading.Event, Callable[[ChatDelta], None]], ChatResult]
"""A generation, run on the worker thread: `work(cancel, emit)` calls `emit` for each delta,
stops soon after `cancel` is set, and returns the whole result."""

_DONE = object()


def _discard(delta: ChatDelta) -> None:
    pass


class Runner:
    def __init__(self) -> None:
        self._executor: ThreadPoolExecutor | None = None
        self._active: set[threading.Event] = set()  # cancel flags of running generations

    @property
    def started(self) -> bool:
        return self._executor is not None

    def _pool(self) -> ThreadPoolExecutor:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="branchwise-llama")
        return self._executor

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """`fn(*args)` on the worker thread."""
        return await asyncio.get_running_loop().run_in_executor(self._pool(), fn, *args)

    async def complete(self, work: Work) -> ChatResult:
        cancel = threading.Event()
        self._active.add(cancel)
        try:
            return await self.call(work, cancel, _discard)
        except asyncio.CancelledError:
            cancel.set()  # the worker stops at its next token
            raise
        finally:
            self._active.discard(cancel)

    async def stream(self, work: Work) -> AsyncIterator[ChatDelta]:
        """The deltas of `work` as they come, then one with its usage; an exception the work
        raised is raised here."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        cancel = threading.Event()

        def emit(item: Any) -> None:
            if cancel.is_set() and item is not _DONE:
                return
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the loop is gone: nobody is listening any more
                cancel.set()

        def run() -> None:
            try:
                if cancel.is_set():
                    return
                result = work(cancel, emit)
                emit(ChatDelta(usage=result.usage))
            except Exception as e:  # handed to the consumer
                emit(e)
            finally:
                emit(_DONE)

        future = loop.run_in_executor(self._pool(), run)
        self._active.add(cancel)
        try:
            while True:
                item = await queue.get()
                if item is _DONE:
                    break
                if isinstance(item, BaseException):
                    raise item
                yield item
            await future
        finally:
            cancel.set()
            self._active.discard(cancel)

    def cancel_all(self) -> None:
        """In-flight generations stop at their next token."""
        for cancel in list(self._active):
            cancel.set()

    def shutdown(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False)
            self._executor = None
