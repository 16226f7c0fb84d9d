"""POST/GET/DELETE /v1/responses and /input_items through the official SDK (and raw HTTP where
the exact wire shape matters), against the mock Chat Completions upstream.

The mock echoes `[N messages] Echo: <last user text>`, so `N` tells how much context the
upstream saw; `mock.requests` holds every body it received.
"""

from __future__ import annotations

import json
import re

import openai
import pytest

MODEL = "mock"
RESP_ID = re.compile(r"^resp_[0-9a-f]{48}$")
MSG_ID = re.compile(r"^msg_[0-9a-f]{48}$")

RESPONSE_FIELDS = {
    "id", "object", "created_at", "completed_at", "status", "model", "instructions",
    "previous_response_id", "conversation", "output", "error", "incomplete_details", "tools",
    "tool_choice", "parallel_tool_calls", "text", "temperature", "top_p", "max_output_tokens",
    "max_tool_calls", "truncation", "reasoning", "usage", "metadata", "store", "background",
    "service_tier", "top_logprobs", "prompt_cache_key", "safety_identifier", "user",
}


def upstream_messages(mock, i: int = -1) -> list[dict]:
    return mock.requests[i]["messages"]


def texts(messages: list[dict]) -> list[tuple[str, str]]:
    """(role, text) of chat messages whose content is a plain string."""
    return [(msg["role"], msg["content"]) for msg in messages]


# ---------------------------------------------------------------- create: inputs


async def test_create_with_string_input(client, mock):
    r = await client.responses.create(model=MODEL, input="Hello there")
    assert r.object == "response"
    assert r.status == "completed"
    assert RESP_ID.match(r.id)
    assert r.model == MODEL
    assert r.output_text == "[1 messages] Echo: Hello there"
    assert len(r.output) == 1
    msg = r.output[0]
    assert msg.type == "message" and msg.role == "assistant" and msg.status == "completed"
    assert MSG_ID.match(msg.id)
    assert msg.content[0].type == "output_text"
    assert msg.content[0].annotations == []
    assert r.error is None and r.incomplete_details is None
    assert r.previous_response_id is None and r.conversation is None
    assert r.store is True
    assert r.created_at > 0 and r.completed_at is not None and r.completed_at >= r.created_at
    # mock usage: prompt = words of all message texts, completion = words of the reply
    assert r.usage.input_tokens == 2
    assert r.usage.output_tokens == len(r.output_text.split())
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    assert upstream_messages(mock) == [{"role": "user", "content": "Hello there"}]
    assert mock.requests[-1]["model"] == MODEL


async def test_create_with_item_lists(client, mock):
    r = await client.responses.create(model=MODEL, input=[
        {"role": "developer", "content": "Be brief."},
        {"role": "system", "content": [{"type": "input_text", "text": "You are a parrot."}]},
        {"role": "user", "content": "first question"},
        {"type": "message", "role": "assistant",
         "content": [{"type": "output_text", "text": "first answer", "annotations": []}]},
        {"role": "assistant", "content": "second answer"},
        {"type": "message", "role": "user",
         "content": [{"type": "input_text", "text": "part one"}, {"type": "input_text", "text": "part two"}]},
    ])
    assert r.status == "completed"
    sent = upstream_messages(mock)
    # developer is sent as system: most Chat Completions servers know no "developer" role
    assert [m["role"] for m in sent] == ["system", "system", "user", "assistant", "assistant", "user"]
    assert sent[0]["content"] == "Be brief."
    assert sent[1]["content"] == "You are a parrot."
    assert sent[3]["content"] == "first answer"
    assert sent[4]["content"] == "second answer"
    # the mock joins text parts with a space; the server may send them as one string or parts
    assert r.output_text.startswith("[6 messages] Echo: ")
    assert "part one" in r.output_text and "part two" in r.output_text

    items = [it async for it in client.responses.input_items.list(r.id, order="asc")]
    assert [(it.type, it.role) for it in items] == [
        ("message", "developer"), ("message", "system"), ("message", "user"),
        ("message", "assistant"), ("message", "assistant"), ("message", "user"),
    ]
    assert all(MSG_ID.match(it.id) for it in items)
    assert items[0].content[0].type == "input_text" and items[0].content[0].text == "Be brief."
    assert items[3].content[0].type == "output_text" and items[3].content[0].text == "first answer"
    assert items[4].content[0].type == "output_text" and items[4].content[0].text == "second answer"
    assert [p.text for p in items[5].content] == ["part one", "part two"]


