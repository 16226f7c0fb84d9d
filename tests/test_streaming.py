"""POST /v1/responses with `stream: true`: OpenAI's event order, sequence numbers, dense
indexes, the SDK's `responses.stream()` helper, and every raw SSE event validated against the
SDK's own event types.
"""

from __future__ import annotations

import json
import re

import openai
import pytest

from .helpers import MODEL, parse_sse, post_sse, validate_event

RESP_ID = re.compile(r"^resp_[0-9a-f]{48}$")
MSG_ID = re.compile(r"^msg_[0-9a-f]{48}$")
RS_ID = re.compile(r"^rs_[0-9a-f]{48}$")


def text_events(n_deltas: int, terminal: str = "response.completed") -> list[str]:
    return [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * n_deltas,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        terminal,
    ]


async def sdk_events(client, **kwargs) -> list:
    stream = await client.responses.create(model=MODEL, stream=True, **kwargs)
    return [ev async for ev in stream]


def check_raw_events(events: list[tuple[str, dict]]) -> list:
    """Each event validates as the SDK's ResponseStreamEvent and names its type in `event:`;
    sequence numbers count from 0."""
    parsed = []
    for i, (name, data) in enumerate(events):
        parsed.append(validate_event(name, data))
        assert data["sequence_number"] == i
    return parsed


# ---------------------------------------------------------------- order and numbering


async def test_text_stream_event_order(client, mock):
    events = await sdk_events(client, input="Hello stream")
    types = [e.type for e in events]
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert len(deltas) >= 2  # the mock streams one word per chunk
    assert types == text_events(len(deltas))
    assert [e.sequence_number for e in events] == list(range(len(events)))

    created, in_progress, added, part_added = events[:4]
    text_done, part_done, item_done, completed = events[-4:]
    assert RESP_ID.match(created.response.id)
    assert created.response.status == "in_progress" and created.response.output == []
    assert in_progress.response.id == created.response.id and in_progress.response.status == "in_progress"

    assert added.output_index == 0
    assert added.item.type == "message" and added.item.role == "assistant"
    assert added.item.status == "in_progress" and added.item.content == []
    item_id = added.item.id
    assert MSG_ID.match(item_id)
    assert part_added.item_id == item_id and part_added.output_index == 0 and part_added.content_index == 0
    assert part_added.part.type == "output_text" and part_added.part.text == ""

    joined = "".join(d.delta for d in deltas)
    assert joined == "[1 messages] Echo: Hello stream"
    assert all(d.item_id == item_id and d.output_index == 0 and d.content_index == 0 for d in deltas)

    assert text_done.text == joined and text_done.item_id == item_id
    assert part_done.part.type == "output_text" and part_done.part.text == joined
    assert item_done.item.id == item_id and item_done.item.status == "completed"
    assert item_done.item.content[0].text == joined

    final = completed.response
    assert final.id == created.response.id
    assert final.status == "completed"
    assert final.output_text == joined
    assert final.usage is not None and final.usage.output_tokens == len(joined.split())
    assert final.usage.total_tokens == final.usage.input_tokens + final.usage.output_tokens

    got = await client.responses.retrieve(final.id)
    assert got.status == "completed"
    assert got.output_text == joined
    assert got.output[0].id == item_id

    body = mock.requests[-1]
    assert body["stream"] is True
    assert body["messages"] == [{"role": "user", "content": "Hello stream"}]


async def test_stream_helper_get_final_response(client):
    deltas = []
    async with client.responses.stream(model=MODEL, input="helper test") as stream:
        async for event in stream:
            if event.type == "response.output_text.delta":
                deltas.append(event.delta)
                assert event.snapshot == "".join(deltas)
        final = await stream.get_final_response()
    assert final.status == "completed"
    assert final.output_text == "".join(deltas) == "[1 messages] Echo: helper test"
    assert RESP_ID.match(final.id)
    got = await client.responses.retrieve(final.id)
    assert got.output_text == final.output_text
    assert got.output[0].id == final.output[0].id


