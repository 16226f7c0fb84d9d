"""Optional OpenTelemetry traces: a server span per request, a client span per model call under
it, sent over OTLP/HTTP by the SDK's batching processor. On only when `otlp_endpoint` is set
(and the `otel` extra installed); otherwise `tracer` is None and the request path pays one
attribute check. The standard `OTEL_*` variables (service name, headers, sampler) apply.
"""

from __future__ import annotations

import os
from contextlib import AbstractContextManager, nullcontext
from typing import Any

tracer: Any = None
"""The tracer while tracing is on, else None."""
_provider: Any = None


def configure(endpoint: str | None) -> None:
    """Start tracing to the collector at `endpoint` (e.g. `http://127.0.0.1:4318`), or stop."""
    global tracer, _provider
    shutdown()
    if not endpoint:
        return
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME") or "branchwise"})
    _provider = TracerProvider(resource=resource)
    _provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint.rstrip("/") + "/v1/traces")))
    tracer = _provider.get_tracer("branchwise")


def shutdown() -> None:
    """Send what is left and stop (the process is stopping)."""
    global tracer, _provider
    if _provider is not None:
        _provider.shutdown()
    tracer = _provider = None


def request_span(method: str, path: str) -> AbstractContextManager:
    """The current span of one request, renamed to its route once it is known (`request_done`)."""
    if tracer is None:
        return nullcontext()
    from opentelemetry.trace import SpanKind

    return tracer.start_as_current_span(f"{method} {path}", kind=SpanKind.SERVER,
                                        attributes={"http.request.method": method, "url.path": path})


def request_done(method: str, route: str, status: int, plan: Any) -> None:
    from opentelemetry import trace

    span = trace.get_current_span()
    span.update_name(f"{method} {route}")
    span.set_attribute("http.route", route)
    span.set_attribute("http.response.status_code", status)
    if plan is not None:
        span.set_attribute("branchwise.response_id", plan.ids[0])
        span.set_attribute("branchwise.response_status", plan.status)
        if plan.req.conversation_id:
            span.set_attribute("branchwise.conversation_id", plan.req.conversation_id)


def model_span(upstream: str, model: str) -> Any:
    """A started client span for one model call (None when tracing is off); end it with
    `model_done`."""
    if tracer is None:
        return None
    from opentelemetry.trace import SpanKind

    return tracer.start_span(f"chat {model}", kind=SpanKind.CLIENT, attributes={
        "gen_ai.operation.name": "chat", "gen_ai.request.model": model, "branchwise.upstream": upstream})


def model_done(span: Any, outcome: str, usage: Any) -> None:
    span.set_attribute("branchwise.outcome", outcome)
    if usage is not None:
        span.set_attribute("gen_ai.usage.input_tokens", usage.input_tokens)
        span.set_attribute("gen_ai.usage.output_tokens", usage.output_tokens)
    if outcome not in ("ok", "cancelled"):
        from opentelemetry.trace import Status, StatusCode

        span.set_status(Status(StatusCode.ERROR, outcome))
    span.end()
