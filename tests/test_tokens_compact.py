"""POST /v1/responses/input_tokens through the official SDK (compaction: test_compaction.py).

Against the mock upstream the token count is the documented estimate (4 tokens a message plus
one per 4 UTF-8 bytes of its text, see `branchwise.services.tokens`) and the upstream is never
called; with the embedded model it is exact: what a real response reports as `usage.input_tokens`.
"""

from __future__ import annotations

import math

import openai
import pytest

from branchwise.settings import Settings

from .helpers import MODEL, new_conversation, serving


def estimate(*texts: str) -> int:
    """The documented estimate for messages with these texts."""
    return sum(4 + math.ceil(len(t.encode()) / 4) for t in texts)


async def count(client: openai.AsyncOpenAI, **kw) -> int:
    r = await client.responses.input_tokens.count(model=kw.pop("model", MODEL), **kw)
    assert r.object == "response.input_tokens"
    return r.input_tokens


# ---------------------------------------------------------------- input_tokens


async def test_count_string_input(client, raw, mock):
    assert await count(client, input="Hello there") == estimate("Hello there")
    body = (await raw.post("/v1/responses/input_tokens", json={"model": MODEL, "input": "Tell me a joke."})).json()
    assert body == {"object": "response.input_tokens", "input_tokens": estimate("Tell me a joke.")}
    # non-ASCII text counts by its UTF-8 bytes; `model` may be left out
    assert await count(client, model=openai.omit, input="héllo wörld ✓") == estimate("héllo wörld ✓")
    assert mock.requests == []


async def test_count_item_list_and_instructions(client, mock):
    items = [
        {"role": "user", "content": "Hi"},
        {"type": "message", "role": "assistant",
         "content": [{"type": "output_text", "text": "Hello! How can I help?", "annotations": []}]},
        {"role": "developer", "content": "Answer in French."},
        {"role": "user", "content": [{"type": "input_text", "text": "Tell me "},
                                     {"type": "input_text", "text": "a joke."}]},
    ]
    plain = await count(client, input=items)
    assert plain == estimate("Hi", "Hello! How can I help?", "Answer in French.", "Tell me a joke.")
    with_instructions = await count(client, input=items, instructions="You are a pirate.")
    assert with_instructions == plain + estimate("You are a pirate.")
    tool = {"type": "function", "name": "get_weather", "description": "Weather for a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
    assert await count(client, input=items, tools=[tool]) > plain
    assert mock.requests == []


async def test_count_grows_with_the_conversation(client, mock):
    conv = await new_conversation(client, "My name is Ada.")
    first = await count(client, conversation=conv.id, input="What is my name?")
    assert first == estimate("My name is Ada.", "What is my name?")
    assert await count(client, conversation={"id": conv.id}, input="What is my name?") == first
    assert mock.requests == []

    r = await client.responses.create(model=MODEL, conversation=conv.id, input="Remember it.")
    mock.clear()
    second = await count(client, conversation=conv.id, input="What is my name?")
    assert second == first + estimate("Remember it.", r.output_text)
    # the same history through previous_response_id
    assert await count(client, previous_response_id=r.id, input="What is my name?") == second
    # counting stored nothing: the conversation still ends with the response's answer
    listed = [it async for it in client.conversations.items.list(conv.id, order="asc")]
    assert len(listed) == 3 and listed[-1].id == r.output[-1].id
    assert mock.requests == []


async def test_count_bad_input(client, raw, mock):
    with pytest.raises(openai.NotFoundError) as e:
        await count(client, conversation="conv_" + "0" * 48, input="hi")
    assert e.value.status_code == 404 and e.value.body["param"] == "conversation"
    with pytest.raises(openai.BadRequestError) as e:
        await count(client, previous_response_id="resp_" + "0" * 48, input="hi")
    assert e.value.code == "previous_response_not_found" and e.value.param == "previous_response_id"
    r = await raw.post("/v1/responses/input_tokens", json={"model": MODEL, "input": "hi", "stream": True})
    assert r.status_code == 400 and r.json()["error"]["code"] == "unknown_parameter"
    assert r.json()["error"]["param"] == "stream"
    r = await raw.post("/v1/responses/input_tokens", json={"model": MODEL, "input": [{"role": "robot",
                                                                                      "content": "x"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "input[0].role"
    r = await raw.post("/v1/responses/input_tokens", json={"model": MODEL})
    assert r.status_code == 400 and r.json()["error"] == {
        "message": "Missing required parameter: 'input'.", "type": "invalid_request_error", "param": "input",
        "code": "missing_required_parameter"}
    assert mock.requests == []


# ---------------------------------------------------------------- the embedded model: exact counts


@pytest.mark.embedded
async def test_embedded_count_is_exact(db_url):
    settings = Settings(database_url=db_url, upstream_base_url=None, upstreams=[])
    async with serving(settings) as (_, client, _):
        # no upstream configured: the embedded model is the one model there is
        assert [m.id async for m in client.models.list()] == ["SmolLM2-135M-Instruct"]
        question = dict(input="What is the capital of France?", instructions="Answer in one word.")
        n = await count(client, model="any", **question)
        r = await client.responses.create(model="any", max_output_tokens=16, temperature=0, **question)
        assert n == r.usage.input_tokens > 10
        # a follow-up: the history, with the model's own answer, counts exactly too
        follow = dict(previous_response_id=r.id, input=[{"role": "user", "content": "And of Spain?"}])
        n2 = await count(client, model="any", **follow)
        r2 = await client.responses.create(model="any", max_output_tokens=16, temperature=0, **follow)
        assert n2 == r2.usage.input_tokens > n