async def test_stream_helper_with_reasoning(client):
    async with client.responses.stream(model=MODEL, input="[[reasoning=deep thoughts]] why") as stream:
        final = await stream.get_final_response()
    assert [o.type for o in final.output] == ["reasoning", "message"]
    assert final.output_text == "[1 messages] Echo: why"


# ---------------------------------------------------------------- raw SSE against the SDK's types


async def test_raw_sse_events_validate_against_sdk_types(raw):
    events = await post_sse(raw, {"input": "validate me", "instructions": "sys", "metadata": {"k": "v"}})
    parsed = check_raw_events(events)
    assert [p.type for p in parsed] == text_events(len(parsed) - 8)
    final = events[-1][1]["response"]
    assert final["metadata"] == {"k": "v"} and final["instructions"] == "sys"
    part = final["output"][0]["content"][0]
    assert set(part) >= {"type", "text", "annotations", "logprobs"}
    # created carries every field, like the final object
    assert set(events[0][1]["response"]) == set(final)


async def test_raw_sse_reasoning_events_validate(raw):
    events = await post_sse(raw, {"input": "[[reasoning=some thoughts]] think"})
    parsed = check_raw_events(events)
    types = [p.type for p in parsed]
    assert "response.reasoning.delta" in types
    assert types[-1] == "response.completed"


async def test_raw_sse_incomplete_events_validate(raw):
    events = await post_sse(raw, {"input": "[[words=40]] long", "max_output_tokens": 16})
    parsed = check_raw_events(events)
    assert parsed[-1].type == "response.incomplete"


async def test_raw_sse_failed_events_validate(raw):
    events = await post_sse(raw, {"input": "[[fail=500]] boom"})
    parsed = check_raw_events(events)
    assert [p.type for p in parsed] == ["response.created", "response.in_progress", "response.failed"]
    assert parsed[-1].response.error is not None


async def test_raw_sse_json_schema_events_validate(raw):
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
              "additionalProperties": False}
    events = await post_sse(raw, {"input": "where?", "text": {"format": {
        "type": "json_schema", "name": "place", "schema": schema, "strict": True}}})
    parsed = check_raw_events(events)
    assert parsed[-1].type == "response.completed"
    assert json.loads(parsed[-1].response.output_text) == {"city": "city"}


