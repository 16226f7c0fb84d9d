"""LocalBackend against the real embedded model (SmolLM2-135M-Instruct via llama.cpp).

Every generation is short (at most 32 tokens, or cancelled early), so the file runs in seconds.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator

import orjson
import pytest
import pytest_asyncio

from branchwise.backends.base import BackendError
from branchwise.backends.local import LocalBackend, default_model_path
from branchwise.core.chat import ChatDelta, ChatRequest

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
CITY_SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}},
    "required": ["city"],
}


def req(messages: list[dict], **params) -> ChatRequest:
    return ChatRequest(model="anything", messages=orjson.dumps(messages), params=params)


@pytest_asyncio.fixture(scope="module")
async def backend() -> AsyncIterator[LocalBackend]:
    b = LocalBackend()
    yield b
    await b.aclose()


@pytest.mark.embedded
def test_default_model_path_points_at_a_gguf_file():
    path = default_model_path()
    assert os.path.isfile(path)
    assert path.endswith(".gguf")


def test_protocol_attributes():
    b = LocalBackend()
    assert b.name == "local"
    assert b.supports_n is True  # n alternatives decode together, sharing their prompt
    assert not b.loaded
    assert b.queue_depth == 0 and b.active_sequences == 0


async def test_bad_messages_are_a_backend_error_without_loading():
    b = LocalBackend()
    with pytest.raises(BackendError) as err:
        await b.complete(ChatRequest(model="m", messages=b"{not json"))
    assert err.value.code == "invalid_request_error"
    assert not b.loaded


@pytest.mark.embedded
async def test_complete_short(backend: LocalBackend):
    result = await backend.complete(req(QUESTION, temperature=0, max_tokens=16))
    assert len(result.choices) == 1
    choice = result.choices[0]
    assert choice.index == 0
    assert choice.text.strip()
    assert choice.finish_reason in ("stop", "length")
    assert result.usage.input_tokens > 0
    assert 0 < result.usage.output_tokens <= 16


@pytest.mark.embedded
async def test_count_tokens_matches_usage(backend: LocalBackend):
    result = await backend.complete(req(QUESTION, temperature=0, max_tokens=1))
    assert await backend.count_tokens(orjson.dumps(QUESTION)) == result.usage.input_tokens


@pytest.mark.embedded
async def test_stream_text_then_finish_then_usage(backend: LocalBackend):
    deltas: list[ChatDelta] = [d async for d in backend.stream(req(QUESTION, temperature=0, max_tokens=16))]
    assert len(deltas) >= 3
    *texts, finish, last = deltas
    assert texts and all(d.text is not None and d.finish_reason is None for d in texts)
    assert "".join(d.text for d in texts).strip()
    assert finish.finish_reason in ("stop", "length") and finish.text is None
    assert last.usage is not None and last.finish_reason is None
    assert last.usage.input_tokens > 0
    assert 0 < last.usage.output_tokens <= 16


@pytest.mark.embedded
async def test_json_schema_response_format(backend: LocalBackend):
    result = await backend.complete(
        req(
            [{"role": "user", "content": "In which city is the Eiffel Tower? Answer in JSON."}],
            temperature=0,
            max_tokens=32,
            response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": CITY_SCHEMA}},
        )
    )
    data = json.loads(result.choices[0].text)
    assert isinstance(data, dict)
    assert isinstance(data["city"], str)


@pytest.mark.embedded
async def test_forced_tool_call(backend: LocalBackend):
    tools = [
        {
            "type": "function",
            "function": {"name": "get_weather", "description": "Current weather", "parameters": CITY_SCHEMA},
        }
    ]
    result = await backend.complete(
        req(
            [{"role": "user", "content": "What's the weather in Paris?"}],
            temperature=0,
            max_tokens=32,
            tools=tools,
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
        )
    )
    choice = result.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert [c.name for c in choice.tool_calls] == ["get_weather"]
    assert choice.tool_calls[0].id
    assert isinstance(json.loads(choice.tool_calls[0].arguments)["city"], str)


@pytest.mark.embedded
async def test_n_generates_choices(backend: LocalBackend):
    request = req(QUESTION, temperature=0.8, max_tokens=4, seed=7)
    request.n = 2
    result = await backend.complete(request)
    assert [c.index for c in result.choices] == [0, 1]
    assert 0 < result.usage.output_tokens <= 8


# A grammar that forces a long answer (at least 150 array items), so a generation that
# kept running after its consumer left would hold the model for many seconds.
LONG = {
    "temperature": 0,
    "max_tokens": 400,
    "response_format": {
        "type": "json_schema",
        "json_schema": {
            "name": "long",
            "schema": {"type": "array", "items": {"type": "integer"}, "minItems": 150},
        },
    },
}


async def _stopped_early(backend: LocalBackend, before: int) -> int:
    """Waits (30 s at most, a hang guard) for the cancelled generation to stop; returns how many
    tokens it had sampled. The model is then free for the next request."""
    for _ in range(3000):
        if len(backend.cancelled) > before:
            break
        await asyncio.sleep(0.01)
    assert len(backend.cancelled) == before + 1
    result = await asyncio.wait_for(backend.complete(req(QUESTION, temperature=0, max_tokens=2)), 30)
    assert result.choices[0].text
    return backend.cancelled[-1]


@pytest.mark.embedded
async def test_closing_the_stream_early_stops_generation(backend: LocalBackend):
    before = len(backend.cancelled)
    stream = backend.stream(req(QUESTION, **LONG))
    first = await asyncio.wait_for(anext(stream), 30)
    assert first.text
    await asyncio.wait_for(stream.aclose(), 5)
    # the worker stopped on the cancel flag, long before the ~400 tokens the grammar forces
    assert await _stopped_early(backend, before) < 300


@pytest.mark.embedded
async def test_cancelling_the_consumer_stops_generation(backend: LocalBackend):
    started = asyncio.Event()

    async def consume() -> None:
        async for _ in backend.stream(req(QUESTION, **LONG)):
            started.set()

    before = len(backend.cancelled)
    task = asyncio.create_task(consume())
    await asyncio.wait_for(started.wait(), 30)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await _stopped_early(backend, before) < 300


@pytest.mark.embedded
async def test_generation_does_not_block_the_event_loop(backend: LocalBackend):
    await backend.load()
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.005)
            ticks += 1

    t = asyncio.create_task(ticker())
    t0 = time.perf_counter()
    await backend.complete(req(QUESTION, temperature=0, max_tokens=32))
    elapsed = time.perf_counter() - t0
    t.cancel()
    # a blocked loop would tick once or not at all
    assert ticks >= min(5, int(elapsed / 0.02))
