"""Any OpenAI-compatible Chat Completions upstream (vLLM, Ollama, llama.cpp server, OpenAI).

One pooled HTTP client per upstream. The request body is spliced from the pre-serialised
messages; the reply is parsed once.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson

from branchwise.backends.base import (
    BackendError,
    ChatDelta,
    ChatRequest,
    ChatResult,
    Choice,
    ToolCall,
    Usage,
)

CONNECT_RETRIES = 2
RETRY_BACKOFF = 0.2


def _usage(u: dict[str, Any] | None) -> Usage:
    if not u:
        return Usage()
    return Usage(
        input_tokens=u.get("prompt_tokens") or 0,
        output_tokens=u.get("completion_tokens") or 0,
        cached_tokens=((u.get("prompt_tokens_details") or {}).get("cached_tokens") or 0),
        reasoning_tokens=((u.get("completion_tokens_details") or {}).get("reasoning_tokens") or 0),
    )


def _error_message(resp: httpx.Response) -> str:
    try:
        body = orjson.loads(resp.content)
        err = body.get("error") if isinstance(body, dict) else None
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        if isinstance(err, str):
            return err
    except orjson.JSONDecodeError:
        pass
    return resp.text[:500] or resp.reason_phrase


class ChatCompletionsBackend:
    supports_n: bool

    def __init__(self, base_url: str, api_key: str | None = None, *, name: str = "upstream",
                 supports_n: bool = True, timeout: float = 600.0):
        self.name = name
        self.supports_n = supports_n
        headers = {"content-type": "application/json"}
        if api_key:
            headers["authorization"] = f"Bearer {api_key}"
        self._client = httpx.AsyncClient(
            base_url=base_url.rstrip("/"),
            headers=headers,
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
            limits=httpx.Limits(max_connections=1000, max_keepalive_connections=200),
        )

    def _body(self, request: ChatRequest, stream: bool) -> bytes:
        params = dict(request.params)
        params["model"] = request.model
        if request.n > 1:
            params["n"] = request.n
        if stream:
            params["stream"] = True
            params["stream_options"] = {"include_usage": True}
        head = orjson.dumps(params)
        return head[:-1] + b',"messages":' + request.messages + b"}"

    async def _send(self, body: bytes, stream: bool) -> httpx.Response:
        """POST with bounded retries of connection errors (nothing reached the upstream)."""
        for attempt in range(CONNECT_RETRIES + 1):
            try:
                req = self._client.build_request("POST", "/chat/completions", content=body)
                return await self._client.send(req, stream=stream)
            except httpx.ConnectError as e:
                if attempt == CONNECT_RETRIES:
                    raise BackendError(f"Could not connect to the upstream model server: {e}",
                                       code="upstream_unavailable") from e
                await asyncio.sleep(RETRY_BACKOFF * (2**attempt))
            except httpx.TimeoutException as e:
                raise BackendError("The upstream model server timed out.", code="upstream_timeout") from e
            except httpx.HTTPError as e:
                raise BackendError(f"Upstream request failed: {e}", code="upstream_error") from e
        raise AssertionError("unreachable")

    async def complete(self, request: ChatRequest) -> ChatResult:
        resp = await self._send(self._body(request, False), False)
        if resp.status_code >= 400:
            raise BackendError(f"Upstream returned {resp.status_code}: {_error_message(resp)}",
                               code="upstream_error", status=resp.status_code)
        try:
            body = orjson.loads(resp.content)
            choices = [
                Choice(
                    index=c.get("index", i),
                    text=(c["message"].get("content") or ""),
                    refusal=c["message"].get("refusal"),
                    reasoning=c["message"].get("reasoning_content") or c["message"].get("reasoning"),
                    tool_calls=[
                        ToolCall(id=t["id"], name=t["function"]["name"], arguments=t["function"].get("arguments") or "")
                        for t in (c["message"].get("tool_calls") or [])
                    ],
                    finish_reason=c.get("finish_reason"),
                )
                for i, c in enumerate(body["choices"])
            ]
        except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise BackendError("The upstream sent a malformed reply.", code="upstream_malformed") from e
        choices.sort(key=lambda c: c.index)
        return ChatResult(choices=choices, usage=_usage(body.get("usage")))

    async def stream(self, request: ChatRequest) -> AsyncIterator[ChatDelta]:
        resp = await self._send(self._body(request, True), True)
        try:
            if resp.status_code >= 400:
                await resp.aread()
                raise BackendError(f"Upstream returned {resp.status_code}: {_error_message(resp)}",
                                   code="upstream_error", status=resp.status_code)
            done = False
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                try:
                    chunk = orjson.loads(data)
                except orjson.JSONDecodeError as e:
                    raise BackendError("The upstream sent a malformed stream chunk.",
                                       code="upstream_malformed") from e
                if isinstance(chunk, dict) and "error" in chunk:
                    err = chunk["error"]
                    msg = err.get("message") if isinstance(err, dict) else str(err)
                    raise BackendError(f"Upstream error: {msg}", code="upstream_error")
                for d in _deltas(chunk):
                    yield d
            if not done:
                raise BackendError("The upstream stream ended before it was complete.",
                                   code="upstream_stream_cut")
        except httpx.TimeoutException as e:
            raise BackendError("The upstream model server timed out.", code="upstream_timeout") from e
        except httpx.HTTPError as e:
            raise BackendError(f"The upstream stream broke: {e}", code="upstream_stream_cut") from e
        finally:
            await resp.aclose()

    async def aclose(self) -> None:
        await self._client.aclose()


def _deltas(chunk: dict[str, Any]) -> list[ChatDelta]:
    out: list[ChatDelta] = []
    try:
        for c in chunk.get("choices") or []:
            i = c.get("index", 0)
            d = c.get("delta") or {}
            r = d.get("reasoning_content") or d.get("reasoning")
            if r:
                out.append(ChatDelta(index=i, reasoning=r))
            if d.get("content"):
                out.append(ChatDelta(index=i, text=d["content"]))
            if d.get("refusal"):
                out.append(ChatDelta(index=i, refusal=d["refusal"]))
            for t in d.get("tool_calls") or []:
                fn = t.get("function") or {}
                out.append(ChatDelta(index=i, tool_index=t.get("index", 0), tool_call_id=t.get("id"),
                                     tool_name=fn.get("name"), tool_arguments=fn.get("arguments") or None))
            if c.get("finish_reason"):
                out.append(ChatDelta(index=i, finish_reason=c["finish_reason"]))
        if chunk.get("usage"):
            out.append(ChatDelta(usage=_usage(chunk["usage"])))
    except (AttributeError, TypeError) as e:
        raise BackendError("The upstream sent a malformed stream chunk.", code="upstream_malformed") from e
    return out