async def test_instructions_go_first_and_are_not_carried_over(client, mock):
    r1 = await client.responses.create(model=MODEL, input="hi", instructions="Talk like a pirate.")
    assert r1.instructions == "Talk like a pirate."
    assert upstream_messages(mock) == [
        {"role": "system", "content": "Talk like a pirate."},
        {"role": "user", "content": "hi"},
    ]
    assert r1.output_text == "[2 messages] Echo: hi"

    r2 = await client.responses.create(model=MODEL, input="again", previous_response_id=r1.id)
    assert r2.instructions is None
    sent = upstream_messages(mock)
    assert all(m["role"] != "system" for m in sent)
    assert texts(sent) == [("user", "hi"), ("assistant", r1.output_text), ("user", "again")]

    r3 = await client.responses.create(model=MODEL, input="third", previous_response_id=r2.id,
                                       instructions="Be formal.")
    sent = upstream_messages(mock)
    assert sent[0] == {"role": "system", "content": "Be formal."}
    assert "Talk like a pirate." not in json.dumps(sent)
    assert r3.instructions == "Be formal."
    # instructions are not input items
    items = [it async for it in client.responses.input_items.list(r1.id)]
    assert [it.role for it in items] == ["user"]


# ---------------------------------------------------------------- chaining and branching


async def test_previous_response_id_chain(client, mock):
    r1 = await client.responses.create(model=MODEL, input="one")
    r2 = await client.responses.create(model=MODEL, input="two", previous_response_id=r1.id)
    r3 = await client.responses.create(model=MODEL, input="three", previous_response_id=r2.id)
    assert r2.previous_response_id == r1.id and r3.previous_response_id == r2.id
    assert r3.output_text == "[5 messages] Echo: three"
    assert texts(upstream_messages(mock)) == [
        ("user", "one"), ("assistant", r1.output_text),
        ("user", "two"), ("assistant", r2.output_text),
        ("user", "three"),
    ]
    got = await client.responses.retrieve(r3.id)
    assert got.previous_response_id == r2.id and got.output_text == r3.output_text


async def test_branching_by_reusing_previous_response_id(client, mock):
    root = await client.responses.create(model=MODEL, input="root question")
    a = await client.responses.create(model=MODEL, input="branch A", previous_response_id=root.id)
    ctx_a = upstream_messages(mock)
    b = await client.responses.create(model=MODEL, input="branch B", previous_response_id=root.id)
    ctx_b = upstream_messages(mock)
    assert a.id != b.id
    assert a.output[0].id != b.output[0].id
    assert ctx_a[:-1] == ctx_b[:-1] == [
        {"role": "user", "content": "root question"}, {"role": "assistant", "content": root.output_text},
    ]
    assert ctx_a[-1]["content"] == "branch A" and ctx_b[-1]["content"] == "branch B"
    assert a.output_text == "[3 messages] Echo: branch A"
    assert b.output_text == "[3 messages] Echo: branch B"
    # continuing branch A does not see branch B, and vice versa
    a2 = await client.responses.create(model=MODEL, input="deeper", previous_response_id=a.id)
    sent = json.dumps(upstream_messages(mock))
    assert "branch A" in sent and "branch B" not in sent
    assert a2.output_text == "[5 messages] Echo: deeper"


async def test_unknown_previous_response_id_is_400(client):
    with pytest.raises(openai.BadRequestError) as ei:
        await client.responses.create(model=MODEL, input="x", previous_response_id="resp_" + "0" * 48)
    assert ei.value.code == "previous_response_not_found"
    assert ei.value.param == "previous_response_id"


# ---------------------------------------------------------------- conversations


async def test_conversation_as_string_and_as_object(client, mock):
    conv = await client.conversations.create(metadata={"topic": "demo"})
    r1 = await client.responses.create(model=MODEL, input="first", conversation=conv.id)
    assert r1.conversation is not None and r1.conversation.id == conv.id
    assert r1.output_text == "[1 messages] Echo: first"

    r2 = await client.responses.create(model=MODEL, input="second", conversation={"id": conv.id})
    assert r2.conversation.id == conv.id
    assert r2.previous_response_id is None
    assert texts(upstream_messages(mock)) == [
        ("user", "first"), ("assistant", r1.output_text), ("user", "second"),
    ]
    assert r2.output_text == "[3 messages] Echo: second"

    items = [it async for it in client.conversations.items.list(conv.id, order="asc")]
    assert [it.id for it in items][1] == r1.output[0].id
    assert [it.id for it in items][3] == r2.output[0].id
    assert [(it.type, it.role) for it in items] == [("message", "user"), ("message", "assistant")] * 2

    # a response on a conversation lists only its own input items
    own = [it async for it in client.responses.input_items.list(r2.id)]
    assert len(own) == 1 and own[0].content[0].text == "second"
    assert own[0].id == items[2].id


