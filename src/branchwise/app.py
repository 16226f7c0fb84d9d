"""The composition root: settings -> store, backends, services -> the ASGI application.

Everything that lives as long as the process is made here, in the lifespan, and handed to the
routes through `app.state`; nothing else in the package builds long-lived parts.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import threading
from collections.abc import Callable
from contextlib import asynccontextmanager

from branchwise import explorer
from branchwise.api.app import API
from branchwise.backends.router import Router
from branchwise.observe import metrics, traces
from branchwise.observe.logs import masked_url
from branchwise.services.compact import compaction_key
from branchwise.services.concurrency import Policies
from branchwise.services.conversations import Conversations
from branchwise.services.idempotency import Idempotency
from branchwise.services.keys import Keys
from branchwise.services.responses import Responses
from branchwise.services.runs import Runs
from branchwise.services.sockets import Sockets
from branchwise.services.stored import StoredResponses
from branchwise.services.streams import Streams
from branchwise.settings import Settings
from branchwise.store.connect import create_engine, migrate
from branchwise.store.idempotency import IdempotencyStore
from branchwise.store.keys import KeyStore, Limits
from branchwise.store.leases import Leases
from branchwise.store.repository import Repository
from branchwise.store.runs import RunStore

log = logging.getLogger("branchwise.server")


def create_app(settings: Settings | None = None) -> API:
    settings = settings or Settings()
    keys = Keys(settings)

    @asynccontextmanager
    async def lifespan(app: API):
        traces.configure(settings.otlp_endpoint)
        db = create_engine(settings.database_url, settings.db_pool_size, settings.db_pool_timeout)
        await migrate(db)
        router = Router(settings)
        store = Repository(db, settings.path_cache_mb << 20)
        policies = Policies(Leases(db), settings)
        runs = Runs(RunStore(db), settings)
        responses = Responses(store, router, settings, policies, runs)
        responses.context.compaction_key = await compaction_key(store, settings)
        s = app.state
        s.settings, s.store, s.router, s.policies, s.runs = settings, store, router, policies, runs
        s.responses, s.streams = responses, Streams(responses, runs)
        s.conversations = Conversations(store, responses.context, policies, settings)
        s.stored = StoredResponses(store)
        s.keys = keys
        s.idempotency = Idempotency(IdempotencyStore(store.db), settings)
        await keys.start(KeyStore(db), Limits(store.db, store.dialect))
        await s.idempotency.start()
        s.sockets = Sockets(responses, s.streams, settings)
        await runs.start()
        # (one process: its /metrics flushes as it answers; workers: each hands its counts over
        # every second, for whichever worker answers)
        flusher = (asyncio.get_running_loop().create_task(_flush_metrics_forever())
                   if metrics.multiprocess_dir() else None)
        # Everything made so far (modules, app, pools) lives as long as the process: keep it out
        # of the collector's full passes, which would otherwise walk it all again and again.
        gc.collect()
        gc.freeze()
        # Many requests in flight hold a few thousand young objects: with the default threshold
        # (700) the collector would run every few requests to find them alive; cycles are rare.
        gc.set_threshold(20_000)
        # A stop signal begins the drain at once: the server (uvicorn) stops accepting and waits
        # for its connections, while the responses running here get `drain_timeout` to finish.
        loop = asyncio.get_running_loop()
        undo = on_stop_signal(lambda: loop.call_soon_threadsafe(runs.drain, settings.drain_timeout))
        log.info("ready: %s, %s", masked_url(settings.database_url),
                 "the embedded model answers every model name" if router.embedded else
                 f"{len(router.routes)} upstream(s): " + ", ".join(cfg.name for cfg, _ in router.routes))
        try:
            yield
        finally:
            undo()
            log.info("stopping")
            await runs.stop()
            await s.idempotency.stop()
            await keys.stop()
            if flusher is not None:
                flusher.cancel()
            await router.aclose()
            await store.close()
            await db.dispose()
            metrics.process_stopped()
            traces.shutdown()
            log.info("stopped")

    return API(lifespan, keys, pages=explorer.routes() if settings.explorer else (), metrics=settings.metrics)


async def _flush_metrics_forever() -> None:
    """This process's counts into prometheus-client every second (see `observe.metrics.flush`),
    so that a scrape answered by another worker sees them."""
    while True:
        await asyncio.sleep(metrics.FLUSH_INTERVAL)
        metrics.flush()


def on_stop_signal(callback: Callable[[], None]) -> Callable[[], None]:
    """Call `callback` (from the signal handler) on SIGTERM and SIGINT, after the handler that the
    server installed for them. Nothing is installed where the server installed none (the
    signal's default action stays) or off the main thread (an app served inside tests).
    Returns the undo."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous: dict[int, Callable] = {}

    def handler(sig, frame) -> None:
        previous[sig](sig, frame)
        callback()

    for sig in (signal.SIGTERM, signal.SIGINT):
        current = signal.getsignal(sig)
        if callable(current) and current is not signal.default_int_handler:
            previous[sig] = current
            signal.signal(sig, handler)

    def undo() -> None:
        for sig, prev in previous.items():
            if signal.getsignal(sig) is handler:
                signal.signal(sig, prev)

    return undo
