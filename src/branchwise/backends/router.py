"""Model routing: which backend answers a model name.

The routing table comes from settings (`upstreams` in the config file, plus the
single-upstream shortcut `BRANCHWISE_UPSTREAM_BASE_URL`). Patterns are fnmatch globs, first
match wins. Each entry's backend is built by its `kind` (`backends.registry`). With no upstream
configured at all, the embedded model answers every name.
"""

from __future__ import annotations

from fnmatch import fnmatchcase

from branchwise.backends import registry
from branchwise.backends.base import Backend
from branchwise.settings import Settings, UpstreamConfig

LOCAL_MODEL_ID = "SmolLM2-135M-Instruct"


class Router:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.routes: list[tuple[UpstreamConfig, Backend]] = [
            (cfg, registry.build(cfg, settings)) for cfg in settings.routes()
        ]
        self._local: Backend | None = None
        self._matched: dict[str, tuple[UpstreamConfig, Backend] | None] = {}

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
        if self.embedded:
            return [LOCAL_MODEL_ID]
        ids: list[str] = []
        for cfg, _ in self.routes:
            ids.extend(p for p in cfg.models if not any(ch in p for ch in "*?["))
        return ids

    async def aclose(self) -> None:
        for _, backend in self.routes:
            await backend.aclose()
        if self._local is not None:
            await self._local.aclose()
