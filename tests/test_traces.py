"""Optional OpenTelemetry traces: with BRANCHWISE_OTLP_ENDPOINT a real server sends a span per
request and a child span per model call to an OTLP/HTTP collector (a small one of the test's
own, decoding what it receives with OpenTelemetry's protobuf classes)."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import openai
import pytest

from .helpers import until

trace_service = pytest.importorskip("opentelemetry.proto.collector.trace.v1.trace_service_pb2")
pytestmark = pytest.mark.e2e


class _Collector(BaseHTTPRequestHandler):
    spans: list = []

    def do_POST(self):  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers["content-length"]))
        request = trace_service.ExportTraceServiceRequest.FromString(body)
        for rs in request.resource_spans:
            for ss in rs.scope_spans:
                _Collector.spans.extend(ss.spans)
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.end_headers()
        self.wfile.write(trace_service.ExportTraceServiceResponse().SerializeToString())

    def log_message(self, *args):
        pass


@pytest.fixture
def collector():
    _Collector.spans = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Collector)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


async def test_a_span_per_request_and_per_model_call(serve, tmp_path, mock, collector):
    server = serve({"BRANCHWISE_DATABASE_URL": f"sqlite:///{tmp_path / 'b.db'}",
                    "BRANCHWISE_UPSTREAM_BASE_URL": mock.url, "BRANCHWISE_OTLP_ENDPOINT": collector,
                    "OTEL_BSP_SCHEDULE_DELAY": "100"})
    async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="k", max_retries=0) as client:
        r = await client.responses.create(model="gpt-4.1-mini", input="Hello")

    def found():
        by_name = {s.name: s for s in _Collector.spans}
        return by_name if {"POST /v1/responses", "chat gpt-4.1-mini"} <= set(by_name) else None

    spans = await until(found, "the request's spans at the collector", timeout=20, interval=0.1)
    request, call = spans["POST /v1/responses"], spans["chat gpt-4.1-mini"]
    assert call.trace_id == request.trace_id and call.parent_span_id == request.span_id
    attrs = {a.key: a.value for a in request.attributes}
    assert attrs["branchwise.response_id"].string_value == r.id
    assert attrs["http.response.status_code"].int_value == 200
    call_attrs = {a.key: a.value for a in call.attributes}
    assert call_attrs["branchwise.outcome"].string_value == "ok"
    assert call_attrs["gen_ai.usage.output_tokens"].int_value == r.usage.output_tokens