async def test_conversation_and_previous_response_id_together_is_400(client):
    conv = await client.conversations.create()
    r = await client.responses.create(model=MODEL, input="x")
    with pytest.raises(openai.BadRequestError):
        await client.responses.create(model=MODEL, input="y", conversation=conv.id, previous_response_id=r.id)


async def test_unknown_conversation_is_404(client):
    with pytest.raises(openai.NotFoundError):
        await client.responses.create(model=MODEL, input="y", conversation="conv_" + "0" * 48)


# ---------------------------------------------------------------- store, metadata, params


async def test_store_false_is_not_retrievable(client, mock):
    r = await client.responses.create(model=MODEL, input="ephemeral", store=False)
    assert r.status == "completed" and r.store is False
    assert r.output_text == "[1 messages] Echo: ephemeral"
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve(r.id)
    with pytest.raises(openai.NotFoundError):
        await client.responses.input_items.list(r.id)
    with pytest.raises(openai.BadRequestError) as ei:
        await client.responses.create(model=MODEL, input="next", previous_response_id=r.id)
    assert ei.value.code == "previous_response_not_found"


async def test_metadata_is_kept(client):
    meta = {"user": "ada", "ticket": "T-1", "empty": ""}
    r = await client.responses.create(model=MODEL, input="m", metadata=meta)
    assert r.metadata == meta
    assert (await client.responses.retrieve(r.id)).metadata == meta
    r2 = await client.responses.create(model=MODEL, input="no metadata")
    assert r2.metadata == {}


async def test_sampling_params_go_upstream(client, mock):
    r = await client.responses.create(model=MODEL, input="p", temperature=0.3, top_p=0.9,
                                      max_output_tokens=100)
    body = mock.requests[-1]
    assert body["temperature"] == 0.3
    assert body["top_p"] == 0.9
    assert body["max_tokens"] == 100
    assert "max_output_tokens" not in body
    assert (r.temperature, r.top_p, r.max_output_tokens) == (0.3, 0.9, 100)
    got = await client.responses.retrieve(r.id)
    assert (got.temperature, got.top_p, got.max_output_tokens) == (0.3, 0.9, 100)

    await client.responses.create(model=MODEL, input="defaults")
    body = mock.requests[-1]
    assert "temperature" not in body and "top_p" not in body and "max_tokens" not in body


async def test_max_output_tokens_below_16_is_400(client):
    with pytest.raises(openai.BadRequestError) as ei:
        await client.responses.create(model=MODEL, input="x", max_output_tokens=15)
    assert ei.value.param == "max_output_tokens"


async def test_text_format_json_schema(client, mock):
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"],
        "additionalProperties": False,
    }
    r = await client.responses.create(model=MODEL, input="who?", text={
        "format": {"type": "json_schema", "name": "person", "schema": schema, "strict": True},
    })
    assert mock.requests[-1]["response_format"] == {
        "type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True},
    }
    assert json.loads(r.output_text) == {"name": "name", "age": 1}
    assert r.text.format.type == "json_schema"
    assert r.text.format.name == "person"
    assert r.text.format.schema_ == schema
    assert r.text.format.strict is True


async def test_text_format_json_object(client, mock):
    r = await client.responses.create(model=MODEL, input="give json", text={"format": {"type": "json_object"}})
    assert mock.requests[-1]["response_format"] == {"type": "json_object"}
    assert json.loads(r.output_text) == {"echo": "give json"}
    assert r.text.format.type == "json_object"


async def test_text_format_text_sends_no_response_format(client, mock):
    r = await client.responses.create(model=MODEL, input="plain", text={"format": {"type": "text"}})
    assert "response_format" not in mock.requests[-1]
    assert r.text.format.type == "text"


