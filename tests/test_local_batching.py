"""The embedded model decodes sequences together (continuous batching) and reuses cached prompt
prefixes: concurrent requests and `n` alternatives complete as they would alone, a cancelled
sequence leaves while the others finish, a request joins mid-generation, a follow-up reuses its
cached prefix and answers as a cold request does, and no more than `parallel` sequences decode
at once. Speed is measured in bench/ (`python -m bench.embedded`), not here.

The backend here has 2 slots of 1,024 tokens, so three requests at once make one wait.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncIterator

import orjson
import pytest
import pytest_asyncio

from branchwise.backends.local import LocalBackend
from branchwise.core.chat import ChatRequest

pytestmark = pytest.mark.embedded

WINDOW = 1024
TOPICS = ("a cat who learns to swim", "the history of bread", "why the sky is blue")


def ask(text: str, system: str | None = None, n: int = 1, **params) -> ChatRequest:
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
    return ChatRequest(model="m", messages=orjson.dumps(messages), params=params, n=n)


def story(topic: str, **params) -> ChatRequest:
    return ask(f"Write a short story about {topic}.", **{"temperature": 0.8, "seed": 11, "max_tokens": 24, **params})


# A grammar that forces a long answer (at least 150 array items): a generation that stops
# early did so because it was cancelled, and one that is still running is still running.
LONG = {
    "temperature": 0,
    "max_tokens": 400,
    "response_format": {
        "type": "json_schema",
        "json_schema": {"name": "long", "schema": {"type": "array", "items": {"type": "integer"}, "minItems": 150}},
    },
}


@pytest_asyncio.fixture(scope="module")
async def backend() -> AsyncIterator[LocalBackend]:
    b = LocalBackend(n_ctx=WINDOW, parallel=2)
    yield b
    await b.aclose()


async def _until(predicate, what: str, seconds: float = 60.0) -> None:
    for _ in range(int(seconds / 0.01)):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"waited {seconds} s for {what}")


async def test_concurrent_requests_answer_as_they_would_alone(backend: LocalBackend):
    alone = [(await backend.complete(story(t))).choices[0].text for t in TOPICS]
    assert all(text.strip() for text in alone)
    peak = {"active": 0, "queued": 0}

    async def watch() -> None:
        while True:
            peak["active"] = max(peak["active"], backend.active_sequences)
            peak["queued"] = max(peak["queued"], backend.queue_depth)
            await asyncio.sleep(0.005)

    watcher = asyncio.create_task(watch())
    try:
        together = await asyncio.wait_for(asyncio.gather(*(backend.complete(story(t)) for t in TOPICS)), 120)
    finally:
        watcher.cancel()
    assert [r.choices[0].text for r in together] == alone  # same seed, same text, batched or not
    assert all(0 < r.usage.output_tokens <= 24 for r in together)
    # three requests, two slots: two decode together, the third waits for a free slot
    assert peak["active"] == 2 and peak["queued"] >= 1
    assert backend.active_sequences == 0 and backend.queue_depth == 0


async def test_memory_is_parallel_context_windows(backend: LocalBackend):
    await backend.load()
    assert backend.kv_cells == 2 * WINDOW
    too_long = ask("word " * (WINDOW + 10), max_tokens=4)
    with pytest.raises(Exception) as err:
        await backend.complete(too_long)
    assert getattr(err.value, "code", None) == "context_length_exceeded"


async def test_n_alternatives_read_their_prompt_once(backend: LocalBackend):
    request = story("a lighthouse keeper", n=3, max_tokens=16)
    request.messages = orjson.dumps([{"role": "user", "content": f"[{secrets.token_hex(8)}] Tell me a story."}])
    before = backend.prompt_tokens_decoded
    result = await backend.complete(request)
    decoded = backend.prompt_tokens_decoded - before
    assert [c.index for c in result.choices] == [0, 1, 2]
    assert all(c.text.strip() for c in result.choices)
    assert len({c.text for c in result.choices}) > 1  # seeds seed, seed+1, seed+2
    assert 0 < result.usage.output_tokens <= 48
    # one read of the prompt, shared; each other alternative decodes only the last token again
    # for its own logits (a prefix of the prompt may also have been cached already)
    assert decoded <= result.usage.input_tokens + 2
    again = await backend.complete(request)
    assert [c.text for c in again.choices] == [c.text for c in result.choices]
    assert again.usage.cached_tokens == again.usage.input_tokens - 1


async def test_a_cancelled_sequence_leaves_while_the_other_finishes(backend: LocalBackend):
    short = story("a painter", max_tokens=32)
    expected = (await backend.complete(short)).choices[0].text
    before = len(backend.cancelled)
    long = backend.stream(ask("List numbers.", **LONG))
    first = await asyncio.wait_for(anext(long), 60)
    assert first.text
    other = asyncio.create_task(backend.complete(short))
    await _until(lambda: backend.active_sequences == 2, "both sequences decoding")
    await long.aclose()
    await _until(lambda: len(backend.cancelled) > before, "the cancelled sequence to leave")
    assert backend.cancelled[-1] < 300  # far from the ~400 tokens its grammar forces
    result = await asyncio.wait_for(other, 60)
    assert result.choices[0].text == expected


async def test_a_request_joins_mid_generation(backend: LocalBackend):
    quick = story("a small robot", max_tokens=12)
    expected = (await backend.complete(quick)).choices[0].text
    pieces: list[str] = []
    finished = asyncio.Event()

    async def long_one() -> None:
        async for d in backend.stream(ask("List numbers.", **LONG)):
            if d.text:
                pieces.append(d.text)
        finished.set()

    task = asyncio.create_task(long_one())
    try:
        await _until(lambda: len(pieces) >= 5, "the long generation to be under way")
        result = await asyncio.wait_for(backend.complete(quick), 60)
        # it did not wait for the long one: it joined the batch and finished first
        assert not finished.is_set()
        assert result.choices[0].text == expected
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


SYSTEM = ("You are a patient assistant for a bakery. " + " ".join(
    f"Rule {i}: answer about bread number {i} with care, kindness and short sentences." for i in range(30)))


async def test_a_follow_up_reuses_its_cached_prefix_and_answers_as_cold(backend: LocalBackend):
    greedy = {"temperature": 0, "max_tokens": 16}
    first = await backend.complete(ask("Which bread is best for toast?", system=SYSTEM, **greedy))
    follow_messages = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "Which bread is best for toast?"},
        {"role": "assistant", "content": first.choices[0].text},
        {"role": "user", "content": "And for sandwiches?"},
    ]
    follow = ChatRequest(model="m", messages=orjson.dumps(follow_messages), params=greedy)
    before = backend.prompt_tokens_decoded
    warm = await backend.complete(follow)
    assert warm.usage.cached_tokens >= first.usage.input_tokens - 1
    assert backend.prompt_tokens_decoded - before == warm.usage.input_tokens - warm.usage.cached_tokens

    cold_backend = LocalBackend(n_ctx=WINDOW, parallel=1)
    try:
        cold = await cold_backend.complete(follow)
    finally:
        await cold_backend.aclose()
    assert cold.usage.cached_tokens == 0
    assert warm.choices[0].text == cold.choices[0].text
    assert warm.usage.input_tokens == cold.usage.input_tokens


async def test_grammar_constrained_and_plain_sequences_batch(backend: LocalBackend):
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    structured = ask("In which city is the Eiffel Tower? Answer in JSON.", temperature=0, max_tokens=32,
                     response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}})
    alone = (await backend.complete(structured)).choices[0].text
    together = await asyncio.wait_for(
        asyncio.gather(backend.complete(structured), backend.complete(story("a city at night"))), 120)
    assert together[0].choices[0].text == alone
    assert isinstance(json.loads(alone)["city"], str)
    assert together[1].choices[0].text.strip()


async def test_a_streamed_n_request_interleaves_its_alternatives(backend: LocalBackend):
    request = story("two friends", n=2, max_tokens=12)
    deltas = [d async for d in backend.stream(request)]
    order = [d.index for d in deltas if d.text]
    assert set(order) == {0, 1}
    # both decode together: alternative 1's text starts before alternative 0's ends
    assert order.index(1) < len(order) - 1 - order[::-1].index(0)
    finishes = {d.index: d.finish_reason for d in deltas if d.finish_reason}
    assert set(finishes) == {0, 1}
    assert deltas[-1].usage is not None and deltas[-1].usage.output_tokens <= 24
