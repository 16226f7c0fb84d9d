"""Any OpenAI-compatible Chat Completions upstream (vLLM, Ollama, llama.cpp server, OpenAI).

One transport (`backends.transport`: pooled connections, proxy, CA bundle) per upstream. The
request body is spliced from the pre-serialised
messages; the reply is parsed once.

Faults. Every failure of the upstream ends as a `BackendError` (never a bare HTTP client or
asyncio exception), with one of these codes:

- `upstream_unavailable`: no connection could be made (refused, unknown host), even after
  `CONNECT_RETRIES` retries with exponential backoff. Only these errors are retried: nothing
  reached the upstream. Once a request was sent it is never sent again.
- `upstream_timeout`: `timeout` seconds passed while connecting, or for the whole request
  (connect to the last byte of the reply or stream).
- `upstream_error`: the upstream answered a non-2xx status (its message and `status` kept) or
  sent an error inside the stream; `rate_limit_exceeded` for a 429.
- `upstream_stream_cut`: the connection ended before the reply was complete (a stream without
  `[DONE]`, a body cut short).
- `upstream_malformed`: a body or stream chunk that is not the JSON of a chat completion.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import orjson

from branchwise.backends.base import BackendError, BaseBackend, Capabilities
from branchwise.backends.transport import (
    BadReply,
    ConnectError,
    Disconnected,
    HTTPError,
    Reply,
    Transport,
    for_upstream,
)
from branchwise.core.chat import ChatDelta, ChatRequest, ChatResult, Choice, ToolCall, Usage

CONNECT_RETRIES = 3
"""Retries of a connection that could not be made (so up to 1 + 3 attempts)."""
RETRY_BACKOFF = 0.2
"""Seconds before the first retry, doubled for each next one: 0.2 + 0.4 + 0.8 = 1.4 s at most."""


def _usage(u: dict[str, Any] | None) -> Usage:
    if not u:
        return Usage()
    return Usage(
        input_tokens=u.get("prompt_tokens") or 0,
        output_tokens=u.get("completion_tokens") or 0,
        cached_tokens=((u.get("prompt_tokens_details") or {}).get("cached_tokens") or 0),
        reasoning_tokens=((u.get("completion_tokens_details") or {}).get("reasoning_tokens") or 0),
    )


def _error_message(status: int, reason: str | None, body: bytes) -> str:
    try:
        parsed = orjson.loads(body)
        err = parsed.get("error") if isinstance(parsed, dict) else None
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        if isinstance(err, str):
            return err
    except orjson.JSONDecodeError:
        pass
    return body[:500].decode(errors="replace") or reason or str(status)


def _status_error(status: int, reason: str | None, body: bytes) -> BackendError:
    code = "rate_limit_exceeded" if status == 429 else "upstream_error"
    return BackendError(f"Upstream returned {status}: {_error_message(status, reason, body)}",
                        code=code, status=status)


def _malformed(what: str) -> BackendError:
    return BackendError(f"The upstream sent a malformed {what}.", code="upstream_malformed")


class ChatCompletionsBackend(BaseBackend):
    """The upstream at `base_url`, reached through `transport` (default: the one
    `transport.for_upstream` picks, with `ca_bundle` and `max_connections`)."""

    def __init__(self, base_url: str, api_key: str | None = None, *, name: str = "upstream",
                 supports_n: bool = True, timeout: float = 600.0, context_window: int | None = None,
                 ca_bundle: str | None = None, max_connections: int | None = None,
                 transport: Transport | None = None):
        self.name = name
        self.capabilities = Capabilities(supports_n=supports_n, context_window=context_window)
        self.timeout = timeout
        self.base_url = base_url.rstrip("/")
        self._path = urlsplit(self.base_url).path + "/chat/completions"
        self._models_path = urlsplit(self.base_url).path + "/models"
        if transport is None:
            headers = {"content-type": "application/json", "accept": "application/json, text/event-stream",
                       "user-agent": "branchwise"}
            if api_key:
                headers["authorization"] = f"Bearer {api_key}"
            transport = for_upstream(self.base_url, headers, ca_bundle=ca_bundle, max_connections=max_connections)
        self._transport = transport

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

    def _deadline(self) -> float:
        return asyncio.get_running_loop().time() + self.timeout

    # ------------------------------------------------------------------ faults

    def _timed_out(self, mid_stream: bool = False, connecting: bool = False) -> BackendError:
        if connecting:
            what = f"could not connect within {self.timeout:g} s"
        else:  # the deadline of the whole request
            what = f"did not finish within {self.timeout:g} s"
        where = " mid-stream" if mid_stream else ""
        return BackendError(f"The upstream model server timed out{where}: it {what}.",
                            code="upstream_timeout")

    @staticmethod
    def _broken(e: HTTPError) -> BackendError:
        if isinstance(e, Disconnected):
            return BackendError(f"The upstream connection ended before the reply was complete: {e}",
                                code="upstream_stream_cut")
        return BackendError(f"The upstream request failed: {e}", code="upstream_error")

    async def _send(self, body: bytes, deadline: float, read: bool = False) -> tuple[Reply, bytes]:
        """POST, by `deadline`; returns once the status and headers are in, and with `read` the
        whole body too (under the same timeout; the connection is then back in the pool).
        Retries only connection errors (nothing reached the upstream), `CONNECT_RETRIES` times
        with exponential backoff; never once the request was sent."""
        for attempt in range(CONNECT_RETRIES + 1):
            conn = None
            try:
                async with asyncio.timeout_at(deadline):
                    conn = await self._transport.connection()
                    reply = await self._transport.post(conn, self._path, body)
                    if not read:
                        return reply, b""
                    raw = await reply.read()
                reply.release()
                return reply, raw
            except ConnectError as e:
                pause = RETRY_BACKOFF * (2**attempt)
                if attempt == CONNECT_RETRIES or asyncio.get_running_loop().time() + pause >= deadline:
                    raise BackendError(
                        f"Could not connect to the upstream model server at {self.base_url} "
                        f"({attempt + 1} attempts): {e}", code="upstream_unavailable") from e
                await asyncio.sleep(pause)
            except TimeoutError as e:
                if conn is not None:
                    conn.close()
                raise self._timed_out(connecting=conn is None) from e
            except (Disconnected, BadReply) as e:
                raise self._broken(e) from e
            except BaseException:  # cancelled: the upstream must see the client leave
                if conn is not None:
                    conn.close()
                raise
        raise AssertionError("unreachable")

    # ------------------------------------------------------------------ calls

    async def complete(self, request: ChatRequest) -> ChatResult:
        resp, raw = await self._send(self._body(request, False), self._deadline(), read=True)
        if resp.status >= 300:
            raise _status_error(resp.status, resp.reason, raw)
        try:
            body = orjson.loads(raw)
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
                    logprobs=_logprobs(c.get("logprobs")),
                )
                for i, c in enumerate(body["choices"])
            ]
            choices.sort(key=lambda c: c.index)
            usage = _usage(body.get("usage"))
        except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise _malformed("reply") from e
        return ChatResult(choices=choices, usage=usage)

    async def stream(self, request: ChatRequest) -> AsyncIterator[ChatDelta]:
        deadline = self._deadline()
        resp, _ = await self._send(self._body(request, True), deadline)
        done = False
        try:
            if resp.status >= 300:
                async with asyncio.timeout_at(deadline):
                    raw = await resp.read()
                done = True
                raise _status_error(resp.status, resp.reason, raw)
            rest = b""
            while not done:
                # every read is bounded by the deadline of the whole request; a yield is never
                # inside the timeout
                async with asyncio.timeout_at(deadline):
                    chunk = await resp.read_chunk()
                if not chunk:
                    lines, rest = [rest], b""
                else:
                    *lines, rest = (rest + chunk).split(b"\n")
                for line in lines:
                    if not line.startswith(b"data:"):
                        continue
                    data = line[5:].strip()
                    if data == b"[DONE]":
                        done = True
                        break
                    try:
                        parsed = orjson.loads(data)
                    except orjson.JSONDecodeError as e:
                        raise _malformed("stream chunk") from e
                    if isinstance(parsed, dict) and "error" in parsed:
                        err = parsed["error"]
                        msg = err.get("message") if isinstance(err, dict) else str(err)
                        raise BackendError(f"Upstream error mid-stream: {msg}", code="upstream_error")
                    for d in _deltas(parsed):
                        yield d
                if not chunk:
                    break
            if not done:
                raise BackendError("The upstream stream ended before it was complete (no [DONE]).",
                                   code="upstream_stream_cut")
        except TimeoutError as e:
            raise self._timed_out(mid_stream=True) from e
        except HTTPError as e:
            raise self._broken(e) from e
        finally:
            if done:
                resp.release()  # back to the pool
            else:
                resp.close()  # cancelled or broken: drop the connection, so the upstream stops too

    async def list_models(self, timeout: float) -> list[str]:
        """GET `base_url`/models: the ids of its `data`, once, within `timeout` (no retry: a
        listing that fails is left out, not waited for)."""
        conn = None
        try:
            async with asyncio.timeout(timeout):
                conn = await self._transport.connection()
                reply = await self._transport.get(conn, self._models_path)
                raw = await reply.read()
            reply.release()
        except TimeoutError as e:
            if conn is not None:
                conn.close()
            raise BackendError(f"The upstream did not list its models within {timeout:g} s.",
                               code="upstream_timeout") from e
        except ConnectError as e:
            raise BackendError(f"Could not connect to the upstream at {self.base_url}: {e}",
                               code="upstream_unavailable") from e
        except HTTPError as e:
            raise self._broken(e) from e
        except BaseException:
            if conn is not None:
                conn.close()
            raise
        if reply.status >= 300:
            raise _status_error(reply.status, reply.reason, raw)
        try:
            data = orjson.loads(raw)["data"]
            return [m["id"] for m in data if isinstance(m, dict) and isinstance(m.get("id"), str)]
        except (orjson.JSONDecodeError, KeyError, TypeError) as e:
            raise _malformed("model list") from e

    async def aclose(self) -> None:
        self._transport.close()


def _logprobs(lp: Any) -> list[dict[str, Any]] | None:
    """Chat Completions `logprobs.content` -> the Responses API's `logprobs` of output_text."""
    if not isinstance(lp, dict) or not isinstance(lp.get("content"), list):
        return None
    return [
        {"token": t.get("token", ""), "logprob": t.get("logprob", 0.0), "bytes": t.get("bytes") or [],
         "top_logprobs": [{"token": x.get("token", ""), "logprob": x.get("logprob", 0.0), "bytes": x.get("bytes") or []}
                          for x in t.get("top_logprobs") or []]}
        for t in lp["content"] if isinstance(t, dict)
    ]


def _deltas(chunk: Any) -> list[ChatDelta]:
    out: list[ChatDelta] = []
    try:
        for c in chunk.get("choices") or []:
            i = c.get("index", 0)
            d = c.get("delta") or {}
            r = d.get("reasoning_content") or d.get("reasoning")
            if r:
                out.append(ChatDelta(index=i, reasoning=r))
            if d.get("content"):
                out.append(ChatDelta(index=i, text=d["content"], logprobs=_logprobs(c.get("logprobs"))))
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
        raise _malformed("stream chunk") from e
    return out
