"""The Chat Completions wire objects of a planned reply: the completion body and SSE chunks."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import orjson

from .replies import Reply


def stream_pieces(text: str) -> list[str]:
    """Split ``text`` on spaces into pieces that keep their following space (join == text)."""
    words = text.split(" ")
    pieces = [word + " " for word in words[:-1]]
    if words[-1]:
        pieces.append(words[-1])
    return pieces


def _split_in_pieces(text: str, count: int = 3) -> list[str]:
    """Split ``text`` into at most ``count`` (at least 2 when possible) contiguous non-empty pieces."""
    if len(text) < 2:
        return [text]
    count = min(count, len(text))
    size = -(-len(text) // count)
    return [text[i : i + size] for i in range(0, len(text), size)]


def token_logprob(piece: str, k: int, top: int) -> dict[str, Any]:
    """The deterministic logprob entry of the k-th streamed piece (``logprobs: true``)."""
    lp = -round(0.1 * (k + 1), 3)
    entry = {"token": piece, "logprob": lp, "bytes": list(piece.encode())}
    alts = [entry] + [{"token": f"alt{j}", "logprob": lp - j, "bytes": list(f"alt{j}".encode())}
                      for j in range(1, top)]
    return {**entry, "top_logprobs": alts[:top]}


def completion_body(reply: Reply) -> dict[str, Any]:
    """The non-streaming ``chat.completion`` object for ``reply``."""
    choices = []
    for choice in reply.choices:
        message: dict[str, Any] = {"role": "assistant", "content": choice.content}
        if choice.reasoning is not None:
            message["reasoning_content"] = choice.reasoning
        if choice.tool_call is not None:
            message["tool_calls"] = [choice.tool_call]
        out: dict[str, Any] = {"index": choice.index, "message": message, "finish_reason": choice.finish_reason}
        if reply.top_logprobs is not None:
            pieces = stream_pieces(choice.content) if choice.content else []
            out["logprobs"] = {"content": [token_logprob(p, k, reply.top_logprobs) for k, p in enumerate(pieces)]}
        choices.append(out)
    return {
        "id": reply.id,
        "object": "chat.completion",
        "created": reply.created,
        "model": reply.model,
        "choices": choices,
        "usage": reply.usage,
    }


def _interleave(per_choice: list[list[Any]]) -> Iterable[tuple[int, Any]]:
    """(choice index, item) pairs: item 0 of every choice, then item 1, ..."""
    longest = max((len(items) for items in per_choice), default=0)
    for j in range(longest):
        for i, items in enumerate(per_choice):
            if j < len(items):
                yield i, items[j]


def stream_events(reply: Reply) -> list[bytes]:
    """The SSE events of a streamed ``reply``, without the final ``[DONE]``."""
    head = orjson.dumps(
        {"id": reply.id, "object": "chat.completion.chunk", "created": reply.created, "model": reply.model}
    )[:-1]  # '{"id":...,"model":...' - the choices are appended per event

    def event(index: int, delta: dict[str, Any], finish: str | None = None) -> bytes:
        choice = orjson.dumps({"index": index, "delta": delta, "finish_reason": finish})
        return b"data: " + head + b',"choices":[' + choice + b"]}\n\n"

    choices = reply.choices
    events = [event(c.index, {"role": "assistant", "content": ""}) for c in choices]
    reasoning = [stream_pieces(c.reasoning) if c.reasoning else [] for c in choices]
    events.extend(event(i, {"reasoning_content": piece}) for i, piece in _interleave(reasoning))
    for c in choices:
        if c.tool_call is not None:
            fn = c.tool_call["function"]
            first = {
                "index": 0,
                "id": c.tool_call["id"],
                "type": "function",
                "function": {"name": fn["name"], "arguments": ""},
            }
            events.append(event(c.index, {"tool_calls": [first]}))
    arguments = [
        _split_in_pieces(c.tool_call["function"]["arguments"]) if c.tool_call is not None else []
        for c in choices
    ]
    events.extend(
        event(i, {"tool_calls": [{"index": 0, "function": {"arguments": piece}}]})
        for i, piece in _interleave(arguments)
    )
    content = [stream_pieces(c.content) if c.content else [] for c in choices]
    if reply.top_logprobs is None:
        events.extend(event(i, {"content": piece}) for i, piece in _interleave(content))
    else:
        counters = [0] * len(choices)
        for i, piece in _interleave(content):
            lp = {"content": [token_logprob(piece, counters[i], reply.top_logprobs)]}
            counters[i] += 1
            choice = orjson.dumps({"index": i, "delta": {"content": piece}, "logprobs": lp, "finish_reason": None})
            events.append(b"data: " + head + b',"choices":[' + choice + b"]}\n\n")
    events.extend(event(c.index, {}, c.finish_reason) for c in choices)
    if reply.include_usage:
        events.append(b"data: " + head + b',"choices":[],"usage":' + orjson.dumps(reply.usage) + b"}\n\n")
    return events