async def test_user_and_safety_identifier_go_upstream_as_user(client, mock):
    r = await client.responses.create(model=MODEL, input="u", user="legacy-user")
    assert mock.requests[-1]["user"] == "legacy-user"
    assert r.user == "legacy-user"
    r = await client.responses.create(model=MODEL, input="s", safety_identifier="hashed-123")
    assert mock.requests[-1]["user"] == "hashed-123"
    assert r.safety_identifier == "hashed-123"
    await client.responses.create(model=MODEL, input="none")
    assert "user" not in mock.requests[-1]


# ---------------------------------------------------------------- wire shape


async def test_raw_response_has_every_field(raw):
    resp = await raw.post("/v1/responses", json={"model": MODEL, "input": "shape"})
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("application/json")
    body = resp.json()
    missing = RESPONSE_FIELDS - body.keys()
    assert not missing, f"missing fields: {sorted(missing)}"
    assert RESP_ID.match(body["id"])
    assert body["object"] == "response"
    assert body["status"] == "completed"
    assert isinstance(body["created_at"], int) and isinstance(body["completed_at"], int)
    for key in ("instructions", "previous_response_id", "conversation", "error", "incomplete_details",
                "max_output_tokens", "max_tool_calls", "prompt_cache_key", "safety_identifier", "user"):
        assert body[key] is None, key
    assert body["tools"] == [] and body["metadata"] == {}
    assert body["tool_choice"] == "auto" and body["parallel_tool_calls"] is True
    assert body["text"]["format"] == {"type": "text"}
    assert body["truncation"] == "disabled"
    assert body["store"] is True and body["background"] is False
    assert isinstance(body["temperature"], float) and isinstance(body["top_p"], float)
    assert isinstance(body["top_logprobs"], int)
    assert isinstance(body["reasoning"], dict)
    usage = body["usage"]
    assert set(usage) >= {"input_tokens", "input_tokens_details", "output_tokens", "output_tokens_details",
                          "total_tokens"}
    assert usage["input_tokens_details"] == {"cached_tokens": 0, "cache_write_tokens": 0}
    assert usage["output_tokens_details"] == {"reasoning_tokens": 0}
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]

    [msg] = body["output"]
    assert MSG_ID.match(msg["id"])
    assert msg["type"] == "message" and msg["role"] == "assistant" and msg["status"] == "completed"
    [part] = msg["content"]
    assert set(part) >= {"type", "text", "annotations", "logprobs"}
    assert part["type"] == "output_text" and part["annotations"] == [] and isinstance(part["logprobs"], list)
    assert part["text"] == "[1 messages] Echo: shape"

    # the retrieved object is the same object
    got = await raw.get(f"/v1/responses/{body['id']}")
    assert got.status_code == 200
    assert got.json() == body


async def test_raw_response_validates_as_sdk_response(raw):
    import openai.types.responses as t

    body = (await raw.post("/v1/responses", json={
        "model": MODEL, "input": "strict", "instructions": "sys", "metadata": {"k": "v"},
        "temperature": 0.5, "max_output_tokens": 64, "text": {"format": {"type": "json_object"}},
    })).json()
    r = t.Response.model_validate(body)
    assert r.instructions == "sys" and r.metadata == {"k": "v"} and r.max_output_tokens == 64
    t.Response.model_validate((await raw.get(f"/v1/responses/{r.id}")).json())

    # incomplete and failed responses validate too (error.code is a ResponseErrorCode)
    for extra in ({"input": "[[words=40]] x", "max_output_tokens": 16}, {"input": "[[fail=500]] x"},
                  {"input": "[[reasoning=hmm]] x"}):
        body = (await raw.post("/v1/responses", json={"model": MODEL, **extra})).json()
        assert body["status"] in ("incomplete", "failed", "completed")
        t.Response.model_validate(body)


# ---------------------------------------------------------------- incomplete and failed


async def test_max_output_tokens_truncates_to_incomplete(client, mock):
    r = await client.responses.create(model=MODEL, input="[[words=40]] long please", max_output_tokens=16)
    assert mock.requests[-1]["max_tokens"] == 16
    assert r.status == "incomplete"
    assert r.incomplete_details is not None and r.incomplete_details.reason == "max_output_tokens"
    assert r.error is None
    assert len(r.output_text.split(" ")) == 16
    assert r.output_text.startswith("[1 messages] w1 w2")
    assert r.output[0].status == "incomplete"
    got = await client.responses.retrieve(r.id)
    assert got.status == "incomplete" and got.incomplete_details.reason == "max_output_tokens"
    assert got.output_text == r.output_text