TOOL = {"type": "function", "name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


def shape(events: list[tuple[str, dict]]) -> list[tuple]:
    """Each event's type and indexes, a run of deltas counting as one (a live stream sends one
    per token, a replay one per part)."""
    out: list[tuple] = []
    for name, data in events:
        key = (name, data.get("output_index"), data.get("content_index"))
        if not (name.endswith(".delta") and out and out[-1] == key):
            out.append(key)
    return out


@pytest.mark.parametrize("body", [
    {"input": "plain"},
    {"input": "[[reasoning=some thoughts]] think"},
    {"input": "[[tool]] weather?", "tools": [TOOL]},
    {"input": "[[words=40]] long", "max_output_tokens": 16, "top_logprobs": 2},
], ids=["text", "reasoning", "tool", "incomplete-logprobs"])
async def test_replay_of_an_unstreamed_response_is_its_stream(raw, body):
    """`GET /v1/responses/{id}?stream=true` of a response made without streaming: the events a
    stream of it sends, valid for the SDK, numbered from 0, with the stored items."""
    live = await post_sse(raw, body)
    r = (await raw.post("/v1/responses", json={"model": MODEL, **body})).json()
    got = await raw.get(f"/v1/responses/{r['id']}", params={"stream": "true"})
    assert got.status_code == 200 and got.headers["content-type"].startswith("text/event-stream")
    replay = parse_sse(got.text)
    check_raw_events(replay)
    assert shape(replay) == shape(live)
    assert replay[-1][1]["response"] == r
    done = [d["item"] for name, d in replay if name == "response.output_item.done"]
    assert done == r["output"]
    text = "".join(d["delta"] for name, d in replay if name == "response.output_text.delta")
    assert text == "".join(p.get("text", "") for it in r["output"] if it["type"] == "message" for p in it["content"])
    logprobs = [d["logprobs"] for name, d in replay if name == "response.output_text.done"]
    assert logprobs == [p["logprobs"] for it in r["output"] if it["type"] == "message" for p in it["content"]]


# ---------------------------------------------------------------- reasoning


async def test_reasoning_stream(client, mock):
    events = await sdk_events(client, input="[[reasoning=some thoughts]] ponder this")
    types = [e.type for e in events]
    r_deltas = [e for e in events if e.type == "response.reasoning.delta"]
    t_deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert len(r_deltas) >= 2
    assert types == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.reasoning.delta"] * len(r_deltas),
        "response.reasoning.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * len(t_deltas),
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))

    rs_added = events[2]
    assert rs_added.output_index == 0 and rs_added.item.type == "reasoning"
    assert RS_ID.match(rs_added.item.id)
    assert all(d.item_id == rs_added.item.id and d.output_index == 0 and d.content_index == 0 for d in r_deltas)
    assert "".join(d.delta for d in r_deltas) == "some thoughts"
    r_done = events[types.index("response.reasoning.done")]
    assert r_done.text == "some thoughts"
    part_added, part_done = events[3], events[types.index("response.content_part.done")]
    assert part_added.item_id == part_done.item_id == rs_added.item.id
    assert part_added.part.type == "reasoning_text" and part_added.part.text == ""
    assert part_done.part.text == "some thoughts" and part_done.content_index == 0

    msg_added = events[types.index("response.output_item.added", 3)]
    assert msg_added.output_index == 1 and msg_added.item.type == "message"
    assert all(d.output_index == 1 and d.content_index == 0 for d in t_deltas)
    joined = "".join(d.delta for d in t_deltas)
    assert joined == "[1 messages] Echo: ponder this"
    done_items = [e for e in events if e.type == "response.output_item.done"]
    assert [e.output_index for e in done_items] == [0, 1]

    final = events[-1].response
    assert [o.type for o in final.output] == ["reasoning", "message"]
    assert final.output[0].id == rs_added.item.id
    assert final.output[0].content[0].text == "some thoughts"
    assert final.output_text == joined
    assert final.usage.output_tokens_details.reasoning_tokens == 2

    got = await client.responses.retrieve(final.id)
    assert [o.id for o in got.output] == [o.id for o in final.output]
    assert got.output[0].content[0].text == "some thoughts"
    assert got.output_text == joined


# ---------------------------------------------------------------- stored, chained, terminal states


async def test_stored_stream_is_retrievable_with_same_output(client, raw):
    events = await sdk_events(client, input="remember", metadata={"via": "stream"}, temperature=0.2)
    final = events[-1].response
    got = await client.responses.retrieve(final.id)
    assert got.model_dump() == final.model_dump()
    items = [it async for it in client.responses.input_items.list(final.id)]
    assert [it.content[0].text for it in items] == ["remember"]

    # byte for byte: the stored object is the terminal event's response
    sse = await post_sse(raw, {"input": "[[reasoning=a b c]] again", "metadata": {"via": "raw"}})
    terminal = sse[-1][1]["response"]
    stored = (await raw.get(f"/v1/responses/{terminal['id']}")).json()
    assert stored == terminal
    assert [o["type"] for o in stored["output"]] == ["reasoning", "message"]
    # and every output item equals its `response.output_item.done`
    done = [data["item"] for name, data in sse if name == "response.output_item.done"]
    assert done == stored["output"]


async def test_stream_store_false_is_not_retrievable(client):
    events = await sdk_events(client, input="forget", store=False)
    final = events[-1].response
    assert events[-1].type == "response.completed" and final.store is False
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve(final.id)


async def test_stream_chained_with_previous_response_id(client, mock):
    r1 = await client.responses.create(model=MODEL, input="first", instructions="Be nice.")
    events = await sdk_events(client, input="second", previous_response_id=r1.id)
    final = events[-1].response
    assert final.previous_response_id == r1.id
    assert final.instructions is None
    assert final.output_text == "[3 messages] Echo: second"
    assert [m["role"] for m in mock.requests[-1]["messages"]] == ["user", "assistant", "user"]
    r3 = await client.responses.create(model=MODEL, input="third", previous_response_id=final.id)
    assert r3.output_text == "[5 messages] Echo: third"


