"""Kinds of backend, by the `kind` of an `[[upstreams]]` entry.

A kind is a factory `(UpstreamConfig, Settings) -> Backend`. Two are built in:
`chat_completions` (the default: an OpenAI-compatible server at `base_url`) and `local` (the
embedded model; it also answers every name when no upstream is configured at all).

Adding a kind is one registration, in a module imported before the router is built::

    from branchwise.backends.registry import register

    @register("anthropic")
    def _anthropic(cfg, settings):
        from mypackage.anthropic import AnthropicBackend  # a BaseBackend subclass
        return AnthropicBackend(cfg.base_url, cfg.api_key, name=cfg.name)

and then `kind = "anthropic"` in the config file. The backend declares what it can do in its
`capabilities` (see `backends.base`); the router and the services read only that.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from branchwise.backends.base import Backend
from branchwise.settings import Settings, UpstreamConfig

Factory = Callable[[UpstreamConfig, Settings], Backend]

_kinds: dict[str, Factory] = {}


def register(kind: str) -> Callable[[Factory], Factory]:
    """Decorator: `factory` builds the backends of `kind` (replacing any earlier one)."""

    def add(factory: Factory) -> Factory:
        _kinds[kind] = factory
        return factory

    return add


def kinds() -> list[str]:
    return sorted(_kinds)


def build(cfg: UpstreamConfig, settings: Settings) -> Backend:
    try:
        factory = _kinds[cfg.kind]
    except KeyError:
        raise ValueError(f"upstream {cfg.name!r}: unknown kind {cfg.kind!r} (known: {', '.join(kinds())})") from None
    return factory(cfg, settings)


@register("chat_completions")
def _chat_completions(cfg: UpstreamConfig, settings: Settings) -> Backend:
    from branchwise.backends.chat_completions import ChatCompletionsBackend

    return ChatCompletionsBackend(cfg.base_url, cfg.api_key, name=cfg.name, supports_n=cfg.supports_n,
                                  timeout=cfg.timeout, context_window=cfg.context_window,
                                  ca_bundle=cfg.ca_bundle, max_connections=cfg.max_connections)


@register("local")
def _local(cfg: UpstreamConfig, settings: Settings) -> Backend:
    from branchwise.backends.local import LocalBackend

    backend = LocalBackend(model_path=settings.local_model_path, n_ctx=cfg.context_window or settings.local_n_ctx,
                           repeat_penalty=settings.local_repeat_penalty, parallel=settings.local_parallel)
    # what a request that does not say gets (settings, not the model's own nature)
    backend.capabilities = replace(backend.capabilities,
                                   default_max_output_tokens=settings.local_max_output_tokens,
                                   default_truncation=settings.local_truncation)
    return backend