async def test_upstream_failure_is_a_failed_response(client, mock):
    r = await client.responses.create(model=MODEL, input="[[fail=500]] boom")
    assert r.status == "failed"
    # error.code is one of OpenAI's ResponseErrorCode values; the message says what went wrong
    assert r.error is not None and r.error.code == "server_error"
    assert "500" in r.error.message
    assert r.output == []
    assert r.incomplete_details is None
    got = await client.responses.retrieve(r.id)
    assert got.status == "failed"
    assert got.error.code == r.error.code
    # the input was kept
    items = [it async for it in client.responses.input_items.list(r.id)]
    assert len(items) == 1 and items[0].content[0].text == "[[fail=500]] boom"


async def test_failed_response_on_conversation_leaves_it_unchanged(client, mock):
    conv = await client.conversations.create()
    ok = await client.responses.create(model=MODEL, input="fine", conversation=conv.id)
    bad = await client.responses.create(model=MODEL, input="[[fail=503]] nope", conversation=conv.id)
    assert bad.status == "failed" and bad.conversation.id == conv.id
    items = [it async for it in client.conversations.items.list(conv.id, order="asc")]
    assert [it.id for it in items][-1] == ok.output[0].id
    assert len(items) == 2


# ---------------------------------------------------------------- retrieve and delete


async def test_retrieve_and_delete(client, raw):
    r = await client.responses.create(model=MODEL, input="keep me", metadata={"a": "b"})
    got = await client.responses.retrieve(r.id)
    assert got.id == r.id and got.output_text == r.output_text and got.metadata == {"a": "b"}
    assert got.output[0].id == r.output[0].id

    resp = await raw.delete(f"/v1/responses/{r.id}")
    assert resp.status_code == 200
    assert resp.json() == {"id": r.id, "object": "response", "deleted": True}
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve(r.id)
    assert (await raw.delete(f"/v1/responses/{r.id}")).status_code == 404

    r2 = await client.responses.create(model=MODEL, input="delete through the SDK")
    assert await client.responses.delete(r2.id) is None
    with pytest.raises(openai.NotFoundError) as ei:
        await client.responses.retrieve(r2.id)
    assert ei.value.status_code == 404
    body = ei.value.body
    assert isinstance(body, dict) and body.get("message")


async def test_unknown_response_id_is_404(client, raw):
    bogus = "resp_" + "f" * 48
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve(bogus)
    with pytest.raises(openai.NotFoundError):
        await client.responses.delete(bogus)
    with pytest.raises(openai.NotFoundError):
        await client.responses.input_items.list(bogus)
    resp = await raw.get(f"/v1/responses/{bogus}")
    assert resp.status_code == 404
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}


# ---------------------------------------------------------------- input_items


async def _three_inputs(client):
    return await client.responses.create(model=MODEL, input=[
        {"role": "user", "content": "alpha"},
        {"role": "assistant", "content": "beta"},
        {"role": "user", "content": "gamma"},
    ])


async def test_input_items_order_and_paging(client):
    r = await _three_inputs(client)

    page = await client.responses.input_items.list(r.id)
    assert page.object == "list"
    texts_desc = [it.content[0].text for it in page.data]
    assert texts_desc == ["gamma", "beta", "alpha"]  # default order is desc
    assert page.first_id == page.data[0].id and page.last_id == page.data[-1].id
    assert page.has_more is False

    page = await client.responses.input_items.list(r.id, order="asc")
    asc = page.data
    assert [it.content[0].text for it in asc] == ["alpha", "beta", "gamma"]

    page = await client.responses.input_items.list(r.id, limit=1)
    assert len(page.data) == 1 and page.has_more is True
    assert page.data[0].content[0].text == "gamma"

    # auto-paging, one item per page, both orders
    got = [it.content[0].text async for it in client.responses.input_items.list(r.id, limit=1)]
    assert got == ["gamma", "beta", "alpha"]
    got = [it.content[0].text async for it in client.responses.input_items.list(r.id, limit=1, order="asc")]
    assert got == ["alpha", "beta", "gamma"]

    # `after` an item id
    page = await client.responses.input_items.list(r.id, order="asc", after=asc[0].id)
    assert [it.content[0].text for it in page.data] == ["beta", "gamma"]
    page = await client.responses.input_items.list(r.id, after=asc[2].id)
    assert [it.content[0].text for it in page.data] == ["beta", "alpha"]
    page = await client.responses.input_items.list(r.id, order="asc", after=asc[2].id)
    assert page.data == [] and page.has_more is False


