"""Function tools, the tool loop, structured outputs, reasoning, logprobs, truncation and the
pass-through fields, through the official SDK against the mock upstream (SQLite and PostgreSQL);
the tool loop and `responses.parse` also with the embedded model, for real."""

from __future__ import annotations

import json

import openai
import orjson
import pytest
from pydantic import BaseModel

from branchwise.settings import Settings

from .helpers import new_conversation, serving, sse_events

WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                   "additionalProperties": False},
    "strict": True,
}


async def test_tool_loop_with_previous_response_id(client, mock):
    r = await client.responses.create(model="m", input="Weather in Paris?", tools=[WEATHER], tool_choice="required")
    assert r.status == "completed"
    [call] = [o for o in r.output if o.type == "function_call"]
    assert call.name == "get_weather" and call.status == "completed"
    assert call.id.startswith("fc_") and call.call_id
    assert json.loads(call.arguments) == {"city": "x"}
    upstream = mock.requests[-1]
    assert upstream["tools"] == [{"type": "function", "function": {
        "name": "get_weather", "description": "The weather in a city", "parameters": WEATHER["parameters"],
        "strict": True}}]
    assert upstream["tool_choice"] == "required"
    final = await client.responses.create(
        model="m", previous_response_id=r.id, tools=[WEATHER],
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 21C"}])
    assert final.output_text == "[3 messages] Tool result: sunny, 21C"
    msgs = mock.requests[-1]["messages"]
    assert msgs[1] == {"role": "assistant", "content": None, "tool_calls": [
        {"id": call.call_id, "type": "function", "function": {"name": "get_weather", "arguments": call.arguments}}]}
    assert msgs[2] == {"role": "tool", "tool_call_id": call.call_id, "content": "sunny, 21C"}


async def test_tool_loop_streaming_with_conversation(client, raw, mock):
    conv = await client.conversations.create()
    body = {"model": "m", "conversation": conv.id, "input": "Weather?", "tools": [WEATHER],
            "tool_choice": {"type": "function", "name": "get_weather"}, "stream": True}
    r = await raw.post("/v1/responses", json=body)
    assert r.status_code == 200, r.text
    events = sse_events(r.text)  # each validated as the SDK's event types
    kinds = [e["type"] for e in events]
    assert kinds[:3] == ["response.created", "response.in_progress", "response.output_item.added"]
    assert events[2]["item"]["type"] == "function_call" and events[2]["item"]["arguments"] == ""
    deltas = [e["delta"] for e in events if e["type"] == "response.function_call_arguments.delta"]
    done = next(e for e in events if e["type"] == "response.function_call_arguments.done")
    assert "".join(deltas) == done["arguments"] and json.loads(done["arguments"]) == {"city": "x"}
    assert kinds[-2:] == ["response.output_item.done", "response.completed"]
    call = events[-1]["response"]["output"][0]
    assert mock.requests[-1]["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    # the SDK's stream helper drives the second half of the loop
    async with client.responses.stream(
        model="m", conversation=conv.id, tools=[WEATHER],
        input=[{"type": "function_call_output", "call_id": call["call_id"], "output": "rain"}],
    ) as stream:
        final = await stream.get_final_response()
    assert final.output_text == "[3 messages] Tool result: rain"
    items = [it async for it in client.conversations.items.list(conv.id, order="asc")]
    assert [it.type for it in items] == ["message", "function_call", "function_call_output", "message"]


async def test_parallel_calls_reach_the_upstream_as_one_assistant_turn(client, mock):
    calls = [{"type": "function_call", "call_id": f"call_{i}", "name": "get_weather",
              "arguments": json.dumps({"city": c})} for i, c in enumerate(("Paris", "Rome"))]
    outputs = [{"type": "function_call_output", "call_id": f"call_{i}", "output": o}
               for i, o in enumerate(("sun", "rain"))]
    await client.responses.create(model="m", tools=[WEATHER], input=[
        {"role": "user", "content": "Paris and Rome?"},
        {"role": "assistant", "content": "Let me check both."}, *calls, *outputs])
    msgs = mock.requests[-1]["messages"]
    assert [m["role"] for m in msgs] == ["user", "assistant", "tool", "tool"]
    assert msgs[1]["content"] == "Let me check both."
    assert [t["id"] for t in msgs[1]["tool_calls"]] == ["call_0", "call_1"]


async def test_an_output_for_a_call_never_made_is_refused(client, mock):
    """OpenAI's rule and wording: a function_call_output answers a call in the history or the
    input (the Open Responses suite fails a WebSocket continuation this way)."""
    r = await client.responses.create(model="m", input="hello")
    mock.clear()
    for kw in ({"previous_response_id": r.id}, {}):
        with pytest.raises(openai.BadRequestError) as e:
            await client.responses.create(model="m", **kw, input=[
                {"type": "function_call_output", "call_id": "call_nowhere", "output": "x"}])
        assert e.value.param == "input" and e.value.code is None
        assert e.value.body["message"] == "No tool call found for function call output with call_id call_nowhere."
    assert mock.requests == []
    # a call earlier in the same input, or in the history, is found (by its own id only)
    calls = [{"type": "function_call", "call_id": "call_here", "name": "get_weather", "arguments": "{}"}]
    first = await client.responses.create(model="m", tools=[WEATHER], input=[
        {"role": "user", "content": "call_here? \"call_other\""}, *calls,
        {"type": "function_call_output", "call_id": "call_here", "output": "ok"}])
    assert first.output_text == "[3 messages] Tool result: ok"
    with pytest.raises(openai.BadRequestError):
        await client.responses.create(model="m", previous_response_id=first.id, input=[
            {"type": "function_call_output", "call_id": "call_other", "output": "x"}])
    again = await client.responses.create(model="m", previous_response_id=first.id, input=[
        {"type": "function_call_output", "call_id": "call_here", "output": "twice"}])
    assert again.output_text == "[5 messages] Tool result: twice"


async def test_unanswered_call_is_refused_and_branching_gets_out(client, raw, mock):
    conv = await new_conversation(client, "Weather?")
    r = await client.responses.create(model="m", conversation=conv.id, input="please", tools=[WEATHER],
                                      tool_choice="required")
    call = r.output[0]
    mock.clear()
    before = [it.id async for it in client.conversations.items.list(conv.id)]
    with pytest.raises(openai.BadRequestError) as e:
        await client.responses.create(model="m", conversation=conv.id, input="never mind")
    assert e.value.code == "tool_output_missing" and e.value.param == "input"
    assert call.call_id in e.value.message
    with pytest.raises(openai.BadRequestError):
        await client.responses.create(model="m", previous_response_id=r.id, input="never mind")
    assert mock.requests == []
    assert [it.id async for it in client.conversations.items.list(conv.id)] == before
    # the branchwise way out: a fork before the call, or the head moved before it
    fork = await client.post(f"/conversations/{conv.id}/fork", body={"item_id": before[1]}, cast_to=object)
    ok = await client.responses.create(model="m", conversation=fork["id"], input="never mind")
    assert ok.status == "completed"
    await client.post(f"/conversations/{conv.id}/head", body={"item_id": before[1]}, cast_to=object)
    ok = await client.responses.create(model="m", conversation=conv.id, input="never mind")
    assert ok.output_text == "[3 messages] Echo: never mind"


async def test_tool_choice_variants_and_bad_values(client, raw, mock):
    r = await client.responses.create(model="m", input="[[tool=get_weather]] hi", tools=[WEATHER], tool_choice="none")
    assert [o.type for o in r.output] == ["message"]
    assert r.tool_choice == "none" and r.tools[0].name == "get_weather"
    mock.clear()
    bad = [
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tool_choice": "sometimes", "tools": [WEATHER]}, "tool_choice"),
        ({"tools": [{"type": "function"}]}, "tools[0].name"),
        ({"tools": [{**WEATHER, "parameters": "x"}]}, "tools[0].parameters"),
        ({"tools": [{"type": "file_search"}]}, "tools[0].type"),
        ({"reasoning": {"effort": "enormous"}}, "reasoning.effort"),
        ({"max_tool_calls": 0}, "max_tool_calls"),
        ({"truncation": "sometimes"}, "truncation"),
        ({"top_logprobs": 21}, "top_logprobs"),
        ({"service_tier": "gold"}, "service_tier"),
        ({"prompt_cache_key": 5}, "prompt_cache_key"),
    ]
    for extra, param in bad:
        resp = await raw.post("/v1/responses", json={"model": "m", "input": "x", **extra})
        assert resp.status_code == 400, (extra, resp.text)
        err = resp.json()["error"]
        assert err["type"] == "invalid_request_error" and err["param"] == param, (extra, err)
    assert mock.requests == []


async def test_structured_output_parse(client, mock):
    class City(BaseModel):
        name: str
        population: int

    r = await client.responses.parse(model="m", input="a city", text_format=City)
    assert isinstance(r.output_parsed, City)
    fmt = mock.requests[-1]["response_format"]
    assert fmt["type"] == "json_schema" and fmt["json_schema"]["name"] == "City" and fmt["json_schema"]["strict"]


async def test_reasoning_and_effort(client, mock):
    r = await client.responses.create(model="m", input="[[reasoning=step one then two]] think",
                                      reasoning={"effort": "low"})
    assert mock.requests[-1]["reasoning_effort"] == "low"
    assert [o.type for o in r.output] == ["reasoning", "message"]
    assert r.output[0].content[0].text == "step one then two"
    assert r.usage.output_tokens_details.reasoning_tokens == 4
    assert r.reasoning.effort == "low"


async def test_logprobs_pass_through(client, raw, mock):
    r = await client.responses.create(model="m", input="two words", top_logprobs=2,
                                      include=["message.output_text.logprobs"])
    assert mock.requests[-1]["logprobs"] is True and mock.requests[-1]["top_logprobs"] == 2
    part = r.output[0].content[0]
    assert "".join(lp.token for lp in part.logprobs) == part.text
    assert all(len(lp.top_logprobs) == 2 for lp in part.logprobs)
    stream = await client.responses.create(model="m", input="two words", top_logprobs=1, stream=True)
    deltas = [e async for e in stream if e.type == "response.output_text.delta"]
    assert all(len(d.logprobs) == 1 and d.logprobs[0].token == d.delta for d in deltas)


async def test_pass_through_fields(client, mock):
    r = await client.responses.create(model="m", input="x", prompt_cache_key="user-42", service_tier="flex",
                                      max_tool_calls=3, metadata={"k": "v"})
    up = mock.requests[-1]
    assert up["prompt_cache_key"] == "user-42" and up["service_tier"] == "flex"
    assert r.prompt_cache_key == "user-42" and r.service_tier == "flex" and r.max_tool_calls == 3
    assert r.metadata == {"k": "v"}


async def test_truncation_both_ways(db_url, mock):
    settings = Settings(database_url=db_url, upstream_base_url=mock.url, upstream_context_window=120)
    async with serving(settings) as (_, client, _):
        conv = await client.conversations.create(items=[
            {"role": "user", "content": f"old message number {i} " + "padding " * 10} for i in range(6)])
        before = [it.id async for it in client.conversations.items.list(conv.id)]
        with pytest.raises(openai.BadRequestError) as e:
            await client.responses.create(model="m", conversation=conv.id, input="new question")
        assert e.value.code == "context_length_exceeded" and e.value.param == "input"
        assert mock.requests == []
        assert [it.id async for it in client.conversations.items.list(conv.id)] == before
        r = await client.responses.create(model="m", conversation=conv.id, input="new question",
                                          truncation="auto", instructions="be brief")
        assert r.status == "completed" and r.truncation == "auto"
        msgs = mock.requests[-1]["messages"]
        assert msgs[0] == {"role": "system", "content": "be brief"}  # instructions are kept
        assert msgs[-1]["content"] == "new question"  # the new input is kept
        assert 2 < len(msgs) < 8  # the oldest history was dropped
        kept = [m["content"] for m in msgs[1:-1]]
        assert kept == [f"old message number {i} " + "padding " * 10 for i in range(6 - len(kept), 6)]
        assert len(orjson.dumps(msgs)) / 4 <= 120
        # the conversation itself keeps everything
        assert len([it async for it in client.conversations.items.list(conv.id)]) == 8


# ------------------------------------------------------------------ the embedded model, for real


@pytest.fixture
async def embedded(tmp_path):
    async with serving(Settings(database_url=f"sqlite:///{tmp_path / 'e.db'}")) as (_, client, _):
        yield client


@pytest.mark.embedded
@pytest.mark.parametrize("stream", [False, True])
async def test_embedded_tool_loop(embedded, stream):
    kwargs = {"model": "gpt-4.1-mini", "tools": [WEATHER], "max_output_tokens": 48, "temperature": 0}
    if stream:
        async with embedded.responses.stream(input="What is the weather in Paris?", tool_choice="required",
                                             **kwargs) as s:
            first = await s.get_final_response()
    else:
        first = await embedded.responses.create(input="What is the weather in Paris?", tool_choice="required",
                                                **kwargs)
    [call] = [o for o in first.output if o.type == "function_call"]
    assert call.name == "get_weather" and isinstance(json.loads(call.arguments)["city"], str)
    # SmolLM2-135M cannot tell by itself when to stop calling tools: the loop asks for the answer
    follow = {"previous_response_id": first.id, "tool_choice": "none",
              "input": [{"type": "function_call_output", "call_id": call.call_id, "output": "Sunny, 21 C"}]}
    if stream:
        events = [e async for e in await embedded.responses.create(stream=True, **follow, **kwargs)]
        final = events[-1].response
        assert events[-1].type in ("response.completed", "response.incomplete")
    else:
        final = await embedded.responses.create(**follow, **kwargs)
    assert final.status in ("completed", "incomplete") and final.output_text.strip()
    assert [o.type for o in final.output] == ["message"]


@pytest.mark.embedded
async def test_embedded_parse(embedded):
    class City(BaseModel):
        city: str

    r = await embedded.responses.parse(model="gpt-4.1-mini", input="Name a city in France as JSON.",
                                       text_format=City, max_output_tokens=32, temperature=0)
    assert r.status == "completed"
    assert isinstance(r.output_parsed, City) and r.output_parsed.city
