"""POST /v1/responses/input_tokens and POST /v1/responses/compact through the official SDK.

Against the mock upstream the token count is the documented estimate (4 tokens a message plus
one per 4 UTF-8 bytes of its text, see `branchwise.services.tokens`) and the upstream is never
called; with the embedded model it is exact: what a real response reports as `usage.input_tokens`.
Compaction makes one upstream call whose messages hold the history; its output goes back in as
`input`. The mock echoes `[N messages] Echo: <last user text>`.
"""

from __future__ import annotations

import math
import re

import openai
import pytest

from branchwise.services.compact import COMPACT_PROMPT, COMPACT_REQUEST, SUMMARY_HEADER
from branchwise.settings import Settings

from .helpers import MODEL, new_conversation, serving

RESP_ID = re.compile(r"^resp_[0-9a-f]{48}$")
MSG_ID = re.compile(r"^msg_[0-9a-f]{48}$")


def estimate(*texts: str) -> int:
    """The documented estimate for messages with these texts."""
    return sum(4 + math.ceil(len(t.encode()) / 4) for t in texts)


async def count(client: openai.AsyncOpenAI, **kw) -> int:
    r = await client.responses.input_tokens.count(model=kw.pop("model", MODEL), **kw)
    assert r.object == "response.input_tokens"
    return r.input_tokens


def text_of(item) -> str:
    return "".join(p.text for p in item.content)


# The SDK types a compaction's output messages as `ResponseOutputMessage` (role "assistant",
# `output_text` parts) although OpenAI's spec and its own example have user messages with
# `input_text` parts there; sending them back as input works but pydantic warns while dumping.
sdk_dump_warning = pytest.mark.filterwarnings("ignore:Pydantic serializer warnings:UserWarning")


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


# ---------------------------------------------------------------- compact


@sdk_dump_warning
async def test_compact_a_previous_response(client, raw, mock):
    r1 = await client.responses.create(model=MODEL, input="Let's plan a trip to Lisbon.")
    r2 = await client.responses.create(model=MODEL, previous_response_id=r1.id, input="Three days in May.")
    mock.clear()

    c = await client.responses.compact(model=MODEL, previous_response_id=r2.id, instructions="Be a travel agent.")
    assert c.object == "response.compaction" and RESP_ID.match(c.id) and c.created_at > 0
    # the conversation ended on an answer: the output is the summary alone
    assert len(c.output) == 1
    summary = c.output[0]
    assert summary.type == "message" and summary.role == "user" and MSG_ID.match(summary.id)
    assert summary.content[0].type == "input_text"
    assert text_of(summary).startswith(SUMMARY_HEADER)

    assert len(mock.requests) == 1
    sent = mock.requests[0]["messages"]
    assert sent[0]["role"] == "system" and sent[0]["content"].startswith(COMPACT_PROMPT)
    assert "Be a travel agent." in sent[0]["content"]
    assert [(m["role"], m["content"]) for m in sent[1:5]] == [
        ("user", "Let's plan a trip to Lisbon."), ("assistant", r1.output_text),
        ("user", "Three days in May."), ("assistant", r2.output_text)]
    assert sent[5] == {"role": "user", "content": COMPACT_REQUEST}
    assert len(sent) == 6
    # the summary is the model's reply; usage is the upstream's
    assert text_of(summary) == SUMMARY_HEADER + f"[6 messages] Echo: {COMPACT_REQUEST}"
    words = sum(len(m["content"].split()) for m in sent)
    reply = text_of(summary).removeprefix(SUMMARY_HEADER)
    assert (c.usage.input_tokens, c.usage.output_tokens) == (words, len(reply.split()))
    assert c.usage.total_tokens == c.usage.input_tokens + c.usage.output_tokens

    # the wire shape, field by field
    body = (await raw.post("/v1/responses/compact", json={"model": MODEL, "previous_response_id": r2.id})).json()
    assert set(body) == {"id", "object", "created_at", "output", "usage"}
    assert set(body["output"][0]) == {"id", "type", "status", "role", "content"}

    # the compaction continues the conversation: its output goes back in as input
    mock.clear()
    nxt = await client.responses.create(model=MODEL, input=[*c.output, {"role": "user", "content": "Hotels?"}])
    assert nxt.status == "completed" and nxt.output_text == "[2 messages] Echo: Hotels?"
    assert mock.requests[0]["messages"] == [{"role": "user", "content": text_of(summary)},
                                            {"role": "user", "content": "Hotels?"}]


@sdk_dump_warning
async def test_compact_keeps_the_unanswered_user_turn(client, mock):
    conv = await client.conversations.create(items=[
        {"role": "user", "content": "I like green."},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Noted."}]},
    ])
    c = await client.responses.compact(model=MODEL, input="Pick a paint colour for me.",
                                       extra_body={"conversation": conv.id})
    assert len(mock.requests) == 1
    sent = mock.requests[0]["messages"]
    assert [m["content"] for m in sent[1:-1]] == ["I like green.", "Noted.", "Pick a paint colour for me."]
    # the summary, then the last user message verbatim (it was never answered)
    assert [it.role for it in c.output] == ["user", "user"]
    assert text_of(c.output[1]) == "Pick a paint colour for me."
    # nothing was stored: the conversation is as it was
    listed = [it async for it in client.conversations.items.list(conv.id, order="asc")]
    assert [text_of(it) for it in listed] == ["I like green.", "Noted."]

    # continuing from the compaction: the upstream sees the summary and the kept question
    mock.clear()
    r = await client.responses.create(model=MODEL, input=c.output)
    assert [m["content"] for m in mock.requests[0]["messages"]] == [text_of(c.output[0]),
                                                                   "Pick a paint colour for me."]
    assert r.output_text == "[2 messages] Echo: Pick a paint colour for me."


async def test_compact_bad_input_and_upstream_failure(client, raw, mock):
    r = await raw.post("/v1/responses/compact", json={"input": "hi"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "missing_required_parameter"
    assert r.json()["error"]["param"] == "model"
    with pytest.raises(openai.BadRequestError) as e:
        await client.responses.compact(model=None, input="hi")
    assert e.value.param == "model"
    with pytest.raises(openai.NotFoundError) as e:
        await client.responses.compact(model=MODEL, input="hi", extra_body={"conversation": "conv_" + "0" * 48})
    assert e.value.body["param"] == "conversation"
    with pytest.raises(openai.BadRequestError) as e:
        await client.responses.compact(model=MODEL, previous_response_id="resp_" + "0" * 48)
    assert e.value.code == "previous_response_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        await client.responses.compact(model=MODEL)
    assert e.value.code == "missing_required_parameter" and e.value.param == "input"
    r = await raw.post("/v1/responses/compact", json={"model": MODEL, "input": "hi", "tools": []})
    assert r.status_code == 400 and r.json()["error"]["code"] == "unknown_parameter"
    assert mock.requests == []

    conv = await new_conversation(client, "hello [[fail=500]]")
    with pytest.raises(openai.InternalServerError) as e:
        await client.responses.compact(model=MODEL, extra_body={"conversation": conv.id})
    assert e.value.status_code == 502
    err = e.value.body
    assert err["type"] == "server_error" and err["code"] == "server_error" and "500" in err["message"]
    assert len(mock.requests) == 1
    assert len([it async for it in client.conversations.items.list(conv.id)]) == 1


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