async def test_input_items_limit_bounds(raw, client):
    r = await client.responses.create(model=MODEL, input="x")
    for bad in (0, 101):
        resp = await raw.get(f"/v1/responses/{r.id}/input_items", params={"limit": bad})
        assert resp.status_code == 400
        assert resp.json()["error"]["param"] == "limit"
    resp = await raw.get(f"/v1/responses/{r.id}/input_items", params={"order": "sideways"})
    assert resp.status_code == 400


async def test_input_items_of_chained_response_are_its_own(client):
    r1 = await client.responses.create(model=MODEL, input=[
        {"role": "user", "content": "a1"}, {"role": "user", "content": "a2"},
    ])
    r2 = await client.responses.create(model=MODEL, input="b1", previous_response_id=r1.id)
    items = [it async for it in client.responses.input_items.list(r2.id)]
    assert [it.content[0].text for it in items] == ["b1"]
    items = [it async for it in client.responses.input_items.list(r1.id, order="asc")]
    assert [it.content[0].text for it in items] == ["a1", "a2"]


async def test_input_items_of_conversation_response(client):
    conv = await client.conversations.create(items=[{"type": "message", "role": "user", "content": "seed"}])
    r1 = await client.responses.create(model=MODEL, conversation=conv.id, input=[
        {"role": "user", "content": "c1"}, {"role": "user", "content": "c2"},
    ])
    assert r1.output_text == "[3 messages] Echo: c2"
    items = [it async for it in client.responses.input_items.list(r1.id, order="asc")]
    assert [it.content[0].text for it in items] == ["c1", "c2"]
    paged = [it.id async for it in client.responses.input_items.list(r1.id, limit=1)]
    assert paged == [items[1].id, items[0].id]
    r2 = await client.responses.create(model=MODEL, conversation=conv.id, input="c3")
    assert r2.output_text == "[5 messages] Echo: c3"
    items = [it async for it in client.responses.input_items.list(r2.id)]
    assert [it.content[0].text for it in items] == ["c3"]


async def test_input_items_unknown_after_is_404(client):
    r = await client.responses.create(model=MODEL, input="x")
    with pytest.raises(openai.NotFoundError):
        await client.responses.input_items.list(r.id, after="msg_" + "0" * 48)


async def test_empty_input_with_previous_response_id(client, mock):
    r1 = await client.responses.create(model=MODEL, input="only turn")
    r2 = await client.responses.create(model=MODEL, input=[], previous_response_id=r1.id)
    assert r2.status == "completed"
    assert texts(upstream_messages(mock)) == [("user", "only turn"), ("assistant", r1.output_text)]
    assert r2.output_text == "[2 messages] Echo: only turn"
    page = await client.responses.input_items.list(r2.id)
    assert page.data == [] and page.has_more is False and page.first_id is None


async def test_missing_input_is_400(raw):
    resp = await raw.post("/v1/responses", json={"model": MODEL})
    assert resp.status_code == 400
    assert resp.json()["error"]["param"] == "input"


# ---------------------------------------------------------------- structured output via the SDK helper


async def test_responses_parse_with_pydantic_text_format(client, mock):
    from pydantic import BaseModel

    class Person(BaseModel):
        name: str
        age: int

    r = await client.responses.parse(model=MODEL, input="who is it?", text_format=Person)
    fmt = mock.requests[-1]["response_format"]
    assert fmt["type"] == "json_schema" and fmt["json_schema"]["name"] == "Person"
    assert fmt["json_schema"]["strict"] is True
    assert r.output_parsed == Person(name="name", age=1)
    assert r.text.format.type == "json_schema" and r.text.format.name == "Person"


async def test_server_timing_header(raw, mock):
    r = await raw.post("/v1/responses", json={"model": "m", "input": "[[delay=0.2]] hi"})
    own, upstream = r.headers["server-timing"].split(", ")
    assert own.startswith("branchwise;dur=") and upstream.startswith("upstream;dur=")
    own_ms, up_ms = float(own.split("=")[1]), float(upstream.split("=")[1])
    assert up_ms >= 200  # the mock waited 0.2 s: that time is the upstream's, not branchwise's
    assert own_ms >= 0
    s = await raw.post("/v1/responses", json={"model": "m", "input": "hi", "stream": True})
    assert s.headers["server-timing"].startswith("branchwise;dur=")
