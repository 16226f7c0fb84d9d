"""What an operator sees: the request lines and warnings a real `branchwise serve` writes,
`/metrics` (one process and several workers), and the line in front of a model that answers
one request at a time."""

from __future__ import annotations

import asyncio
import json
import logging
import re

import httpx
import openai
import pytest

from branchwise.backends.base import BaseBackend, Capabilities
from branchwise.core.chat import ChatRequest, ChatResult, Choice, Usage
from branchwise.observe import metrics
from branchwise.services.upstream import Upstream

from .helpers import until

pytestmark = pytest.mark.e2e


def _env(tmp_path, mock, **extra) -> dict[str, str]:
    return {"BRANCHWISE_DATABASE_URL": f"sqlite:///{tmp_path / 'b.db'}", "BRANCHWISE_UPSTREAM_BASE_URL": mock.url,
            "BRANCHWISE_API_KEY": "sk-very-secret", **extra}


def _json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def _sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample of the exposition text (0 when absent)."""
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            found = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0]))
            if all(found.get(k) == v for k, v in labels.items()):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_request_lines_warnings_and_metrics(serve, tmp_path, mock):
    server = serve(_env(tmp_path, mock), log_level="info", args=("--log-format", "json"))
    async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="sk-very-secret", max_retries=0) as client:
        conv = await client.conversations.create()
        ok = await client.responses.create(model="gpt-4.1-mini", conversation=conv.id, input="Hello")
        failed = await client.responses.create(model="gpt-4.1-mini", input="[[fail=503]] hello")
    assert ok.status == "completed" and failed.status == "failed"
    scrape = httpx.get(f"{server.url}/metrics", timeout=5).text

    lines = await until(lambda: (ls := _json_lines(server.output())) and any(
        x.get("response_id") == failed.id for x in ls) and ls, "the request lines")
    access = {x.get("response_id"): x for x in lines if x["logger"] == "branchwise.access" and x.get("response_id")}
    line = access[ok.id]
    assert line["method"] == "POST" and line["path"] == "/v1/responses" and line["status"] == 200
    assert line["response_status"] == "completed" and line["conversation_id"] == conv.id
    assert line["model"] == "gpt-4.1-mini" and line["input_tokens"] == ok.usage.input_tokens
    assert line["output_tokens"] == ok.usage.output_tokens
    assert line["duration_ms"] > 0 and line["upstream_ms"] > 0 and line["level"] == "info"
    assert access[failed.id]["response_status"] == "failed"
    warning = next(x for x in lines if x["level"] == "warning" and x.get("response_id") == failed.id)
    assert warning["code"] == "upstream_error" and warning["upstream_status"] == 503
    assert "mock failure 503" in warning["message"]
    assert "sk-very-secret" not in server.output()  # never a secret
    assert any(x["logger"] == "branchwise.store" and "schema" in x["message"] for x in lines)

    assert _sample(scrape, "branchwise_http_request_duration_seconds_count", method="POST", route="/v1/responses",
                   status="200") == 2
    assert _sample(scrape, "branchwise_http_request_duration_seconds_count", method="POST",
                   route="/v1/conversations", status="200") == 1
    assert _sample(scrape, "branchwise_upstream_request_duration_seconds_count", upstream="upstream",
                   model="gpt-4.1-mini", outcome="ok") == 1
    assert _sample(scrape, "branchwise_upstream_request_duration_seconds_count", upstream="upstream",
                   model="gpt-4.1-mini", outcome="upstream_error") == 1
    assert _sample(scrape, "branchwise_tokens_total", upstream="upstream", direction="output") == ok.usage.output_tokens
    assert _sample(scrape, "branchwise_responses_running") == 0


async def test_metrics_add_up_over_workers(serve, tmp_path, mock):
    server = serve(_env(tmp_path, mock, BRANCHWISE_API_KEY=""), workers=2)
    n = 12
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        for _ in range(n):  # new connections: the kernel spreads them over both workers
            r = await http.post("/v1/responses", json={"model": "m", "input": "hi"},
                                headers={"connection": "close"})
            assert r.status_code == 200

    def counted() -> bool:
        text = httpx.get(f"{server.url}/metrics", timeout=5).text
        return _sample(text, "branchwise_http_request_duration_seconds_count", method="POST",
                       route="/v1/responses", status="200") == n

    # each worker hands its counts over within a second; any worker's /metrics sums them all
    await until(counted, f"/metrics to count all {n} responses", timeout=20, interval=0.2)


def test_metrics_can_be_switched_off(serve, tmp_path, mock):
    server = serve(_env(tmp_path, mock, BRANCHWISE_METRICS="false"))
    assert httpx.get(f"{server.url}/metrics", timeout=5).status_code == 404


async def test_text_lines_and_the_banner_after_start(serve, tmp_path, mock):
    server = serve({**_env(tmp_path, mock)}, log_level="info")
    async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="sk-very-secret", max_retries=0) as client:
        r = await client.responses.create(model="gpt-4.1-mini", input="Hi")
    await until(lambda: r.id in server.output(), "the response's line")
    out = server.output()
    assert re.search(rf" INFO    branchwise.access: POST /v1/responses 200 [\d.]+ms response={r.id} \(completed\) "
                     rf"conversation=- model=gpt-4.1-mini tokens={r.usage.input_tokens}\+{r.usage.output_tokens} "
                     rf"upstream=[\d.]+ms\n", out), out
    banner = next(line for line in out.splitlines() if "serving on" in line)
    assert banner.startswith("branchwise ") and f"http://127.0.0.1:{server.port}" in banner
    assert out.index("ready:") < out.index("serving on")  # after the start-up, not before
    assert re.search(r" INFO    branchwise.access: GET /healthz 200 [\d.]+ms", out)


# ------------------------------------------------------------------ the line before a model


class _OneAtATime(BaseBackend):
    name = "slow"
    capabilities = Capabilities(slots=1)

    def __init__(self):
        self.now = self.most = 0
        self.release = asyncio.Event()

    async def complete(self, request: ChatRequest) -> ChatResult:
        self.now += 1
        self.most = max(self.most, self.now)
        try:
            await self.release.wait()
        finally:
            self.now -= 1
        return ChatResult(choices=[Choice(text="ok", finish_reason="stop")], usage=Usage(3, 1))


class _Plan:
    def __init__(self, backend, rid):
        self.backend, self.ids, self.upstream_s = backend, [rid], 0.0
        self.req = type("Req", (), {"model": "m"})()


async def test_requests_beyond_a_backends_slots_wait_visibly(caplog):
    backend, upstream = _OneAtATime(), Upstream()
    gauge = metrics.model_queue("slow")
    before = gauge._value.get()
    chat = ChatRequest(model="m", messages=b"[]")
    with caplog.at_level(logging.INFO, logger="branchwise.upstream"):
        calls = [asyncio.ensure_future(upstream.complete(_Plan(backend, f"resp_{i}"), chat)) for i in range(3)]
        await until(lambda: gauge._value.get() == before + 2, "two requests in line")
        assert backend.now == 1
        backend.release.set()
        results = await asyncio.wait_for(asyncio.gather(*calls), 10)
    assert [r.choices[0].text for r in results] == ["ok"] * 3
    assert backend.most == 1 and gauge._value.get() == before
    waits = [r.getMessage() for r in caplog.records if "waits for the slow model" in r.getMessage()]
    assert waits == ["resp_1 waits for the slow model: number 1 in line",
                     "resp_2 waits for the slow model: number 2 in line"]


async def test_a_request_that_gives_up_leaves_the_line():
    backend, upstream = _OneAtATime(), Upstream()
    chat = ChatRequest(model="m", messages=b"[]")
    first = asyncio.ensure_future(upstream.complete(_Plan(backend, "resp_a"), chat))
    await until(lambda: backend.now == 1, "the first call to run")
    second = asyncio.ensure_future(upstream.complete(_Plan(backend, "resp_b"), chat))
    third = asyncio.ensure_future(upstream.complete(_Plan(backend, "resp_c"), chat))
    await asyncio.sleep(0)
    second.cancel()
    backend.release.set()
    assert (await asyncio.wait_for(third, 10)).choices[0].text == "ok"
    await asyncio.wait_for(first, 10)
    assert second.cancelled() and backend.most == 1