async def test_stream_on_conversation(client, mock):
    conv = await client.conversations.create()
    events = await sdk_events(client, input="one", conversation=conv.id)
    assert events[-1].response.conversation.id == conv.id
    events = await sdk_events(client, input="two", conversation={"id": conv.id})
    final = events[-1].response
    assert final.output_text == "[3 messages] Echo: two"
    items = [it async for it in client.conversations.items.list(conv.id, order="asc")]
    assert len(items) == 4 and items[-1].id == final.output[0].id


async def test_stream_incomplete(client, mock):
    events = await sdk_events(client, input="[[words=40]] go", max_output_tokens=16)
    assert mock.requests[-1]["max_tokens"] == 16
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert [e.type for e in events] == text_events(len(deltas), terminal="response.incomplete")
    final = events[-1].response
    assert final.status == "incomplete"
    assert final.incomplete_details.reason == "max_output_tokens"
    assert final.output[0].status == "incomplete"
    joined = "".join(d.delta for d in deltas)
    assert final.output_text == joined and len(joined.split()) == 16
    got = await client.responses.retrieve(final.id)
    assert got.status == "incomplete" and got.output_text == joined


async def test_stream_upstream_failure_ends_with_failed(client):
    events = await sdk_events(client, input="[[fail=500]] kaboom")
    assert [e.type for e in events] == ["response.created", "response.in_progress", "response.failed"]
    assert [e.sequence_number for e in events] == [0, 1, 2]
    failed = events[-1].response
    assert failed.id == events[0].response.id
    assert failed.status == "failed"
    assert failed.error is not None and failed.error.code == "server_error"
    assert "500" in failed.error.message
    got = await client.responses.retrieve(failed.id)
    assert got.status == "failed" and got.error.code == failed.error.code

    # the helper has no `response.completed` to return
    async with client.responses.stream(model=MODEL, input="[[fail=502]] again") as stream:
        seen = [ev.type async for ev in stream]
        assert seen[-1] == "response.failed"
        with pytest.raises(RuntimeError):
            await stream.get_final_response()


async def test_stream_sends_instructions_and_params_upstream(client, mock):
    events = await sdk_events(client, input="hi", instructions="Be terse.", temperature=0.4, top_p=0.5,
                              max_output_tokens=64, user="u-1")
    body = mock.requests[-1]
    assert body["messages"] == [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "hi"}]
    assert (body["temperature"], body["top_p"], body["max_tokens"], body["user"]) == (0.4, 0.5, 64, "u-1")
    assert body["stream"] is True
    final = events[-1].response
    assert final.output_text == "[2 messages] Echo: hi"
    assert final.instructions == "Be terse." and final.temperature == 0.4 and final.max_output_tokens == 64
    # created already echoes the request's settings
    created = events[0].response
    assert created.instructions == "Be terse." and created.temperature == 0.4 and created.usage is None


async def test_stream_helper_with_text_format(client, mock):
    from pydantic import BaseModel

    class City(BaseModel):
        city: str
        population: int

    async with client.responses.stream(model=MODEL, input="a city", text_format=City) as stream:
        final = await stream.get_final_response()
    assert mock.requests[-1]["response_format"]["type"] == "json_schema"
    assert final.output_parsed == City(city="city", population=1)


@pytest.mark.parametrize("directive", ["[[cut]]", "[[malformed]]"])
async def test_stream_broken_upstream_mid_stream_ends_with_failed(raw, client, directive):
    events = await post_sse(raw, {"input": f"[[words=20]] {directive} go"})
    parsed = check_raw_events(events)
    types = [p.type for p in parsed]
    assert types[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert "response.output_text.delta" in types
    assert types[-1] == "response.failed"
    assert "response.completed" not in types and "response.output_item.done" not in types
    failed = parsed[-1].response
    assert failed.status == "failed" and failed.error.code == "server_error"
    got = await client.responses.retrieve(failed.id)
    assert got.status == "failed" and got.error.message == failed.error.message
