"""Model routing: which backend answers a model name.

The routing table comes from settings (`upstreams` in the config file, plus the
single-upstream shortcut `BRANCHWISE_UPSTREAM_BASE_URL`). Patterns are fnmatch globs, first
match wins. Each entry's backend is built by its `kind` (`backends.registry`). With no upstream
configured at all, the embedded model answers every name.

What is routable (GET /v1/models) is each route's literal names and, for a route with
patterns, the names its upstream lists on its own /models that match them: asked with a short
timeout, the answer kept `models_list_ttl` seconds; an upstream that does not answer is left out
for a sixth of that (its literal names are still listed).
"""

from __future__ import annotations

import asyncio
import time
from fnmatch import fnmatchcase

from branchwise.backends import registry
from branchwise.backends.base import Backend, BackendError
from branchwise.settings import Settings, UpstreamConfig

LOCAL_MODEL_ID = "SmolLM2-135M-Instruct"
MAX_LISTED = 1000  # names taken from one upstream's list at most


def is_pattern(name: str) -> bool:
    return any(ch in name for ch in "*?[")


class Router:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.routes: list[tuple[UpstreamConfig, Backend]] = [
            (cfg, registry.build(cfg, settings)) for cfg in settings.routes()
        ]
        self._local: Backend | None = None
        self._matched: dict[str, tuple[UpstreamConfig, Backend] | None] = {}
        # route index -> (when to ask again, the names its upstream listed), and one ask at a time
        self._listed: dict[int, tuple[float, list[str]]] = {}
        self._listing: dict[int, asyncio.Lock] = {}

    @property
    def embedded(self) -> bool:
        """No upstream is configured: the embedded model answers every name."""
        return not self.routes

    def local(self) -> Backend:
        """The embedded model that answers when no upstream is configured (built on first use)."""
        if self._local is None:
            self._local = registry.build(UpstreamConfig(name="local", kind="local"), self.settings)
        return self._local

    def _route(self, model: str):
        """The first (config, backend) whose patterns match `model`, or None; remembered per
        name (the routes never change), for a bounded number of names."""
        try:
            return self._matched[model]
        except KeyError:
            pass
        route = next((r for r in self.routes if any(fnmatchcase(model, p) for p in r[0].models)), None)
        if len(self._matched) >= 1024:
            self._matched.clear()
        self._matched[model] = route
        return route

    def backend(self, model: str) -> Backend | None:
        """The backend for `model`, or None when no route matches."""
        if self.embedded:
            return self.local()
        route = self._route(model)
        return None if route is None else route[1]

    def context_window(self, model: str) -> int | None:
        """The context window of `model`, when known (always, for the embedded model)."""
        backend = self.backend(model)
        return None if backend is None else backend.capabilities.context_window

    def model_ids(self) -> list[str]:
        """The routes' literal names (no upstream is asked)."""
        if self.embedded:
            return [LOCAL_MODEL_ID]
        ids: list[str] = []
        for cfg, _ in self.routes:
            ids.extend(p for p in cfg.models if not is_pattern(p))
        return ids

    async def list_models(self) -> list[tuple[str, str]]:
        """Every routable name and the upstream (route name) that serves it: the literal names,
        then the names the pattern routes' upstreams list that match their patterns, each once,
        in route order."""
        if self.embedded:
            return [(LOCAL_MODEL_ID, "branchwise")]
        patterned = [i for i, (cfg, _) in enumerate(self.routes) if any(is_pattern(p) for p in cfg.models)]
        reported = dict(zip(patterned, await asyncio.gather(*(self._reported(i) for i in patterned)), strict=True))
        names: dict[str, None] = {}
        for i, (cfg, _) in enumerate(self.routes):
            names.update(dict.fromkeys(p for p in cfg.models if not is_pattern(p)))
            for name in reported.get(i, ()):
                if any(fnmatchcase(name, p) for p in cfg.models if is_pattern(p)):
                    names[name] = None
        out = []
        for name in names:
            route = self._route(name)  # (the route that serves it: the first whose patterns match)
            if route is not None:
                out.append((name, route[0].name))
        return out

    async def _reported(self, i: int) -> list[str]:
        """What route `i`'s upstream lists, from the cache or asked now (one ask at a time)."""
        hit = self._listed.get(i)
        if hit is not None and hit[0] > time.monotonic():
            return hit[1]
        async with self._listing.setdefault(i, asyncio.Lock()):
            hit = self._listed.get(i)
            if hit is not None and hit[0] > time.monotonic():
                return hit[1]
            ttl = self.settings.models_list_ttl
            try:
                names = (await self.routes[i][1].list_models(self.settings.models_list_timeout))[:MAX_LISTED]
            except BackendError:
                names, ttl = [], ttl / 6
            self._listed[i] = (time.monotonic() + ttl, names)
            return names

    async def aclose(self) -> None:
        for _, backend in self.routes:
            await backend.aclose()
        if self._local is not None:
            await self._local.aclose()
